"""Dot-product attention: the pure-JAX (XLA) reference and the implementation switch.

Shapes: q_BTHD [batch, q_len, q_heads, head_dim], k_BSKD / v_BSKD [batch, kv_len, kv_heads, head_dim];
q_heads is a multiple of kv_heads (GQA/MQA). Masking is expressed with segment ids and positions, so the same
function covers causal training, packed sequences (attention never crosses segments) and sliding windows.
Branch ids express a shared prompt computed once for several continuations in one row (``[prompt, chosen,
rejected]``): a token sees a key only if the key's branch is 0 (the shared prompt) or its own branch.
"""
from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("xla", "pallas", "cudnn")


def attention_mask(B, T, S, q_segment_ids_BT=None, kv_segment_ids_BS=None, q_positions_BT=None,
                   kv_positions_BS=None, causal=True, sliding_window=0, q_branch_ids_BT=None, kv_branch_ids_BS=None):
  """[B, T, S] bool: query t may see key s (same segment, visible branch, causal and window on positions)."""
  q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if q_positions_BT is None else q_positions_BT
  kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)) if kv_positions_BS is None else kv_positions_BS
  mask = jnp.ones((B, T, S), bool)
  if q_segment_ids_BT is not None:
    kv_seg = q_segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
    mask &= q_segment_ids_BT[:, :, None] == kv_seg[:, None, :]
  if q_branch_ids_BT is not None:
    kv_br = q_branch_ids_BT if kv_branch_ids_BS is None else kv_branch_ids_BS
    mask &= (kv_br[:, None, :] == 0) | (kv_br[:, None, :] == q_branch_ids_BT[:, :, None])
  delta = q_pos[:, :, None] - kv_pos[:, None, :]
  if causal:
    mask &= delta >= 0
  if sliding_window:
    mask &= delta < sliding_window
  return mask


def attention_reference(q_BTHD, k_BSKD, v_BSKD, *, q_segment_ids_BT=None, kv_segment_ids_BS=None,
                        q_positions_BT=None, kv_positions_BS=None, causal=True, sliding_window=0, scale=None,
                        kv_heads_first=False, q_branch_ids_BT=None, kv_branch_ids_BS=None, k_transposed=False):
  """Reference attention; softmax in float32, output in q's dtype. ``kv_heads_first``: k and v come as
  [batch, kv_heads, kv_len, head_dim] (the KV cache's layout), which the matmuls use without a transposed copy;
  with ``k_transposed`` too, k comes as [batch, kv_heads, head_dim, kv_len] (the CPU cache's layout: the scores
  are then a plain matmul, where XLA:CPU transposes every [kv_len, head_dim] block of k at every decode step).
  With ``kv_heads_first``, k and v may also be tuples of blocks along kv_len (a blocked cache): the matmuls read
  each block where it lies, where a slice of one buffer would be copied first."""
  heads_first = (lambda x: x) if kv_heads_first else (lambda x: x.transpose(0, 2, 1, 3))
  k_blocks = tuple(k_BSKD) if isinstance(k_BSKD, (tuple, list)) else (k_BSKD,)
  v_blocks = tuple(heads_first(v) for v in (v_BSKD if isinstance(v_BSKD, (tuple, list)) else (v_BSKD,)))
  if len(k_blocks) > 1 and not kv_heads_first:
    raise ValueError("k/v blocks need kv_heads_first=True (the cache's layout)")
  B, T, H, D = q_BTHD.shape
  K = v_blocks[0].shape[1]
  widths = [v.shape[2] for v in v_blocks]
  S = sum(widths)
  G = H // K
  scale = D ** -0.5 if scale is None else scale
  # [B, K, G*T, D] x [B, K, S, D]: one batch-matmul per (batch, kv head) with the query group folded into the
  # rows, contracting the last dims of both (no transposed copy of k).
  q_BKQD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
  if kv_heads_first and k_transposed:  # k as given: [B, K, D, S]
    parts = [jnp.einsum("bkqd,bkds->bkqs", q_BKQD, k, preferred_element_type=jnp.float32) for k in k_blocks]
  else:
    parts = [jnp.einsum("bkqd,bksd->bkqs", q_BKQD, heads_first(k), preferred_element_type=jnp.float32)
             for k in k_blocks]
  scores = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
  scores_BKGTS = scores.reshape(B, K, G, T, S) * scale
  mask_BTS = attention_mask(B, T, S, q_segment_ids_BT, kv_segment_ids_BS, q_positions_BT, kv_positions_BS, causal,
                            sliding_window, q_branch_ids_BT, kv_branch_ids_BS)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  # softmax normalised after the values matmul, on [.., D] instead of [.., S] (as flash attention does): no pass
  # dividing the probabilities, and the backward sums over D where softmax's sums over S; the max is a constant
  # to the gradient (the softmax does not depend on it)
  max_BKGT1 = jax.lax.stop_gradient(jnp.max(scores_BKGTS, axis=-1, keepdims=True))
  unnorm_BKGTS = jnp.exp(scores_BKGTS - max_BKGT1)
  sum_BKGT1 = jnp.sum(unnorm_BKGTS, axis=-1, keepdims=True)
  p_BKQS = unnorm_BKGTS.astype(v_blocks[0].dtype).reshape(B, K, G * T, S)
  starts = np.cumsum([0] + widths[:-1])
  out_BKQD = None
  for o, w, v in zip(starts, widths, v_blocks):
    part = jnp.einsum("bkqs,bksd->bkqd", p_BKQS if len(widths) == 1 else p_BKQS[..., o:o + w], v,
                      preferred_element_type=jnp.float32)
    out_BKQD = part if out_BKQD is None else out_BKQD + part
  out_BKGTD = out_BKQD.reshape(B, K, G, T, D) / sum_BKGT1
  out_BTHD = out_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
  return out_BTHD.astype(q_BTHD.dtype)


