"""Numerics of the online-RL algorithms against independent references: KL estimators, masked whitening, GAE, GRPO
group advantages, the RLOO baseline, the clipped surrogate and GRPO's aggregations (hand computations, plain
Python loops written from the NeMo-Aligner / TRL specs, torch as a calculator, TRL's helpers where present); the
algorithms' host-side ``prepare``; micro-batch independence of the GRPO and PPO train steps; and the rollout
source's row arrangement, prompt order and global moments."""
import ast
import dataclasses
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jalign import config, trainer
from jalign.algorithms import grpo, online_dpo, pg, ppo, rloo, rs
from jalign.models import ModelConfig, forward, hidden_states, init_params
from jalign.rl import source

MODEL = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn_size=32)
init_jit = jax.jit(init_params, static_argnums=0)  # eager init/forward dispatch op by op: slower than one compile
forward_jit = jax.jit(lambda p, tok, pos, seg, cfg: forward(p, tok, cfg, positions_BT=pos, segment_ids_BT=seg),
                      static_argnums=4)
hidden_jit = jax.jit(lambda p, tok, pos, seg, cfg: hidden_states(p, tok, cfg, positions_BT=pos, segment_ids_BT=seg),
                     static_argnums=4)


def make_cfg(algorithm, **over):
  """base_config() with ``algorithm`` and dotted overrides (``grpo__loss_agg=...``)."""
  cfg = config.base_config()
  cfg.algorithm = algorithm
  for k, v in over.items():
    sec, key = k.split("__")
    cfg[sec][key] = v
  return cfg


def ragged_mask(rng, N, T, min_len=1):
  """[N, T] bool: one contiguous run [s, e) per row, random start and end."""
  m = np.zeros((N, T), bool)
  for i in range(N):
    s = int(rng.integers(0, T - min_len + 1))
    e = int(rng.integers(s + min_len, T + 1))
    m[i, s:e] = True
  return m


def rows_layout(prompt_lens, total_lens, T, rng, vocab=32):
  """Right-padded prompt+response rows: tokens, segment_ids, positions, loss_mask [N, T]."""
  N = len(prompt_lens)
  tokens = np.zeros((N, T), np.int32)
  seg, mask = np.zeros((N, T), np.int32), np.zeros((N, T), bool)
  for i, (p, n) in enumerate(zip(prompt_lens, total_lens)):
    tokens[i, :n] = rng.integers(1, vocab, n)
    seg[i, :n] = 1
    mask[i, p:n] = True
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (N, T)).copy()
  return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_token_logps(params, rows, model_cfg, temperature=1.0):
  """log pi(token t+1 | prefix) [N, T-1] from the model's logits, shifted and gathered in numpy."""
  logits = np.asarray(forward_jit(params, rows["tokens"], rows["positions"], rows["segment_ids"], model_cfg),
                      np.float64) / temperature
  lsm = np_log_softmax(logits[:, :-1])
  tgt = rows["tokens"][:, 1:]
  logp = np.take_along_axis(lsm, tgt[..., None], axis=-1)[..., 0]
  ent = -(np.exp(lsm) * lsm).sum(-1)
  return logp, ent


# ------------------------------------------------------------------------------------------ KL estimators

def test_kl_estimators_match_numpy_formulas():
  """k1, abs, k2, k3 (with verl's clamps) on random log-probs against numpy; k3 >= 0; unknown kind raises."""
  rng = np.random.default_rng(0)
  logp = rng.normal(-2.0, 1.5, (5, 7)).astype(np.float32)
  ref = rng.normal(-2.0, 1.5, (5, 7)).astype(np.float32)
  logp[0, :3], ref[0, :3] = [-40.0, 0.0, -1.0], [0.0, -40.0, -4.5]  # beyond the clamps
  d = logp.astype(np.float64) - ref
  lr = np.clip(ref.astype(np.float64) - logp, -20, 20)
  want = {"k1": d, "abs": np.abs(d), "k2": 0.5 * d ** 2, "k3": np.clip(np.exp(lr) - lr - 1, -10, 10)}
  for kind, w in want.items():
    got = np.asarray(pg.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), kind))
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=kind)
  k3 = np.asarray(pg.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "k3"))
  assert (k3 >= 0).all() and k3.max() <= 10.0
  assert np.asarray(pg.kl_penalty(jnp.asarray(logp), jnp.asarray(logp), "k3")).max() == 0.0
  with pytest.raises(ValueError):
    pg.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), "k4")


@pytest.mark.parametrize("logp,ref,k1,k3", [
    (-1.0, -2.0, 1.0, math.exp(-1.0)),           # log r = 1: e^-1 + 1 - 1
    (-2.0, -1.0, -1.0, math.e - 2.0),            # log r = -1: e^1 - 1 - 1
    (-0.5, -0.5, 0.0, 0.0),
    (-30.0, 0.0, -30.0, 10.0),                   # e^20 - 21, clamped to 10
    (0.0, -30.0, 30.0, 10.0),                    # -log r clamped to -20: e^-20 + 20 - 1 = 19 -> 10
])
def test_kl_estimators_hand_values(logp, ref, k1, k3):
  """k1 and k3 on scalars worked out by hand (k3 = e^(ref-logp) - (ref-logp) - 1, clamps included)."""
  a, b = jnp.float32(logp), jnp.float32(ref)
  assert float(pg.kl_penalty(a, b, "k1")) == pytest.approx(k1, abs=1e-6)
  assert float(pg.kl_penalty(a, b, "k3")) == pytest.approx(k3, rel=1e-5, abs=1e-6)
  assert float(pg.kl_penalty(a, b, "k2")) == pytest.approx(0.5 * k1 * k1, rel=1e-5)


# ------------------------------------------------------------------------------------------ masked statistics

def torch_masked_whiten(x, mask, shift_mean=True):
  """TRL's masked_whiten written with torch ops, uncorrected variance as NeMo-Aligner (TRL: unbiased)."""
  import torch
  x, m = torch.tensor(x, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)
  mean = (x * m).sum() / m.sum()
  var = (((x - mean) ** 2) * m).sum() / m.sum()
  out = (x - mean) * torch.rsqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return (out * m).numpy()


def test_masked_mean_and_whiten_vs_torch():
  """masked_mean (global and per row, empty rows give 0) and masked_whiten (both shift_mean) against torch;
  entries outside the mask are 0 and the whitened masked entries have mean 0 and uncorrected variance 1."""
  pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, (4, 9)).astype(np.float32)
  m = ragged_mask(rng, 4, 9)
  m[2] = False
  xm = np.where(m, x, 0.0)
  assert float(pg.masked_mean(jnp.asarray(x), jnp.asarray(m))) == pytest.approx(xm.sum() / m.sum(), rel=1e-5)
  rows = np.asarray(pg.masked_mean(jnp.asarray(x), jnp.asarray(m), axis=1))
  np.testing.assert_allclose(rows, xm.sum(1) / np.maximum(m.sum(1), 1), rtol=1e-5)
  assert rows[2] == 0.0
  for shift in (True, False):
    got = np.asarray(pg.masked_whiten(jnp.asarray(x), jnp.asarray(m), shift_mean=shift))
    np.testing.assert_allclose(got, torch_masked_whiten(x, m, shift), rtol=1e-4, atol=1e-5, err_msg=str(shift))
    assert (got[~m] == 0).all()
  w = np.asarray(pg.masked_whiten(jnp.asarray(x), jnp.asarray(m)), np.float64)[m]
  assert abs(w.mean()) < 1e-5 and w.var() == pytest.approx(1.0, rel=1e-4)
  assert w.var(ddof=1) != pytest.approx(1.0, rel=1e-3)  # not the Bessel-corrected variance
  w2 = np.asarray(pg.masked_whiten(jnp.asarray(x), jnp.asarray(m), shift_mean=False), np.float64)[m]
  assert w2.mean() == pytest.approx(xm.sum() / m.sum(), rel=1e-4)


