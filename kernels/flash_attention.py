"""Flash attention as Pallas kernels: forward, and backward kernels for dq and dk/dv, under ``jax.custom_vjp``.

``flash_attention`` has the signature and masking of ``attention_ops.attention_reference`` (segment ids,
positions for causal and sliding-window masks, branch ids, GQA/MQA, either KV layout) plus ``softcap``
(``cap * tanh(s / cap)`` on the scaled logits) and tuning keywords. Where they differ: a query row with no visible
key outputs 0 (the reference averages all values) and gets zero gradients. Segment ids must be >= 0 (0 is a
segment like any other, as in the reference; the wrapper pads with negative ids that match nothing).

Where it runs (``unsupported_reason``): GPU compiles the kernels with the Pallas Triton lowering (2-D tiles, power-of-2
block sizes >= 16, dynamic loop bounds, no scratch memory); TPU routes to upstream splash attention when it can
express the arguments; CPU (and any backend) runs the same kernels with ``interpret=True``.

Work skipping: the wrapper reduces each block of queries and of keys to its segment-id range and the
lexicographic min/max of (segment id, position), marks the (query block, key block) pairs that may hold a visible
pair, and hands each program the first and one-past-last such block; the loop covers that range and masks
element-wise, so skipping never changes a value. For packed rows (increasing segments, padding at the end) with
causal and/or window masks the marked blocks are exactly those holding a visible pair and form one range, so no
fully masked block is computed; branch ids are not used for skipping.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Finite, so a row that saw only masked keys has max == MASK_VALUE exactly and exp() never meets inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
Q_PAD, KV_PAD = -1, -2  # segment ids of the wrapper's padding: they match no segment and not each other
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  causal: bool
  window: int
  softcap: float
  kv_heads_first: bool
  groups: int            # query heads per KV head
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int
  num_stages: int
  interpret: bool


def _params(cfg):
  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _mask(cfg, q_seg, kv_seg, q_pos, kv_pos, q_br, kv_br):
  """[bq, bk] visibility of a tile from the ids of its rows (bq) and columns (bk)."""
  mask = q_seg[:, None] == kv_seg[None, :]
  delta = q_pos[:, None] - kv_pos[None, :]
  if cfg.causal:
    mask &= delta >= 0
  if cfg.window:
    mask &= delta < cfg.window
  if q_br is not None:
    mask &= (kv_br[None, :] == 0) | (kv_br[None, :] == q_br[:, None])
  return mask


def _scores(cfg, q, k):
  """Scaled (and soft-capped) logits [bq, bk] in float32."""
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
  if cfg.softcap:
    s = cfg.softcap * jnp.tanh(s / cfg.softcap)
  return s


def _dscores(cfg, p, s, dp, delta):
  """Gradient w.r.t. the scaled logits before the cap: p * (dp - delta) * d cap(u) / du."""
  ds = p * (dp - delta[:, None])
  if cfg.softcap:
    ds *= 1.0 - jnp.square(s / cfg.softcap)
  return ds


def _load_ids(refs, sl=...):
  return tuple(None if r is None else r[sl] for r in refs)


def online_softmax_step(acc, m, l, s, v):
  """One key block of the online softmax: (acc, running max m, running sum l) updated with masked scores
  s [rows, block] and values v [block, D]. While a row has seen only masked keys, m == MASK_VALUE and p == 1; the
  first visible key rescales that sum by exp(MASK_VALUE - m) == 0."""
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  p = jnp.exp(s - m_new[:, None])
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=1)
  acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return acc, m_new, l


def _fwd_kernel(lo_ref, hi_ref, q_seg_ref, q_pos_ref, q_br_ref, kv_seg_ref, kv_pos_ref, kv_br_ref, q_ref, k_ref,
                v_ref, o_ref, lse_ref, *, cfg):
  bk = cfg.block_k
  q = q_ref[...]                                                  # [bq, D]
  q_seg, q_pos, q_br = _load_ids((q_seg_ref, q_pos_ref, q_br_ref))  # [bq]

  def body(j, carry):
    acc, m, l = carry
    ks = pl.ds(j * bk, bk)
    kv_seg, kv_pos, kv_br = _load_ids((kv_seg_ref, kv_pos_ref, kv_br_ref), ks)
    v = v_ref[ks, :]
    s = _scores(cfg, q, k_ref[ks, :])
    s = jnp.where(_mask(cfg, q_seg, kv_seg, q_pos, kv_pos, q_br, kv_br), s, MASK_VALUE)
    return online_softmax_step(acc, m, l, s, v)

  bq, d = q.shape
  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(lo_ref[...], hi_ref[...], body, init)
  seen = m > MASK_VALUE                                           # at least one visible key
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # inf: p = exp(s - lse) = 0


def _dq_kernel(lo_ref, hi_ref, q_seg_ref, q_pos_ref, q_br_ref, kv_seg_ref, kv_pos_ref, kv_br_ref, q_ref, k_ref,
               v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg):
  bk = cfg.block_k_bwd
  q, do = q_ref[...], do_ref[...]                                 # [bq, D]
  lse, delta = lse_ref[...], delta_ref[...]                       # [bq]
  q_seg, q_pos, q_br = _load_ids((q_seg_ref, q_pos_ref, q_br_ref))

  def body(j, dq):
    ks = pl.ds(j * bk, bk)
    kv_seg, kv_pos, kv_br = _load_ids((kv_seg_ref, kv_pos_ref, kv_br_ref), ks)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = _scores(cfg, q, k)
    p = jnp.where(_mask(cfg, q_seg, kv_seg, q_pos, kv_pos, q_br, kv_br), jnp.exp(s - lse[:, None]), 0.0)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = _dscores(cfg, p, s, dp, delta)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = lax.fori_loop(lo_ref[...], hi_ref[...], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_seg_ref, q_pos_ref, q_br_ref, kv_seg_ref, kv_pos_ref, kv_br_ref, q_ref, k_ref,
                v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg):
  """One block of keys of one KV head: sums over its query blocks and all ``groups`` query heads sharing it."""
  bq = cfg.block_q_bwd
  k, v = k_ref[...], v_ref[...]                                   # [bk, D]
  kv_seg, kv_pos, kv_br = _load_ids((kv_seg_ref, kv_pos_ref, kv_br_ref))

  def q_block(i, carry):
    qs = pl.ds(i * bq, bq)
    q_seg, q_pos, q_br = _load_ids((q_seg_ref, q_pos_ref, q_br_ref), qs)
    mask = _mask(cfg, q_seg, kv_seg, q_pos, kv_pos, q_br, kv_br)  # shared by the group's heads

    def head(g, carry):
      dk, dv = carry
      q, do = q_ref[qs, g, :], do_ref[qs, g, :]                   # [bq, D]
      lse, delta = lse_ref[g, qs], delta_ref[g, qs]               # [bq]
      s = _scores(cfg, q, k)
      p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
      dv += lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
      dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
      ds = _dscores(cfg, p, s, dp, delta)
      dk += lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)
      return dk, dv

    return lax.fori_loop(0, cfg.groups, head, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(lo_ref[...], hi_ref[...], q_block, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _kv_spec(cfg, block, d, index):
  """BlockSpec of k/v/dk/dv: ``block`` rows of one KV head; ``index(*grid)`` gives (batch, row block, kv head)."""
  def index_map(*grid):
    b, j, h = index(*grid)
    return (b, h, j, 0) if cfg.kv_heads_first else (b, j, h, 0)
  return pl.BlockSpec((None, None, block, d) if cfg.kv_heads_first else (None, block, None, d), index_map)


def _ids_specs(block_q, block_k, q_index, kv_index, has_branch):
  """BlockSpecs of (q_seg, q_pos, q_br, kv_seg, kv_pos, kv_br); the index maps give (batch, block index)."""
  q_spec = pl.BlockSpec((None, block_q), q_index)
  kv_spec = pl.BlockSpec((None, block_k), kv_index)
  return [q_spec, q_spec, q_spec if has_branch else None, kv_spec, kv_spec, kv_spec if has_branch else None]


def _forward(cfg, q, k, v, ids):
  B, T, H, D = q.shape
  S = k.shape[2] if cfg.kv_heads_first else k.shape[1]
  bq = cfg.block_q
  row = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
  kv_all = _kv_spec(cfg, S, D, lambda i, b, h: (b, 0, lax.div(h, cfg.groups)))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(T // bq, B, H),
      in_specs=[pl.BlockSpec((None, None), lambda i, b, h: (b, i))] * 2 + _ids_specs(
          bq, S, lambda i, b, h: (b, i), lambda i, b, h: (b, 0), ids["q_br"] is not None) + [row, kv_all, kv_all],
      out_specs=[row, pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      compiler_params=_params(cfg), interpret=cfg.interpret, name="flash_attention_fwd",
  )(*ids["fwd"], *_ids_args(ids), q, k, v)


def _ids_args(ids):
  return ids["q_seg"], ids["q_pos"], ids["q_br"], ids["kv_seg"], ids["kv_pos"], ids["kv_br"]


def _backward(cfg, q, k, v, ids, o, lse, do):
  B, T, H, D = q.shape
  S = k.shape[2] if cfg.kv_heads_first else k.shape[1]
  G = cfg.groups
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  has_branch = ids["q_br"] is not None
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # [B, H, T]

  # dq: one program per (query block, batch, query head), looping over key blocks.
  row = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
  stat = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  kv_all = _kv_spec(cfg, S, D, lambda i, b, h: (b, 0, lax.div(h, G)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(T // bq, B, H),
      in_specs=[pl.BlockSpec((None, None), lambda i, b, h: (b, i))] * 2 + _ids_specs(
          bq, S, lambda i, b, h: (b, i), lambda i, b, h: (b, 0), has_branch) + [row, kv_all, kv_all, row, stat, stat],
      out_specs=row,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(cfg), interpret=cfg.interpret, name="flash_attention_dq",
  )(*ids["dq"], *_ids_args(ids), q, k, v, do, lse, delta)

  # dk, dv: one program per (key block, batch, KV head), looping over query blocks and the head's query group.
  group = pl.BlockSpec((None, T, G, D), lambda j, b, h: (b, 0, h, 0))
  group_stat = pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0))
  kv_block = _kv_spec(cfg, bk, D, lambda j, b, h: (b, j, h))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(S // bk, B, H // G),
      in_specs=[pl.BlockSpec((None, None), lambda j, b, h: (b, j))] * 2 + _ids_specs(
          T, bk, lambda j, b, h: (b, 0), lambda j, b, h: (b, j), has_branch) + [
          group, kv_block, kv_block, group, group_stat, group_stat],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(cfg), interpret=cfg.interpret, name="flash_attention_dkv",
  )(*ids["dkv"], *_ids_args(ids), q, k, v, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, ids):
  return _forward(cfg, q, k, v, ids)[0]


def _flash_fwd(cfg, q, k, v, ids):
  o, lse = _forward(cfg, q, k, v, ids)
  return o, (q, k, v, ids, o, lse)


def _flash_bwd(cfg, res, do):
  q, k, v, ids, o, lse = res
  return (*_backward(cfg, q, k, v, ids, o, lse, do), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _visible_blocks(q_seg_BT, kv_seg_BS, q_pos_BT, kv_pos_BS, bq, bk, causal, window):
  """[B, T/bq, S/bk]: False where no (query, key) pair of the two blocks can be visible.

  Each block is reduced to its segment-id range and to the lexicographic min and max of (segment id, position)
  over its real tokens (padding, id < 0, left out). A visible pair shares a segment, so it needs overlapping
  ranges, q max >= k min for causal (pos_q >= pos_k) and k max > q min - window for the window. With packed,
  increasing segments this marks exactly the blocks holding a visible pair (independent segment and position
  ranges would not: a key block straddling two segments has the low positions of the second). Segment 0 (the
  caller's padding at the end of rows) is ranked last, so such rows stay increasing; only the order changes.
  """
  big = 2 ** 30

  def stats(seg_BN, pos_BN, block):
    B, N = seg_BN.shape
    seg, pos = seg_BN.reshape(B, N // block, block), pos_BN.reshape(B, N // block, block)
    real = seg >= 0
    seg = jnp.where(seg == 0, big - 1, seg)
    seg_lo = jnp.min(jnp.where(real, seg, big), axis=-1)
    seg_hi = jnp.max(jnp.where(real, seg, -big), axis=-1)
    pos_lo = jnp.min(jnp.where(real & (seg == seg_lo[..., None]), pos, big), axis=-1)   # at seg_lo
    pos_hi = jnp.max(jnp.where(real & (seg == seg_hi[..., None]), pos, -big), axis=-1)  # at seg_hi
    return seg_lo, seg_hi, pos_lo, pos_hi

  qs_lo, qs_hi, qp_lo, qp_hi = (x[:, :, None] for x in stats(q_seg_BT, q_pos_BT, bq))
  ks_lo, ks_hi, kp_lo, kp_hi = (x[:, None, :] for x in stats(kv_seg_BS, kv_pos_BS, bk))
  visible = (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
  if causal:
    visible &= (qs_hi > ks_lo) | ((qs_hi == ks_lo) & (qp_hi >= kp_lo))
  if window:
    visible &= (ks_hi > qs_lo) | ((ks_hi == qs_lo) & (kp_hi > qp_lo - window))
  return visible


def _block_range(visible, axis):
  """First and one-past-last True index along ``axis`` ([B, N] int32 each; 0, 0 where none)."""
  n = visible.shape[axis]
  any_ = visible.any(axis)
  lo = jnp.where(any_, jnp.argmax(visible, axis), 0)
  hi = jnp.where(any_, n - jnp.argmax(jnp.flip(visible, axis), axis), 0)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _pad_to(x, axis, size, value=0):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _block(block, n):
  """Block size for a length-n axis: the requested one, capped for a short axis at the power of 2 >= max(n, 16)."""
  return min(block, max(16, pl.next_power_of_2(n)))


def unsupported_reason(q_BTHD, k_BSKD, v_BSKD, *, q_segment_ids_BT=None, kv_segment_ids_BS=None,
                       q_positions_BT=None, kv_positions_BS=None, causal=True, sliding_window=0, scale=None,
                       kv_heads_first=False, q_branch_ids_BT=None, kv_branch_ids_BS=None, softcap=0.0,
                       block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, interpret=False, backend=None,
                       **_):
  """None if ``flash_attention`` runs these arguments on ``backend`` (default: JAX's), else why not."""
  del v_BSKD, scale, softcap, kv_branch_ids_BS
  if q_BTHD.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"dtype {q_BTHD.dtype} is not float32/bfloat16/float16"
  if interpret:
    return None
  backend = backend or jax.default_backend()
  if backend in ("gpu", "cuda", "rocm"):
    blocks = (block_q, block_k, block_q_bwd, block_k_bwd)
    if any(b < 16 or b & (b - 1) for b in blocks):
      return f"Triton needs power-of-2 block sizes >= 16, got {blocks}"
    return None
  if backend == "tpu":
    T, S = q_BTHD.shape[1], k_BSKD.shape[2 if kv_heads_first else 1]
    if q_positions_BT is not None or kv_positions_BS is not None:
      return "splash attention masks by index: explicit positions are not supported"
    if q_branch_ids_BT is not None:
      return "splash attention has no branch ids"
    if kv_segment_ids_BS is not None and kv_segment_ids_BS is not q_segment_ids_BT:
      return "splash attention here needs kv segment ids equal to the query's (no fully masked rows)"
    if T != S or T % 128:
      return f"splash attention here needs self-attention with a length multiple of 128, got T={T}, S={S}"
    return None
  return (f"the Pallas kernels compile for GPU (Triton) and route to splash attention on TPU; on {backend!r} "
          "they run only with interpret=True")


def _splash_attention(q_BTHD, k, v, *, q_segment_ids_BT, causal, sliding_window, scale, kv_heads_first, softcap,
                      interpret=False):
  """TPU: upstream splash attention (block-sparse static mask from causal/window, segment ids, soft cap)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  B, T, H, D = q_BTHD.shape
  if sliding_window:
    mask = sa.LocalMask((T, T), window_size=(sliding_window - 1, 0 if causal else None), offset=0)
  else:
    mask = sa.CausalMask((T, T)) if causal else sa.FullMask((T, T))
  kernel = sa.make_splash_mha(sa.MultiHeadMask([mask] * H), head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=softcap or None, interpret=interpret)
  k_BKSD, v_BKSD = (x if kv_heads_first else x.transpose(0, 2, 1, 3) for x in (k, v))
  seg = None if q_segment_ids_BT is None else sa.SegmentIds(q=q_segment_ids_BT, kv=q_segment_ids_BT)
  q_BHTD = (q_BTHD * jnp.asarray(scale, q_BTHD.dtype)).transpose(0, 2, 1, 3)  # splash does not scale
  out_BHTD = jax.vmap(kernel)(q_BHTD, k_BKSD, v_BKSD, seg)
  return out_BHTD.transpose(0, 2, 1, 3)


def flash_attention(q_BTHD, k_BSKD, v_BSKD, *, q_segment_ids_BT=None, kv_segment_ids_BS=None, q_positions_BT=None,
                    kv_positions_BS=None, causal=True, sliding_window=0, scale=None, kv_heads_first=False,
                    q_branch_ids_BT=None, kv_branch_ids_BS=None, softcap=0.0, block_q=128, block_k=64,
                    block_q_bwd=64, block_k_bwd=64, num_warps=None, num_stages=2, interpret=False):
  """Attention with ``attention_reference``'s arguments and masks, differentiable (dq, dk, dv kernels).

  Block sizes are upper bounds (a short sequence uses the next power of 2 >= 16 above its length); T and S are
  padded to them inside. ``interpret=True`` runs the Triton kernels in the Pallas interpreter on any backend.
  """
  reason = unsupported_reason(q_BTHD, k_BSKD, v_BSKD, q_segment_ids_BT=q_segment_ids_BT,
                              kv_segment_ids_BS=kv_segment_ids_BS, q_positions_BT=q_positions_BT,
                              kv_positions_BS=kv_positions_BS, causal=causal, sliding_window=sliding_window,
                              kv_heads_first=kv_heads_first, q_branch_ids_BT=q_branch_ids_BT, block_q=block_q,
                              block_k=block_k, block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd,
                              interpret=interpret)
  if reason:
    raise NotImplementedError(reason)
  B, T, H, D = q_BTHD.shape
  seq_axis = 2 if kv_heads_first else 1
  S, K = k_BSKD.shape[seq_axis], k_BSKD.shape[3 - seq_axis]
  if H % K or k_BSKD.shape != v_BSKD.shape or not q_BTHD.dtype == k_BSKD.dtype == v_BSKD.dtype:
    raise ValueError(f"need q heads a multiple of kv heads and one dtype: q {q_BTHD.shape} {q_BTHD.dtype}, "
                     f"k {k_BSKD.shape} {k_BSKD.dtype}, v {v_BSKD.shape} {v_BSKD.dtype}")
  scale = D ** -0.5 if scale is None else scale
  if not interpret and jax.default_backend() == "tpu":
    return _splash_attention(q_BTHD, k_BSKD, v_BSKD, q_segment_ids_BT=q_segment_ids_BT, causal=causal,
                             sliding_window=sliding_window, scale=scale, kv_heads_first=kv_heads_first,
                             softcap=softcap)

  bq, bk = _block(block_q, T), _block(block_k, S)
  bq_bwd, bk_bwd = _block(block_q_bwd, T), _block(block_k_bwd, S)
  T_pad = -(-T // math.lcm(bq, bq_bwd)) * math.lcm(bq, bq_bwd)
  S_pad = -(-S // math.lcm(bk, bk_bwd)) * math.lcm(bk, bk_bwd)
  D_pad = max(16, pl.next_power_of_2(D))                          # Triton dot dims; zero columns add nothing
  cfg = _Config(scale=float(scale), causal=bool(causal), window=int(sliding_window), softcap=float(softcap),
                kv_heads_first=kv_heads_first, groups=H // K, block_q=bq, block_k=bk, block_q_bwd=bq_bwd,
                block_k_bwd=bk_bwd, num_warps=num_warps or (4 if D_pad <= 64 else 8), num_stages=num_stages,
                interpret=interpret)

  if q_segment_ids_BT is None:                                   # as the reference: kv ids alone mask nothing
    q_seg, kv_seg = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
  else:
    q_seg = q_segment_ids_BT.astype(jnp.int32)
    kv_seg = q_seg if kv_segment_ids_BS is None else kv_segment_ids_BS.astype(jnp.int32)
  q_pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if q_positions_BT is None else q_positions_BT
  kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)) if kv_positions_BS is None else kv_positions_BS
  q_br = kv_br = None
  if q_branch_ids_BT is not None:
    q_br = q_branch_ids_BT.astype(jnp.int32)
    kv_br = q_br if kv_branch_ids_BS is None else kv_branch_ids_BS.astype(jnp.int32)
  ids = dict(q_seg=_pad_to(q_seg, 1, T_pad, Q_PAD), kv_seg=_pad_to(kv_seg, 1, S_pad, KV_PAD),
             q_pos=_pad_to(q_pos.astype(jnp.int32), 1, T_pad), kv_pos=_pad_to(kv_pos.astype(jnp.int32), 1, S_pad),
             q_br=_pad_to(q_br, 1, T_pad), kv_br=_pad_to(kv_br, 1, S_pad))
  visible = functools.partial(_visible_blocks, ids["q_seg"], ids["kv_seg"], ids["q_pos"], ids["kv_pos"],
                              causal=cfg.causal, window=cfg.window)
  ids["fwd"] = _block_range(visible(bq, bk), 2)
  visible_bwd = visible(bq_bwd, bk_bwd)
  ids["dq"], ids["dkv"] = _block_range(visible_bwd, 2), _block_range(visible_bwd, 1)

  q = _pad_to(_pad_to(q_BTHD, 1, T_pad), 3, D_pad)
  k, v = (_pad_to(_pad_to(x, seq_axis, S_pad), 3, D_pad) for x in (k_BSKD, v_BSKD))
  out = _flash(cfg, q, k, v, ids)
  return out[:, :T, :, :D]
