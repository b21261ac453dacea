"""Pallas kernels in interpret mode on CPU: fused token log-probs (values, entropy, d h, d w against plain XLA,
and XLA's memory analysis of a DPO-style loss at Llama-3 size), fused sampling (the engine's tokens and
log-probs), and their Triton lowering for GPU."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl

from jalign.generation import sampling as engine_sampling
from jalign.kernels import logprob, sampling
from jalign.models import ModelConfig, transformer

TRITON_CALL = "__gpu$xla.gpu.triton"


def close(got, want, rel):
  """Elementwise within rel, plus rel of the largest magnitude (for entries near zero)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


# ---------------------------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("dtype,temperature,entropy,v_splits,rel", [
    ("float32", 0.7, True, 2, 1e-5),   # 3 vocabulary blocks in splits of 2 and 1
    ("float32", 1.0, False, 1, 1e-5),
    ("bfloat16", 1.3, True, 0, 1e-2),  # automatic splits (3 of 1 block)
])
def test_token_logprobs_match_reference(dtype, temperature, entropy, v_splits, rel):
  rng = np.random.RandomState(0)
  N, D, V = 37, 40, 300  # none a multiple of its block (16, 16, 128): rows, hidden and vocabulary padded
  h = jnp.asarray(rng.randn(N, D), dtype)
  w = jnp.asarray(rng.randn(D, V) * 0.4, dtype)
  t = jnp.asarray(rng.randint(0, V, N), jnp.int32)
  c_lp, c_ent = jnp.asarray(rng.randn(N), jnp.float32), jnp.asarray(rng.randn(N), jnp.float32)
  opts = dict(temperature=temperature, return_entropy=entropy, interpret=True, block_n=16, block_v=128,
              block_d=16, v_splits=v_splits)

  def loss(f):
    def fn(h, w):
      out = f(h, w, t, **opts)
      lp, ent = out if entropy else (out, jnp.zeros(N))
      return jnp.sum(c_lp * lp) + jnp.sum(c_ent * ent), out
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))

  (_, got), (dh, dw) = loss(logprob.token_logprobs)(h, w)
  (_, want), (dh_ref, dw_ref) = loss(logprob.token_logprobs_reference)(h, w)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == (N,) and g.dtype == jnp.float32 and np.isfinite(g).all()
    close(g, r, rel)
  assert dh.dtype == h.dtype and dw.dtype == w.dtype
  close(dh, dh_ref, rel)
  close(dw, dw_ref, rel)


def test_token_logprobs_partial_gradients():
  """Only what is differentiated is computed: d h alone (a frozen head, as under LoRA) is the backward kernel's
  only output; an output without a cotangent (entropy, or log-probs) adds nothing."""
  rng = np.random.RandomState(3)
  N, D, V = 16, 16, 200
  h = jnp.asarray(rng.randn(N, D), jnp.float32)
  w = jnp.asarray(rng.randn(D, V) * 0.4, jnp.float32)
  t = jnp.asarray(rng.randint(0, V, N), jnp.int32)
  opts = dict(return_entropy=True, interpret=True, block_n=16, block_v=128, block_d=16)
  for out, argnum in ((0, 0), (1, 1)):  # d logp / d h, d entropy / d w
    def f(fn, h, w):
      return jnp.sum(jnp.cos(jnp.arange(N)) * fn(h, w, t, **opts)[out])
    grad = jax.grad(functools.partial(f, logprob.token_logprobs), argnums=argnum)
    close(grad(h, w), jax.grad(functools.partial(f, logprob.token_logprobs_reference), argnums=argnum)(h, w), 1e-5)
    outs = re.findall(r"\n\s*([^\n]*?) = pallas_call\[", str(jax.make_jaxpr(grad)(h, w)))
    assert len(outs) == 2 and outs[1].split(":")[1] == ("f32[16,16]" if argnum == 0 else "f32[16,256]")


