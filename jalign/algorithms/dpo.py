"""The DPO family as pure losses over sequence log-probs (one value per sequence, summed or token-averaged).

``preference_losses`` covers NeMo-Aligner's ``preference_loss`` options (``dpo``, ``ipo``, ``rpo_sq``,
``rpo_bwd_kl``, ``rpo_fwd_kl``), label-smoothed DPO (cDPO, ``label_smoothing``), ``hinge``, ``simpo``
(reference-free; pass token-averaged log-probs) and ``orpo`` (odds ratio; pass token-averaged log-probs and add
the NLL term yourself). The implicit rewards it returns are the *unscaled* log-ratios rho = log pi - log pi_ref,
as NeMo-Aligner logs them (multiply by beta for TRL's convention).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import common
from jalign.data import preference

LOSS_TYPES = ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "hinge", "simpo", "orpo")


def _bernoulli_kl(log_a, log_1ma, log_b, log_1mb):
  """KL(Bern(a) || Bern(b)) from log-probabilities."""
  return jnp.exp(log_a) * (log_a - log_b) + jnp.exp(log_1ma) * (log_1ma - log_1mb)


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
  return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def preference_losses(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                      loss_type: str = "dpo", beta: float = 0.2, label_smoothing: float = 0.0,
                      chosen_rewards=None, rejected_rewards=None, gt_reward_scale: float = 1.0,
                      simpo_gamma: float = 0.5):
  """Per-pair losses [B] and the implicit rewards (rho_chosen, rho_rejected), each [B].

  ``chosen_rewards``/``rejected_rewards`` are the data's ground-truth rewards (RPO variants only).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r}: choose from {LOSS_TYPES}")
  if loss_type in ("simpo", "orpo"):
    rho_c, rho_r = chosen_logps, rejected_logps
  else:
    rho_c, rho_r = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
  delta = rho_c - rho_r
  if loss_type == "dpo":
    z = beta * delta
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  elif loss_type == "ipo":
    loss = (delta - 1 / (2 * beta)) ** 2
  elif loss_type == "hinge":
    loss = jax.nn.relu(1 - beta * delta)
  elif loss_type == "simpo":
    z = beta * (delta - simpo_gamma / beta)
    loss = -(1 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  elif loss_type == "orpo":
    log_odds = delta - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    loss = -beta * jax.nn.log_sigmoid(log_odds)
  else:
    if chosen_rewards is None or rejected_rewards is None:
      raise ValueError(f"loss_type={loss_type!r} needs chosen_reward/rejected_reward in the data")
    gt = gt_reward_scale * (chosen_rewards - rejected_rewards)
    z = beta * delta
    if loss_type == "rpo_sq":
      loss = (z - gt) ** 2
    elif loss_type == "rpo_bwd_kl":  # KL(Bern(sigmoid(gt)) || Bern(sigmoid(z)))
      loss = _bernoulli_kl(jax.nn.log_sigmoid(gt), jax.nn.log_sigmoid(-gt), jax.nn.log_sigmoid(z),
                           jax.nn.log_sigmoid(-z))
    else:  # rpo_fwd_kl: KL(Bern(sigmoid(z)) || Bern(sigmoid(gt)))
      loss = _bernoulli_kl(jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z), jax.nn.log_sigmoid(gt),
                           jax.nn.log_sigmoid(-gt))
  return loss, (rho_c, rho_r)


# ------------------------------------------------------------------------------------------ algorithm API

AVERAGED = ("simpo", "orpo")  # defined on token-averaged log-probs; always averaged
REFERENCE_FREE = ("simpo", "orpo")


def batch_axes(cfg) -> dict:
  keys = ["tokens", "loss_mask", "segment_ids", "chosen_reward", "rejected_reward"]
  if common.reference_mode(cfg) == "precomputed" and cfg.dpo.loss not in REFERENCE_FREE:
    keys.append("ref_logps")
  return common.batch_axes(cfg, keys)


WINDOWED = True  # make_loss takes the response window of padded pair rows


def load_data(path, tok, cfg):
  pairs, skipped = preference.load_pairs(path, tok, cfg.data, cfg.tokenizer.chat_template)
  values = {"chosen_reward": np.array([p.chosen_reward for p in pairs], np.float32),
            "rejected_reward": np.array([p.rejected_reward for p in pairs], np.float32)}
  rows = preference.pair_rows([(p.chosen, p.rejected) for p in pairs], values, cfg.data, tok.pad_id)
  return rows, len(pairs), skipped, [p.chosen for p in pairs]


def make_loss(cfg, model_cfg, window: int = 0):
  """``window``: the LM-head window of padded pair rows (``common.response_window``); 0: every position."""
  d = cfg.dpo
  mode = common.reference_mode(cfg)

  def loss_fn(params, batch, rng):
    logp, n = common.pair_logps(common.policy_params(params), batch, model_cfg, rng, window)  # [..., 2]
    n = jnp.maximum(n, 1.0)
    w = common.pair_weights(batch)
    ref = None if d.loss in REFERENCE_FREE else common.reference_logps(params, batch, model_cfg, mode, window)
    if d.preference_average_log_probs or d.loss in AVERAGED:
      pol, ref = logp / n, (None if ref is None else ref / n)
    else:
      pol = logp
    losses, (rho_c, rho_r) = preference_losses(
        pol[..., 0], pol[..., 1], None if ref is None else ref[..., 0], None if ref is None else ref[..., 1],
        loss_type=d.loss, beta=d.beta, label_smoothing=d.label_smoothing, chosen_rewards=batch["chosen_reward"],
        rejected_rewards=batch["rejected_reward"], gt_reward_scale=d.gt_reward_scale, simpo_gamma=d.simpo_gamma)
    sft = -(logp[..., 0] / n[..., 0] if d.sft_average_log_probs else logp[..., 0])
    total = d.preference_loss_weight * losses + d.sft_loss_weight * sft
    loss = jnp.sum(w * total)
    return loss, jnp.sum(w), {"loss": loss, "preference_loss": jnp.sum(w * losses), "sft_loss": jnp.sum(w * sft),
                              **common.reward_sums(rho_c, rho_r, w)}

  return loss_fn


finalize = common.finalize
