"""The kernels selected through the model config (``model.attention``, ``model.logprob_impl``,
``model.sampling_impl``), interpreted on CPU, give the XLA path's losses, gradients and sampled tokens."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import config as config_lib
from jalign.algorithms import dpo, sft
from jalign.generation import Engine, SamplingParams
from jalign.models import ModelConfig, init_params, transformer

CFG = ModelConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1, ffn_size=64)
PALLAS = dict(attention="pallas", logprob_impl="pallas")


@pytest.fixture
def interpret(monkeypatch):
  monkeypatch.setenv("JALIGN_PALLAS_INTERPRET", "1")


def _close(a, b, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _sft_batch(rng, B=2, T=20):
  """Packed rows: two segments in row 0 (positions restart), padding at the end of row 1."""
  tokens = rng.randint(1, CFG.vocab_size, (B, T)).astype(np.int32)
  seg = np.array([[1] * 12 + [2] * 8, [1] * 15 + [0] * 5], np.int32)
  pos = np.array([list(range(12)) + list(range(8)), list(range(T))], np.int32)
  mask = (rng.rand(B, T) < 0.7) & (seg > 0)
  return {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos)}


def test_sft_step_with_pallas_kernels_matches_xla(interpret):
  params = init_params(CFG, jax.random.PRNGKey(0))
  batch = _sft_batch(np.random.RandomState(0))
  grad = lambda cfg: jax.jit(jax.value_and_grad(lambda p: sft.loss_fn(p, batch, cfg)[0]))(params)
  (loss_x, g_x), (loss_p, g_p) = grad(CFG), grad(dataclasses.replace(CFG, **PALLAS))
  assert float(loss_p) == pytest.approx(float(loss_x), rel=1e-5)
  _close(g_p, g_x)


@pytest.mark.parametrize("shared", [False, True])
def test_dpo_step_with_pallas_kernels_matches_xla(interpret, shared):
  """DPO (frozen reference copy) on padded pairs and on shared-prompt rows (branch ids through the kernel)."""
  from jalign.data import preference
  from jalign.data.formats import Example
  rng = np.random.RandomState(1)
  seqs = []
  for p_len, c_len, r_len in ((5, 7, 3), (9, 2, 6), (4, 5, 5)):
    p, c, r = (rng.randint(1, CFG.vocab_size, n).astype(np.int32) for n in (p_len, c_len, r_len))
    ex = lambda resp: Example(np.concatenate([p, resp]), np.arange(p_len + len(resp)) >= p_len)
    seqs.append((ex(c), ex(r)))
  data_cfg = config_lib.base_config().data
  data_cfg.max_seq_len, data_cfg.shared_prompt = 16, shared
  rows = preference.pair_rows(seqs, {"chosen_reward": np.ones(3, np.float32),
                                     "rejected_reward": np.zeros(3, np.float32)}, data_cfg, 0)
  batch = jax.tree.map(jnp.asarray, rows)
  c = config_lib.base_config()
  c.algorithm, c.reference, c.data.shared_prompt = "dpo", "copy", shared
  params = init_params(CFG, jax.random.PRNGKey(1))
  ref = init_params(CFG, jax.random.PRNGKey(2))

  def run(cfg):
    loss_fn = dpo.make_loss(c, cfg)
    f = lambda p: loss_fn({**p, "reference": ref}, batch, None)[0]
    return jax.jit(jax.value_and_grad(f))(params)

  (loss_x, g_x), (loss_p, g_p) = run(CFG), run(dataclasses.replace(CFG, **PALLAS))
  assert float(loss_p) == pytest.approx(float(loss_x), rel=1e-5)
  _close(g_p, g_x)


@pytest.mark.parametrize("sp", [SamplingParams(), SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.02)])
def test_sampler_with_decode_and_sampling_kernels_gives_the_xla_tokens(interpret, sp):
  """Ragged prompts, GQA: the prefill through flash attention, each decode step through the decode kernel, the
  token choice through the fused sampling kernel."""
  cfg = dataclasses.replace(CFG, num_kv_heads=2, sliding_window=6)
  params = init_params(cfg, jax.random.PRNGKey(3))
  rng = np.random.RandomState(4)
  prompts = [rng.randint(1, cfg.vocab_size, n).tolist() for n in (3, 9, 5)]
  gen = lambda c: Engine(params, c, batch_size=4, max_new_tokens=8, top_k_cap=32).generate(
      prompts, [sp] * len(prompts), n=2, seed=5)
  xla, pallas = gen(cfg), gen(dataclasses.replace(cfg, attention="pallas", sampling_impl="pallas"))
  for a, b in zip(xla, pallas):
    for sa, sb in zip(a, b):
      assert sa["tokens"] == sb["tokens"]
      np.testing.assert_allclose(sa["logprobs"], sb["logprobs"], atol=2e-5)


def test_logprob_impls_agree_with_temperature_and_entropy(interpret):
  """``target_logprobs`` by xla, chunked and pallas: the same log-probs and entropies."""
  rng = np.random.RandomState(6)
  params = init_params(CFG, jax.random.PRNGKey(4))
  h = jnp.asarray(rng.randn(2, 11, CFG.hidden_size), jnp.float32)
  t = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 11)))
  out = {impl: transformer.target_logprobs(params, h, t, dataclasses.replace(CFG, logprob_impl=impl,
                                                                              logprob_chunk=4),
                                           temperature=0.7, with_entropy=True)
         for impl in ("xla", "chunked", "pallas")}
  logits = h @ params["lm_head"] / 0.7
  logq = jax.nn.log_softmax(logits, -1)
  want = (jnp.take_along_axis(logq, t[..., None], -1)[..., 0], -jnp.sum(jnp.exp(logq) * logq, -1))
  for impl, got in out.items():
    _close(got, want, rtol=1e-5, atol=1e-5)