# ------------------------------------------------------------------------------------------ GAE

def gae_loop(rewards, values, mask, gamma, lam):
  """NeMo-Aligner's calculate_advantages_and_returns as a plain double loop."""
  N, T = rewards.shape
  r = [[float(rewards[i, t]) if mask[i, t] else 0.0 for t in range(T)] for i in range(N)]
  v = [[float(values[i, t]) if mask[i, t] else 0.0 for t in range(T)] for i in range(N)]
  adv, ret = np.zeros((N, T)), np.zeros((N, T))
  for i in range(N):
    last = 0.0
    for t in reversed(range(T)):
      nxt = v[i][t + 1] if t + 1 < T else 0.0
      delta = r[i][t] + gamma * nxt - v[i][t]
      last = delta + gamma * lam * last
      adv[i, t], ret[i, t] = last, last + v[i][t]
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_matches_loop(gamma, lam):
  """pg.gae on random [3, 7] rewards/values with ragged masks against the double loop of the spec."""
  rng = np.random.default_rng(2)
  r = rng.normal(size=(3, 7)).astype(np.float32)
  v = rng.normal(size=(3, 7)).astype(np.float32)
  m = ragged_mask(rng, 3, 7)
  adv, ret = pg.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
  want_adv, want_ret = gae_loop(r, v, m, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)


def test_gae_hand_case():
  """T=3, gamma=lam=1: advantages = reward-to-go - V, returns = reward-to-go; gamma=0.5, lam=0: one-step TD."""
  r, v, m = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[0.5, 0.25, 1.0]]), jnp.ones((1, 3), bool)
  adv, ret = pg.gae(r, v, m, 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(adv), [[5.5, 4.75, 2.0]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), [[6.0, 5.0, 3.0]], rtol=1e-6)
  adv, _ = pg.gae(r, v, m, 0.5, 0.0)
  np.testing.assert_allclose(np.asarray(adv), [[1 + 0.125 - 0.5, 2 + 0.5 - 0.25, 3 - 1.0]], rtol=1e-6)
  # outside the mask rewards and values are zeroed: the last value (masked) no longer bootstraps the second step
  adv, ret = pg.gae(r, v, jnp.array([[True, True, False]]), 1.0, 1.0)
  np.testing.assert_allclose(np.asarray(adv), [[2.5, 1.75, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ret), [[3.0, 2.0, 0.0]], rtol=1e-6)


# ------------------------------------------------------------------------------------------ GRPO advantages

def test_group_advantages_vs_numpy():
  """scale group / batch / none / batch_std against numpy (ddof=1, +1e-4); identical rewards give 0."""
  rng = np.random.default_rng(3)
  r = rng.normal(size=12)
  r[4:8] = 0.7  # a group with identical rewards
  g = r.reshape(3, 4)
  centred = g - g.mean(1, keepdims=True)
  want = {"group": centred / (g.std(1, ddof=1, keepdims=True) + 1e-4), "batch": centred / (r.std(ddof=1) + 1e-4),
          "none": centred}
  for scale, w in want.items():
    got = pg.group_advantages(r, 4, scale)
    np.testing.assert_allclose(got, w.reshape(-1), rtol=1e-5, atol=1e-6, err_msg=scale)
    np.testing.assert_array_equal(got[4:8], 0.0)
  np.testing.assert_allclose(pg.group_advantages(r, 4, "batch", batch_std=2.5), (centred / 2.5001).reshape(-1),
                             rtol=1e-5)
  two = pg.group_advantages([1.0, 3.0], 2, "group")  # std of two (Bessel) = |a-b|/sqrt(2)
  np.testing.assert_allclose(two, [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)], rtol=1e-6)
  with pytest.raises(ValueError):
    pg.group_advantages(r, 4, "bogus")


# ------------------------------------------------------------------------------------------ RLOO baseline

def test_rloo_baseline_hand():
  """All ended: b_i = mean of the others; <= 1 ended: b_i = R_i; the ended samples of a partly ended group use the
  other *ended* samples only."""
  r = [1.0, 2.0, 6.0, 4.0, 5.0, 7.0, 9.0, 3.0, 8.0]
  e = [1, 1, 1, 1, 0, 1, 0, 0, 1]
  b = pg.rloo_baseline(r, e, 3)
  np.testing.assert_allclose(b[:3], [4.0, 3.5, 1.5], rtol=1e-6)      # (2+6)/2, (1+6)/2, (1+2)/2
  np.testing.assert_allclose(b[[3, 5]], [7.0, 4.0], rtol=1e-6)       # ended 4 and 7: each the other
  np.testing.assert_allclose(b[6:], [9.0, 3.0, 8.0], rtol=1e-6)      # one ended: b = R
  np.testing.assert_allclose(pg.rloo_baseline([1.0, 2.0], [0, 0], 2), [1.0, 2.0])


def test_rloo_baseline_unfinished_sample_follows_nemo():
  """NeMo-Aligner (and the docstring): b_i = sum_{j != i} e_j R_j / (sum_j e_j - 1) for every i of a group with
  >= 2 ended samples, so an unfinished sample i gets (4 + 7) / (2 - 1) = 11."""
  b = pg.rloo_baseline([4.0, 5.0, 7.0], [1, 0, 1], 3)
  assert b[1] == pytest.approx(11.0)


# ------------------------------------------------------------------------------------------ clipped surrogate

@pytest.mark.parametrize("ratio,adv,dual,loss,clipped", [
    (1.1, 1.0, 0.0, -1.1, 0.0),    # inside the range
    (1.5, 1.0, 0.0, -1.2, 1.0),    # A > 0 above 1 + eps: clipped
    (0.5, 1.0, 0.0, -0.5, 0.0),    # A > 0 below 1 - eps: the pessimistic bound is the unclipped term
    (1.5, -1.0, 0.0, 1.5, 0.0),    # A < 0 above: unclipped
    (0.5, -1.0, 0.0, 0.8, 1.0),    # A < 0 below 1 - eps: clipped
    (0.9, -2.0, 0.0, 1.8, 0.0),
    (5.0, -1.0, 0.0, 5.0, 0.0),    # no dual clip: unbounded
    (5.0, -1.0, 3.0, 3.0, 0.0),    # dual clip caps at -c A
    (2.0, -1.0, 3.0, 2.0, 0.0),    # below the cap
    (5.0, 1.0, 3.0, -1.2, 1.0),    # dual clip leaves A > 0 alone
])
def test_clipped_surrogate_hand(ratio, adv, dual, loss, clipped):
  """Per-token loss, ratio and clipped indicator on hand-picked ratios and advantages (eps 0.2)."""
  lp, old = jnp.float32(math.log(ratio) - 1.0), jnp.float32(-1.0)
  got, r, c = pg.clipped_surrogate(lp, old, jnp.float32(adv), 0.2, 0.2, dual)
  assert float(got) == pytest.approx(loss, rel=1e-5)
  assert float(r) == pytest.approx(ratio, rel=1e-5)
  assert float(c) == clipped