def interpret_mode() -> bool:
  """``JALIGN_PALLAS_INTERPRET=1`` runs the Pallas kernels in Pallas' interpreter (any backend, e.g. CPU)."""
  return os.environ.get("JALIGN_PALLAS_INTERPRET", "0") not in ("", "0")


_WARNED: set = set()


def fallback(kernel: str, why: str) -> None:
  """One warning per (kernel, reason) that the XLA reference runs instead of ``kernel``."""
  if (kernel, why) not in _WARNED:
    _WARNED.add((kernel, why))
    warnings.warn(f"{kernel}: {why}; running the XLA reference instead", stacklevel=3)


def _cudnn(q_BTHD, k, v, *, kv_heads_first=False, scale=None, **masks):
  """cuDNN's fused attention through ``jax.nn.dot_product_attention`` (GQA native; the mask as a boolean array)."""
  if jax.default_backend() != "gpu":
    return None, f"cuDNN attention needs a GPU (backend {jax.default_backend()!r})"
  if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
    return None, f"cuDNN attention needs bfloat16/float16, got {q_BTHD.dtype}"
  if kv_heads_first:
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  B, T, S = q_BTHD.shape[0], q_BTHD.shape[1], k.shape[1]
  mask = attention_mask(B, T, S, **masks)[:, None]
  try:
    out = jax.nn.dot_product_attention(q_BTHD, k, v, mask=mask, scale=scale, implementation="cudnn")
  except Exception as e:  # an unsupported shape or cuDNN version: one warning, then the reference
    return None, f"cuDNN attention failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
  return out.astype(q_BTHD.dtype), None


