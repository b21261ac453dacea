"""Fused sampling over logits [B, V]: greedy, temperature, top-k, top-p, min-p, the repetition penalty and banned
tokens, in vocabulary blocks and without sorting. The tokens and log-probs are those of the engine's XLA path
(``jalign.generation.sampling.sample``, reproduced here by ``sample_reference``) for the same per-row keys.

One program per row walks the row block by block, once per step:
  1. the max of the original and of the choice logits, and the greedy pick (first index of the max);
  2. top-k: the k-th largest choice logit, by bisection on the floats' ordered bit patterns (exact, <= 32 walks);
  3. the softmax sums, for the log-prob and over the top-k set;
  4. top-p: the engine's 32 bisection steps on the probability threshold;
  5. the kept mass, then the inverse-CDF pick with the row's uniform, drawn outside the kernel as the engine
     draws it.
A row skips the steps it does not use (greedy rows stop after 3). Only the order of the fp32 sums differs from
the engine (blocked here), so a token can differ only when a sum lands within rounding of a threshold or of the
uniform. Compiled on GPU the kernel lowers through Triton; on CPU pass ``interpret=True``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TOP_P_ITERS = 32  # the engine's bisection steps on the top-p threshold
_KEY_NEG_INF = int(np.float32(-np.inf).view(np.int32) ^ 0x7FFFFFFF)  # _to_key(-inf), a plain int for Triton


def _to_key(x):
  """int32 that orders as the float32 x does (non-nan): negative floats get their magnitude bits flipped."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(i >= 0, i, i ^ 0x7FFFFFFF)


def _from_key(k):
  return jax.lax.bitcast_convert_type(jnp.where(k >= 0, k, k ^ 0x7FFFFFFF), jnp.float32)


def _effective_k(top_k_B, k_cap, V):
  """The engine's top-k rule as one number per row: 0 off, else clip(top_k, 1, min(k_cap, V))."""
  if k_cap <= 0:
    return jnp.zeros_like(top_k_B, jnp.int32)
  return jnp.where(top_k_B > 0, jnp.clip(top_k_B, 1, min(k_cap, V)), 0).astype(jnp.int32)


def _uniforms(keys_B):
  """One uniform per row, drawn exactly as the engine's ``draw_from``."""
  return jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys_B)