def test_clipped_surrogate_asymmetric():
  """eps_low / eps_high clip each side separately (DAPO's clip-higher)."""
  got, _, _ = pg.clipped_surrogate(jnp.log(jnp.array([1.5, 0.5])), jnp.zeros(2), jnp.array([1.0, -1.0]), 0.1, 0.28)
  np.testing.assert_allclose(np.asarray(got), [-1.28, 0.9], rtol=1e-5)


# ------------------------------------------------------------------------------------------ GRPO aggregation

def test_grpo_aggregate_modes():
  """token_mean = sum / ntok, sequence_mean = mean over non-empty rows of row token means, dr_grpo =
  sum / (non-empty rows x max_new); and (sum, weight) add up over any split of the rows."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(5, 6)).astype(np.float32)
  m = ragged_mask(rng, 5, 6)
  m[3] = False
  xm = np.where(m, x, 0.0).astype(np.float64)
  valid = m.any(1)
  want = {"token_mean": xm.sum() / m.sum(),
          "sequence_mean": np.mean([xm[i].sum() / m[i].sum() for i in range(5) if valid[i]]),
          "dr_grpo": xm.sum() / (valid.sum() * 10)}
  for mode, w in want.items():
    s, n = grpo.aggregate(jnp.asarray(x), jnp.asarray(m), mode, 10)
    assert float(s) / float(n) == pytest.approx(w, rel=1e-5), mode
    parts = [grpo.aggregate(jnp.asarray(x[idx]), jnp.asarray(m[idx]), mode, 10) for idx in ([0, 3], [1, 2, 4])]
    assert sum(float(p[0]) for p in parts) == pytest.approx(float(s), rel=1e-5, abs=1e-6), mode
    assert sum(float(p[1]) for p in parts) == pytest.approx(float(n)), mode
  with pytest.raises(ValueError):
    grpo.aggregate(jnp.asarray(x), jnp.asarray(m), "bogus", 10)


def test_grpo_token_loss_with_k3():
  """token_loss = clipped surrogate + beta * k3 KL to the reference, per token."""
  rng = np.random.default_rng(5)
  lp, old, ref = (rng.normal(-2, 0.4, (2, 4)) for _ in range(3))
  adv = rng.normal(size=(2, 4))
  got, ratio, _, kl = grpo.token_loss(*(jnp.asarray(a, jnp.float32) for a in (lp, old, adv, ref)), eps_low=0.2,
                                      eps_high=0.3, beta=0.04, kl_estimator="k3")
  rho = np.exp(lp - old)
  surr = np.maximum(-adv * rho, -adv * np.clip(rho, 0.8, 1.3))
  k3 = np.exp(ref - lp) - (ref - lp) - 1
  np.testing.assert_allclose(np.asarray(ratio), rho, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(kl), k3, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got), surr + 0.04 * k3, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ micro-batch independence

def rl_rows(seed, N=8, T=10):
  """A rollout batch in the trainer layout with ragged prompts and responses and one row left out (weight 0)."""
  rng = np.random.default_rng(seed)
  plens = rng.integers(1, 4, N)
  tot = np.array([int(rng.integers(p + 1, T + 1)) for p in plens])
  rows = rows_layout(plens, tot, T, rng)
  rows["weight"] = np.ones(N, np.float32)
  rows["weight"][5] = 0.0
  return rows, rng


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves the CPU compile time of these tiny steps


def run_steps(loss_fn, finalize, optimizer, state, batch, n_micros):
  """One jitted train step per n_micro from the same state: {n_micro: (new params, metrics)}."""
  out = {}
  for n in n_micros:
    step = jax.jit(trainer.make_train_step(loss_fn, optimizer, optax.constant_schedule(0.0), n, finalize),
                   compiler_options=FAST_COMPILE)
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    out[n] = jax.device_get((new["params"], metrics))
  return out


def sgd_state(params):
  """A train state at step 0 with plain SGD (lr 0.5): the updated params show the gradient directly."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": {}, "opt_state": optax.sgd(0.5).init(params),
          "rng": jax.random.PRNGKey(0)}


def assert_same_steps(out, param_atol=1e-7):
  """Loss, grad norm, weight, every metric and the updated params equal those of n_micro=1."""
  p0, m0 = out[1]
  for n, (p, m) in out.items():
    assert bool(m["finite"]), n
    for k in ("loss", "grad_norm", "weight"):
      assert float(m[k]) == pytest.approx(float(m0[k]), rel=1e-5, abs=1e-7), (n, k)
    for k in m0:
      np.testing.assert_allclose(m[k], m0[k], rtol=2e-5, atol=1e-6, err_msg=f"n_micro={n} metric {k}")
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=param_atol, err_msg=f"n_micro={n} params")


@pytest.mark.parametrize("mode", grpo.AGGREGATIONS)
def test_grpo_step_independent_of_micro_batches(mode):
  """GRPO loss (checked against a numpy computation), metrics and SGD-updated params agree for n_micro 1, 2, 4."""
  cfg = make_cfg("grpo", grpo__loss_agg=mode, grpo__beta=0.04, grpo__kl_estimator="k3", grpo__epsilon_high=0.28,
                 rollout__temperature=0.7, rollout__max_new_tokens=9)
  assert set(grpo.batch_axes(cfg)) == {"tokens", "segment_ids", "positions", "loss_mask", "weight", "old_logps",
                                       "advantages", "ref_logps", "sampler_logps"}
  params = init_jit(MODEL, jax.random.PRNGKey(1))
  rows, rng = rl_rows(6)
  lp, _ = np_token_logps(params, rows, MODEL, 0.7)
  tmask = rows["loss_mask"][:, 1:]
  shape = lp.shape
  rows["old_logps"] = (lp + rng.normal(0, 0.3, shape)).astype(np.float32)
  rows["ref_logps"] = (lp + rng.normal(0, 0.3, shape)).astype(np.float32)
  rows["sampler_logps"] = (lp + rng.normal(0, 1e-3, shape)).astype(np.float32)
  adv = np.repeat(rng.normal(size=(8, 1)), shape[1], 1)
  rows["advantages"] = np.where(tmask, adv, 0.0).astype(np.float32)
  # the loss at the starting params, from the spec
  rho = np.exp(lp - rows["old_logps"])
  a = rows["advantages"]
  surr = np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.28))
  d = rows["ref_logps"] - lp
  per = surr + 0.04 * (np.exp(d) - d - 1)
  m = tmask & (rows["weight"][:, None] > 0)
  valid = m.any(1)
  sums = np.where(m, per, 0.0)
  want = {"token_mean": sums.sum() / m.sum(), "dr_grpo": sums.sum() / (valid.sum() * 9),
          "sequence_mean": (sums.sum(1)[valid] / m.sum(1)[valid]).mean()}[mode]
  state = sgd_state(params)
  out = run_steps(grpo.make_loss(cfg, MODEL), grpo.finalize, optax.sgd(0.5), state, rows, (1, 2, 4))
  assert float(out[1][1]["loss"]) == pytest.approx(want, rel=1e-4)
  assert float(out[1][1]["ppo_ratio"]) == pytest.approx(rho[m].mean(), rel=1e-4)  # token means whatever the mode
  assert_same_steps(out)


