"""Choosing the next token from logits ``[B, V]``: greedy, temperature, top-k, top-p, min-p and repetition
penalty, every parameter a per-row traced array (changing a value never recompiles), without sorting the
vocabulary. Log-probs are those of the temperature-scaled distribution before truncation, which is what the
trainer's forward recomputes (``log_softmax(logits / T)``; greedy rows use T = 1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
TOP_P_ITERS = 32  # bisection steps on the probability threshold: within max(p) * 2**-32 of the exact one


def top_k_mask(scaled_BV, top_k_B, k_cap: int):
  """Tokens among each row's ``top_k`` largest (``top_k`` <= 0: all); ``k_cap`` is the static largest k."""
  if k_cap <= 0:
    return jnp.ones(scaled_BV.shape, bool)
  vals_BK = jax.lax.top_k(scaled_BV, min(k_cap, scaled_BV.shape[-1]))[0]
  kth_B = jnp.take_along_axis(vals_BK, jnp.clip(top_k_B - 1, 0, vals_BK.shape[-1] - 1)[:, None], axis=-1)
  return (top_k_B[:, None] <= 0) | (scaled_BV >= kth_B)


def top_p_mask(probs_BV, top_p_B):
  """The smallest set of most probable tokens whose mass reaches ``top_p`` (1: all): the tokens whose
  probability is at least the largest threshold tau with sum(p >= tau) >= top_p, found by bisection on tau (about
  32 masked sums over V instead of a sort)."""
  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    mass = jnp.sum(jnp.where(probs_BV >= mid[:, None], probs_BV, 0.0), axis=-1)
    ok = mass >= top_p_B
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  B = probs_BV.shape[0]
  lo, _ = jax.lax.fori_loop(0, TOP_P_ITERS, body, (jnp.zeros(B), jnp.max(probs_BV, axis=-1) * 1.0001 + 1e-30))
  return (top_p_B[:, None] >= 1.0) | (probs_BV >= lo[:, None])


def argmax(x_BV):
  """Index of each row's largest entry (the first on ties), as two plain reductions: XLA:CPU's variadic argmax
  reduction is several times slower at [32, 8192]."""
  m_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
  iota_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
  return jnp.minimum(jnp.min(jnp.where(x_BV == m_B1, iota_BV, x_BV.shape[-1]), axis=-1), x_BV.shape[-1] - 1)


def apply_repetition_penalty(logits_BV, seen_BV, penalty_B):
  """CTRL's penalty as transformers and NeMo apply it: seen tokens' logits divided by the penalty when positive,
  multiplied when negative (1: off)."""
  p = penalty_B[:, None]
  return jnp.where(seen_BV, jnp.where(logits_BV > 0, logits_BV / p, logits_BV * p), logits_BV)


def draw_from(weights_BV, keys_B, block: int = 128):
  """One index per row with probability proportional to ``weights_BV`` (>= 0), by inverse CDF: one uniform
  number per row against the cumulative weights, instead of random noise for every vocabulary entry. The CDF is
  taken in two levels (blocks of ``block`` entries, then the entries of the one block the draw falls in): a full
  cumulative sum over the vocabulary is XLA:CPU's slowest op here. A zero weight is never chosen."""
  B, V = weights_BV.shape
  nb = -(-V // block)
  w_BNK = jnp.pad(weights_BV, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
  last = lambda x: jnp.max(jnp.where(x > 0, jax.lax.broadcasted_iota(jnp.int32, x.shape, 1), 0), axis=-1)
  sums_BN = jnp.sum(w_BNK, axis=-1)
  cdf_BN = jnp.cumsum(sums_BN, axis=-1)
  u_B = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys_B) * cdf_BN[:, -1]
  # the first block (then entry) whose cumulative weight exceeds u; rounding can leave u past a block's own
  # total, so each level is capped at its last positive weight
  j_B = jnp.minimum(jnp.sum(cdf_BN <= u_B[:, None], axis=-1), last(sums_BN))
  before_B = jnp.where(j_B > 0, jnp.take_along_axis(cdf_BN, jnp.maximum(j_B - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
  w_BK = jnp.take_along_axis(w_BNK, j_B[:, None, None], axis=1)[:, 0]
  cdf_BK = before_B[:, None] + jnp.cumsum(w_BK, axis=-1)
  i_B = jnp.minimum(jnp.sum(cdf_BK <= u_B[:, None], axis=-1), last(w_BK))
  return j_B * block + i_B


def sample(logits_BV, keys_B, *, temperature_B, top_k_B, top_p_B, min_p_B, k_cap: int, penalty_B=None,
           seen_BV=None, banned_BV=None):
  """(token_B, logprob_B): greedy where temperature <= 0, else a draw from the truncated, temperature-scaled
  distribution. The repetition penalty (``seen_BV``) changes the choice, not the returned log-prob. Truncation
  order: top-k, then top-p and min-p on the renormalised top-k set (as transformers and vLLM). ``banned_BV``
  (e.g. stop tokens before ``min_tokens``) are never chosen. ``keys_B``: the per-row keys, or a function
  returning them (called only when some row samples). The penalty and the bans are selects fused into the
  reductions that read the logits, and the log-prob is the chosen logit minus a log-sum-exp: no [B, V] array
  beyond the scaled logits is written on a greedy step."""
  logits_BV = logits_BV.astype(jnp.float32)
  inv_t_B1 = (1.0 / jnp.where(temperature_B <= 0, 1.0, temperature_B))[:, None]
  scaled_BV = logits_BV * inv_t_B1
  logz_B = jax.nn.logsumexp(scaled_BV, axis=-1)
  choice_BV = scaled_BV
  if seen_BV is not None:
    choice_BV = jnp.where(seen_BV & (penalty_B != 1.0)[:, None],
                          apply_repetition_penalty(logits_BV, seen_BV, penalty_B) * inv_t_B1, choice_BV)
  if banned_BV is not None:
    choice_BV = jnp.where(banned_BV, NEG_INF, choice_BV)
  greedy_B = argmax(choice_BV)

  def draw():  # skipped when every row is greedy; each filter skipped when no row uses it
    B, V = choice_BV.shape
    ones = lambda: jnp.ones((B, V), bool)
    mask_BV = jax.lax.cond(jnp.any(top_k_B > 0), lambda: top_k_mask(choice_BV, top_k_B, k_cap), ones)
    mask_BV &= choice_BV > NEG_INF
    probs_BV = jax.nn.softmax(jnp.where(mask_BV, choice_BV, NEG_INF), axis=-1)
    mask_BV &= jax.lax.cond(jnp.any(top_p_B < 1), lambda: top_p_mask(probs_BV, top_p_B), ones)
    mask_BV &= probs_BV >= (min_p_B * jnp.max(probs_BV, axis=-1))[:, None]
    drawn_B = draw_from(jnp.where(mask_BV, probs_BV, 0.0), keys_B() if callable(keys_B) else keys_B)
    return jnp.where(temperature_B <= 0, greedy_B, drawn_B).astype(jnp.int32)

  token_B = jax.lax.cond(jnp.all(temperature_B <= 0), lambda: greedy_B, draw)
  return token_B, jnp.take_along_axis(scaled_BV, token_B[:, None], axis=-1)[:, 0] - logz_B
