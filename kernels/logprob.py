"""Fused LM-head log-probs: log p(target) (and the entropy) from final hidden states h [N, D] and the output
matrix w [D, V], in vocabulary blocks with an online logsumexp, so the [N, V] logits never exist, in the forward
pass or the backward.

Layout (Triton semantics: grid programs run in parallel and nothing accumulates across the grid). The forward
grid is (N / block_n, splits); a program walks its split of the vocabulary block by block, each
[block_n, block_v] logits tile accumulated in fp32 over block_d slices of D, and writes per row and split the
logsumexp, the target's logit and the expected logit; XLA combines the splits (a few [splits, N] arrays). The
backward has the same grid: it recomputes each tile from h, w and the saved logsumexp and atomically adds the
tile's products into fp32 d h [N, D] (summed over vocabulary blocks) and d w [D, V] (summed over N blocks).
Compiled on GPU the kernels lower through Triton; on CPU pass ``interpret=True``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.custom_derivatives import SymbolicZero
from jax.experimental.pallas import triton as plgpu

_RUNNING_MAX_START = float(jnp.finfo(jnp.float32).min)  # finite: exp(m_old - m_new) never sees -inf - -inf
_TARGET_PROGRAMS = 256  # split the vocabulary until about this many programs run (H100: 132 SMs)


class _Config(NamedTuple):  # static: hashable for custom_vjp
  n_vocab: int          # real V; columns past it are padding, masked to -inf
  temperature: float
  entropy: bool
  block_n: int
  block_v: int
  block_d: int
  per_split: int        # vocabulary blocks per split (the last split may have fewer)
  interpret: bool


def _splits(n_vblocks, c):
  return -(-n_vblocks // c.per_split)


def _split_blocks(n_vblocks, c):
  """(first vocabulary block, number of blocks) of this program's split."""
  first = pl.program_id(1) * c.per_split
  return first, jnp.minimum(c.per_split, n_vblocks - first)


def _logits_tile(h_ref, w_ref, vb, c):
  """(x, cols): [block_n, block_v] fp32 logits / temperature of vocabulary block ``vb`` (-inf past V) and their
  column ids."""
  bn, D = h_ref.shape
  col0 = pl.multiple_of(vb * c.block_v, c.block_v)

  def body(k, acc_NV):
    d0 = pl.multiple_of(k * c.block_d, c.block_d)
    return acc_NV + jnp.dot(h_ref[:, pl.ds(d0, c.block_d)], w_ref[pl.ds(d0, c.block_d), pl.ds(col0, c.block_v)],
                            preferred_element_type=jnp.float32)

  acc_NV = jax.lax.fori_loop(0, D // c.block_d, body, jnp.zeros((bn, c.block_v), jnp.float32))
  cols_NV = col0 + jax.lax.broadcasted_iota(jnp.int32, (bn, c.block_v), 1)
  return jnp.where(cols_NV < c.n_vocab, acc_NV / c.temperature, -jnp.inf), cols_NV


def _fwd_kernel(h_ref, t_ref, w_ref, lse_ref, xt_ref, *ex_ref, c: _Config):
  n_vblocks = w_ref.shape[1] // c.block_v
  first, count = _split_blocks(n_vblocks, c)
  t_N1 = t_ref[...][:, None]

  def body(k, carry):
    m_N, z_N, xz_N, xt_N = carry  # running max, sum exp(x - m), sum exp(x - m) x, target logit
    x_NV, cols_NV = _logits_tile(h_ref, w_ref, first + k, c)
    m_new_N = jnp.maximum(m_N, jnp.max(x_NV, axis=1))
    rescale_N = jnp.exp(m_N - m_new_N)
    e_NV = jnp.exp(x_NV - m_new_N[:, None])
    z_N = z_N * rescale_N + jnp.sum(e_NV, axis=1)
    if c.entropy:  # where: 0 * -inf at padded columns is nan
      xz_N = xz_N * rescale_N + jnp.sum(jnp.where(cols_NV < c.n_vocab, e_NV * x_NV, 0.0), axis=1)
    xt_N = xt_N + jnp.sum(jnp.where(cols_NV == t_N1, x_NV, 0.0), axis=1)
    return m_new_N, z_N, xz_N, xt_N

  zeros_N = jnp.zeros(t_N1.shape[:1], jnp.float32)
  m_N, z_N, xz_N, xt_N = jax.lax.fori_loop(
      0, count, body, (jnp.full_like(zeros_N, _RUNNING_MAX_START), zeros_N, zeros_N, zeros_N))
  lse_ref[...] = (m_N + jnp.log(z_N))[None]
  xt_ref[...] = xt_N[None]
  if c.entropy:
    ex_ref[0][...] = (xz_N / z_N)[None]  # E[x] under this split's softmax


def _forward(h_ND, w_DV, t_N, c: _Config):
  """(logp_N or (logp_N, entropy_N), lse_N) on padded inputs."""
  N, D = h_ND.shape
  n_vblocks = w_DV.shape[1] // c.block_v
  S = _splits(n_vblocks, c)
  row_spec = pl.BlockSpec((c.block_n,), lambda i, s: (i,))
  split_spec = pl.BlockSpec((1, c.block_n), lambda i, s: (s, i))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, c=c),
      grid=(N // c.block_n, S),
      in_specs=[pl.BlockSpec((c.block_n, D), lambda i, s: (i, 0)), row_spec, pl.no_block_spec],
      out_specs=[split_spec] * (3 if c.entropy else 2),
      out_shape=[jax.ShapeDtypeStruct((S, N), jnp.float32)] * (3 if c.entropy else 2),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=c.interpret, name="token_logprobs_fwd",
  )(h_ND, t_N, w_DV)
  lse_SN, xt_SN = outs[:2]
  lse_N = jax.nn.logsumexp(lse_SN, axis=0)
  logp_N = jnp.sum(xt_SN, axis=0) - lse_N
  if not c.entropy:
    return logp_N, lse_N
  entropy_N = lse_N - jnp.sum(jnp.exp(lse_SN - lse_N) * outs[2], axis=0)  # lse - E[x]
  return (logp_N, entropy_N), lse_N