def test_ppo_step_independent_of_micro_batches():
  """PPO loss (actor + critic + entropy, checked against numpy), metrics and the AdamW-updated policy and critic
  agree for n_micro 1 and 2."""
  cfg = make_cfg("ppo", ppo__entropy_coef=0.01, ppo__dual_clip=3.0, ppo__value_clip=0.2)
  critic_cfg = dataclasses.replace(MODEL, num_value_heads=1)
  assert set(ppo.batch_axes(cfg)) == {"tokens", "segment_ids", "positions", "loss_mask", "weight", "old_logps",
                                      "advantages", "returns", "old_values"}
  params = init_jit(MODEL, jax.random.PRNGKey(2))
  critic = init_jit(MODEL, jax.random.PRNGKey(3))  # the critic's trunk; its value head by hand
  critic["value_head"] = {"w": jnp.asarray(np.random.default_rng(0).normal(0, 0.5, (16, 1)), jnp.float32),
                          "b": jnp.full((1,), 0.3)}
  params["critic"] = critic
  rows, rng = rl_rows(7)
  lp, ent = np_token_logps(params, rows, MODEL)
  h = np.asarray(hidden_jit(critic, rows["tokens"], rows["positions"], rows["segment_ids"], critic_cfg), np.float64)
  v = (h @ np.asarray(critic["value_head"]["w"], np.float64) + 0.3)[:, :-1, 0]
  shape = lp.shape
  tmask = rows["loss_mask"][:, 1:]
  rows["old_logps"] = (lp + rng.normal(0, 0.5, shape)).astype(np.float32)
  rows["advantages"] = np.where(tmask, rng.normal(size=shape), 0.0).astype(np.float32)
  rows["returns"] = np.where(tmask, rng.normal(size=shape), 0.0).astype(np.float32)
  rows["old_values"] = (v + rng.normal(0, 0.4, shape)).astype(np.float32)
  m = tmask & (rows["weight"][:, None] > 0)
  a, rho = rows["advantages"], np.exp(lp - rows["old_logps"])
  surr = np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.2))
  surr = np.where(a < 0, np.minimum(surr, -3.0 * a), surr)
  old_v, ret = rows["old_values"], rows["returns"]
  vf = np.maximum((v - ret) ** 2, (old_v + np.clip(v - old_v, -0.2, 0.2) - ret) ** 2)
  want_actor = np.where(m, surr - 0.01 * ent, 0).sum() / m.sum()
  want_critic = np.where(m, 0.5 * vf, 0).sum() / m.sum()
  optimizer, _ = trainer.make_optimizer(cfg.optim, 10, 1.0, critic_lr=1e-3, keys=tuple(params))
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": {}, "opt_state": optimizer.init(params),
           "rng": jax.random.PRNGKey(0)}
  out = run_steps(ppo.make_loss(cfg, MODEL, critic_cfg), ppo.finalize, optimizer, state, rows, (1, 2))
  m1 = out[1][1]
  assert float(m1["actor_loss"]) == pytest.approx(want_actor, rel=1e-4)
  assert float(m1["critic_loss"]) == pytest.approx(want_critic, rel=1e-4)
  assert float(m1["loss"]) == pytest.approx(want_actor + want_critic, rel=1e-4)
  assert float(m1["values"]) == pytest.approx(v[m].mean(), rel=1e-4)
  assert not np.allclose(out[1][0]["critic"]["value_head"]["w"], params["critic"]["value_head"]["w"])
  # AdamW's first step is lr * g / (|g| + eps): float noise on near-zero gradients moves a weight by << lr (3e-4)
  assert_same_steps(out, param_atol=2e-6)


def test_grpo_tis_cap_weights_each_token():
  """Truncated importance sampling: each token's surrogate times min(pi_old / pi_sampler, tis_cap), against
  numpy, with sampler log-probs far enough from the old ones that some weights hit the cap."""
  cfg = make_cfg("grpo", grpo__tis_cap=1.5, rollout__max_new_tokens=9)
  params = init_jit(MODEL, jax.random.PRNGKey(4))
  rows, rng = rl_rows(9)
  lp, _ = np_token_logps(params, rows, MODEL)
  tmask = rows["loss_mask"][:, 1:]
  rows["old_logps"] = (lp + rng.normal(0, 0.3, lp.shape)).astype(np.float32)
  rows["sampler_logps"] = (rows["old_logps"] + rng.normal(0, 0.5, lp.shape)).astype(np.float32)
  rows["advantages"] = np.where(tmask, np.repeat(rng.normal(size=(8, 1)), lp.shape[1], 1), 0.0).astype(np.float32)
  m = tmask & (rows["weight"][:, None] > 0)
  w = np.minimum(np.exp(rows["old_logps"] - rows["sampler_logps"]), 1.5)
  assert (w[m] == 1.5).any() and (w[m] < 1.5).any()
  rho, a = np.exp(lp - rows["old_logps"]), rows["advantages"]
  per = np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.2)) * w
  state = sgd_state(params)
  out = run_steps(grpo.make_loss(cfg, MODEL), grpo.finalize, optax.sgd(0.5), state, rows, (1,))
  assert float(out[1][1]["loss"]) == pytest.approx(np.where(m, per, 0.0).sum() / m.sum(), rel=1e-4)


def test_rloo_step_independent_of_micro_batches():
  """RLOO loss = token mean of -log pi * A over the ended rows' response tokens (checked against numpy); metrics
  and SGD-updated params agree for n_micro 1 and 2."""
  cfg = make_cfg("rloo", rollout__max_new_tokens=9)
  assert set(rloo.batch_axes(cfg)) == {"tokens", "segment_ids", "positions", "loss_mask", "weight", "advantages"}
  params = init_jit(MODEL, jax.random.PRNGKey(5))
  rows, rng = rl_rows(10)
  lp, _ = np_token_logps(params, rows, MODEL)
  tmask = rows["loss_mask"][:, 1:]
  rows["advantages"] = np.where(tmask, np.repeat(rng.normal(size=(8, 1)), lp.shape[1], 1), 0.0).astype(np.float32)
  m = tmask & (rows["weight"][:, None] > 0)
  want = np.where(m, -lp * rows["advantages"], 0.0).sum() / m.sum()
  state = sgd_state(params)
  out = run_steps(rloo.make_loss(cfg, MODEL), rloo.finalize, optax.sgd(0.5), state, rows, (1, 2))
  assert float(out[1][1]["loss"]) == pytest.approx(want, rel=1e-4)
  assert float(out[1][1]["logprob"]) == pytest.approx(lp[m].mean(), rel=1e-4)
  assert not np.allclose(out[1][0]["lm_head"], params["lm_head"])
  assert_same_steps(out)


# ------------------------------------------------------------------------------------------ GRPO prepare

