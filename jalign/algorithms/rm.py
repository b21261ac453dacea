"""Reward models: the value head read at each sequence's last real token, trained with

- ``bradley_terry``: ``-log sigmoid(r_c - r_r - margin)`` per pair (``margin`` from the data, 0 if absent), plus
  TRL's optional reward-centering term ``center_coef * (r_c + r_r)^2``;
- ``regression``: SteerLM/HelpSteer2 multi-attribute masked MSE (labels equal to ``-100`` are missing), averaged
  over the present labels of the global batch;
- ``regular_bt`` / ``margin_bt`` / ``scaled_bt``: the HelpSteer2-Preference variants on pairs of consecutive
  regression lines, driven by the preference strength l in -3..3 (l < 0: the first response is preferred),
  reading attribute ``rm.reward_index`` of the head.
Metric names follow NeMo-Aligner (``acc``, ``rewards_chosen_mean``, ...).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import common
from jalign.data import preference
from jalign.models import transformer

MISSING = -100
HELPSTEER_VARIANTS = ("regular_bt", "margin_bt", "scaled_bt")
LOSSES = ("bradley_terry", "regression") + HELPSTEER_VARIANTS
FROZEN = ("lm_head",)  # the LM head is not used by a reward model


def bradley_terry(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
  """Per-pair losses [B]."""
  loss = -jax.nn.log_sigmoid(r_chosen - r_rejected - (0.0 if margin is None else margin))
  if center_coef:
    loss = loss + center_coef * (r_chosen + r_rejected) ** 2
  return loss


def regression_sums(pred_BA, labels_BA, valid_B=None):
  """(sum of squared errors, number of labels) over the attributes present (label != -100) of valid rows
  (packed rows: [B, P, A] predictions and labels, [B, P] validity)."""
  present = labels_BA != MISSING
  if valid_B is not None:
    present = present & valid_B[..., None]
  return jnp.sum(jnp.where(present, (pred_BA - labels_BA) ** 2, 0.0)), jnp.sum(present).astype(jnp.float32)


def regression(pred_BA, labels_BA):
  """Masked MSE over the attributes present (label != -100); 0 when none is."""
  sq, n = regression_sums(pred_BA, labels_BA)
  return sq / jnp.maximum(n, 1)


def helpsteer_bt(r_first, r_second, strength, variant: str = "scaled_bt"):
  """Per-pair losses [B] and the (chosen, rejected) rewards the strength implies."""
  if variant not in HELPSTEER_VARIANTS:
    raise ValueError(f"variant={variant!r}: choose from {HELPSTEER_VARIANTS}")
  first_wins = strength < 0
  r_c = jnp.where(first_wins, r_first, r_second)
  r_r = jnp.where(first_wins, r_second, r_first)
  mag = jnp.abs(strength)
  if variant == "regular_bt":
    loss = -jax.nn.log_sigmoid(r_c - r_r)
  elif variant == "margin_bt":
    loss = -jax.nn.log_sigmoid(r_c - r_r - mag)
  else:
    loss = -mag * jax.nn.log_sigmoid(r_c - r_r)
  return loss, r_c, r_r


# ------------------------------------------------------------------------------------------ model side

def last_token_values(params, tokens_BT, segment_ids_BT, model_cfg, rng=None):
  """Value head at each sequence's last real token: [B, N] float32."""
  B, T = tokens_BT.shape
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  h_BTD = transformer.hidden_states(params, tokens_BT, model_cfg, positions_BT=pos, segment_ids_BT=segment_ids_BT,
                                    dropout_rng=rng)
  last_B = jnp.maximum(jnp.sum(segment_ids_BT > 0, axis=-1) - 1, 0)
  h_B1D = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)
  return transformer.values_from_hidden(params, h_B1D)[:, 0]


