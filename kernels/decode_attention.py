"""Decode attention: one new query token per row against the engine's KV cache, as a Pallas (Triton) kernel.

The cache is laid out [batch, kv_heads, slots, head_dim] (``jalign.models.transformer.init_cache``): slot s of a
row holds the token at position s, and the query is the token at position ``lengths[b] - 1`` (its own key and
value already written). It sees slots ``max(0, lengths[b] - sliding_window) <= s < lengths[b]``; a row with
length 0 outputs 0. Slots at or beyond a row's length are never read: key blocks past the length are skipped by
the loop bounds, and the last, partial block is read with masked loads.

One program handles all query heads of one KV head (GQA: the group is the rows of one tile, padded to 16 for the
Triton dot) over one slice of the slots; ``num_splits`` > 1 splits the slots across programs (split-K) and merges
the partial softmaxes by their log-sum-exp in XLA.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .attention_ops import attention_reference
from .flash_attention import MASK_VALUE, online_softmax_step

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, window, block_s, chunk, head_dim):
  split = pl.program_id(2)
  length = len_ref[...]
  first = jnp.maximum(length - window, 0) if window else 0
  start = jnp.maximum(split * chunk, first)                       # this program's slots: [start, stop)
  stop = jnp.minimum((split + 1) * chunk, length)
  q = q_ref[...]                                                  # [Gp, Dp]: the KV head's query group
  cols = jnp.arange(q.shape[1]) < head_dim

  def body(j, carry):
    acc, m, l = carry
    slots = j * block_s + jnp.arange(block_s)
    live = (slots >= start) & (slots < stop)
    read = live[:, None] & cols[None, :]                          # masked lanes are not loaded
    k = plgpu.load(k_ref.at[pl.ds(j * block_s, block_s), :], mask=read, other=0)
    v = plgpu.load(v_ref.at[pl.ds(j * block_s, block_s), :], mask=read, other=0)
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale   # [Gp, block_s]
    s = jnp.where(live[None, :], s, MASK_VALUE)
    return online_softmax_step(acc, m, l, s, v)

  rows = q.shape[0]
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(start // block_s, pl.cdiv(stop, block_s), body, init)
  seen = m > MASK_VALUE
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), MASK_VALUE)


def unsupported_reason(q_BHD, k_BKSD, v_BKSD, lengths_B, *, block_s=128, interpret=False, backend=None, **_):
  """None if ``decode_attention`` runs these arguments on ``backend`` (default: JAX's), else why not."""
  del k_BKSD, v_BKSD, lengths_B
  if q_BHD.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {q_BHD.dtype} is not float32/bfloat16/float16"
  if interpret:
    return None
  backend = backend or jax.default_backend()
  if backend not in ("gpu", "cuda", "rocm"):
    return f"the decode kernel compiles for GPU (Triton) only; on {backend!r} it runs only with interpret=True"
  if block_s < 16 or block_s & (block_s - 1):
    return f"Triton needs a power-of-2 block_s >= 16, got {block_s}"
  return None


def decode_attention(q_BHD, k_BKSD, v_BKSD, lengths_B, *, scale=None, sliding_window=0, interpret=False,
                     block_s=128, num_splits=1):
  """Attention of one query per row ([B, H, D]) over the first ``lengths_B`` slots of a [B, K, S, D] cache."""
  reason = unsupported_reason(q_BHD, k_BKSD, v_BKSD, lengths_B, block_s=block_s, interpret=interpret)
  if reason:
    raise NotImplementedError(reason)
  B, H, D = q_BHD.shape
  _, K, S, _ = k_BKSD.shape
  if H % K or k_BKSD.shape != v_BKSD.shape or not q_BHD.dtype == k_BKSD.dtype == v_BKSD.dtype:
    raise ValueError(f"need q heads a multiple of kv heads and one dtype: q {q_BHD.shape} {q_BHD.dtype}, "
                     f"k {k_BKSD.shape} {k_BKSD.dtype}, v {v_BKSD.shape} {v_BKSD.dtype}")
  G = H // K
  lengths_B = jnp.clip(lengths_B, 0, S).astype(jnp.int32)      # a length past the cache would read past it
  scale = D ** -0.5 if scale is None else scale
  Gp, Dp = (max(16, pl.next_power_of_2(n)) for n in (G, D))  # Triton tiles: powers of 2, dot dims >= 16
  chunk = pl.cdiv(pl.cdiv(S, block_s), num_splits) * block_s     # slots per split, whole blocks
  # query head h = kv_head * G + g, as in attention_reference; padding rows and columns are zero
  q_BKGD = jnp.pad(q_BHD.reshape(B, K, G, D), ((0, 0), (0, 0), (0, Gp - G), (0, Dp - D)))
  kernel = functools.partial(_decode_kernel, scale=float(scale), window=int(sliding_window), block_s=block_s,
                             chunk=chunk, head_dim=D)
  cache = pl.BlockSpec((None, None, S, Dp), lambda b, h, n: (b, h, 0, 0))  # Dp > D: the extra columns are masked
  o_BKNGD, lse_BKNG = pl.pallas_call(
      kernel,
      grid=(B, K, num_splits),
      in_specs=[pl.BlockSpec((None,), lambda b, h, n: (b,)),
                pl.BlockSpec((None, None, Gp, Dp), lambda b, h, n: (b, h, 0, 0)), cache, cache],
      out_specs=[pl.BlockSpec((None, None, None, Gp, Dp), lambda b, h, n: (b, h, n, 0, 0)),
                 pl.BlockSpec((None, None, None, Gp), lambda b, h, n: (b, h, n, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, K, num_splits, Gp, Dp), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, num_splits, Gp), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
      name="decode_attention",
  )(lengths_B, q_BKGD, k_BKSD, v_BKSD)
  # merge the splits; a split that saw nothing has lse = MASK_VALUE and output 0, so weight 0 (or all equal,
  # all zero outputs, when the whole row is empty)
  w_BKNG = jnp.exp(lse_BKNG - lse_BKNG.max(axis=2, keepdims=True))
  o_BKGD = jnp.einsum("bkng,bkngd->bkgd", w_BKNG, o_BKNGD) / w_BKNG.sum(axis=2)[..., None]
  return o_BKGD[:, :, :G, :D].reshape(B, H, D).astype(q_BHD.dtype)


def decode_attention_reference(q_BHD, k_BKSD, v_BKSD, lengths_B, *, scale=None, sliding_window=0, interpret=False,
                               block_s=128, num_splits=1):
  """``decode_attention`` via ``attention_reference`` (kernel keywords accepted and unused). Slots at or beyond
  a row's length are zeroed first, so garbage (NaN) there cannot leak through 0 * NaN."""
  del interpret, block_s, num_splits
  filled_B1S1 = (jnp.arange(k_BKSD.shape[2]) < lengths_B[:, None])[:, None, :, None]
  k_BKSD, v_BKSD = (jnp.where(filled_B1S1, x, jnp.zeros((), x.dtype)) for x in (k_BKSD, v_BKSD))
  out_B1HD = attention_reference(q_BHD[:, None], k_BKSD, v_BKSD, q_positions_BT=(lengths_B - 1)[:, None],
                                 causal=True, sliding_window=sliding_window, scale=scale, kv_heads_first=True)
  return jnp.where((lengths_B > 0)[:, None, None], out_B1HD[:, 0], 0).astype(q_BHD.dtype)
