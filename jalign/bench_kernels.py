"""``python -m jalign.bench kernels``: the Pallas kernels against their references.

On a GPU: flash attention forward and forward+backward (bf16, head dim 128, causal, GQA 8:1, T in 1k..16k) in
TFLOP/s against cuDNN (``jax.nn.dot_product_attention``), the XLA reference and a bf16 matmul ceiling measured in
the same process; decode attention against the HBM bound (bytes of K/V read per call / measured copy bandwidth);
the fused log-prob (N = 8 x 4096, V = 128256) against full logits and the chunked path, time and XLA's temporary
memory; fused sampling against the engine's XLA path and a sort-based sampler. On CPU the kernels run in Pallas'
interpreter at small sizes (a check that the harness and kernels run, not a speed figure), and XLA's
``memory_analysis()`` of the log-prob paths at the GPU sizes is printed (compiled, not run).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


def _time(f, *args, reps=5):
  jax.block_until_ready(f(*args))  # compile and warm up
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / reps


def matmul_ceiling(n=8192, dtype=jnp.bfloat16):
  """TFLOP/s of one n^3 matmul: the dense ceiling on this device."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  return 2 * n ** 3 / _time(jax.jit(lambda a: a @ a), a) / 1e12


def copy_bandwidth(gib=2.0):
  """GB/s of reading and writing a large array once (x + 1): the memory-bandwidth bound for decode."""
  n = int(gib * 2 ** 30 / 4)
  x = jnp.zeros((n,), jnp.float32)
  return 2 * 4 * n / _time(jax.jit(lambda x: x + 1), x) / 1e9


def attention_rows(sizes, *, B=1, H=32, K=4, D=128, dtype=jnp.bfloat16, interpret=False, **blocks):
  from jalign.kernels import attention_ops
  from jalign.kernels.flash_attention import flash_attention
  impls = {"pallas": functools.partial(flash_attention, interpret=interpret, **blocks),
           "xla": attention_ops.attention_reference}
  if jax.default_backend() == "gpu":
    impls["cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                                          implementation="cudnn")
  rows = []
  for T in sizes:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (B, T, H, D), dtype)
    k, v = (jax.random.normal(x, (B, T, K, D), dtype) for x in (kk, kv))
    flops = 4 * B * H * T * T * D / 2  # causal forward; the backward is 2.5x
    for name, attn in impls.items():
      fwd = jax.jit(lambda q, k, v, attn=attn: attn(q, k, v, causal=True))
      loss = lambda q, k, v, attn=attn: attn(q, k, v, causal=True).astype(jnp.float32).sum()
      fwd_bwd = jax.jit(jax.grad(loss, (0, 1, 2)))
      try:
        t_f, t_fb = _time(fwd, q, k, v), _time(fwd_bwd, q, k, v)
      except Exception as e:  # e.g. the XLA reference's [T, T] scores at 16k
        rows.append({"kernel": name, "T": T, "error": type(e).__name__})
        continue
      rows.append({"kernel": name, "T": T, "fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_fb,
                   "fwd_tflops": flops / t_f / 1e12, "fwd_bwd_tflops": 3.5 * flops / t_fb / 1e12})
  return rows


def decode_rows(sizes, *, B=8, H=32, K=4, D=128, dtype=jnp.bfloat16, interpret=False, bandwidth=0.0, **kw):
  from jalign.kernels.decode_attention import decode_attention, decode_attention_reference
  rows = []
  for S in sizes:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (B, H, D), dtype)
    k, v = (jax.random.normal(x, (B, K, S, D), dtype) for x in (kk, kv))
    lengths = jnp.full((B,), S, jnp.int32)
    bytes_read = 2 * k.size * k.dtype.itemsize
    for name, f in {"pallas": functools.partial(decode_attention, interpret=interpret, **kw),
                    "xla": decode_attention_reference}.items():
      t = _time(jax.jit(f), q, k, v, lengths)
      row = {"kernel": name, "S": S, "ms": 1e3 * t, "gbps": bytes_read / t / 1e9}
      if bandwidth:
        row["of_hbm_bound"] = row["gbps"] / bandwidth
      rows.append(row)
  return rows


def logprob_rows(N, D, V, *, dtype=jnp.bfloat16, interpret=False, chunk=256, run=True):
  """Fused log-probs vs full XLA logits vs ``model.logprob_chunk``: forward and forward+backward (d h, d w) time
  (``run``) and XLA's temporary bytes of the forward+backward."""
  from jalign.kernels import logprob
  from jalign.models import ModelConfig, transformer
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  cfg = ModelConfig(vocab_size=V, hidden_size=D, dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name,
                    logprob_impl="chunked", logprob_chunk=chunk)
  paths = {"pallas (fused)": lambda h, w, t: logprob.token_logprobs(h, w, t, interpret=interpret),
           "xla (full logits)": lambda h, w, t: logprob.token_logprobs_reference(h, w, t),
           f"chunked ({chunk})": lambda h, w, t: transformer.target_logprobs({"lm_head": w}, h[None], t[None],
                                                                             cfg)[0]}
  shapes = (jax.ShapeDtypeStruct((N, D), dtype), jax.ShapeDtypeStruct((D, V), dtype),
            jax.ShapeDtypeStruct((N,), jnp.int32))
  rows = []
  for name, f in paths.items():
    grad = jax.jit(jax.grad(lambda h, w, t, f=f: f(h, w, t).sum(), argnums=(0, 1)))
    row = {"path": name, "temp_mb": grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes / 2 ** 20}
    if run:
      h = jax.random.normal(k[0], (N, D), dtype)
      w = (jax.random.normal(k[1], (D, V)) * D ** -0.5).astype(dtype)
      t = jax.random.randint(k[2], (N,), 0, V)
      try:
        row.update(fwd_ms=1e3 * _time(jax.jit(f), h, w, t), fwd_bwd_ms=1e3 * _time(grad, h, w, t))
      except Exception as e:  # out of memory
        row["error"] = type(e).__name__
    rows.append(row)
  return rows