def test_token_logprobs_as_the_model_calls_it():
  """h [B, T, D] flattened with rolled targets, default blocks: the model's log-probs, full and chunked."""
  rng = np.random.RandomState(1)
  B, T, D, V = 2, 9, 32, 70
  h = jnp.asarray(rng.randn(B, T, D), jnp.float32)
  w = jnp.asarray(rng.randn(D, V) * 0.3, jnp.float32)
  tokens = jnp.asarray(rng.randint(0, V, (B, T)), jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)
  got = logprob.token_logprobs(h.reshape(B * T, D), w, targets.reshape(B * T), interpret=True)
  got = got.reshape(B, T)[:, :-1]
  for chunk in (0, 4):
    cfg = ModelConfig(vocab_size=V, hidden_size=D, logprob_chunk=chunk)
    close(got, transformer.logprobs_from_hidden({"lm_head": w}, h, tokens, cfg), 1e-5)


def test_unwritten_outputs_are_poisoned():
  """Negative control for the finiteness checks: in interpret mode an output element no program writes reads
  nan (floats) or INT_MIN (ints), so a kernel that skipped a block could not pass them."""
  def kernel(x_ref, f_ref, i_ref):
    @pl.when(pl.program_id(1) < pl.num_programs(1) - 1)  # the last block is never written
    def _():
      f_ref[...] = x_ref[...]
      i_ref[...] = x_ref[...].astype(jnp.int32)

  spec = pl.BlockSpec((1, 8), lambda s, i: (s, i))
  f, i = pl.pallas_call(kernel, grid=(2, 3), in_specs=[spec], out_specs=[spec, spec],
                        out_shape=[jax.ShapeDtypeStruct((2, 24), jnp.float32),
                                   jax.ShapeDtypeStruct((2, 24), jnp.int32)],
                        interpret=True)(jnp.ones((2, 24), jnp.float32))
  assert np.isfinite(f[:, :16]).all() and np.isnan(f[:, 16:]).all()
  assert (i[:, :16] == 1).all() and (i[:, 16:] == np.iinfo(np.int32).min).all()


def _dpo_loss_grad(impl, B, T, D, V, argnums=(0, 1)):
  """d/d(h, w) of a DPO-like loss on summed masked response log-probs, with log-probs from ``impl``."""
  def logps(h, w, tokens):
    if impl == "pallas":
      targets = jnp.roll(tokens, -1, axis=1).reshape(B * T)
      return logprob.token_logprobs(h.reshape(B * T, D), w, targets, interpret=True).reshape(B, T)[:, :-1]
    cfg = ModelConfig(vocab_size=V, hidden_size=D, logprob_chunk=256 if impl == "chunked" else 0)
    return transformer.logprobs_from_hidden({"lm_head": w}, h, tokens, cfg)

  def loss(h, w, tokens, mask):
    s_B = jnp.sum(jnp.where(mask[:, 1:], logps(h, w, tokens), 0.0), axis=1)
    return -jnp.mean(jax.nn.log_sigmoid(0.1 * (s_B[0::2] - s_B[1::2])))  # rows 2i, 2i+1: chosen, rejected

  return jax.grad(loss, argnums=argnums)


@pytest.mark.parametrize("dtype,argnums", [("float32", (0, 1)), ("bfloat16", (0, 1)), ("bfloat16", 0)])
def test_fused_logprob_memory_at_llama3_size(dtype, argnums):
  """Compile only (abstract shapes): XLA's temporaries for forward + backward of 8 rows x 4096 tokens, hidden
  4096, vocabulary 128256 (argnums 0: a frozen head). Interpret mode lowers the kernels to XLA loops over blocks,
  so what it keeps is what memory_analysis counts: the fp32 d h / d w accumulators, no [N, V] array."""
  B, T, D, V = 8, 4096, 4096, 128256
  args = (jax.ShapeDtypeStruct((B, T, D), dtype), jax.ShapeDtypeStruct((D, V), dtype),
          jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), bool))
  temp_mb = {impl: jax.jit(_dpo_loss_grad(impl, B, T, D, V, argnums)).lower(*args).compile().memory_analysis()
             .temp_size_in_bytes / 2**20 for impl in ("pallas", "chunked", "xla")}
  print(dtype, argnums, {k: round(v) for k, v in temp_mb.items()})
  assert temp_mb["pallas"] <= 0.5 * temp_mb["xla"]
  assert temp_mb["pallas"] <= temp_mb["chunked"]
  assert temp_mb["pallas"] >= B * T * D * 4 / 2**20  # the fp32 accumulators are counted, not hidden
  # O(N D + D V): at most two fp32 copies of h and w (on CPU, XLA also upcasts a bf16 w for its dots)
  assert temp_mb["pallas"] <= 2 * (B * T * D + D * V) * 4 / 2**20


