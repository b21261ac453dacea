import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import jalign_from_hf, tiny_hf_model
from jalign.models import ModelConfig, forward, init_params, lora
from jalign.models import transformer



def _hf_logits(model, tokens):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    ("llama", {"num_key_value_heads": 1}),  # MQA
    ("qwen2", {}),                          # q/k/v bias, tied embeddings
    ("mistral", {"sliding_window": 5}),     # sliding-window attention
])
def test_logits_match_transformers(kind, overrides):
  pytest.importorskip("torch")
  model = tiny_hf_model(kind, **overrides)
  cfg, params = jalign_from_hf(model)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24))
  want = _hf_logits(model, tokens)
  got = np.asarray(forward(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), cfg))
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=0)


def test_bf16_compute_close_to_fp32():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.arange(16)[None] % 64
  full = forward(params, tokens, cfg)
  half = forward(params, tokens, dataclasses.replace(cfg, dtype="bfloat16"))
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(half), np.asarray(full), atol=0.05)


def test_remat_policies_same_grads():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.arange(16)[None] % 64
  loss = lambda p, c: -transformer.token_logprobs(forward(p, tokens, c), tokens).mean()
  base = jax.grad(loss)(params, cfg)
  for policy in ("full", "dots"):
    g = jax.grad(loss)(params, dataclasses.replace(cfg, remat=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g, base)


def test_packing_isolation():
  """Changing one packed neighbour leaves another segment's logits unchanged, and a packed segment's
  logits equal the same sequence run alone."""
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64)
  params = init_params(cfg, jax.random.PRNGKey(1))
  rng = np.random.RandomState(0)
  a, b = rng.randint(0, 64, 7), rng.randint(0, 64, 9)
  seg = np.array([1] * 7 + [2] * 9)[None]
  pos = np.concatenate([np.arange(7), np.arange(9)])[None]
  run = lambda toks: np.asarray(forward(params, jnp.asarray(toks)[None], cfg, positions_BT=jnp.asarray(pos),
                                        segment_ids_BT=jnp.asarray(seg)))[0]
  packed = run(np.concatenate([a, b]))
  changed = run(np.concatenate([rng.randint(0, 64, 7), b]))
  np.testing.assert_allclose(packed[7:], changed[7:], atol=1e-6)
  assert np.abs(packed[:7] - changed[:7]).max() > 1e-3
  alone = np.asarray(forward(params, jnp.asarray(b)[None], cfg))[0]
  np.testing.assert_allclose(packed[7:], alone, atol=1e-5)


@pytest.fixture(scope="module")
def lora_setup():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64,
                    lora_rank=4, lora_alpha=8.0, lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
  params = init_params(cfg, jax.random.PRNGKey(2))
  return cfg, params


def test_lora_fresh_adapter_is_noop_and_off_view_is_base(lora_setup):
  cfg, params = lora_setup
  tokens = jnp.arange(12)[None]
  np.testing.assert_allclose(forward(params, tokens, cfg), forward(lora.disabled(params), tokens, cfg), atol=1e-6)
  trained = dict(params, lora=jax.tree.map(lambda x: x + 0.05, params["lora"]))
  off = lora.disabled(trained)
  assert all(off[k] is trained[k] for k in off)  # the same arrays: no copy
  base_cfg = dataclasses.replace(cfg, lora_rank=0)
  np.testing.assert_allclose(forward(off, tokens, cfg), forward(lora.disabled(params), tokens, base_cfg), atol=0)
  assert np.abs(np.asarray(forward(trained, tokens, cfg) - forward(off, tokens, cfg))).max() > 1e-3


def test_lora_merge_equals_unmerged(lora_setup):
  cfg, params = lora_setup
  trained = dict(params, lora=jax.tree.map(lambda x: x + 0.05, params["lora"]))
  tokens = jnp.arange(12)[None]
  merged = lora.merge(trained, cfg)
  assert "lora" not in merged
  np.testing.assert_allclose(forward(merged, tokens, dataclasses.replace(cfg, lora_rank=0)),
                             forward(trained, tokens, cfg), atol=1e-5)


def test_lora_only_adapters_change(lora_setup):
  import optax
  from jalign import trainer
  from jalign.algorithms import sft
  cfg, params = lora_setup
  tr, fr = lora.split_trainable(params)
  assert set(tr) == {"lora"}
  opt = optax.adam(1e-2)
  step = trainer.make_train_step(lambda p, b, r: sft.loss_fn(p, b, cfg, r), opt, lambda s: 1e-2, 1)
  T = 12
  batch = {"tokens": jnp.arange(2 * T).reshape(2, T) % 64, "loss_mask": jnp.ones((2, T), bool),
           "segment_ids": jnp.ones((2, T), jnp.int32), "positions": jnp.tile(jnp.arange(T), (2, 1))}
  state = {"step": jnp.zeros((), jnp.int32), "params": tr, "frozen": fr, "opt_state": opt.init(tr),
           "rng": jax.random.PRNGKey(0)}
  new, _ = jax.jit(step)(state, batch)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new["frozen"], fr)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new["params"], tr)
  # B starts at zero, so the first step moves every B (A's gradient is zero until B is non-zero)
  assert all(moved["lora"][t]["b"] > 0 for t in cfg.lora_targets)


def test_value_head_outputs():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_size=64,
                    num_value_heads=3)
  params = init_params(cfg, jax.random.PRNGKey(0))
  params["value_head"]["b"] = jnp.array([1.0, 2.0, 3.0])
  h = transformer.hidden_states(params, jnp.arange(8)[None], cfg)
  v = transformer.values_from_hidden(params, h)
  assert v.shape == (1, 8, 3)
  np.testing.assert_allclose(v, h @ params["value_head"]["w"] + params["value_head"]["b"], atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_logprobs_match_full_logits(tie):
  """model.logprob_chunk gives the same log-probs and gradients as materialising all logits (T=13 is not a
  multiple of the chunk)."""
  import dataclasses

  from jalign.models import ModelConfig, init_params, transformer
  cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn_size=32,
                    tie_embeddings=tie)
  params = init_params(cfg, jax.random.PRNGKey(0))
  h = jax.random.normal(jax.random.PRNGKey(1), (2, 13, 16))
  toks = jax.random.randint(jax.random.PRNGKey(2), (2, 13), 0, 50)
  wkey = "embed" if tie else "lm_head"

  def loss(p, h, c):
    lp = transformer.logprobs_from_hidden(p, h, toks, dataclasses.replace(cfg, logprob_chunk=c))
    return jnp.sum(lp * jnp.arange(12.0)), lp

  (l0, lp0), g0 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, h, 0)
  (l4, lp4), g4 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, h, 4)
  assert lp4.shape == (2, 12)
  np.testing.assert_allclose(lp4, lp0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g4[1], g0[1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g4[0][wkey], g0[0][wkey], rtol=1e-4, atol=1e-6)