def test_grpo_prepare_end_to_end():
  """Advantages from overlong-penalised rewards (group std, Bessel), broadcast on the shifted response mask only;
  mask_truncated zeroes unfinished rows' weight; the batch scale uses ctl's batch_std."""
  T = 8
  rng = np.random.default_rng(8)
  plens, lengths = np.array([2, 2, 3, 3]), np.array([4, 2, 3, 1])
  ro = rows_layout(plens, plens + lengths, T, rng)
  ro.update(logps=rng.normal(-2, 1, (4, T - 1)).astype(np.float32), rewards=np.array([1.0, 0.5, 0.0, 2.0]),
            finished=np.array([False, True, True, True]), lengths=lengths,
            sampler_logps=rng.normal(-2, 1, (4, T - 1)).astype(np.float32))
  cfg = make_cfg("grpo", rollout__num_generations=2, rollout__max_new_tokens=4, grpo__overlong_buffer=2,
                 grpo__overlong_penalty=1.0, grpo__mask_truncated=True)
  rows, metrics = grpo.prepare(ro, cfg, {})
  pen = np.array([1.0, 0.0, 0.5, 0.0])  # linear over the last 2 of 4 tokens: lengths 4, 2, 3, 1
  assert metrics["overlong_penalty"] == pytest.approx(pen.mean())
  r = np.array([1.0, 0.5, 0.0, 2.0]) - pen  # [0, 0.5, -0.5, 2]
  adv = []
  for a, b in ((r[0], r[1]), (r[2], r[3])):
    s = abs(a - b) / math.sqrt(2) + 1e-4
    adv += [(a - b) / 2 / s, (b - a) / 2 / s]
  shifted = np.zeros((4, T - 1), bool)
  for i, (p, n) in enumerate(zip(plens, lengths)):
    shifted[i, p - 1:p - 1 + n] = True  # index t scores token t + 1
  np.testing.assert_array_equal(rows["advantages"] != 0, shifted)
  np.testing.assert_allclose(rows["advantages"], np.where(shifted, np.array(adv)[:, None], 0.0), rtol=1e-5)
  np.testing.assert_array_equal(rows["weight"], [0.0, 1.0, 1.0, 1.0])
  np.testing.assert_array_equal(rows["old_logps"], ro["logps"])
  for k in ("tokens", "segment_ids", "positions", "loss_mask"):
    np.testing.assert_array_equal(rows[k], ro[k])
  assert "ref_logps" not in rows
  cfg = make_cfg("grpo", rollout__num_generations=2, rollout__max_new_tokens=4, grpo__scale_rewards="batch")
  rows, _ = grpo.prepare(ro, cfg, {"batch_std": 0.5})
  want = np.array([0.25, -0.25, -1.0, 1.0]) / 0.5001  # raw rewards centred per group, over batch_std + 1e-4
  np.testing.assert_allclose(rows["advantages"][shifted], np.repeat(want, lengths), rtol=1e-5)
  np.testing.assert_array_equal(rows["weight"], 1.0)


def grouped_rows(seed, G=3, n_groups=2, max_prompt=5, W=6):
  """Rollout rows of T = max_prompt + W in groups of G samples of one prompt (ragged prompts per group,
  ragged responses, one response of the full window, one of a single token)."""
  rng = np.random.default_rng(seed)
  T, N = max_prompt + W, G * n_groups
  plens = np.repeat(rng.integers(1, max_prompt + 1, n_groups), G)
  plens[:G] = max_prompt
  lens = rng.integers(1, W + 1, N)
  lens[0], lens[1] = W, 1
  rows = rows_layout(plens, plens + lens, T, rng)
  for i in range(N):  # samples of a group share the prompt tokens
    rows["tokens"][i, :plens[i]] = rows["tokens"][i - i % G, :plens[i]]
  rows["weight"] = np.ones(N, np.float32)
  return rows, rng


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_rows_give_the_separate_log_probs(temperature):
  """A group's prompt computed once (branch rows) gives each sample's response log-probs and entropies of a
  plain forward over its own row (numpy log-softmax of the model's logits) within 1e-5 in fp32."""
  G, W = 3, 6
  rows, _ = grouped_rows(3, G=G, W=W)
  params = init_jit(MODEL, jax.random.PRNGKey(4))
  want_lp, want_ent = np_token_logps(params, rows, MODEL, temperature)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  f = jax.jit(lambda p, b, g: pg.token_logps(p, b, MODEL, temperature, with_entropy=True, window=W, group=g),
              static_argnums=2)
  (lp, ent), (lp_sep, ent_sep) = f(params, batch, G), f(params, batch, 0)
  m = rows["loss_mask"][:, 1:]
  np.testing.assert_allclose(np.asarray(lp)[m], want_lp[m], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent)[m], want_ent[m], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lp)[m], np.asarray(lp_sep)[m], rtol=1e-5, atol=1e-6)
  g = pg.group_rows(batch, G, W)
  assert g["tokens"].shape == (2, (rows["tokens"].shape[1] - W - 1) + G * W)  # prompt once per group


