"""Dot-product attention: the pure-JAX (XLA) reference and the implementation switch.

Shapes: q_BTHD [batch, q_len, q_heads, head_dim], k_BSKD / v_BSKD [batch, kv_len, kv_heads, head_dim];
q_heads is a multiple of kv_heads (GQA/MQA). Masking is expressed with segment ids and positions, so the same
function covers causal training, packed sequences (attention never crosses segments) and sliding windows.
Branch ids express a shared prompt computed once for several continuations in one row (``[prompt, chosen,
rejected]``): a token sees a key only if the key's branch is 0 (the shared prompt) or its own branch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def attention_reference(q_BTHD, k_BSKD, v_BSKD, *, q_segment_ids_BT=None, kv_segment_ids_BS=None,
                        q_positions_BT=None, kv_positions_BS=None, causal=True, sliding_window=0, scale=None,
                        kv_heads_first=False, q_branch_ids_BT=None, kv_branch_ids_BS=None):
  """Reference attention; softmax in float32, output in q's dtype. ``kv_heads_first``: k and v come as
  [batch, kv_heads, kv_len, head_dim] (the KV cache's layout), which the matmuls use without a transposed copy."""
  if kv_heads_first:
    k_BSKD, v_BSKD = k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)  # undone below: no copy
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  G = H // K
  if q_positions_BT is None:
    q_positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if kv_positions_BS is None:
    kv_positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  scale = D ** -0.5 if scale is None else scale
  # [B, K, G*T, D] x [B, K, S, D]: one batch-matmul per (batch, kv head) with the query group folded into the
  # rows, contracting the last dims of both (no transposed copy of k).
  q_BKQD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
  k_BKSD = k_BSKD.transpose(0, 2, 1, 3)
  v_BKSD = v_BSKD.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkqd,bksd->bkqs", q_BKQD, k_BKSD, preferred_element_type=jnp.float32)
  scores_BKGTS = scores.reshape(B, K, G, T, S) * scale
  mask_BTS = jnp.ones((B, T, S), dtype=bool)
  if q_segment_ids_BT is not None:
    kv_seg = q_segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
    mask_BTS &= q_segment_ids_BT[:, :, None] == kv_seg[:, None, :]
  if q_branch_ids_BT is not None:
    kv_br = q_branch_ids_BT if kv_branch_ids_BS is None else kv_branch_ids_BS
    mask_BTS &= (kv_br[:, None, :] == 0) | (kv_br[:, None, :] == q_branch_ids_BT[:, :, None])
  delta_BTS = q_positions_BT[:, :, None] - kv_positions_BS[:, None, :]
  if causal:
    mask_BTS &= delta_BTS >= 0
  if sliding_window:
    mask_BTS &= delta_BTS < sliding_window
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKQS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKD.dtype).reshape(B, K, G * T, S)
  out_BKQD = jnp.einsum("bkqs,bksd->bkqd", probs_BKQS, v_BKSD)
  out_BTHD = out_BKQD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
  return out_BTHD.astype(q_BTHD.dtype)


def attention(q_BTHD, k_BSKD, v_BSKD, *, implementation="xla", **kwargs):
  """Dispatch to an attention implementation; unknown names fail, unavailable kernels fall back to XLA."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
  return attention_reference(q_BTHD, k_BSKD, v_BSKD, **kwargs)
