"""Policy-gradient pieces shared by PPO, GRPO and REINFORCE/RLOO: KL estimators, masked statistics, GAE, group
and leave-one-out baselines, and the rollout batch layout with its trainer-side log-probs.

A rollout row is one prompt + response, right-padded to T: ``tokens``, ``segment_ids`` (1 real, 0 pad),
``positions``, ``loss_mask`` (the response tokens, the stop token included) and per-token values in the shifted
space [N, T-1] (index t scores token t+1): ``old_logps`` (the policy that sampled, recomputed by this forward),
``ref_logps``, ``advantages``, ``returns``, ``old_values``; ``weight`` [N] is 0 for rows left out of the loss.
Masks come from lengths only, never from token values (a pad id equal to EOS cannot hide the stop token).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.models import transformer

KL_ESTIMATORS = ("k1", "abs", "k2", "k3")
ROLLOUT_AXES = {"tokens": ("batch", "length"), "segment_ids": ("batch", "length"), "positions": ("batch", "length"),
                "loss_mask": ("batch", "length"), "weight": ("batch",)}
TOKEN_AXES = ("batch", "length")


def kl_penalty(logp, ref_logp, kind: str):
  """Per-token KL estimate of pi against pi_ref from the sampled tokens' log-probs:
  k1 = log r, abs = |log r| (NeMo-Aligner's ``use_absolute_kl``), k2 = (log r)^2 / 2, k3 = e^-log r + log r - 1
  (Schulman's low-variance estimator, log r clamped to [-20, 20] and the result to [-10, 10] as verl does),
  where log r = logp - ref_logp."""
  d = logp - ref_logp
  if kind == "k1":
    return d
  if kind == "abs":
    return jnp.abs(d)
  if kind == "k2":
    return 0.5 * d * d
  if kind == "k3":
    neg = jnp.clip(-d, -20.0, 20.0)
    return jnp.clip(jnp.exp(neg) - neg - 1.0, -10.0, 10.0)
  raise ValueError(f"kl estimator {kind!r}: choose from {KL_ESTIMATORS}")


def masked_sum(x, mask, axis=None):
  return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / sqrt(var + eps) over the masked entries (uncorrected variance, as NeMo-Aligner); with
  ``shift_mean=False`` the mean is added back. Entries outside the mask become 0."""
  mean = masked_mean(x, mask)
  var = masked_mean((x - mean) ** 2, mask)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(mask, out, 0.0)


def gae(rewards_NT, values_NT, mask_NT, gamma: float, lam: float):
  """Generalised advantage estimation over the shifted token axis (NeMo-Aligner's, TRL's): rewards and values are
  zeroed outside the mask, V past the end is 0; delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam
  A_{t+1}; returns = A + V. Returns (advantages, returns), both [N, T]."""
  r = jnp.where(mask_NT, rewards_NT, 0.0)
  v = jnp.where(mask_NT, values_NT, 0.0)
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  delta = r + gamma * next_v - v

  def body(carry, d_N):
    a = d_N + gamma * lam * carry
    return a, a

  _, adv_TN = jax.lax.scan(body, jnp.zeros_like(delta[:, 0]), delta.T, reverse=True)
  adv = adv_TN.T
  return adv, adv + v


def group_advantages(rewards_N, group: int, scale: str = "group", eps: float = 1e-4, batch_std=None):
  """GRPO: A_i = r_i - mean of its group, divided by (std + eps) with the group's std (``group``), the batch's
  (``batch``; ``batch_std`` when given, e.g. across processes) or not at all (``none``). Stds are
  Bessel-corrected (TRL's ``nanstd``; a group of one has std 0). Rows are groups of ``group`` consecutive samples."""
  r = np.asarray(rewards_N, np.float64).reshape(-1, group)
  adv = r - r.mean(axis=1, keepdims=True)
  if scale == "group":
    std = r.std(axis=1, ddof=1, keepdims=True) if group > 1 else np.zeros_like(r[:, :1])
    adv = adv / (std + eps)
  elif scale == "batch":
    std = batch_std if batch_std is not None else (r.std(ddof=1) if r.size > 1 else 0.0)
    adv = adv / (std + eps)
  elif scale != "none":
    raise ValueError(f"scale_rewards={scale!r}: choose group, batch or none")
  return adv.reshape(-1).astype(np.float32)


def rloo_baseline(rewards_N, is_end_N, group: int):
  """NeMo-Aligner's leave-one-out baseline: b_i = sum_{j != i} e_j R_j / (sum_j e_j - 1) over the ended samples
  e of the group; b_i = R_i (no signal) when at most one sample of the group ended."""
  r = np.asarray(rewards_N, np.float64).reshape(-1, group)
  e = np.asarray(is_end_N, np.float64).reshape(-1, group)
  tot, cnt = (e * r).sum(axis=1, keepdims=True), e.sum(axis=1, keepdims=True)
  others = tot - e * r
  base = np.where(cnt > 1, others / np.maximum(cnt - 1, 1.0), r)
  return base.reshape(-1).astype(np.float32)


# ------------------------------------------------------------------------------------------ model side

def target_mask(batch):
  """[N, T-1]: token t+1 is a response token (loss_mask) of a real row."""
  return batch["loss_mask"][:, 1:] & (batch["segment_ids"][:, 1:] > 0)


def group_rows(batch, group: int, window: int) -> dict:
  """One row per group of ``group`` consecutive rollout rows that share their prompt (GRPO/RLOO samples of one
  prompt): ``[prompt[:-1], (last prompt token, window - 1 response tokens) x group]`` with branch ids (a window's
  inputs), so the prompt runs through the layers once per group instead of once per sample. Each branch restarts at the last prompt
  token's position and sees the prompt and itself only, so its hidden states equal the separate rows'. The
  prompt region is the T - window - 1 slots a prompt can fill (pad slots get segment 0). Returns the row arrays
  and ``cols_NW``, each sample's window positions in its group's row; ``start_N`` = p - 1."""
  tokens_NT, mask_NT = batch["tokens"], batch["loss_mask"]
  N, T = tokens_NT.shape
  M, W, Pm = N // group, window, T - window - 1
  start_N = jnp.maximum(jnp.argmax(mask_NT, axis=1) - 1, 0)  # the last prompt token of each row
  lead_M = start_N[::group]
  j_P = jnp.arange(Pm)
  prompt_MP = tokens_NT[::group, :Pm]
  src_NW = jnp.minimum(start_N[:, None] + jnp.arange(W), T - 1)  # the branch: from the last prompt token
  branch_NW = jnp.take_along_axis(tokens_NT, src_NW, axis=1)
  pos_NW = start_N[:, None] + jnp.arange(W)
  rows = {
      "tokens": jnp.concatenate([prompt_MP, branch_NW.reshape(M, group * W)], axis=1),
      "positions": jnp.concatenate([jnp.broadcast_to(j_P, (M, Pm)), pos_NW.reshape(M, -1)], axis=1),
      "segment_ids": jnp.concatenate([(j_P[None] < lead_M[:, None]).astype(jnp.int32),
                                      jnp.ones((M, group * W), jnp.int32)], axis=1),
      "branch_ids": jnp.concatenate([jnp.zeros((M, Pm), jnp.int32),
                                     jnp.repeat(jnp.arange(1, group + 1, dtype=jnp.int32), W)[None].repeat(M, 0)],
                                    axis=1)}
  g_N = jnp.arange(N) % group
  rows["cols_NW"] = Pm + g_N[:, None] * W + jnp.arange(W)  # hidden state j predicts response token j
  rows["start_N"] = start_N
  return rows


SHARED_PROMPT = ("auto", "on", "off")


def prompt_group(cfg, model_cfg) -> int:
  """G when the update and scoring forwards run each group's prompt once (``rollout.shared_prompt``; GRPO and
  RLOO, whose rows come in groups of G samples of one prompt), else 0. ``auto``: when it costs fewer FLOPs, the
  group's row of Pm + G W tokens against G rows of T, attention counted over every (query, key) pair as
  the XLA attention computes it (long groups of long responses make one row's attention dearer than it saves)."""
  ro = cfg.rollout
  G, W, mode = ro.num_generations, ro.max_new_tokens, ro.shared_prompt
  if mode == "off" or G < 2 or cfg.algorithm not in ("grpo", "rloo"):
    return 0
  if mode == "on":
    return G
  T = ro.max_prompt_len + W
  L = T - W - 1 + G * W
  m = model_cfg
  dense = m.hidden_size * (m.num_heads + 2 * m.num_kv_heads) * m.dh + m.num_heads * m.dh * m.hidden_size
  dense += 3 * m.hidden_size * m.ffn_size
  pair = 2 * m.num_heads * m.dh
  return G if L * dense + L * L * pair < G * (T * dense + T * T * pair) else 0


def token_logps(params, batch, model_cfg, temperature: float = 1.0, with_entropy: bool = False, rng=None,
                window: int = 0, group: int = 0):
  """log pi(token t+1 | prefix) of the temperature-scaled distribution, [N, T-1] fp32 (the sampler returns the
  same values); with ``with_entropy`` also the per-token entropy of that distribution. ``window`` = W > 0: the LM
  head runs only on the W positions from the one before each row's first response token (a rollout's responses
  are at most W tokens), and positions outside are 0, which saves the head on the prompt. ``group`` = G > 1 (with
  a window): groups of G consecutive rows share their prompt, which then runs once per group (``group_rows``)."""
  N, T = batch["tokens"].shape
  if window and group > 1 and window < T - 1:
    g = group_rows(batch, group, window)
    h = transformer.hidden_states(params, g["tokens"], model_cfg, positions_BT=g["positions"],
                                  segment_ids_BT=g["segment_ids"], branch_ids_BT=g["branch_ids"], dropout_rng=rng)
    M = N // group
    h_NWD = jnp.take_along_axis(h, g["cols_NW"].reshape(M, -1)[..., None], axis=1).reshape(N, window, -1)
    start_N = g["start_N"]
  else:
    h = transformer.hidden_states(params, batch["tokens"], model_cfg, positions_BT=batch["positions"],
                                  segment_ids_BT=batch["segment_ids"], dropout_rng=rng)
    if not window or window >= T - 1:
      return transformer.logprobs_from_hidden(params, h, batch["tokens"], model_cfg, temperature=temperature,
                                              with_entropy=with_entropy)
    start_N = jnp.maximum(jnp.argmax(batch["loss_mask"], axis=1) - 1, 0)
    h_NWD = jnp.take_along_axis(h, jnp.minimum(start_N[:, None] + jnp.arange(window), T - 2)[..., None], axis=1)
  pos_NW = start_N[:, None] + jnp.arange(window)  # may run past T - 2: gathered clipped, scattered dropped
  targets_NW = jnp.take_along_axis(batch["tokens"], jnp.minimum(pos_NW + 1, T - 1), axis=1)
  out = transformer.target_logprobs(params, h_NWD, targets_NW, model_cfg, temperature=temperature,
                                    with_entropy=with_entropy)
  rows = jnp.arange(N)[:, None]
  place = lambda x_NW: jnp.zeros((N, T - 1), jnp.float32).at[rows, pos_NW].set(x_NW, mode="drop")
  return jax.tree.map(place, out)


def token_values(params, batch, model_cfg):
  """A critic's value at each position, in the shifted space [N, T-1]: the value of the state that predicts token
  t+1 (NeMo-Aligner's critic, ``output_sequence=True``)."""
  h = transformer.hidden_states(params, batch["tokens"], model_cfg, positions_BT=batch["positions"],
                                segment_ids_BT=batch["segment_ids"])
  return transformer.values_from_hidden(params, h)[:, :-1, 0]


def clipped_surrogate(logp, old_logp, adv, eps_low: float, eps_high: float, dual_clip: float = 0.0):
  """Per-token PPO loss max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), r = exp(logp - old_logp); with
  ``dual_clip`` = c > 1 the loss of negative advantages is capped at -c A (dual-clip PPO). Returns (loss, ratio,
  clipped indicator)."""
  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  loss = jnp.maximum(-adv * ratio, -adv * clipped)
  if dual_clip:
    loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
  return loss, ratio, (-adv * clipped > -adv * ratio).astype(jnp.float32)


# ------------------------------------------------------------------------------------------ shared by the losses

def row_mask(batch):
  """[N, T-1] target tokens of the rows the loss uses (weight > 0)."""
  return target_mask(batch) & (batch["weight"][:, None] > 0)


def token_sums(mask, **per_token) -> dict:
  """Masked sums of per-token metrics, with ``_tokens`` so that ``finalize`` turns them into token means whatever
  the loss's weight (token, sequence or Dr.GRPO aggregation)."""
  out = {k: masked_sum(v, mask) for k, v in per_token.items()}
  out["_tokens"] = jnp.sum(mask).astype(jnp.float32)
  return out


def finalize(m: dict) -> dict:
  """Averaged sums -> token means for every metric summed with ``token_sums`` (names not starting with loss)."""
  m = dict(m)
  n = m.pop("_tokens", None)
  if n is None:
    return m
  return {k: (v if k.endswith("loss") else v / jnp.maximum(n, 1e-9)) for k, v in m.items()}


def policy_and_critic(params):
  from jalign.algorithms import common
  return common.policy_params(params), params.get("critic")


def sequence_scores(x_NT, mask_NT):
  """Per-row sums and token counts (numpy, host side)."""
  m = np.asarray(mask_NT, bool)
  return np.where(m, x_NT, 0.0).sum(axis=1), m.sum(axis=1)