# ---------------------------------------------------------------------------------------------- sampling

def _keys(n, seed=0):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(n))


def _engine(logits, keys, **kw):
  return jax.jit(lambda l, k: engine_sampling.sample(l, k, **kw))(logits, keys)


@pytest.mark.parametrize("extras", [False, True])
def test_sample_matches_engine(extras):
  """Many rows, mixed settings (greedy, temperature, top-k incl. above the cap, top-p, min-p, repetition penalty,
  banned tokens): the same tokens as the engine's XLA path, and its log-probs."""
  rng = np.random.RandomState(2)
  B, V, k_cap = 96, 300, 16
  logits = jnp.asarray(rng.randn(B, V) * 3, jnp.float32)
  kw = dict(temperature_B=jnp.asarray(rng.choice([0.0, 0.5, 1.0, 1.5], B), jnp.float32),
            top_k_B=jnp.asarray(rng.choice([0, 1, 5, 16, 40], B), jnp.int32),
            top_p_B=jnp.asarray(rng.choice([1.0, 0.9, 0.5, 0.1], B), jnp.float32),
            min_p_B=jnp.asarray(rng.choice([0.0, 0.05, 0.3], B), jnp.float32), k_cap=k_cap)
  if extras:
    kw.update(penalty_B=jnp.asarray(rng.choice([1.0, 1.3], B), jnp.float32),
              seen_BV=jnp.asarray(rng.rand(B, V) < 0.1), banned_BV=jnp.asarray(rng.rand(B, V) < 0.02))
  keys = _keys(B, seed=int(extras))
  tok_e, lp_e = _engine(logits, keys, **kw)
  tok_r, lp_r = jax.jit(lambda l, k: sampling.sample_reference(l, k, **kw))(logits, keys)
  tok_k, lp_k = jax.jit(lambda l, k: sampling.sample(l, k, interpret=True, block_v=128, **kw))(logits, keys)
  np.testing.assert_array_equal(tok_r, tok_e)
  np.testing.assert_allclose(lp_r, lp_e, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(tok_k, tok_e)
  np.testing.assert_allclose(lp_k, lp_e, rtol=1e-5, atol=1e-5)
  assert ((0 <= tok_k) & (tok_k < V)).all() and np.isfinite(lp_k).all()
  drawn = kw["temperature_B"] > 0
  assert (tok_k[drawn] != jnp.argmax(logits, axis=-1)[drawn]).sum() > 10  # the draws are not all argmax


def test_sample_candidate_sets():
  """Hand-built distributions, 64 draws per setting: exactly the expected tokens come out."""
  V, R, k_cap = 200, 64, 8
  a, b, c, d, e = 5, 70, 130, 199, 150  # spread over the four 64-wide blocks; d is the last column
  probs = np.full(V, 0.05 / (V - 4))
  probs[[a, b, c, d]] = [0.4, 0.25, 0.2, 0.1]
  base = np.log(probs)
  tie = base.copy()
  tie[e] = tie[b]  # b and e tie for second place
  top_tie = base.copy()
  top_tie[c] = top_tie[a] = np.log(0.3)  # a and c tie for the max
  # (logits, temperature, top_k, top_p, min_p, banned, seen with penalty 100, expected tokens)
  cases = [(base, 1.0, 1, 1.0, 0.0, None, None, {a}),
           (base, 1.0, 3, 1.0, 0.0, None, None, {a, b, c}),
           (tie, 1.0, 2, 1.0, 0.0, None, None, {a, b, e}),  # ties at the k-th value are kept
           (base, 1.0, 0, 0.6, 0.0, None, None, {a, b}),  # 0.4 + 0.25 >= 0.6
           (base, 1.0, 3, 0.7, 0.0, None, None, {a, b}),  # top-p on the renormalised top-3: (0.4 + 0.25) / 0.85
           (base, 0.7, 0, 1.0, 0.3, None, None, {a, b, c}),  # p >= 0.3 max p at T = 0.7: c 0.37, d 0.14
           (base, 1.0, 1, 1.0, 0.0, a, None, {b}),  # a banned
           (base, 0.0, 0, 1.0, 0.0, None, None, {a}),  # greedy
           (top_tie, 0.0, 0, 1.0, 0.0, None, None, {a}),  # greedy: the first of tied maxima
           (base, 0.0, 0, 1.0, 0.0, None, a, {b})]  # greedy with a penalised
  col = lambda j, dt, f=lambda x: x: jnp.asarray(np.repeat([f(cs[j]) for cs in cases], R, axis=0), dt)
  one_hot = lambda tok: np.arange(V) == (-1 if tok is None else tok)
  logits = col(0, jnp.float32)
  kw = dict(temperature_B=col(1, jnp.float32), top_k_B=col(2, jnp.int32), top_p_B=col(3, jnp.float32),
            min_p_B=col(4, jnp.float32), k_cap=k_cap, banned_BV=col(5, bool, one_hot), seen_BV=col(6, bool, one_hot),
            penalty_B=col(6, jnp.float32, lambda tok: 1.0 if tok is None else 100.0))
  keys = _keys(len(cases) * R, seed=3)
  tok, lp = sampling.sample(logits, keys, interpret=True, block_v=64, **kw)
  np.testing.assert_array_equal(tok, _engine(logits, keys, **kw)[0])
  tok = np.asarray(tok).reshape(len(cases), R)
  for i, cs in enumerate(cases):
    assert set(tok[i].tolist()) == cs[-1], (i, sorted(set(tok[i].tolist())))
  # log-probs of the scaled distribution before truncation and penalty
  want = jax.nn.log_softmax(logits / jnp.where(kw["temperature_B"] > 0, kw["temperature_B"], 1.0)[:, None])
  close(lp, np.take_along_axis(np.asarray(want), tok.reshape(-1, 1), axis=1)[:, 0], 1e-5)


# ---------------------------------------------------------------------------------------------- GPU lowering

def _triton_modules(fn, *args):
  """fn lowered for CUDA on this CPU-only machine: each Pallas call becomes a Triton module (not compiled to
  PTX), which is parsed back with the Triton dialect and checked by MLIR's verifier (it caught a loop bound the
  lowering typed wrongly). Returns the number of modules."""
  exported = export.export(jax.jit(fn), platforms=("cuda",),
                           disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
  try:  # jax internals: the MLIR contexts with the StableHLO and the Triton dialects
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton.lowering import _new_ir_context as triton_context
  except ImportError:
    return exported.mlir_module().count(TRITON_CALL)

  def calls(op):
    if op.name == "stablehlo.custom_call" and "xla.gpu.triton" in str(op.attributes["call_target_name"]):
      yield op
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          yield from calls(inner.operation)

  with jax_mlir.make_ir_context():
    module = ir.Module.parse(exported.mlir_module())
    blobs = [ir.StringAttr(op.attributes["mhlo.backend_config"]["ir"]).value_bytes
             for op in calls(module.operation)]
  for blob in blobs:
    with triton_context():
      assert ir.Module.parse(blob).operation.verify()  # parse raises on an invalid module
  return len(blobs)


def test_kernels_lower_to_triton():
  """The Triton lowering (power-of-two tiles, supported primitives, atomics in loops) gives valid modules at
  Llama-3 shapes; compiling them to PTX and running them needs a GPU."""
  h = jax.ShapeDtypeStruct((512, 4096), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4096, 128256), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((512,), jnp.int32)

  def grads(h, w, t):
    return jax.grad(lambda h, w: sum(x.sum() for x in logprob.token_logprobs(h, w, t, return_entropy=True)),
                    argnums=(0, 1))(h, w)

  assert _triton_modules(grads, h, w, t) == 2
  B, V = 8, 128256
  args = [jax.ShapeDtypeStruct((B, V), jnp.bfloat16), jax.ShapeDtypeStruct((B, 2), jnp.uint32)]
  args += [jax.ShapeDtypeStruct((B,), dt) for dt in (jnp.float32, jnp.int32) + (jnp.float32,) * 3]
  args += [jax.ShapeDtypeStruct((B, V), bool)] * 2

  def sample(logits, keys, temp, top_k, top_p, min_p, penalty, seen, banned):
    return sampling.sample(logits, keys, temperature_B=temp, top_k_B=top_k, top_p_B=top_p, min_p_B=min_p, k_cap=64,
                           penalty_B=penalty, seen_BV=seen, banned_BV=banned)

  assert _triton_modules(sample, *args) == 1