def _sample_kernel(*refs, n_vocab: int, block_v: int, penalty: bool, banned: bool):
  refs = list(refs)
  x_ref = refs.pop(0)
  seen_ref, pen_ref = (refs.pop(0), refs.pop(0)) if penalty else (None, None)
  ban_ref = refs.pop(0) if banned else None
  temp_ref, k_ref, top_p_ref, min_p_ref, u_ref, tok_ref, m_ref, z_ref = refs
  n_blocks = x_ref.shape[0] // block_v
  greedy = temp_ref[...] <= 0
  inv_t = 1.0 / jnp.where(greedy, 1.0, temp_ref[...])

  def load(b):
    """(original, choice) scaled logits of block b, -inf past V, and their column ids."""
    cols = pl.multiple_of(b * block_v, block_v)
    sl = pl.ds(cols, block_v)
    cols_V = cols + jax.lax.broadcasted_iota(jnp.int32, (block_v,), 0)
    x_V = jnp.where(cols_V < n_vocab, x_ref[sl].astype(jnp.float32), -jnp.inf)
    xo_V = x_V * inv_t
    if penalty:
      p = pen_ref[...]
      x_V = jnp.where(seen_ref[sl], jnp.where(x_V > 0, x_V / p, x_V * p), x_V)
    xc_V = x_V * inv_t
    if banned:
      xc_V = jnp.where(ban_ref[sl], -jnp.inf, xc_V)
    return xo_V, xc_V, cols_V

  def walk(f, init, n=n_blocks):
    return jax.lax.fori_loop(0, n, lambda b, c: f(b, c, *load(b)), init)

  # 1. maxima and the greedy pick
  def maxima(b, c, xo_V, xc_V, cols_V):
    m_o, m_c, arg = c
    bm = jnp.max(xc_V)
    barg = jnp.min(jnp.where(xc_V == bm, cols_V, n_vocab))
    return jnp.maximum(m_o, jnp.max(xo_V)), jnp.maximum(m_c, bm), jnp.where(bm > m_c, barg, arg)

  m_o, m_c, arg = walk(maxima, (jnp.float32(-jnp.inf), jnp.float32(-jnp.inf), jnp.int32(0)))

  # 2. top-k: the largest key t with count(x >= t) >= k is the k-th largest logit's key
  k = k_ref[...]
  use_k = (k > 0) & ~greedy

  def count_ge(thr):
    return walk(lambda b, n, xo_V, xc_V, cols_V: n + jnp.sum((xc_V >= thr).astype(jnp.int32)), jnp.int32(0))

  def bisect_k(lo_hi):
    lo, hi = lo_hi
    mid = (lo >> 1) + (hi >> 1) + (((lo & 1) + (hi & 1) + 1) >> 1)  # ceil((lo + hi) / 2) without overflow
    ok = count_ge(_from_key(mid)) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  hi = _to_key(m_c)
  lo, _ = jax.lax.while_loop(lambda lo_hi: lo_hi[0] < lo_hi[1], bisect_k,
                             (jnp.where(use_k, _KEY_NEG_INF, hi), hi))
  kth = jnp.where(use_k, _from_key(lo), -jnp.inf)

  # 3. softmax sums: over everything (log-prob), over the top-k set (the truncated distribution)
  def sums(b, c, xo_V, xc_V, cols_V):
    keep_V = (xc_V >= kth) & (xc_V > -jnp.inf)
    return (c[0] + jnp.sum(jnp.exp(xo_V - m_o)),
            c[1] + jnp.sum(jnp.where(keep_V, jnp.exp(xc_V - m_c), 0.0)))

  z_o, z_c = walk(sums, (jnp.float32(0), jnp.float32(0)))

  def probs(xc_V):
    return jnp.where((xc_V >= kth) & (xc_V > -jnp.inf), jnp.exp(xc_V - m_c), 0.0) / z_c

  # 4. top-p: the largest tau with mass(p >= tau) >= top_p, by the engine's bisection; min-p against max p = 1 / z
  top_p = top_p_ref[...]
  p_max = 1.0 / z_c

  def bisect_p(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)

    def mass(b, s, xo_V, xc_V, cols_V):
      p_V = probs(xc_V)
      return s + jnp.sum(jnp.where(p_V >= mid, p_V, 0.0))

    ok = walk(mass, jnp.float32(0)) >= top_p
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  n_bisect = TOP_P_ITERS * (~greedy & (top_p < 1)).astype(jnp.int32)  # not where(c, 32, 0): Triton mistypes it
  tau, _ = jax.lax.fori_loop(0, n_bisect, bisect_p, (jnp.float32(0), p_max * 1.0001 + 1e-30))
  p_min = min_p_ref[...] * p_max

  def weights(xc_V):
    p_V = probs(xc_V)
    return jnp.where((p_V >= tau) & (p_V >= p_min), p_V, 0.0)

  # 5. inverse CDF: the first index whose cumulative weight exceeds u * total
  n_draw = n_blocks * (~greedy).astype(jnp.int32)
  total = walk(lambda b, s, xo_V, xc_V, cols_V: s + jnp.sum(weights(xc_V)), jnp.float32(0), n_draw)
  target = u_ref[...] * total

  def draw(b, c, xo_V, xc_V, cols_V):
    prefix, n = c
    cdf_V = prefix + jnp.cumsum(weights(xc_V))
    return jnp.max(cdf_V), n + jnp.sum((cdf_V <= target).astype(jnp.int32))

  _, n_below = walk(draw, (jnp.float32(0), jnp.int32(0)), n_draw)
  tok_ref[...] = jnp.where(greedy, arg, jnp.minimum(n_below, n_vocab - 1))
  m_ref[...] = m_o
  z_ref[...] = z_o


