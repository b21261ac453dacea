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

import jax
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


def needs_old_logps(cfg) -> bool:
  """One pass of one step over each rollout (TRL's num_iterations=1): the policy that sampled is the one being
  updated, so its log-probs come from the step's own forward (stop-gradient) and the scoring pass skips them."""
  rows = cfg.rollout.num_prompts * cfg.rollout.num_generations
  return not (cfg.rollout.epochs == 1 and rows == cfg.train.global_batch_size)


def batch_axes(cfg) -> dict:
  keys = ["advantages", "sampler_logps"] + (["old_logps"] if needs_old_logps(cfg) else [])
  keys += ["ref_logps"] if needs_reference(cfg) else []
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
  rows.update(weight=weight, advantages=np.where(mask, adv[:, None], 0.0).astype(np.float32),
              sampler_logps=ro["sampler_logps"])
  if needs_old_logps(cfg):
    rows["old_logps"] = ro["logps"]
  if needs_reference(cfg):
    rows["ref_logps"] = ro["ref_logps"]
  metrics.update(advantages_mean=float(adv.mean()), advantages_std=float(adv.std()))
  return rows, metrics


def make_loss(cfg, model_cfg):
  g, T = cfg.grpo, cfg.rollout.temperature
  group = pg.prompt_group(cfg, model_cfg)

  def loss_fn(params, batch, rng):
    policy, _ = pg.policy_and_critic(params)
    logp = pg.token_logps(policy, batch, model_cfg, T, rng=rng, window=cfg.rollout.max_new_tokens, group=group)
    mask = pg.row_mask(batch)
    old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
    tis = None
    if g.tis_cap:  # truncated importance sampling: the trainer's old policy over the sampler's, capped
      tis = jnp.minimum(jnp.exp(old - batch["sampler_logps"]), g.tis_cap)
    per_tok, ratio, clipped, kl = token_loss(
        logp, old, batch["advantages"], batch.get("ref_logps"), eps_low=g.epsilon_low,
        eps_high=g.epsilon_high, beta=g.beta, kl_estimator=g.kl_estimator, tis_weight=tis)
    loss, weight = aggregate(per_tok, mask, g.loss_agg, cfg.rollout.max_new_tokens)
    parts = {"ppo_ratio": ratio, "ppo_ratio_clamped": clipped, "kl": kl,
             "logprob_diff": jnp.abs(jax.lax.stop_gradient(old) - batch["sampler_logps"])}  # trainer vs sampler
    if "ref_logps" in batch:  # k1 and k3 always, whichever estimator the loss uses
      parts.update(init_policy_kl=pg.kl_penalty(logp, batch["ref_logps"], "k1"),
                   init_policy_kl_k3=pg.kl_penalty(logp, batch["ref_logps"], "k3"))
    return loss, weight, {"loss": loss, **pg.token_sums(mask, **jax.lax.stop_gradient(parts))}

  return loss_fn


finalize = pg.finalize