def attention_blocked(q_BTHD, k_BSKD, v_BSKD, *, block: int = 64, **kwargs):
  """``attention_reference`` for self-attention over rows whose visible keys never come after their query in the
  row (causal rows, packed segments, shared-prompt branches): query block i attends keys [0, end of block i)
  only, so the blocks above the diagonal are neither computed nor masked. Same arguments and results."""
  B, T = q_BTHD.shape[:2]
  kv = {"segment_ids": kwargs.pop("kv_segment_ids_BS", None), "positions": kwargs.pop("kv_positions_BS", None),
        "branch_ids": kwargs.pop("kv_branch_ids_BS", None)}
  q = {"segment_ids": kwargs.pop("q_segment_ids_BT", None), "positions": kwargs.pop("q_positions_BT", None),
       "branch_ids": kwargs.pop("q_branch_ids_BT", None)}
  if q["positions"] is None:
    q["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  kv = {n: q[n] if a is None else a for n, a in kv.items()}
  outs = []
  for start in range(0, T, block):
    end = min(start + block, T)
    outs.append(attention_reference(
        q_BTHD[:, start:end], k_BSKD[:, :end], v_BSKD[:, :end],
        **{f"q_{n}_BT": None if a is None else a[:, start:end] for n, a in q.items()},
        **{f"kv_{n}_BS": None if a is None else a[:, :end] for n, a in kv.items()}, **kwargs))
  return jnp.concatenate(outs, axis=1)


def attention(q_BTHD, k_BSKD, v_BSKD, *, implementation="xla", causal_rows=False, **kwargs):
  """Dispatch to an attention implementation. ``pallas``: the flash-attention kernel (one query token against
  a ``kv_heads_first`` cache: the decode kernel); ``cudnn``: ``jax.nn.dot_product_attention`` on cuDNN. Where the
  choice cannot run (backend, dtype, arguments), the XLA reference runs and one warning says why; unknown names
  fail. ``causal_rows``: self-attention where no visible key comes after its query in the row; on CPU the XLA
  path then skips the blocks above the diagonal (``attention_blocked``: about half the work, measured 2x faster
  forward and backward at T=256)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
  if kwargs.get("k_transposed") and implementation != "xla":
    raise ValueError(f"a transposed k ([B, K, D, S]) is the XLA path's cache layout, not {implementation!r}'s")
  if implementation == "pallas":
    interpret = interpret_mode()
    if _is_decode(q_BTHD, kwargs):
      from . import decode_attention as da
      lengths_B = kwargs["q_positions_BT"][:, 0] + 1  # the cache holds slots 0 .. position of each row
      why = da.unsupported_reason(q_BTHD[:, 0], k_BSKD, v_BSKD, lengths_B, interpret=interpret)
      if why is None:
        return da.decode_attention(q_BTHD[:, 0], k_BSKD, v_BSKD, lengths_B, scale=kwargs.get("scale"),
                                   sliding_window=kwargs.get("sliding_window", 0), interpret=interpret)[:, None]
      fallback("decode attention", why)
    else:
      from . import flash_attention as fa
      why = fa.unsupported_reason(q_BTHD, k_BSKD, v_BSKD, interpret=interpret, **kwargs)
      if why is None:
        return fa.flash_attention(q_BTHD, k_BSKD, v_BSKD, interpret=interpret, **kwargs)
      fallback("flash attention", why)
  elif implementation == "cudnn":
    out, why = _cudnn(q_BTHD, k_BSKD, v_BSKD, **kwargs)
    if out is not None:
      return out
    fallback("cudnn attention", why)
  if (causal_rows and kwargs.get("causal", True) and not kwargs.get("kv_heads_first", False)
      and q_BTHD.shape[1] == k_BSKD.shape[1] >= 2 * BLOCK and jax.default_backend() == "cpu"):
    block = max(BLOCK, -(-q_BTHD.shape[1] // MAX_BLOCKS))
    return attention_blocked(q_BTHD, k_BSKD, v_BSKD, block=block, **kwargs)
  return attention_reference(q_BTHD, k_BSKD, v_BSKD, **kwargs)


# attention_blocked on CPU: query blocks of at least 64 and at most 4 of them (more blocks skip more of the upper
# triangle, but each is more to compile: at T=448, 4 blocks ran the SFT step as fast as 7, compiling 0.9 s less)
BLOCK, MAX_BLOCKS = 64, 4


def _is_decode(q_BTHD, kw) -> bool:
  """One query token per row against a [B, K, S, D] cache, masked only by causality on the cache's slots."""
  return (q_BTHD.shape[1] == 1 and kw.get("kv_heads_first", False) and kw.get("causal", True)
          and kw.get("q_segment_ids_BT") is None and kw.get("q_branch_ids_BT") is None
          and kw.get("q_positions_BT") is not None and kw.get("kv_positions_BS") is not None)
