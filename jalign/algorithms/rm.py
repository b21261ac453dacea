"""Reward-model losses, pure functions over rewards (the value head read at each sequence's last real token).

- ``bradley_terry``: ``-log sigmoid(r_c - r_r - margin)`` per pair, with TRL's optional reward-centering term
  ``coef * mean((r_c + r_r)^2)``;
- ``regression``: SteerLM/HelpSteer2 multi-attribute masked MSE (labels equal to ``-100`` are missing);
- ``helpsteer_bt``: the HelpSteer2-Preference variants ``regular_bt``, ``margin_bt``, ``scaled_bt`` driven by a
  preference strength l in -3..3 (l < 0: the first response is preferred).
Metric names follow NeMo-Aligner (``acc``, ``rewards_chosen_mean``, ...).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MISSING = -100
HELPSTEER_VARIANTS = ("regular_bt", "margin_bt", "scaled_bt")


def reward_metrics(r_chosen, r_rejected) -> dict:
  all_r = jnp.concatenate([r_chosen, r_rejected])
  return {"acc": jnp.mean(r_chosen > r_rejected), "rewards_chosen_mean": jnp.mean(r_chosen),
          "rewards_rejected_mean": jnp.mean(r_rejected), "rewards_all_mean": jnp.mean(all_r),
          "rewards_all_std": jnp.std(all_r)}


def bradley_terry(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
  """Mean pairwise loss and metrics."""
  diff = r_chosen - r_rejected - (0.0 if margin is None else margin)
  loss = -jnp.mean(jax.nn.log_sigmoid(diff))
  if center_coef:
    loss = loss + center_coef * jnp.mean((r_chosen + r_rejected) ** 2)
  return loss, reward_metrics(r_chosen, r_rejected)


def regression(pred_BA, labels_BA):
  """Masked MSE over the attributes present (label != -100); 0 when none is."""
  present = labels_BA != MISSING
  sq = jnp.where(present, (pred_BA - labels_BA) ** 2, 0.0)
  return jnp.sum(sq) / jnp.maximum(jnp.sum(present), 1)


def helpsteer_bt(r_first, r_second, strength, variant: str = "scaled_bt"):
  """HelpSteer2-Preference pairs: ``strength`` < 0 prefers the first response, >= 0 the second."""
  if variant not in HELPSTEER_VARIANTS:
    raise ValueError(f"variant={variant!r}: choose from {HELPSTEER_VARIANTS}")
  first_wins = strength < 0
  r_c = jnp.where(first_wins, r_first, r_second)
  r_r = jnp.where(first_wins, r_second, r_first)
  mag = jnp.abs(strength)
  if variant == "regular_bt":
    per_pair = -jax.nn.log_sigmoid(r_c - r_r)
  elif variant == "margin_bt":
    per_pair = -jax.nn.log_sigmoid(r_c - r_r - mag)
  else:
    per_pair = -mag * jax.nn.log_sigmoid(r_c - r_r)
  return jnp.mean(per_pair), reward_metrics(r_c, r_r)