def test_shared_prompt_grpo_step_equals_separate_rows():
  """The GRPO train step (loss, metrics, updated params) with rollout.shared_prompt on equals the one with it
  off, with micro-batches of whole groups."""
  G, W = 3, 6
  rows, rng = grouped_rows(5, G=G, n_groups=4, W=W)
  params = init_jit(MODEL, jax.random.PRNGKey(2))
  lp, _ = np_token_logps(params, rows, MODEL, 0.9)
  shape, tmask = lp.shape, rows["loss_mask"][:, 1:]
  rows["old_logps"] = (lp + rng.normal(0, 0.3, shape)).astype(np.float32)
  rows["sampler_logps"] = rows["old_logps"]
  rows["advantages"] = np.where(tmask, rng.normal(size=(len(lp), 1)), 0.0).astype(np.float32)
  (order,) = source.arrange(len(lp), G, len(lp), 2, np.random.default_rng(0))  # the source's micro-batch order
  rows = {k: v[order] for k, v in rows.items()}
  state = sgd_state(params)
  out = {}
  for mode in ("on", "off"):
    cfg = make_cfg("grpo", rollout__num_generations=G, rollout__max_new_tokens=W, rollout__max_prompt_len=5,
                   rollout__num_prompts=4, rollout__shared_prompt=mode, rollout__temperature=0.9,
                   train__global_batch_size=16)  # 12 rows: epochs so old_logps come from the batch
    assert pg.prompt_group(cfg, MODEL) == (G if mode == "on" else 0)
    out[mode] = run_steps(grpo.make_loss(cfg, MODEL), grpo.finalize, optax.sgd(0.5), state, rows, (2,))[2]
  (p_on, m_on), (p_off, m_off) = out["on"], out["off"]
  for k in m_off:
    np.testing.assert_allclose(m_on[k], m_off[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_shared_prompt_auto_counts_flops():
  """auto shares the prompt when one group row costs fewer FLOPs than G rows (short groups), not when the
  group's row is so long that its attention costs more than the prompt saves; off, PPO and RS never share."""
  m = ModelConfig(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_size=768)
  cfg = make_cfg("grpo", rollout__num_generations=4, rollout__max_new_tokens=32, rollout__max_prompt_len=32)
  assert pg.prompt_group(cfg, m) == 4
  assert pg.prompt_group(make_cfg("rloo", rollout__num_generations=4, rollout__max_new_tokens=32,
                                  rollout__max_prompt_len=32), m) == 4
  long = make_cfg("grpo", rollout__num_generations=16, rollout__max_new_tokens=2048, rollout__max_prompt_len=32)
  assert pg.prompt_group(long, m) == 0
  assert pg.prompt_group(make_cfg("grpo", rollout__shared_prompt="off"), m) == 0
  assert pg.prompt_group(make_cfg("rs"), m) == 0 and pg.prompt_group(make_cfg("ppo"), m) == 0
  with pytest.raises(config.ConfigError, match="rollout.shared_prompt"):
    config.validate(make_cfg("grpo", rollout__shared_prompt="yes"))


# ------------------------------------------------------------------------------------------ PPO

def test_ppo_token_rewards_placement():
  """r at the last position of the shifted mask (resp_len - 2 unshifted), -kl_coef * KL on every response token,
  nothing on rows without response tokens."""
  T = 7
  plens, tot = [2, 1, 3], [5, 7, 3]
  ro = rows_layout(plens, tot, T, np.random.default_rng(0))
  mask = ro["loss_mask"][:, 1:]
  kl = np.arange(18, dtype=np.float64).reshape(3, 6) / 10
  out = ppo.token_rewards(np.array([2.0, -1.0, 5.0]), kl, mask, 0.5)
  want = np.zeros((3, 6))
  for i in range(3):
    for t in range(6):
      if mask[i, t]:
        want[i, t] = -0.5 * kl[i, t]
  want[0, tot[0] - 2] += 2.0
  want[1, tot[1] - 2] += -1.0
  assert not mask[2].any()  # a prompt without response: no reward placed
  np.testing.assert_allclose(out, want)
  assert [int(np.flatnonzero(mask[i])[-1]) for i in range(2)] == [3, 5]


def ppo_rollout(seed=9):
  T = 8
  rng = np.random.default_rng(seed)
  plens, lengths = np.array([2, 1, 3, 2, 1, 4]), np.array([3, 6, 2, 5, 1, 4])
  ro = rows_layout(plens, plens + lengths, T, rng)
  ro.update(logps=rng.normal(-2, 0.5, (6, T - 1)).astype(np.float32),
            ref_logps=rng.normal(-2, 0.5, (6, T - 1)).astype(np.float32),
            values=rng.normal(size=(6, T - 1)).astype(np.float32), rewards=rng.normal(size=6),
            finished=np.array([True, False, True, True, False, True]), lengths=lengths)
  return ro


def np_moments(x, mask, ddof=0):
  v = np.asarray(x, np.float64)[np.asarray(mask, bool)]
  return float(v.mean()), float(v.std(ddof=ddof))


def ppo_reference(ro, kl_coef, gamma, lam, absolute, penalty=0.0):
  """NeMo's PPO rollout math from the spec: per-token rewards, GAE, (advantages, returns)."""
  mask = ro["loss_mask"][:, 1:]
  d = ro["logps"].astype(np.float64) - ro["ref_logps"]
  kl = np.abs(d) if absolute else d
  r = np.asarray(ro["rewards"], np.float64) - penalty * (~ro["finished"])
  N, T1 = mask.shape
  per = np.zeros((N, T1))
  for i in range(N):
    idx = np.flatnonzero(mask[i])
    per[i, idx] = -kl_coef * kl[i, idx]
    per[i, idx[-1]] += r[i]
  return gae_loop(per, ro["values"], mask, gamma, lam)


def test_ppo_prepare_normalized():
  """Advantages = whitened GAE of the spec's rewards (uncorrected var): mean ~0 and var ~1 over the mask, 0
  outside; returns masked; unfinished rows weight 0 with ppo.unfinished=mask."""
  ro = ppo_rollout()
  cfg = make_cfg("ppo", ppo__gamma=0.9, ppo__lam=0.8)
  rows, metrics = ppo.prepare(ro, cfg, {"kl_coef": 0.1, "moments": np_moments})
  mask = ro["loss_mask"][:, 1:]
  adv, ret = ppo_reference(ro, 0.1, 0.9, 0.8, True)
  mu, sd = adv[mask].mean(), adv[mask].std()
  np.testing.assert_allclose(rows["advantages"], np.where(mask, (adv - mu) / np.sqrt(sd ** 2 + 1e-8), 0), rtol=1e-4,
                             atol=1e-5)
  a = rows["advantages"][mask].astype(np.float64)
  assert abs(a.mean()) < 1e-5 and a.var() == pytest.approx(1.0, rel=1e-4)
  assert (rows["advantages"][~mask] == 0).all()
  np.testing.assert_allclose(rows["returns"], np.where(mask, ret, 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(rows["weight"], ro["finished"].astype(np.float32))
  np.testing.assert_array_equal(rows["old_values"], ro["values"])
  assert metrics["advantages_mean"] == pytest.approx(mu, rel=1e-4)
  assert metrics["advantages_std"] == pytest.approx(sd, rel=1e-4)


def test_ppo_prepare_penalty_and_k1():
  """ppo.unfinished=penalty subtracts the penalty from unfinished rows' rewards (weight stays 1); use_absolute_kl
  off takes k1; normalize_advantages off keeps raw GAE on the mask."""
  ro = ppo_rollout(10)
  cfg = make_cfg("ppo", ppo__unfinished="penalty", ppo__unfinished_penalty=2.0, ppo__use_absolute_kl=False,
                 ppo__normalize_advantages=False, ppo__gamma=1.0, ppo__lam=1.0)
  rows, _ = ppo.prepare(ro, cfg, {"kl_coef": 0.2, "moments": np_moments})
  mask = ro["loss_mask"][:, 1:]
  adv, ret = ppo_reference(ro, 0.2, 1.0, 1.0, False, penalty=2.0)
  np.testing.assert_allclose(rows["advantages"][mask], adv[mask], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rows["returns"], np.where(mask, ret, 0), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(rows["weight"], 1.0)
  # gamma = lam = 1: the return at the first response token is r - penalty - kl_coef * sum KL
  for i in range(6):
    idx = np.flatnonzero(mask[i])
    kl = (ro["logps"][i, idx] - ro["ref_logps"][i, idx]).sum()
    want = ro["rewards"][i] - 2.0 * (not ro["finished"][i]) - 0.2 * kl
    assert rows["returns"][i, idx[0]] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_adapt_kl():
  """Up when KL > target, down when below, by at most 20% x n_steps / horizon; off without a target."""
  cfg = make_cfg("ppo", ppo__adaptive_kl_target=0.1, ppo__adaptive_kl_horizon=100)
  assert ppo.adapt_kl(0.5, 0.5, cfg, 10) == pytest.approx(0.5 * 1.02)       # error 4 clipped to 0.2
  assert ppo.adapt_kl(0.5, 0.0, cfg, 10) == pytest.approx(0.5 * 0.98)       # error -1 clipped to -0.2
  assert ppo.adapt_kl(0.5, 0.11, cfg, 10) == pytest.approx(0.5 * 1.01)      # error 0.1
  assert ppo.adapt_kl(0.5, 0.09, cfg, 50) == pytest.approx(0.5 * 0.95)      # error -0.1 x 0.5
  assert ppo.adapt_kl(0.5, 0.1, cfg, 10) == pytest.approx(0.5)
  assert ppo.adapt_kl(0.5, 3.0, make_cfg("ppo"), 10) == 0.5


# ------------------------------------------------------------------------------------------ RLOO

@pytest.mark.parametrize("absolute", [True, False])
def test_rloo_prepare(absolute):
  """Advantages = R_i - b_i with R_i = r_i - kl_coef * mean_t KL (|log r| or log r) and the leave-one-out baseline
  over ended samples (sum_j e_j - 1 for every row, the unfinished one included), on the shifted mask; unfinished
  rows weight 0."""
  T = 7
  rng = np.random.default_rng(11)
  plens, lengths = np.array([1, 2, 3, 1, 2, 2]), np.array([3, 4, 2, 5, 1, 3])
  ro = rows_layout(plens, plens + lengths, T, rng)
  ro.update(logps=rng.normal(-2, 0.5, (6, T - 1)).astype(np.float32),
            ref_logps=rng.normal(-2, 0.5, (6, T - 1)).astype(np.float32), rewards=np.array([1., 3., 2., 0., 4., 1.]),
            finished=np.array([True, True, True, True, False, True]))
  cfg = make_cfg("rloo", rollout__num_generations=3, rloo__use_absolute_kl=absolute)
  rows, metrics = rloo.prepare(ro, cfg, {"kl_coef": 0.3})
  mask = ro["loss_mask"][:, 1:]
  R = []
  for i in range(6):
    d = [float(ro["logps"][i, t]) - float(ro["ref_logps"][i, t]) for t in range(T - 1) if mask[i, t]]
    kl = sum(abs(x) if absolute else x for x in d) / len(d)
    R.append(ro["rewards"][i] - 0.3 * kl)
  b = [(R[1] + R[2]) / 2, (R[0] + R[2]) / 2, (R[0] + R[1]) / 2, R[5], (R[3] + R[5]) / (2 - 1), R[3]]
  for i in range(6):
    np.testing.assert_allclose(rows["advantages"][i][mask[i]], R[i] - b[i], rtol=1e-5, atol=1e-6)
    assert (rows["advantages"][i][~mask[i]] == 0).all()
  np.testing.assert_array_equal(rows["weight"], [1, 1, 1, 1, 0, 1])
  assert metrics["rewards_with_kl"] == pytest.approx(np.mean(R), rel=1e-5)


# ------------------------------------------------------------------------------------------ RS and online DPO

def test_rs_select_top_ties_and_prepare():
  """The top_n rewards of each group, ties to the earlier sample; prepare keeps those rows with weight 1."""
  r = np.array([1.0, 3.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0])
  assert rs.select_top(r, 4, 1).tolist() == [1, 4]
  assert rs.select_top(r, 4, 2).tolist() == [1, 2, 4, 5]
  assert rs.select_top(r, 4, 3).tolist() == [1, 2, 3, 4, 5, 6]
  ro = rows_layout([1] * 8, [3] * 8, 4, np.random.default_rng(0))
  ro["rewards"] = r
  rows, m = rs.prepare(ro, make_cfg("rs", rollout__num_generations=4, rs__top_n=2), {})
  np.testing.assert_array_equal(rows["tokens"], ro["tokens"][[1, 2, 4, 5]])
  np.testing.assert_array_equal(rows["weight"], 1.0)
  assert m["selected_rewards"] == pytest.approx(4.0)


def test_online_dpo_prepare():
  """Chosen = the higher reward (first on ties), ties weight 0, ref_logps = summed response ref log-probs in
  (chosen, rejected) order."""
  T = 6
  rng = np.random.default_rng(12)
  plens, tot = [1, 2, 2, 1, 3, 1], [4, 6, 3, 5, 6, 2]
  ro = rows_layout(plens, tot, T, rng)
  ro["ref_logps"] = rng.normal(-2, 1, (6, T - 1)).astype(np.float32)
  ro["rewards"] = np.array([0.1, 0.9, 0.5, 0.5, 2.0, -1.0])
  rows, m = online_dpo.prepare(ro, make_cfg("online_dpo", rollout__num_generations=2), {})
  sums = [sum(float(ro["ref_logps"][i, t]) for t in range(plens[i] - 1, tot[i] - 1)) for i in range(6)]
  order = [[1, 0], [2, 3], [4, 5]]
  for p, (c, rj) in enumerate(order):
    np.testing.assert_array_equal(rows["tokens"][p, 0], ro["tokens"][c])
    np.testing.assert_array_equal(rows["tokens"][p, 1], ro["tokens"][rj])
    np.testing.assert_array_equal(rows["loss_mask"][p, 1], ro["loss_mask"][rj])
    np.testing.assert_allclose(rows["ref_logps"][p], [sums[c], sums[rj]], rtol=1e-5)
  np.testing.assert_array_equal(rows["weight"], [1.0, 0.0, 1.0])
  assert rows["tokens"].shape == (3, 2, T)
  assert m["fraction_of_ties"] == pytest.approx(1 / 3)
  assert m["reward_margin"] == pytest.approx((0.8 + 0.0 + 3.0) / 3)


# ------------------------------------------------------------------------------------------ the rollout source

@pytest.mark.parametrize("n_micro", [1, 2, 4])
def test_arrange_gives_whole_groups_per_micro_batch(n_micro):
  """Every row once across steps; the trainer's interleaved split (and _split_micro itself) gives micro-batches
  made of whole groups."""
  unit, lb = 4, 16
  steps = source.arrange(32, unit, lb, n_micro, np.random.default_rng(n_micro))
  assert len(steps) == 2 and all(len(s) == lb for s in steps)
  assert sorted(np.concatenate(steps).tolist()) == list(range(32))
  for order in steps:
    split = np.asarray(trainer._split_micro({"x": jnp.asarray(order)}, n_micro)["x"])
    for m in range(n_micro):
      mb = order[m::n_micro]
      np.testing.assert_array_equal(split[m], mb)
      groups = set((mb // unit).tolist())
      assert sorted(mb.tolist()) == sorted(g * unit + j for g in groups for j in range(unit)), (m, mb)


def test_prompt_order_epochs_and_state():
  """take() covers every index once per epoch (across take boundaries), epochs differ, state round-trips and
  reproduces the continuation; shuffle=False is the identity order."""
  o = source.PromptOrder(7, seed=3)
  seq = sum((o.take(3) for _ in range(7)), [])
  epochs = [seq[i:i + 7] for i in range(0, 21, 7)]
  assert all(sorted(e) == list(range(7)) for e in epochs)
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
  a = source.PromptOrder(7, seed=3)
  a.take(5)
  a.take(4)
  s = a.get_state()
  assert s == {"epoch": 1, "index": 2}
  b = source.PromptOrder(7, seed=3)
  b.set_state(dict(s))
  assert b.take(11) == a.take(11)
  assert b.get_state() == a.get_state()
  plain = source.PromptOrder(5, seed=0, shuffle=False)
  assert plain.take(7) == [0, 1, 2, 3, 4, 0, 1]


def test_global_moments_single_process():
  """(mean, std) of the masked entries against numpy, ddof 0 and 1; an empty mask gives (0, 0)."""
  rng = np.random.default_rng(13)
  x = rng.normal(2.0, 3.0, (5, 6))
  m = ragged_mask(rng, 5, 6)
  for ddof in (0, 1):
    mean, std = source.global_moments(x, m, ddof=ddof)
    assert mean == pytest.approx(x[m].mean(), rel=1e-9)
    assert std == pytest.approx(x[m].std(ddof=ddof), rel=1e-9)
  assert source.global_moments(x, np.zeros_like(m)) == (0.0, 0.0)


def test_rollout_arrays():
  """Prompt + response rows right-padded; loss mask on the response; sampler log-probs in the shifted space."""
  samples = [[{"tokens": [5, 6], "logprobs": [-0.1, -0.2], "finished": True},
              {"tokens": [7], "logprobs": [-0.3], "finished": False}],
             [{"tokens": [8, 9, 10], "logprobs": [-0.4, -0.5, -0.6], "finished": True}]]
  ro = source.rollout_arrays([[1, 2], [3]], samples, 6, pad_id=0)
  np.testing.assert_array_equal(ro["tokens"], [[1, 2, 5, 6, 0, 0], [1, 2, 7, 0, 0, 0], [3, 8, 9, 10, 0, 0]])
  np.testing.assert_array_equal(ro["segment_ids"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(ro["loss_mask"], [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]])
  np.testing.assert_allclose(ro["sampler_logps"], [[0, -0.1, -0.2, 0, 0], [0, -0.3, 0, 0, 0],
                                                   [-0.4, -0.5, -0.6, 0, 0]], rtol=1e-6)
  assert ro["finished"].tolist() == [True, False, True]
  assert ro["lengths"].tolist() == [2, 1, 3] and ro["prompt_lengths"].tolist() == [2, 2, 1]


# ------------------------------------------------------------------------------------------ TRL as an extra oracle

def trl_helpers(*names):
  """TRL's torch-only helpers from the installed ``trl/trainer/utils.py``, compiled from its source without importing
  the package (which pulls in transformers, ~5 s); the Triton kernel path is stubbed off, as on a CPU install."""
  torch = pytest.importorskip("torch")
  spec = importlib.util.find_spec("trl")
  if spec is None or spec.origin is None:
    pytest.skip("trl is not installed")
  path = os.path.join(os.path.dirname(spec.origin), "trainer", "utils.py")
  if not os.path.exists(path):
    pytest.skip(f"no {path}")
  with open(path) as f:
    tree = ast.parse(f.read())
  defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
  if {d.name for d in defs} != set(names):
    pytest.skip(f"trl.trainer.utils lacks {set(names) - {d.name for d in defs}}")
  ns = {"torch": torch, "F": torch.nn.functional, "is_triton_available": lambda: False}
  exec(compile(ast.Module(body=defs, type_ignores=[]), path, "exec"), ns)
  return [ns[n] for n in names]


def test_trl_helpers_as_oracles():
  """TRL's nanstd (Bessel) gives group_advantages' std; selective_log_softmax and entropy_from_logits give the
  temperature-scaled token_logps and entropies of the model."""
  import torch
  nanstd, selective_log_softmax, entropy_from_logits = trl_helpers("nanstd", "selective_log_softmax",
                                                                   "entropy_from_logits")
  rng = np.random.default_rng(14)
  r = rng.normal(size=8)
  g = torch.tensor(r.reshape(2, 4))
  std = torch.stack([nanstd(g[i]) for i in range(2)]).numpy()
  want = (r.reshape(2, 4) - r.reshape(2, 4).mean(1, keepdims=True)) / (std[:, None] + 1e-4)
  np.testing.assert_allclose(pg.group_advantages(r, 4, "group"), want.reshape(-1), rtol=1e-5)
  params = init_jit(MODEL, jax.random.PRNGKey(3))
  rows = rows_layout([2, 1, 3], [6, 4, 5], 6, rng)
  logits = torch.tensor(np.asarray(forward_jit(params, rows["tokens"], rows["positions"], rows["segment_ids"],
                                               MODEL))[:, :-1])
  got, ent = pg.token_logps(params, {k: jnp.asarray(v) for k, v in rows.items()}, MODEL, 0.7, with_entropy=True)
  want = selective_log_softmax(logits, torch.tensor(rows["tokens"][:, 1:]).long(), temperature=0.7)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), entropy_from_logits(logits / 0.7).numpy(), rtol=1e-5, atol=1e-5)


def test_grpo_on_policy_step_needs_no_old_logprob_pass():
  """With one pass of one step per rollout the old log-probs are the step's own (stop-gradient): same loss and
  gradient as feeding them from a separate scoring pass; with more steps per rollout they are fed."""
  on = make_cfg("grpo", rollout__num_prompts=2, rollout__num_generations=4, rollout__max_new_tokens=9,
                train__global_batch_size=8)
  assert not grpo.needs_old_logps(on) and "old_logps" not in grpo.batch_axes(on)
  assert grpo.needs_old_logps(make_cfg("grpo", rollout__num_prompts=2, rollout__num_generations=4,
                                       train__global_batch_size=4))
  params = init_jit(MODEL, jax.random.PRNGKey(3))
  rows, rng = rl_rows(11)
  lp, _ = np_token_logps(params, rows, MODEL)
  rows["sampler_logps"] = lp.astype(np.float32)
  rows["advantages"] = np.where(rows["loss_mask"][:, 1:], rng.normal(size=(8, 1)), 0.0).astype(np.float32)
  loss_fn = grpo.make_loss(on, MODEL)
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))
  g_on = grad(params, {k: jnp.asarray(v) for k, v in rows.items()})
  g_fed = grad(params, {**{k: jnp.asarray(v) for k, v in rows.items()}, "old_logps": jnp.asarray(lp, jnp.float32)})
  for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_fed)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_on)) > 0


class _EchoEngine:
  """A stand-in sampler: sample j of prompt ids continues with [ids[0], 100 + j] (one token identifies the
  prompt, the other the sample), so a row says which prompt and sample it came from."""
  params = None

  def generate(self, ids, sp, *, n, stop_ids, seed):
    return [[{"tokens": [p[0], 100 + j], "logprobs": [-1.0, -1.0], "finished": True} for j in range(n)]
            for p in ids]


def _rollout_rows(pid, nproc, num_prompts=8, G=4, micro=2):
  """The first training batch of process ``pid`` of ``nproc`` in a GRPO run over 16 prompts (ids [i + 1])."""
  cfg = make_cfg("grpo", rollout__num_prompts=num_prompts, rollout__num_generations=G, rollout__max_new_tokens=2,
                 rollout__max_prompt_len=4, train__global_batch_size=num_prompts * G)
  prompts = [({"prompt": str(i)}, [i + 1]) for i in range(16)]
  tok = type("Tok", (), {"pad_id": 0, "decode": staticmethod(lambda ids: " ".join(map(str, ids)))})()
  responses = type("Resp", (), {"stops": set(), "__call__": lambda self, s: (str(s["tokens"]), None, True)})()
  rewards = lambda s: (np.array([float(t.endswith("100]")) for t in s.responses]), {})  # sample 0 of each prompt
  src = source.ExperienceSource(
      cfg=cfg, algo=grpo, prompts=prompts, tok=tok, engine=_EchoEngine(), score=lambda state, rows: {},
      policy=lambda state: None, rewards=rewards, responses=responses, moments=source.global_moments,
      local_batch=num_prompts * G // nproc, n_micro=micro, process_index=pid, process_count=nproc)
  rows, _ = src.next(None)
  return rows


def test_groups_stay_on_their_process_and_micro_batch():
  """With 2 processes each process samples its own prompts (disjoint, together the single-process rollout's), and
  every micro-batch of every process holds whole groups: the G samples of a prompt, never split."""
  G, micro = 4, 2
  single = _rollout_rows(0, 1, G=G, micro=micro)
  per_proc = [_rollout_rows(p, 2, G=G, micro=micro) for p in range(2)]
  prompt_of = lambda rows: rows["tokens"][:, 1]  # row = [prompt id, prompt id, 100 + j, ...]
  sets = [set(prompt_of(r).tolist()) for r in per_proc]
  assert not sets[0] & sets[1] and sets[0] | sets[1] == set(prompt_of(single).tolist()) and len(sets[0]) == 4
  for rows in per_proc + [single]:
    assert (rows["tokens"][:, 0] == rows["tokens"][:, 1]).all()
    for m in range(micro):  # the trainer's interleaved split: micro-batch m takes rows m, m + micro, ...
      mb = rows["tokens"][m::micro]
      for p in set(mb[:, 1].tolist()):
        assert sorted(mb[mb[:, 1] == p, 2].tolist()) == [100 + j for j in range(G)], (m, p)
      # group-normalised advantages: sample 0 (reward 1) above the group's other samples (reward 0)
      adv = rows["advantages"][m::micro].max(axis=1)
      assert (adv[mb[:, 2] == 100] > 0).all() and (adv[mb[:, 2] != 100] <= 0).all()