def sample(logits_BV, keys_B, *, temperature_B, top_k_B, top_p_B, min_p_B, k_cap: int, penalty_B=None,
           seen_BV=None, banned_BV=None, interpret: bool = False, block_v: int = 2048):
  """(token_B int32, logprob_B float32) with the signature and results of the engine's
  ``jalign.generation.sampling.sample``: greedy where temperature <= 0, else a draw from the truncated
  (top-k, then top-p and min-p on the renormalised top-k set), temperature-scaled distribution, with one uniform
  per row from ``keys_B``. The log-prob is that of the temperature-scaled distribution before truncation and
  before the repetition penalty (``seen_BV``, ``penalty_B``); ``banned_BV`` tokens are never chosen.
  ``k_cap``: static largest top_k. ``block_v``: vocabulary block (a power of two on GPU); V is padded to it."""
  B, V = logits_BV.shape
  pad = -V % block_v
  pad_cols = lambda a: jnp.pad(a, ((0, 0), (0, pad))) if pad else a  # masked to -inf in the kernel
  row = pl.BlockSpec((None, V + pad), lambda b: (b, 0))
  scalar = pl.BlockSpec((None,), lambda b: (b,))
  args, specs = [pad_cols(logits_BV)], [row]
  if seen_BV is not None:
    args += [pad_cols(seen_BV), penalty_B.astype(jnp.float32)]
    specs += [row, scalar]
  if banned_BV is not None:
    args += [pad_cols(banned_BV)]
    specs += [row]
  args += [temperature_B.astype(jnp.float32), _effective_k(top_k_B, k_cap, V), top_p_B.astype(jnp.float32),
           min_p_B.astype(jnp.float32), _uniforms(keys_B)]
  specs += [scalar] * 5
  kernel = functools.partial(_sample_kernel, n_vocab=V, block_v=block_v, penalty=seen_BV is not None,
                             banned=banned_BV is not None)
  token_B, m_B, z_B = pl.pallas_call(
      kernel, grid=(B,), in_specs=specs, out_specs=[scalar] * 3,
      out_shape=[jax.ShapeDtypeStruct((B,), jnp.int32)] + [jax.ShapeDtypeStruct((B,), jnp.float32)] * 2,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret, name="sample")(*args)
  # log_softmax(x / T) at the token, as jax.nn.log_softmax computes it: (x - max) - log(sum(exp(x - max)))
  inv_t_B = 1.0 / jnp.where(temperature_B <= 0, 1.0, temperature_B)
  x_B = jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0].astype(jnp.float32)
  return token_B, (x_B * inv_t_B - m_B) - jnp.log(z_B)


def sample_reference(logits_BV, keys_B, *, temperature_B, top_k_B, top_p_B, min_p_B, k_cap: int, penalty_B=None,
                     seen_BV=None, banned_BV=None, **kernel_options):
  """``sample`` in plain XLA: the engine's algorithm on whole rows (every row runs every step; the engine skips
  steps no row uses, which changes nothing), its draw by one cumulative sum over the vocabulary where the engine
  takes it in blocks (the same draw up to float rounding). ``kernel_options`` are accepted and ignored."""
  del kernel_options
  B, V = logits_BV.shape
  x_BV = logits_BV.astype(jnp.float32)
  greedy_B = temperature_B <= 0
  inv_t_B1 = (1.0 / jnp.where(greedy_B, 1.0, temperature_B))[:, None]
  logp_BV = jax.nn.log_softmax(x_BV * inv_t_B1, axis=-1)
  if seen_BV is not None:
    p_B1 = penalty_B[:, None]
    x_BV = jnp.where(seen_BV, jnp.where(x_BV > 0, x_BV / p_B1, x_BV * p_B1), x_BV)
  xc_BV = x_BV * inv_t_B1
  if banned_BV is not None:
    xc_BV = jnp.where(banned_BV, -jnp.inf, xc_BV)
  k_B = _effective_k(top_k_B, k_cap, V)
  kth_B = jnp.full((B,), -jnp.inf)
  if k_cap > 0:
    top_BK = jax.lax.top_k(xc_BV, min(k_cap, V))[0]
    kth_B = jnp.where(k_B > 0, jnp.take_along_axis(top_BK, jnp.maximum(k_B - 1, 0)[:, None], axis=-1)[:, 0],
                      -jnp.inf)
  keep_BV = (xc_BV >= kth_B[:, None]) & (xc_BV > -jnp.inf)
  probs_BV = jax.nn.softmax(jnp.where(keep_BV, xc_BV, -jnp.inf), axis=-1)

  def bisect_p(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    ok = jnp.sum(jnp.where(probs_BV >= mid[:, None], probs_BV, 0.0), axis=-1) >= top_p_B
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  p_max_B = jnp.max(probs_BV, axis=-1)
  tau_B, _ = jax.lax.fori_loop(0, TOP_P_ITERS, bisect_p, (jnp.zeros(B), p_max_B * 1.0001 + 1e-30))
  keep_BV &= (top_p_B[:, None] >= 1.0) | (probs_BV >= tau_B[:, None])
  keep_BV &= probs_BV >= (min_p_B * p_max_B)[:, None]
  cdf_BV = jnp.cumsum(jnp.where(keep_BV, probs_BV, 0.0), axis=-1)
  drawn_B = jnp.sum(cdf_BV <= (_uniforms(keys_B) * cdf_BV[:, -1])[:, None], axis=-1)
  token_B = jnp.where(greedy_B, jnp.argmax(xc_BV, axis=-1), jnp.minimum(drawn_B, V - 1)).astype(jnp.int32)
  return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
