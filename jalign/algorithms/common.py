"""Pieces shared by the pairwise algorithms (reward models, DPO family, KTO): one forward over a [B, 2, T] batch
(chosen/rejected, or sample/KL-sample, interleaved as NeMo-Aligner does), the reference model's log-probs, and
reward statistics summed per pair so that the trainer can average them over the global batch.

With ``data.packing`` or ``data.shared_prompt`` the pairs come in rows instead (``preference.pack_pairs``):
[B, L] ``tokens``, ``loss_mask``, ``segment_ids``, ``positions`` (and ``branch_ids``), with the per-pair values
in P slots per row ([B, P] ``pair_valid``, rewards, ...; [B, P, 2] ``ref_logps``). The same functions then
return [B, P, 2] log-probs from one forward over the rows, and the losses, elementwise over pairs, are unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.models import lora, transformer

PAIR_AXES = {"tokens": ("batch", None, "length"), "loss_mask": ("batch", None, "length"),
             "segment_ids": ("batch", None, "length"), "margin": ("batch",), "chosen_reward": ("batch",),
             "rejected_reward": ("batch",), "desirable": ("batch",), "ref_logps": ("batch", None)}
ROW_AXES = {"tokens": ("batch", "length"), "loss_mask": ("batch", "length"), "segment_ids": ("batch", "length"),
            "positions": ("batch", "length"), "branch_ids": ("batch", "length"), "pair_valid": ("batch", None),
            "margin": ("batch", None), "chosen_reward": ("batch", None), "rejected_reward": ("batch", None),
            "desirable": ("batch", None), "labels": ("batch", None, None), "ref_logps": ("batch", None, None)}
REFERENCE_MODES = ("auto", "copy", "lora_off", "precomputed")


def packed(cfg) -> bool:
  """Pairs travel in rows (``data.packing``: several per row; ``data.shared_prompt``: the prompt once)."""
  return bool(cfg.data.packing or cfg.data.shared_prompt)


def batch_axes(cfg, keys) -> dict:
  """Logical axes of the batch ``keys`` in the configured layout; rows add their own keys."""
  if not packed(cfg):
    return {k: PAIR_AXES[k] for k in keys}
  extra = ("positions", "pair_valid") + (("branch_ids",) if cfg.data.shared_prompt else ())
  return {k: ROW_AXES[k] for k in (*keys, *extra)}


def flat_pairs(batch):
  """[B, 2, T] -> [2B, T] (c0, r0, c1, r1, ...) for tokens, loss_mask, segment_ids; plus positions."""
  B, _, T = batch["tokens"].shape
  flat = {k: batch[k].reshape(2 * B, T) for k in ("tokens", "loss_mask", "segment_ids")}
  flat["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2 * B, T))
  return flat


def target_mask(flat):
  """[N, T-1]: token t+1 is a response token of the same (unpacked) sequence."""
  return flat["loss_mask"][:, 1:] & (flat["segment_ids"][:, 1:] > 0)


def response_window(*row_sets, multiple: int = 16) -> int:
  """The LM-head window W for [N, 2, T] pair rows: the most positions any sequence's trained tokens span (from the
  position before its first trained token to the one before its last), rounded up to ``multiple``; 0 (the full
  row) when that is no shorter than T - 1. Computed over every split the loss will see."""
  T, span = 0, 0
  for rows in row_sets:
    if rows is None:
      continue
    m = rows["loss_mask"][..., 1:] & (rows["segment_ids"][..., 1:] > 0)
    T = m.shape[-1] + 1
    m = m.reshape(-1, T - 1)
    m = m[m.any(axis=1)]
    if len(m):
      first, last = m.argmax(axis=1), T - 2 - m[:, ::-1].argmax(axis=1)
      span = max(span, int((last - first + 1).max()))
  W = -(-span // multiple) * multiple
  return W if 0 < W < T - 1 else 0


def sequence_logps(params, flat, model_cfg, rng=None, window: int = 0):
  """Summed response log-probs and response lengths, both [N], of unpacked sequences
  (``flat``: tokens, loss_mask, segment_ids, positions, each [N, T]). ``window`` = W > 0: the LM head runs only on
  W positions from the one before each sequence's first trained token (``response_window``: every trained token
  of the data lies within them), not on the prompt or the padding after the response."""
  h_NTD = transformer.hidden_states(params, flat["tokens"], model_cfg, positions_BT=flat["positions"],
                                    segment_ids_BT=flat["segment_ids"], dropout_rng=rng)
  mask_NT = target_mask(flat)
  if window:
    T = flat["tokens"].shape[1]
    pos_NW = jnp.argmax(mask_NT, axis=1)[:, None] + jnp.arange(window)
    safe_NW = jnp.minimum(pos_NW, T - 2)
    h_NWD = jnp.take_along_axis(h_NTD, safe_NW[..., None], axis=1)
    logp = transformer.target_logprobs(params, h_NWD, jnp.take_along_axis(flat["tokens"], safe_NW + 1, axis=1),
                                       model_cfg)
    mask = jnp.take_along_axis(mask_NT, safe_NW, axis=1) & (pos_NW <= T - 2)
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1), jnp.sum(mask_NT, axis=-1).astype(jnp.float32)
  logp_NT = transformer.logprobs_from_hidden(params, h_NTD, flat["tokens"], model_cfg)
  return jnp.sum(jnp.where(mask_NT, logp_NT, 0.0), axis=-1), jnp.sum(mask_NT, axis=-1).astype(jnp.float32)


def row_hidden(params, batch, model_cfg, rng=None):
  """Hidden states [B, L, D] of packed or shared-prompt rows."""
  return transformer.hidden_states(params, batch["tokens"], model_cfg, positions_BT=batch["positions"],
                                   segment_ids_BT=batch["segment_ids"], branch_ids_BT=batch.get("branch_ids"),
                                   dropout_rng=rng)


def sequence_index(batch):
  """[B, L]: the sequence each token of a row belongs to (slot k's j-th sequence: k*G + j), -1 on padding and
  on a shared prompt. Packed: segment - 1; shared prompt: 2 (segment - 1) + branch - 1."""
  seg = batch["segment_ids"]
  if "branch_ids" in batch:
    br = batch["branch_ids"]
    return jnp.where((seg > 0) & (br > 0), 2 * (seg - 1) + br - 1, -1)
  return seg - 1


def per_sequence(x_BL, idx_BL, S: int):
  """[B, S]: the sums of x over the tokens of each of S sequences (``idx_BL``: each token's, -1: none)."""
  hit_BLS = idx_BL[..., None] == jnp.arange(S)
  return jnp.sum(jnp.where(hit_BLS, x_BL[..., None], 0.0), axis=1)


def last_positions(idx_BL, S: int):
  """[B, S]: the index of each sequence's last token (0 for an empty slot); sequences are contiguous."""
  hit_BLS = idx_BL[..., None] == jnp.arange(S)
  return jnp.max(jnp.where(hit_BLS, jnp.arange(idx_BL.shape[1])[:, None], 0), axis=1)


def row_logps(params, batch, model_cfg, rng=None):
  """Summed response log-probs and response lengths, both [B, P, 2], of the pairs in packed or shared-prompt
  rows, from one forward. Token t+1 counts for its sequence when trained and t belongs to the same sequence."""
  B, P = batch["pair_valid"].shape
  h_BLD = row_hidden(params, batch, model_cfg, rng)
  logp_BL = transformer.logprobs_from_hidden(params, h_BLD, batch["tokens"], model_cfg)
  idx = sequence_index(batch)
  target_BL = jnp.where(batch["loss_mask"][:, 1:] & (idx[:, 1:] == idx[:, :-1]), idx[:, 1:], -1)
  s = per_sequence(logp_BL, target_BL, 2 * P)
  n = per_sequence(jnp.ones_like(logp_BL), target_BL, 2 * P)
  return s.reshape(B, P, 2), n.reshape(B, P, 2)


def pair_logps(params, batch, model_cfg, rng=None, window: int = 0):
  """Summed response log-probs and response lengths, both [B, 2] (rows: [B, P, 2]), from one forward over the
  2B sequences (or the rows); ``window``: see ``sequence_logps``."""
  if "pair_valid" in batch:
    return row_logps(params, batch, model_cfg, rng)
  B = batch["tokens"].shape[0]
  s, n = sequence_logps(params, flat_pairs(batch), model_cfg, rng, window)
  return s.reshape(B, 2), n.reshape(B, 2)


def pair_weights(batch):
  """1.0 for each real pair, 0.0 for padding: [B] (rows: [B, P])."""
  if "pair_valid" in batch:
    return batch["pair_valid"].astype(jnp.float32)
  return jnp.any(batch["segment_ids"][:, 0] > 0, axis=-1).astype(jnp.float32)


def reference_mode(cfg) -> str:
  mode = cfg.reference
  if mode == "auto":
    return "lora_off" if cfg.model.lora.rank else "copy"
  return mode


def policy_params(params):
  """The policy's own params: no reference copy, no PPO critic, no KD teacher."""
  return {k: v for k, v in params.items() if k not in ("reference", "critic", "teacher")}


def reference_logps(params, batch, model_cfg, mode, window: int = 0):
  """[B, 2] (rows: [B, P, 2]) summed log-probs under the reference: a frozen copy (``params['reference']``), the
  same params with LoRA adapters off, or values precomputed before training (``batch['ref_logps']``)."""
  if mode == "precomputed":
    return batch["ref_logps"]
  ref = params["reference"] if mode == "copy" else lora.disabled(policy_params(params))
  logp, _ = pair_logps(jax.lax.stop_gradient(ref), batch, model_cfg, window=window)
  return jax.lax.stop_gradient(logp)


def reward_sums(r_chosen, r_rejected, w):
  """Per-pair sums (weighted by validity w) that the trainer divides by the number of pairs."""
  return {"acc": jnp.sum(w * (r_chosen > r_rejected)), "rewards_chosen_mean": jnp.sum(w * r_chosen),
          "rewards_rejected_mean": jnp.sum(w * r_rejected),
          "rewards_all_mean": jnp.sum(w * (r_chosen + r_rejected)) / 2,
          "_rewards_sq": jnp.sum(w * (r_chosen ** 2 + r_rejected ** 2)) / 2}


def finalize(m: dict) -> dict:
  """Averaged sums -> NeMo-Aligner's metrics (std from the mean of squares)."""
  m = dict(m)
  if "_rewards_sq" in m:
    sq = m.pop("_rewards_sq")
    m["rewards_all_std"] = jnp.sqrt(jnp.maximum(sq - m["rewards_all_mean"] ** 2, 0.0))
  return m