def _bwd_kernel(*refs, c: _Config, want_dh: bool, want_dw: bool, ent: bool):
  refs = list(refs)
  h_ref, t_ref, lse_ref, glp_ref = (refs.pop(0) for _ in range(4))
  ent_ref, gent_ref = (refs.pop(0), refs.pop(0)) if ent else (None, None)
  w_ref = refs.pop(0)
  dh_ref = refs[-2 if want_dw else -1] if want_dh else None  # after the zero inputs aliased to them
  dw_ref = refs[-1] if want_dw else None
  n_vblocks = w_ref.shape[1] // c.block_v
  first, count = _split_blocks(n_vblocks, c)
  bn, D = h_ref.shape
  i = pl.program_id(0)  # read here: the interpreter substitutes program ids only at the kernel's top level
  row0 = pl.multiple_of(i * bn, bn)
  lse_N1 = lse_ref[...][:, None]

  def v_body(k, _):
    vb = first + (k + i) % count  # row blocks start at different columns: fewer atomic collisions
    x_NV, cols_NV = _logits_tile(h_ref, w_ref, vb, c)
    p_NV = jnp.exp(x_NV - lse_N1)
    # d logp[t] / dx = onehot(t) - p;  d entropy / dx = -p (log p + entropy), log p = x - lse
    dx_NV = glp_ref[...][:, None] * (jnp.where(cols_NV == t_ref[...][:, None], 1.0, 0.0) - p_NV)
    if ent:
      dx_NV -= gent_ref[...][:, None] * jnp.where(cols_NV < c.n_vocab,
                                                  p_NV * (x_NV - lse_N1 + ent_ref[...][:, None]), 0.0)
    dx_NV = (dx_NV / c.temperature).astype(h_ref.dtype)  # d logits = d x / temperature
    cols = pl.ds(pl.multiple_of(vb * c.block_v, c.block_v), c.block_v)

    def d_body(kd, _):
      d = pl.ds(pl.multiple_of(kd * c.block_d, c.block_d), c.block_d)
      if want_dh:
        plgpu.atomic_add(dh_ref, (pl.ds(row0, bn), d), jax.lax.dot_general(
            dx_NV, w_ref[d, cols], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32))
      if want_dw:
        plgpu.atomic_add(dw_ref, (d, cols), jax.lax.dot_general(
            h_ref[:, d], dx_NV, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))

    jax.lax.fori_loop(0, D // c.block_d, d_body, None)

  jax.lax.fori_loop(0, count, v_body, None)


def _backward(h_ND, w_DV, t_N, lse_N, g_lp_N, ent_N, g_ent_N, c: _Config, want_dh: bool, want_dw: bool):
  """(d h [N, D] or None, d w [D, V] or None) in the inputs' dtypes, accumulated in fp32; ``g_ent_N`` None:
  the entropy has no cotangent."""
  N, D = h_ND.shape
  S = _splits(w_DV.shape[1] // c.block_v, c)
  row_spec = pl.BlockSpec((c.block_n,), lambda i, s: (i,))
  ent = g_ent_N is not None
  rows = [t_N, lse_N, g_lp_N] + ([ent_N, g_ent_N] if ent else [])
  zeros = ([jnp.zeros(h_ND.shape, jnp.float32)] if want_dh else []) + (
      [jnp.zeros(w_DV.shape, jnp.float32)] if want_dw else [])
  n_in = 1 + len(rows) + 1
  grads = list(pl.pallas_call(
      functools.partial(_bwd_kernel, c=c, want_dh=want_dh, want_dw=want_dw, ent=ent),
      grid=(N // c.block_n, S),
      in_specs=[pl.BlockSpec((c.block_n, D), lambda i, s: (i, 0))] + [row_spec] * len(rows)
               + [pl.no_block_spec] * (1 + len(zeros)),
      out_specs=[pl.no_block_spec] * len(zeros),
      out_shape=[jax.ShapeDtypeStruct(z.shape, jnp.float32) for z in zeros],
      input_output_aliases={n_in + j: j for j in range(len(zeros))},  # atomic adds start from zeros
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=2),
      interpret=c.interpret, name="token_logprobs_bwd",
  )(h_ND, *rows, w_DV, *zeros))
  dh_ND = grads.pop(0).astype(h_ND.dtype) if want_dh else None
  dw_DV = grads.pop(0).astype(w_DV.dtype) if want_dw else None
  return dh_ND, dw_DV


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Wanted:  # which inputs need a gradient: static, a residual without leaves
  dh: bool
  dw: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(h_ND, w_DV, t_N, c: _Config):
  return _forward(h_ND, w_DV, t_N, c)[0]


def _fused_fwd(h_ND, w_DV, t_N, c: _Config):  # symbolic zeros: CustomVJPPrimal(value, perturbed) arguments
  out, lse_N = _forward(h_ND.value, w_DV.value, t_N.value, c)
  ent_N = out[1] if c.entropy else None
  return out, (h_ND.value, w_DV.value, t_N.value, lse_N, ent_N, _Wanted(h_ND.perturbed, w_DV.perturbed))


def _fused_bwd(c: _Config, res, g):
  h_ND, w_DV, t_N, lse_N, ent_N, wanted = res
  g_lp_N, g_ent_N = g if c.entropy else (g, None)
  if isinstance(g_lp_N, SymbolicZero):
    g_lp_N = jnp.zeros_like(lse_N)
  if isinstance(g_ent_N, SymbolicZero):
    g_ent_N = None
  dh_ND, dw_DV = _backward(h_ND, w_DV, t_N, lse_N, g_lp_N, ent_N, g_ent_N, c, wanted.dh, wanted.dw)
  return dh_ND, dw_DV, None  # None: no gradient (targets, or an input not being differentiated)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _pad_to(x, axis, multiple):
  """x zero-padded along ``axis`` to a multiple (no copy when it already is one)."""
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def token_logprobs(h_ND, w_DV, targets_N, *, temperature: float = 1.0, return_entropy: bool = False,
                   interpret: bool = False, block_n: int = 64, block_v: int = 128, block_d: int = 64,
                   v_splits: int = 0):
  """log p(target) [N] float32 of softmax(h @ w / temperature), and with ``return_entropy`` also that
  distribution's entropy [N]; differentiable w.r.t. h and w (both outputs), never holding [N, V] logits.

  h_ND: final hidden states (fp32 or bf16); w_DV: the LM head (embed.T when tied); targets_N: int token ids.
  w is cast to h's dtype (as the model casts the head to its compute dtype); matmuls run in that dtype with fp32
  accumulation, and d h / d w come back in the inputs' dtypes.
  ``temperature``: a Python float. Any N, V and D: inputs are zero-padded to the blocks, padded vocabulary
  columns masked to -inf (w is copied only when its dtype differs from h's or V / D is not a multiple of block_v /
  block_d). On GPU keep every block a power of two and >= 16 (Triton).
  ``v_splits``: vocabulary splits per row block (0: enough for about 256 programs); more splits, more programs.
  ``interpret=True`` runs the kernels in Pallas' interpreter (CPU)."""
  N, D = h_ND.shape
  V = w_DV.shape[1]
  w_DV = w_DV.astype(h_ND.dtype)
  n_vblocks = -(-V // block_v)
  n_nblocks = -(-N // block_n)
  splits = v_splits or max(1, -(-_TARGET_PROGRAMS // n_nblocks))
  c = _Config(n_vocab=V, temperature=float(temperature), entropy=bool(return_entropy), block_n=block_n,
              block_v=block_v, block_d=block_d, per_split=-(-n_vblocks // min(splits, n_vblocks)),
              interpret=bool(interpret))
  h_pad = _pad_to(_pad_to(h_ND, 0, block_n), 1, block_d)
  w_pad = _pad_to(_pad_to(w_DV, 0, block_d), 1, block_v)
  t_pad = _pad_to(targets_N.astype(jnp.int32), 0, block_n)
  out = _fused(h_pad, w_pad, t_pad, c)
  return jax.tree.map(lambda x: x[:N], out)


def token_logprobs_reference(h_ND, w_DV, targets_N, *, temperature: float = 1.0, return_entropy: bool = False,
                             **kernel_options):
  """``token_logprobs`` in plain XLA (full [N, V] fp32 logits, log_softmax, gather); ``kernel_options``
  (interpret, block sizes) are accepted and ignored, so the two are interchangeable."""
  del kernel_options
  logits_NV = jnp.dot(h_ND, w_DV.astype(h_ND.dtype), preferred_element_type=jnp.float32) / temperature
  logq_NV = jax.nn.log_softmax(logits_NV, axis=-1)
  logp_N = jnp.take_along_axis(logq_NV, targets_N[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if not return_entropy:
    return logp_N
  return logp_N, -jnp.sum(jnp.exp(logq_NV) * logq_NV, axis=-1)