def row_values(params, batch, model_cfg, n_seq: int, rng=None):
  """Value head at the last token of each of the ``n_seq`` sequence slots of packed or shared-prompt rows:
  [B, n_seq, A] float32."""
  h_BLD = common.row_hidden(params, batch, model_cfg, rng)
  last_BS = common.last_positions(common.sequence_index(batch), n_seq)
  h_BSD = jnp.take_along_axis(h_BLD, last_BS[..., None], axis=1)
  return transformer.values_from_hidden(params, h_BSD)


def pair_rewards(params, batch, model_cfg, index: int, rng=None):
  """(r_chosen [B], r_rejected [B]) from one forward over the 2B sequences (rows: [B, P] each)."""
  if "pair_valid" in batch:
    B, P = batch["pair_valid"].shape
    v = row_values(params, batch, model_cfg, 2 * P, rng)[..., index].reshape(B, P, 2)
    return v[..., 0], v[..., 1]
  flat = common.flat_pairs(batch)
  v = last_token_values(params, flat["tokens"], flat["segment_ids"], model_cfg, rng)[:, index]
  v = v.reshape(-1, 2)
  return v[:, 0], v[:, 1]


# ------------------------------------------------------------------------------------------ algorithm API

def model_overrides(cfg) -> dict:
  return {"num_value_heads": cfg.rm.num_attributes}


def batch_axes(cfg) -> dict:
  if cfg.rm.loss != "regression":
    return common.batch_axes(cfg, ("tokens", "loss_mask", "segment_ids", "margin"))
  if common.packed(cfg):
    return common.batch_axes(cfg, ("tokens", "loss_mask", "segment_ids", "labels"))
  return {"tokens": ("batch", "length"), "segment_ids": ("batch", "length"), "labels": ("batch", None)}


def load_data(path, tok, cfg):
  """Rows for the configured loss: regression rows, HelpSteer pairs, or preference pairs (any format)."""
  d, r = cfg.data, cfg.rm
  if r.loss == "regression":
    items, skipped = preference.load_regression(path, tok, d, r.num_attributes, tuple(r.label_range),
                                                cfg.tokenizer.chat_template)
    rows = preference.pair_rows([(e,) for e, _ in items], {"labels": np.stack([lab for _, lab in items])}, d,
                                tok.pad_id)
    return rows, len(items), skipped, []
  if r.loss in HELPSTEER_VARIANTS:
    pairs, skipped = preference.load_helpsteer_pairs(path, tok, d, r.num_attributes, cfg.tokenizer.chat_template)
  else:
    pairs, skipped = preference.load_pairs(path, tok, d, cfg.tokenizer.chat_template)
  rows = preference.pair_rows([(p.chosen, p.rejected) for p in pairs],
                              {"margin": np.array([p.margin for p in pairs], np.float32)}, d, tok.pad_id,
                              share_trained=True)
  return rows, len(pairs), skipped, []


def make_loss(cfg, model_cfg):
  r = cfg.rm

  def loss_fn(params, batch, rng):
    if r.loss == "regression":
      if "pair_valid" in batch:  # packed rows: [B, P, A]
        pred, valid = row_values(params, batch, model_cfg, batch["pair_valid"].shape[1], rng), batch["pair_valid"]
      else:
        pred = last_token_values(params, batch["tokens"], batch["segment_ids"], model_cfg, rng)
        valid = jnp.any(batch["segment_ids"] > 0, axis=-1)
      sq, n = regression_sums(pred, batch["labels"], valid)
      return sq, n, {"loss": sq}
    r_a, r_b = pair_rewards(params, batch, model_cfg, r.reward_index, rng)
    w = common.pair_weights(batch)
    if r.loss == "bradley_terry":
      per_pair, r_c, r_r = bradley_terry(r_a, r_b, batch["margin"], r.center_coef), r_a, r_b
    else:
      per_pair, r_c, r_r = helpsteer_bt(r_a, r_b, batch["margin"], r.loss)
    loss = jnp.sum(w * per_pair)
    return loss, jnp.sum(w), {"loss": loss, **common.reward_sums(r_c, r_r, w)}

  return loss_fn


finalize = common.finalize
