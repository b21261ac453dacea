"""GRPO: G samples per prompt, advantages normalised within each group, a clipped surrogate per token.

A_i = r_i - mean(group) divided by the group's std + 1e-4 (``scale_rewards=group``, TRL's default), the batch's
(``batch``) or nothing (``none``, Dr.GRPO). Per token: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) with
rho = exp(log pi - log pi_old), plus ``beta`` x KL to the reference as a loss term (k2 by default, k3 selectable).
Aggregation over the *global* batch, so no mode depends on the micro-batch split: ``token_mean`` (sum over all
tokens / number of tokens: TRL's dapo/bnpo), ``sequence_mean`` (each sequence's token mean, averaged: the
original GRPO) or ``dr_grpo`` (sum / (sequences x max_new_tokens)). Options: truncated completions masked out
(``mask_truncated``), DAPO's soft overlong penalty, truncated importance sampling against the sampler's
log-probs (``tis_cap``); dynamic sampling (dropping groups whose rewards are all equal) lives in the source.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jalign.algorithms import pg

AGGREGATIONS = ("token_mean", "sequence_mean", "dr_grpo")
SCALES = ("group", "batch", "none")
GROUPED = True  # training rows come in groups of rollout.num_generations (kept whole per micro-batch)


def aggregate(x_NT, mask_NT, mode: str, max_new: int):
  """(sum, weight) of a per-token loss under ``mode``; the trainer divides the global sum by the global weight."""
  valid_N = jnp.any(mask_NT, axis=1).astype(jnp.float32)
  if mode == "token_mean":
    return pg.masked_sum(x_NT, mask_NT), jnp.sum(mask_NT).astype(jnp.float32)
  if mode == "sequence_mean":
    per_seq = pg.masked_sum(x_NT, mask_NT, axis=1) / jnp.maximum(jnp.sum(mask_NT, axis=1), 1)
    return jnp.sum(per_seq), jnp.sum(valid_N)
  if mode == "dr_grpo":
    return pg.masked_sum(x_NT, mask_NT), jnp.sum(valid_N) * max_new
  raise ValueError(f"grpo.loss_agg={mode!r}: choose from {AGGREGATIONS}")


def token_loss(logp, old_logp, adv, ref_logp, *, eps_low, eps_high, beta, kl_estimator, tis_weight=None):
  """Per-token GRPO loss and its parts (surrogate, ratio, clipped indicator, KL)."""
  surr, ratio, clipped = pg.clipped_surrogate(logp, old_logp, adv, eps_low, eps_high)
  if tis_weight is not None:
    surr = surr * tis_weight
  kl = pg.kl_penalty(logp, ref_logp, kl_estimator) if ref_logp is not None else jnp.zeros_like(logp)
  return surr + beta * kl, ratio, clipped, kl


# ------------------------------------------------------------------------------------------ algorithm API

def needs_reference(cfg) -> bool:
  return cfg.grpo.beta > 0


def batch_axes(cfg) -> dict:
  keys = ["old_logps", "advantages"] + (["ref_logps"] if needs_reference(cfg) else [])
  keys += ["sampler_logps"] if cfg.grpo.tis_cap else []
  return {**pg.ROLLOUT_AXES, **{k: pg.TOKEN_AXES for k in keys}}


def prepare(ro: dict, cfg, ctl: dict) -> tuple[dict, dict]:
  """Scored rollout -> training rows and rollout metrics (host side). ``ro`` holds numpy arrays."""
  g, G = cfg.grpo, cfg.rollout.num_generations
  rewards = ro["rewards"].astype(np.float64)
  metrics = {}
  if g.overlong_buffer:  # DAPO: a linear penalty over the last ``overlong_buffer`` tokens before the cap
    start = cfg.rollout.max_new_tokens - g.overlong_buffer
    pen = g.overlong_penalty * np.clip((ro["lengths"] - start) / g.overlong_buffer, 0.0, 1.0)
    rewards = rewards - pen
    metrics["overlong_penalty"] = float(pen.mean())
  adv = pg.group_advantages(rewards, G, g.scale_rewards, batch_std=ctl.get("batch_std"))
  weight = np.ones(len(rewards), np.float32)
  if g.mask_truncated:
    weight = ro["finished"].astype(np.float32)
  mask = ro["loss_mask"][:, 1:]
  rows = {k: ro[k] for k in pg.ROLLOUT_AXES if k != "weight"}
  rows.update(weight=weight, old_logps=ro["logps"], advantages=np.where(mask, adv[:, None], 0.0).astype(np.float32))
  if needs_reference(cfg):
    rows["ref_logps"] = ro["ref_logps"]
  if g.tis_cap:
    rows["sampler_logps"] = ro["sampler_logps"]
  metrics.update(advantages_mean=float(adv.mean()), advantages_std=float(adv.std()))
  return rows, metrics


def make_loss(cfg, model_cfg):
  g, T = cfg.grpo, cfg.rollout.temperature

  def loss_fn(params, batch, rng):
    policy, _ = pg.policy_and_critic(params)
    logp = pg.token_logps(policy, batch, model_cfg, T, rng=rng)
    mask = pg.row_mask(batch)
    tis = None
    if g.tis_cap:  # truncated importance sampling: the trainer's old policy over the sampler's, capped
      tis = jnp.minimum(jnp.exp(batch["old_logps"] - batch["sampler_logps"]), g.tis_cap)
    per_tok, ratio, clipped, kl = token_loss(
        logp, batch["old_logps"], batch["advantages"], batch.get("ref_logps"), eps_low=g.epsilon_low,
        eps_high=g.epsilon_high, beta=g.beta, kl_estimator=g.kl_estimator, tis_weight=tis)
    loss, weight = aggregate(per_tok, mask, g.loss_agg, cfg.rollout.max_new_tokens)
    return loss, weight, {"loss": loss, **pg.token_sums(mask, ppo_ratio=ratio, ppo_ratio_clamped=clipped, kl=kl)}

  return loss_fn


finalize = pg.finalize
