"""The KV-cache sampler against full forwards, hand-built candidate sets, seeded frequency tests and meshes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import sharding
from jalign.generation import Engine, SamplingParams, sampling
from jalign.models import ModelConfig, init_params, transformer

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64)
LENGTHS = (3, 9, 14, 6)


def _prompts(seed=0, lengths=LENGTHS):
  rng = np.random.RandomState(seed)
  return [rng.randint(1, CFG.vocab_size, n).tolist() for n in lengths]


def _params(cfg, seed=0, lora_scale=0.0):
  p = init_params(cfg, jax.random.PRNGKey(seed))
  if lora_scale and "lora" in p:  # fresh adapters are a no-op (b = 0): give them weight
    p["lora"] = jax.tree.map(lambda x: x + lora_scale * jax.random.normal(jax.random.PRNGKey(7), x.shape, x.dtype),
                             p["lora"])
  return p


def _greedy_by_full_forward(params, cfg, prompt, n):
  """The reference: recompute the whole sequence for every new token, take the argmax."""
  buf = np.zeros((1, 32), np.int32)  # right padding: a causal model's logits at i never see it
  buf[0, :len(prompt)] = prompt
  fwd = jax.jit(lambda p, t: transformer.forward(p, t, cfg))
  for i in range(len(prompt), len(prompt) + n):
    buf[0, i] = int(jnp.argmax(fwd(params, jnp.asarray(buf))[0, i - 1]))
  return buf[0, len(prompt):len(prompt) + n].tolist()


@pytest.mark.parametrize("name, overrides, lora, block", [
    ("gqa", {}, 0.0, 64),
    ("gqa_phases", {}, 0.0, 4),  # attended lengths 4, 8, 16, 28: the longest prompt (14) starts in the third
    ("cudnn_blocks", {"attention": "cudnn"}, 0.0, 4),  # blocks concatenated for a kernel (the reference on CPU)
    ("mqa_sliding_window", {"num_kv_heads": 1, "sliding_window": 5}, 0.0, 64),
    ("lora", {"lora_rank": 4, "lora_targets": ("q", "v", "down")}, 0.3, 64),
    ("qkv_bias_tied", {"qkv_bias": True, "tie_embeddings": True}, 0.0, 64),
])
def test_cached_greedy_equals_full_forward_argmax(name, overrides, lora, block):
  cfg = dataclasses.replace(CFG, **overrides)
  params = _params(cfg, lora_scale=lora)
  prompts = _prompts()
  out = Engine(params, cfg, batch_size=4, max_new_tokens=12, attend_block=block).generate(prompts)
  for prompt, samples in zip(prompts, out):
    assert samples[0]["tokens"] == _greedy_by_full_forward(params, cfg, prompt, 12), name


def test_bf16_cached_logits_close_to_full_forward():
  """bf16 compute: the cached path's logits agree with the full forward's within bf16 tolerance."""
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  params = _params(cfg)
  tokens = jnp.asarray([_prompts(lengths=(16,))[0]])
  full = transformer.forward(params, tokens, cfg)
  cache = transformer.init_cache(cfg, 1, 16)
  h, cache = transformer.cached_hidden_states(params, tokens[:, :10], cfg, cache, jnp.zeros(1, jnp.int32))
  parts = [h]
  for t in range(10, 16):
    h, cache = transformer.cached_hidden_states(params, tokens[:, t:t + 1], cfg, cache, jnp.full(1, t, jnp.int32))
    parts.append(h)
  cached = transformer.logits_from_hidden(params, jnp.concatenate(parts, 1), cfg)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=0.05 * float(jnp.abs(full).max()))
  from scipy import special
  # the engine's bf16 greedy decode: each token is the bf16 full forward's argmax over the engine's own prefix, up
  # to bf16 rounding (a near-tie may go either way), and its log-probs are that forward's, within bf16 tolerance
  prompts = _prompts()
  got = Engine(params, cfg, batch_size=4, max_new_tokens=8).generate(prompts)
  ties = 0
  for prompt, (sample,) in zip(prompts, got):
    toks = sample["tokens"]
    assert len(toks) == 8
    seq = jnp.asarray([prompt + toks])
    logits = np.asarray(transformer.forward(params, seq, cfg), np.float32)[0, len(prompt) - 1:-1]
    tol = float(np.abs(logits).max()) / 64  # a few bf16 roundings (8 mantissa bits) of the largest logit
    chosen = logits[np.arange(8), toks]
    assert (chosen >= logits.max(-1) - tol).all(), (chosen, logits.max(-1))
    ties += int((chosen < logits.max(-1)).sum())
    lsm = special.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(sample["logprobs"], lsm[np.arange(8), toks], atol=tol)
  assert ties <= 2, ties  # of 32 steps (none measured): the argmax, not bf16 noise, decides


def test_sampled_logprobs_equal_trainer_rescoring():
  """Log-probs returned with samples = log_softmax(logits / T)[token] of a re-scoring forward with the trainer's
  code, to 1e-5 in fp32 (top-k/top-p truncation does not change them)."""
  params = _params(CFG)
  prompts = _prompts()
  T = 0.7
  out = Engine(params, CFG, batch_size=4, max_new_tokens=10).generate(
      prompts, SamplingParams(temperature=T, top_k=20, top_p=0.9), n=2, seed=3)
  for prompt, samples in zip(prompts, out):
    for s in samples:
      seq = jnp.asarray([prompt + s["tokens"]])
      logits = transformer.logits_from_hidden(params, transformer.hidden_states(params, seq, CFG), CFG) / T
      want = transformer.token_logprobs(logits, seq)[0, len(prompt) - 1:]
      np.testing.assert_allclose(s["logprobs"], np.asarray(want), atol=1e-5)


# ---------------------------------------------------------------------------------------------- candidate sets

def _sorted_reference(logits, top_k, top_p, min_p):
  """Candidate set by sorting, as transformers' warpers define it: top-k, then top-p on the renormalised top-k
  probabilities (smallest set reaching top_p), then min-p."""
  order = np.argsort(-logits)
  keep = np.zeros(len(logits), bool)
  keep[order[:top_k] if top_k else order] = True
  p = np.where(keep, np.exp(logits - logits.max()), 0)
  p /= p.sum()
  cum = np.cumsum(p[order])
  n_top_p = int(np.searchsorted(cum, top_p - 1e-12) + 1) if top_p < 1 else len(order)
  keep_p = np.zeros(len(logits), bool)
  keep_p[order[:n_top_p]] = True
  return keep & keep_p & (p >= min_p * p.max())


def _mask(logits, top_k, top_p, min_p, cap=16):
  B = logits.shape[0]
  lg = jnp.asarray(logits, jnp.float32)
  m = sampling.top_k_mask(lg, jnp.full(B, top_k, jnp.int32), cap)
  probs = jax.nn.softmax(jnp.where(m, lg, -jnp.inf), axis=-1)
  m &= sampling.top_p_mask(probs, jnp.full(B, top_p, jnp.float32))
  return np.asarray(m & (probs >= min_p * probs.max(-1, keepdims=True)))


@pytest.mark.parametrize("top_k, top_p, min_p", [(5, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.2),
                                                (8, 0.8, 0.0), (0, 0.95, 0.05), (1, 0.3, 0.0), (0, 0.01, 0.0)])
def test_candidate_sets_match_sorting(top_k, top_p, min_p):
  logits = np.random.RandomState(top_k + int(100 * top_p)).randn(6, 50) * 2
  got = _mask(logits, top_k, top_p, min_p)
  for b in range(6):
    np.testing.assert_array_equal(got[b], _sorted_reference(logits[b], top_k, top_p, min_p))


def test_hand_built_candidate_sets():
  logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  assert _mask(logits, 0, 0.6, 0.0)[0].tolist() == [1, 1, 0, 0, 0]     # 0.5 < 0.6 <= 0.7
  assert _mask(logits, 0, 0.7, 0.0)[0].tolist() == [1, 1, 0, 0, 0]     # 0.7 reached exactly by two tokens
  assert _mask(logits, 0, 0.71, 0.0)[0].tolist() == [1, 1, 1, 0, 0]
  assert _mask(logits, 2, 1.0, 0.0)[0].tolist() == [1, 1, 0, 0, 0]
  assert _mask(logits, 3, 0.8, 0.0)[0].tolist() == [1, 1, 0, 0, 0]     # top-3 renormalised: 0.59, 0.24, 0.18
  assert _mask(logits, 0, 1.0, 0.3)[0].tolist() == [1, 1, 1, 0, 0]     # p >= 0.15
  assert _mask(logits, 0, 1.0, 0.0)[0].all()


def test_sampling_frequencies():
  """10,000 seeded draws per setting against the truncated, renormalised distribution: a chi-square test at a
  false-alarm rate of 1e-4 per setting (fixed seeds: deterministic)."""
  from scipy import stats
  logits = np.log(np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02]))
  N = 10_000
  # the last two run the library's min-p, and top-k, top-p and min-p together, inside sample()
  for T, top_k, top_p, min_p in [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 4, 1.0, 0.0), (1.5, 0, 0.8, 0.0),
                                 (1.0, 0, 1.0, 0.3), (1.2, 5, 0.9, 0.2)]:
    scaled = logits / T
    keep = _sorted_reference(scaled, top_k, top_p, min_p)
    want = np.where(keep, np.exp(scaled), 0)
    want /= want.sum()
    keys = jax.random.split(jax.random.PRNGKey(11), N)
    tok, lp = jax.jit(lambda k: sampling.sample(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, 7)), k, temperature_B=jnp.full(N, T),
        top_k_B=jnp.full(N, top_k), top_p_B=jnp.full(N, top_p), min_p_B=jnp.full(N, min_p), k_cap=8))(keys)
    counts = np.bincount(np.asarray(tok), minlength=7)
    assert counts[~keep].sum() == 0
    assert keep.sum() < 7 or not (top_k or top_p < 1 or min_p)  # each truncating setting removes tokens
    _, pval = stats.chisquare(counts[keep], N * want[keep])
    assert pval > 1e-4, (T, top_k, top_p, min_p, counts, want)
    np.testing.assert_allclose(np.asarray(lp), (scaled - np.log(np.exp(scaled).sum()))[np.asarray(tok)], atol=1e-5)


def test_two_level_draw_is_the_inverse_cdf():
  """``draw_from`` (blocks of 128, then one block's entries) picks, for each row's uniform u, the first index whose
  float64 cumulative weight exceeds u x total, over a vocabulary of 300 (three blocks, the last padded) with
  mostly-zero weights, a row whose only weight is in the padded last block and one with a weight below float32's
  resolution after another; a zero weight is never chosen."""
  rng = np.random.default_rng(0)
  B, V = 2000, 300
  w = rng.random((B, V)) * (rng.random((B, V)) < 0.3)
  w[:, 0] += 1e-3  # no empty row
  w[0] = 0.0
  w[0, V - 1] = 1.0  # the only weight in the padded last block
  w[1] = 0.0
  w[1, [0, 200]] = [1.0, 1e-9]  # a weight float32 sums cannot see after 1.0
  w = w.astype(np.float32)
  keys = jax.random.split(jax.random.PRNGKey(3), B)
  got = np.asarray(jax.jit(sampling.draw_from)(jnp.asarray(w), keys))
  u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys), np.float64)
  cdf = np.cumsum(w.astype(np.float64), axis=1)
  target = u * cdf[:, -1]
  want = np.minimum((cdf <= target[:, None]).sum(axis=1), V - 1)
  assert (w[np.arange(B), got] > 0).all()
  assert got[0] == V - 1 and got[1] in (0, 200)
  # rows whose u falls within float32 rounding of a boundary may differ by one entry
  near = np.abs(cdf[np.arange(B), np.maximum(want - 1, 0)] - target) < 1e-5 * cdf[:, -1]
  assert (got == want)[~near].all() and (~near).sum() > 1900


def test_repetition_penalty_and_min_tokens():
  logits = jnp.asarray([[2.0, -1.0, 1.5, 0.5]])
  seen = jnp.asarray([[True, True, False, False]])
  pen = sampling.apply_repetition_penalty(logits, seen, jnp.asarray([2.0]))
  np.testing.assert_allclose(np.asarray(pen), [[1.0, -2.0, 1.5, 0.5]])  # 2/2, -1*2, unchanged
  one = dict(temperature_B=jnp.zeros(1), top_k_B=jnp.zeros(1, jnp.int32), top_p_B=jnp.ones(1), min_p_B=jnp.zeros(1),
             k_cap=4)
  tok, lp = sampling.sample(logits, jax.random.split(jax.random.PRNGKey(0), 1), penalty_B=jnp.asarray([2.0]),
                            seen_BV=seen, **one)
  assert int(tok[0]) == 2  # the penalty moves greedy from token 0 to token 2 ...
  np.testing.assert_allclose(float(lp[0]), float(jax.nn.log_softmax(logits[0])[2]), atol=1e-6)  # ... not its logprob
  tok, _ = sampling.sample(logits, jax.random.split(jax.random.PRNGKey(0), 1), banned_BV=seen, **one)
  assert int(tok[0]) == 2
  # through the engine: a stop token banned before min_tokens
  params = _params(CFG)
  prompts = _prompts()
  free = Engine(params, CFG, batch_size=4, max_new_tokens=8).generate(prompts)
  first = free[0][0]["tokens"][0]
  eng = Engine(params, CFG, batch_size=4, max_new_tokens=8)
  stopped = eng.generate(prompts, stop_ids=[first])[0][0]
  assert stopped["tokens"] == [first] and stopped["finished"]
  held = eng.generate(prompts, SamplingParams(min_tokens=3), stop_ids=[first])[0][0]
  assert first not in held["tokens"][:3]


# ---------------------------------------------------------------------------------------------- stops, n, compiles

def test_stops_n_and_compile_once():
  params = _params(CFG)
  prompts = _prompts()
  eng = Engine(params, CFG, batch_size=4, max_new_tokens=12)
  free = eng.generate(prompts)
  toks = free[1][0]["tokens"]
  # a stop id ends the row at its first occurrence, the stop token kept
  got = eng.generate(prompts, stop_ids=[toks[4]])[1][0]
  cut = toks.index(toks[4]) + 1
  assert got["tokens"] == toks[:cut] and got["finished"] and len(got["logprobs"]) == cut
  # a multi-token stop sequence ends the row after it (its tokens kept)
  got = eng.generate(prompts, stop_sequences=[toks[5:7]])[1][0]
  assert got["tokens"][-2:] == toks[5:7] and got["finished"] and toks[:len(got["tokens"])] == got["tokens"]
  # unmatched: the length cap ends rows, not finished; a per-request max_new_tokens is honoured
  got = eng.generate(prompts, [SamplingParams(max_new_tokens=k) for k in (3, 12, 5, 1)])
  assert [len(s[0]["tokens"]) for s in got] == [3, 12, 5, 1] and not any(s[0]["finished"] for s in got)
  before = eng.compiled_count()
  # n samples per prompt: different streams, reproducible by seed; new values compile nothing
  a = eng.generate(prompts, SamplingParams(temperature=1.0, top_p=0.95), n=3, seed=5)
  b = eng.generate(prompts, SamplingParams(temperature=1.0, top_p=0.95), n=3, seed=5)
  c = eng.generate(prompts, SamplingParams(temperature=0.5, top_k=7, min_p=0.1, repetition_penalty=1.3), n=3,
                   seed=6)
  assert a == b and a != c
  assert all(len(s) == 3 for s in a) and len({tuple(s["tokens"]) for s in a[0]}) == 3
  after_n3 = eng.compiled_count()
  eng.generate(prompts, SamplingParams(temperature=0.9, top_p=0.5), n=3, seed=1)
  eng.generate(prompts[:2], SamplingParams(temperature=0.2), n=3, stop_ids=[1, 2, 3], stop_sequences=[[4, 5]])
  assert eng.compiled_count() == after_n3 == before + 1  # n=3: one prefill-and-decode; nothing after


def test_sharded_sampler_gives_one_device_tokens():
  """8 simulated devices (data=2, fsdp=2, tensor=2): same greedy and sampled tokens as on one device."""
  cfg = dataclasses.replace(CFG, num_kv_heads=2)
  params = _params(cfg)
  prompts = _prompts(lengths=(3, 9, 14, 6, 2, 11, 5, 8))
  sp = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9)]
  one = [Engine(params, cfg, batch_size=8, max_new_tokens=10).generate(prompts, s, seed=2) for s in sp]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.rules_from_config(sharding.DEFAULT_RULES)
  from jalign.models import param_axes
  shardings = sharding.tree_shardings(param_axes(cfg), params, rules, mesh)
  sharded = jax.device_put(params, shardings)
  assert not sharded["layers"]["q"].sharding.is_fully_replicated
  eng = Engine(sharded, cfg, batch_size=8, max_new_tokens=10, mesh=mesh, rules=rules)
  many = [eng.generate(prompts, s, seed=2) for s in sp]
  for o, m in zip(one, many):
    assert [s[0]["tokens"] for s in o] == [s[0]["tokens"] for s in m]
    np.testing.assert_allclose([s[0]["logprobs"] for s in o], [s[0]["logprobs"] for s in m], atol=1e-5)


def test_slots_continuous_batching_equals_batch_generation():
  """Requests joining and leaving a 2-slot batch between chunks get exactly the tokens and log-probs of one
  batched call (same seeds), greedy and sampled, each with its own stop id."""
  from jalign.generation.engine import Slots
  params = _params(CFG)
  prompts = _prompts(lengths=(3, 9, 14, 6, 5))
  eng = Engine(params, CFG, batch_size=8, max_new_tokens=12, attend_block=4)  # attended lengths 4 .. 28
  sps = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(max_new_tokens=4),
         SamplingParams(temperature=1.2, top_k=5), SamplingParams(min_tokens=2)]
  free = eng.generate(prompts, sps, seed=[10 + i for i in range(5)])
  stops = [[s[0]["tokens"][3]] for s in free]
  ref = [eng.generate([p], [sp], seed=[10 + i], stop_ids=st)[0][0] for i, (p, sp, st) in
         enumerate(zip(prompts, sps, stops))]
  slots = Slots(eng, size=2, max_prompt=16)
  got = {i: ([], []) for i in range(5)}
  queue, owner = list(range(5)), {}
  while queue or any(slots.active):
    for s in slots.free():
      if queue:
        i = queue.pop(0)
        slots.admit(s, prompts[i], sps[i], seed=10 + i, stop_ids=stops[i])
        owner[s] = i
    for s, toks, lps, finished, done in slots.step(5):
      got[owner[s]][0].extend(toks)
      got[owner[s]][1].extend(lps)
      if done:
        assert finished == ref[owner[s]]["finished"]
  for i in range(5):
    assert got[i][0] == ref[i]["tokens"], i
    np.testing.assert_allclose(got[i][1], ref[i]["logprobs"], atol=1e-5)