def sampling_rows(B, V, *, interpret=False, k_cap=64):
  from jalign.generation import sampling as engine_sampling
  from jalign.kernels import sampling
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  logits = jax.random.normal(k[0], (B, V)) * 3
  keys = jax.random.split(k[1], B)
  kw = dict(temperature_B=jnp.full((B,), 0.8), top_k_B=jnp.full((B,), 50, jnp.int32),
            top_p_B=jnp.full((B,), 0.9), min_p_B=jnp.full((B,), 0.05))

  def sort_based(logits, keys):  # sort the vocabulary, truncate by rank and cumulative mass, draw
    x_BV = -jnp.sort(-logits / kw["temperature_B"][:, None], axis=-1)
    idx_BV = jnp.argsort(-logits, axis=-1)
    p_BV = jax.nn.softmax(jnp.where(jnp.arange(V) < kw["top_k_B"][:, None], x_BV, -jnp.inf), axis=-1)
    keep_BV = (jnp.cumsum(p_BV, axis=-1) - p_BV < kw["top_p_B"][:, None]) & (
        p_BV >= kw["min_p_B"][:, None] * p_BV[:, :1])
    pick_B = jax.vmap(jax.random.categorical)(keys, jnp.where(keep_BV, jnp.log(p_BV), -jnp.inf))
    return jnp.take_along_axis(idx_BV, pick_B[:, None], axis=-1)[:, 0]

  samplers = {"pallas (fused)": lambda l, k: sampling.sample(l, k, k_cap=k_cap, interpret=interpret, **kw),
              "xla (engine)": lambda l, k: engine_sampling.sample(l, k, k_cap=k_cap, **kw),
              "sort-based": sort_based}
  return [{"sampler": name, "B": B, "V": V, "ms": 1e3 * _time(jax.jit(f), logits, keys)}
          for name, f in samplers.items()]


def run(device_sizes=None):
  """All rows for this backend: ``{"backend", "attention", "decode", "logprob", "logprob_memory", "sampling",
  ...}``."""
  gpu = jax.default_backend() == "gpu"
  out = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}
  if gpu:
    sizes = device_sizes or (1024, 4096, 8192, 16384)
    out["matmul_tflops"] = matmul_ceiling()
    out["bandwidth_gbps"] = copy_bandwidth()
    out["attention"] = attention_rows(sizes)
    out["decode"] = decode_rows(sizes, num_splits=4, bandwidth=out["bandwidth_gbps"])
    out["logprob"] = logprob_rows(8 * 4096, 4096, 128256)
    out["sampling"] = sampling_rows(64, 128256)
  else:  # interpreted: the harness and kernels run; times say nothing about a GPU
    blocks = dict(block_q=32, block_k=32, block_q_bwd=32, block_k_bwd=32)
    out["attention"] = attention_rows((64, 128), H=8, K=1, D=32, dtype=jnp.float32, interpret=True, **blocks)
    out["decode"] = decode_rows((64, 128), B=2, H=8, K=1, D=32, dtype=jnp.float32, interpret=True, block_s=32)
    out["logprob"] = logprob_rows(256, 64, 1000, dtype=jnp.float32, interpret=True, chunk=64)
    out["logprob_memory"] = logprob_rows(8 * 4096, 4096, 128256, interpret=True, run=False)
    out["sampling"] = sampling_rows(4, 1000, interpret=True)
  return out


def _fmt(v):
  return f"{v:.3g}" if isinstance(v, float) else str(v)


def print_tables(out):
  print(f"backend {out['backend']} ({out['device']})"
        + (f"; bf16 matmul ceiling {out['matmul_tflops']:.0f} TFLOP/s, copy bandwidth {out['bandwidth_gbps']:.0f} "
           "GB/s" if "matmul_tflops" in out else "; kernels interpreted (not speed figures)"))
  for name in ("attention", "decode", "logprob", "logprob_memory", "sampling"):
    rows = out.get(name)
    if not rows:
      continue
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n{name}\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
      print("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
  if out["backend"] != "gpu":
    print("\nGPU rows (attention vs cuDNN and the matmul ceiling, decode vs the HBM bound, fused log-prob and "
          "sampling times at full size): not yet measured on this backend")
