"""One decoder-only transformer for the Llama family, as pure functions over a parameter dict.

Options cover Llama 2/3 (RoPE with linear or Llama-3 scaling), Mistral (sliding window), Qwen2 (q/k/v bias, tied
embeddings), GQA/MQA, a value/reward head with N outputs and LoRA adapters. Layers are stacked on a leading axis
and run under ``lax.scan``, so compile time does not grow with depth.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jalign import sharding
from jalign import kernels

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 256
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 0            # 0: hidden_size // num_heads
  ffn_size: int = 128
  rope_theta: float = 10000.0
  rope_scaling: str = "none"   # none | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = False
  sliding_window: int = 0      # 0: full attention
  activation: str = "silu"     # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
  norm_offset: float = 0.0     # RMSNorm scales by (offset + w): Gemma stores w around 0 and uses 1
  scale_embeddings: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
  param_dtype: str = "float32"
  dtype: str = "float32"       # compute dtype
  remat: str = "none"          # none | full | dots
  scan_unroll: int = 1         # layers unrolled per scan iteration (num_layers: a straight-line program)
  attention: str = "xla"
  num_value_heads: int = 0     # >0 adds a value/reward head with that many outputs
  logprob_chunk: int = 0       # >0: sequence log-probs in chunks of this many positions, never all [B, T, V] logits
  logprob_impl: str = "xla"    # xla (chunked when logprob_chunk > 0) | chunked | pallas (fused kernel)
  sampling_impl: str = "xla"   # the sampler's token choice: xla | pallas (fused kernel)
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple = ("q", "v")

  @property
  def dh(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @classmethod
  def from_config(cls, c) -> "ModelConfig":
    """From ``config.model`` (a ConfigDict or dict); keys that are not model fields are ignored."""
    d = dict(c)
    lora = dict(d.pop("lora", {}) or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    if lora:
      kw.update(lora_rank=lora.get("rank", 0), lora_alpha=lora.get("alpha", 16.0),
                lora_dropout=lora.get("dropout", 0.0), lora_targets=tuple(lora.get("targets", ("q", "v"))))
    cfg = cls(**kw)
    cfg.validate()
    return cfg

  def validate(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.rope_scaling not in ("none", "linear", "llama3"):
      raise ValueError(f"model.rope_scaling={self.rope_scaling!r}: choose none, linear or llama3")
    if self.activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"model.activation={self.activation!r}: choose silu or gelu_tanh")
    if self.attention not in kernels.IMPLEMENTATIONS:
      raise ValueError(f"model.attention={self.attention!r}: choose from {kernels.IMPLEMENTATIONS}")
    if self.logprob_impl not in LOGPROB_IMPLS:
      raise ValueError(f"model.logprob_impl={self.logprob_impl!r}: choose from {LOGPROB_IMPLS}")
    if self.sampling_impl not in ("xla", "pallas"):
      raise ValueError(f"model.sampling_impl={self.sampling_impl!r}: choose xla or pallas")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat={self.remat!r}: choose none, full or dots")
    bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if bad:
      raise ValueError(f"model.lora.targets: unknown {bad}; choose from {LORA_TARGETS}")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["lora_targets"] = list(self.lora_targets)
    return d


# ----------------------------------------------------------------------------------------------- parameters

def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
  D, H, K, Dh, F, L = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dh, cfg.ffn_size, cfg.num_layers
  s = {
      "attn_norm": ((L, D), ("layers", "norm")),
      "q": ((L, D, H, Dh), ("layers", "embed", "q_heads", "head_dim")),
      "k": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
      "v": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
      "o": ((L, H, Dh, D), ("layers", "q_heads", "head_dim", "embed")),
      "mlp_norm": ((L, D), ("layers", "norm")),
      "gate": ((L, D, F), ("layers", "embed", "mlp")),
      "up": ((L, D, F), ("layers", "embed", "mlp")),
      "down": ((L, F, D), ("layers", "mlp", "embed")),
  }
  if cfg.qkv_bias:
    s["q_bias"] = ((L, H, Dh), ("layers", "q_heads", "head_dim"))
    s["k_bias"] = ((L, K, Dh), ("layers", "kv_heads", "head_dim"))
    s["v_bias"] = ((L, K, Dh), ("layers", "kv_heads", "head_dim"))
  return s


# Number of leading "input" dims (after the layer axis) of each projection; the rest are output dims.
_IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def param_specs(cfg: ModelConfig) -> dict:
  """Nested dict of (shape, logical_axes) for every parameter."""
  V, D = cfg.vocab_size, cfg.hidden_size
  specs: dict[str, Any] = {"embed": ((V, D), ("vocab", "embed")),
                           "layers": _layer_shapes(cfg),
                           "final_norm": ((D,), ("norm",))}
  if not cfg.tie_embeddings:
    specs["lm_head"] = ((D, V), ("embed", "vocab"))
  if cfg.num_value_heads:
    specs["value_head"] = {"w": ((D, cfg.num_value_heads), ("embed", "value_out")),
                           "b": ((cfg.num_value_heads,), ("value_out",))}
  if cfg.lora_rank:
    lora = {}
    for name in cfg.lora_targets:
      shape, axes = _layer_shapes(cfg)[name]
      n_in = _IN_DIMS[name]
      in_shape, out_shape = shape[1:1 + n_in], shape[1 + n_in:]
      in_axes, out_axes = axes[1:1 + n_in], axes[1 + n_in:]
      lora[name] = {"a": ((cfg.num_layers, *in_shape, cfg.lora_rank), ("layers", *in_axes, "lora_rank")),
                    "b": ((cfg.num_layers, cfg.lora_rank, *out_shape), ("layers", "lora_rank", *out_axes))}
    specs["lora"] = lora
  return specs


def is_spec(x):  # a (shape, axes) leaf of a spec tree
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple) and isinstance(x[1], tuple)


def axes_from_specs(specs) -> dict:
  """Logical axis names from a tree of (shape, axes) specs (this model's, or the denoiser's)."""
  return jax.tree.map(lambda s: s[1], specs, is_leaf=is_spec)


def shapes_from_specs(specs, param_dtype) -> dict:
  dt = jnp.dtype(param_dtype)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s[0], dt), specs, is_leaf=is_spec)


def param_axes(cfg: ModelConfig) -> dict:
  return axes_from_specs(param_specs(cfg))


def param_shapes(cfg: ModelConfig) -> dict:
  return shapes_from_specs(param_specs(cfg), cfg.param_dtype)


def init_params(cfg: ModelConfig, rng) -> dict:
  """Random init: normal(0.02) for matrices (scaled for output projections), ones for norms, zeros for biases
  and for LoRA ``b`` (so a fresh adapter is an exact no-op)."""
  specs = param_specs(cfg)
  flat, treedef = jax.tree.flatten_with_path(specs, is_leaf=is_spec)
  keys = jax.random.split(rng, len(flat))
  dt = jnp.dtype(cfg.param_dtype)
  out = []
  for (path, (shape, _)), key in zip(flat, keys):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    last = name.split("/")[-1]
    if last.endswith("norm"):  # an effective scale of 1
      x = jnp.full(shape, 1.0 - cfg.norm_offset, dt)
    elif last.endswith("bias") or last == "b" and "value_head" in name:
      x = jnp.zeros(shape, dt)
    elif name.startswith("lora/") and last == "b":
      x = jnp.zeros(shape, dt)
    elif name.startswith("lora/") and last == "a":
      fan_in = math.prod(shape[1:-1])
      x = jax.random.normal(key, shape, jnp.float32).astype(dt) * (1.0 / math.sqrt(fan_in))
    else:
      std = 0.02 / math.sqrt(2 * cfg.num_layers) if last in ("o", "down") else 0.02
      x = (jax.random.normal(key, shape, jnp.float32) * std).astype(dt)
    out.append(x)
  return jax.tree.unflatten(treedef, out)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ------------------------------------------------------------------------------------------------- forward

def rms_norm(x, w, eps, offset=0.0):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * (offset + w.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  Dh = cfg.dh
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh))
  if cfg.rope_scaling == "linear":
    inv = inv / cfg.rope_factor
  elif cfg.rope_scaling == "llama3":
    old = cfg.rope_original_max_position
    low_wl, high_wl = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
    wl = 2 * np.pi / inv
    scaled = np.where(wl > low_wl, inv / cfg.rope_factor, inv)
    smooth = (old / wl - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = ~(wl < high_wl) & ~(wl > low_wl)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def rope_tables(positions_BT, inv_freq, max_position: int = 0):
  """cos, sin [B, T, 1, Dh/2] for rotate-half RoPE, computed once per forward pass. ``max_position``: positions
  lie below it, and the values are gathered from tables over 0 .. max_position - 1, which do not depend on the
  positions (XLA computes them once, outside a decode loop): a decode step then computes no cos/sin, which XLA:CPU
  otherwise recomputes in every layer's rotation for each head."""
  if not max_position:
    freqs_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(freqs_BTF)[:, :, None, :], jnp.sin(freqs_BTF)[:, :, None, :]
  freqs_PF = jnp.arange(max_position, dtype=jnp.int32)[:, None].astype(jnp.float32) * inv_freq
  return tuple(jnp.take(f(freqs_PF), positions_BT, axis=0, mode="clip")[:, :, None, :] for f in (jnp.cos, jnp.sin))


def apply_rope(x_BTHD, cos, sin):
  """Rotate-half RoPE (the Hugging Face layout)."""
  x = x_BTHD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)


def _matmul(x, w, n_in):
  """Contract the last ``n_in`` dims of x with the first ``n_in`` dims of w as one 2-D matmul
  ([N, in] @ [in, out]): XLA:CPU runs canonical 2-D dots far faster than multi-dim contractions."""
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  lead = x.shape[:x.ndim - n_in]
  y = x.reshape(-1, math.prod(in_shape)) @ w.reshape(math.prod(in_shape), math.prod(out_shape))
  return y.reshape(*lead, *out_shape)


@jax.custom_vjp
def _vocab_matmul_cpu(h_ND, w_DV):
  return h_ND @ w_DV


def _vocab_matmul_cpu_fwd(h_ND, w_DV):
  return h_ND @ w_DV, (h_ND, w_DV)


def _vocab_matmul_cpu_bwd(res, g_NV):
  h_ND, w_DV = res
  # dW as [D, N] @ [N, V] on an explicitly transposed copy of h: XLA:CPU's dot contracting the leading dims of
  # [N, D] and [N, V] ran about 2x slower at V = 8192 (measured; at the layers' widths it gains nothing)
  return g_NV @ w_DV.T, jax.lax.optimization_barrier(h_ND.T) @ g_NV


_vocab_matmul_cpu.defvjp(_vocab_matmul_cpu_fwd, _vocab_matmul_cpu_bwd)


def _vocab_matmul(h, w_DV):
  """The output layer ``h @ w`` over the last dim of h (its gradient for w computed as above on CPU)."""
  if jax.default_backend() != "cpu":
    return _matmul(h, w_DV, 1)
  lead = h.shape[:-1]
  return _vocab_matmul_cpu(h.reshape(-1, h.shape[-1]), w_DV).reshape(*lead, w_DV.shape[-1])


def _lora_delta(name, x, lora, cfg, dt, drop_key):
  n_in = _IN_DIMS[name]
  a, b = lora[name]["a"].astype(dt), lora[name]["b"].astype(dt)
  if cfg.lora_dropout and drop_key is not None:
    keep = jax.random.bernoulli(jax.random.fold_in(drop_key, LORA_TARGETS.index(name)), 1 - cfg.lora_dropout,
                                x.shape)
    x = jnp.where(keep, x / (1 - cfg.lora_dropout), 0).astype(dt)
  return (cfg.lora_alpha / cfg.lora_rank) * _matmul(_matmul(x, a, n_in), b, 1)


def _proj(names, x, layer, lora, cfg, dt, drop_key):
  """x @ W[name] (+ LoRA delta) for each name; projections of the same input run as one matmul whose output
  is split (larger matmuls use the CPU/accelerator better)."""
  n_in = _IN_DIMS[names[0]]
  ws = [layer[n].astype(dt) for n in names]
  if len(ws) == 1:
    ys = [_matmul(x, ws[0], n_in)]
  else:
    axis = n_in  # the first output dim
    y = _matmul(x, jnp.concatenate(ws, axis=axis), n_in)
    sizes = np.cumsum([w.shape[axis] for w in ws])[:-1]
    ys = jnp.split(y, sizes, axis=x.ndim - n_in)
  if lora is not None:
    ys = [y + _lora_delta(n, x, lora, cfg, dt, drop_key) if n in lora else y for n, y in zip(names, ys)]
  return ys


CACHE_AXES = ("batch", "act_kv_heads", None, None)


def k_cache_transposed(cfg: ModelConfig) -> bool:
  """Whether the cache holds keys as [batch, kv_heads, head_dim, length]: with the XLA attention, whose decode
  scores are then a plain matmul (XLA:CPU otherwise transposes every row's keys at every step: measured 3x the
  matmul at batch 32); the Pallas and cuDNN kernels read [batch, kv_heads, length, head_dim]."""
  return cfg.attention == "xla"


CACHE_BLOCK = 64  # the first block of a blocked cache; the next ones double the cache length read so far


def cache_blocks(cfg: ModelConfig, length: int, block: int = CACHE_BLOCK) -> list[int]:
  """The slots in each block of a ``length``-slot cache: blocks end at block, 2 block, 4 block, ... slots, so that
  a decode step reads only the blocks that hold its rows' tokens (its cost follows the longest sequence, not the
  cache's size); the XLA attention reads each block in place, cuDNN a concatenated copy of them. The Pallas decode
  kernel reads one block up to each row's length."""
  if cfg.attention == "pallas":
    return [length]
  ends, n = [], block
  while n < length:
    ends.append(n)
    n *= 2
  ends.append(length)
  return list(np.diff([0] + ends))


def init_cache(cfg: ModelConfig, batch: int, length: int, block: int = CACHE_BLOCK) -> tuple:
  """KV cache: one ``{"k", "v"}`` per layer, each a tuple of blocks along the slots (``cache_blocks``), in the
  compute dtype, ``v`` [batch, kv_heads, slots, head_dim] and ``k`` the same or [batch, kv_heads, head_dim,
  slots] (``k_cache_transposed``): heads before slots, so the attention matmuls read it without a transposed
  copy. Slot s of a row holds the keys/values of the token at position s. Buffers per layer, not one stacked
  array: XLA updates each in place inside the decode loop, where writing one layer of a stacked cache and reading
  it back copies the whole cache."""
  def blocks(shape):
    return tuple(sharding.constrain(jnp.zeros(shape(n), cfg.dtype), CACHE_AXES)
                 for n in cache_blocks(cfg, length, block))
  v_shape = lambda n: (batch, cfg.num_kv_heads, n, cfg.dh)
  k_shape = (lambda n: (batch, cfg.num_kv_heads, cfg.dh, n)) if k_cache_transposed(cfg) else v_shape
  return tuple({"k": blocks(k_shape), "v": blocks(v_shape)} for _ in range(cfg.num_layers))


def unstack_layers(params) -> dict:
  """``params`` with the stacked ``layers`` (and ``lora``) as lists of per-layer trees: sliced once before a
  decode loop, so its body does not slice the weights at every step."""
  out = dict(params)
  for key in ("layers", "lora"):
    if isinstance(params.get(key), dict):
      n = jax.tree.leaves(params[key])[0].shape[0]
      out[key] = [jax.tree.map(lambda w, i=i: w[i], params[key]) for i in range(n)]
  return out


def _block(cfg: ModelConfig, rope, x_BTD, layer, lora, positions_BT, segment_ids_BT, drop_key, kv=None,
           branch_ids_BT=None, blocks_read=None):
  """One layer. ``kv``: this layer's cache; write its keys/values at slots ``positions_BT`` and attend over its
  slots (those of its first ``blocks_read + 1`` blocks when given; the causal mask on positions hides the slots
  not yet written); returns (x, kv) then."""
  dt = jnp.dtype(cfg.dtype)
  h = rms_norm(x_BTD, layer["attn_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  q, k, v = _proj(("q", "k", "v"), h, layer, lora, cfg, dt, drop_key)
  if cfg.qkv_bias:
    q, k, v = q + layer["q_bias"].astype(dt), k + layer["k_bias"].astype(dt), v + layer["v_bias"].astype(dt)
  q = sharding.constrain(apply_rope(q, *rope), ("batch", "length", "act_heads", None))
  k = sharding.constrain(apply_rope(k, *rope), ("batch", "length", "act_kv_heads", None))
  v = sharding.constrain(v, ("batch", "length", "act_kv_heads", None))
  k_transposed = kv is not None and k_cache_transposed(cfg)
  if kv is not None:
    B, T = positions_BT.shape
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    k, v = k.astype(kv["k"][0].dtype), v.astype(kv["v"][0].dtype)
    ks, vs, start = [], [], 0
    for kb, vb in zip(kv["k"], kv["v"]):  # [B, T, K, D] rows written at [b, :, slot, :] of the block holding them
      n = vb.shape[2]                     # (transposed keys: at [b, :, :, slot])
      slot_BT = positions_BT if len(kv["v"]) == 1 else jnp.where(
          (positions_BT >= start) & (positions_BT < start + n), positions_BT - start, n)
      k_at = kb.at[rows_BT, :, :, slot_BT] if k_transposed else kb.at[rows_BT, :, slot_BT]
      ks.append(sharding.constrain(k_at.set(k, mode="drop"), CACHE_AXES))
      vs.append(sharding.constrain(vb.at[rows_BT, :, slot_BT].set(v, mode="drop"), CACHE_AXES))
      start += n
    kv = {"k": tuple(ks), "v": tuple(vs)}

  def attention(q, k, v, kv_positions_BS):
    return kernels.attention(q, k, v, implementation=cfg.attention, q_segment_ids_BT=segment_ids_BT,
                             q_positions_BT=positions_BT, kv_positions_BS=kv_positions_BS, causal=True,
                             sliding_window=cfg.sliding_window, kv_heads_first=kv is not None,
                             q_branch_ids_BT=branch_ids_BT, causal_rows=kv is None,
                             **({"k_transposed": True} if k_transposed else {}))

  if kv is None:
    attn = attention(q, k, v, positions_BT)
  else:
    def over(n):  # attention over the first n blocks of the cache
      def f(q, ks, vs):
        S = sum(b.shape[2] for b in vs[:n])
        if n == 1:
          ks, vs = ks[0], vs[0]
        elif k_transposed:  # the XLA attention takes the blocks as they are
          ks, vs = ks[:n], vs[:n]
        else:  # a kernel takes one array: a copy of the blocks read
          ks, vs = jnp.concatenate(ks[:n], axis=2), jnp.concatenate(vs[:n], axis=2)
        return attention(q, ks, vs, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)))
      return f
    n_blocks = len(kv["v"])
    if blocks_read is None or n_blocks == 1:
      attn = over(n_blocks)(q, kv["k"], kv["v"])
    else:
      attn = jax.lax.switch(blocks_read, [over(n + 1) for n in range(n_blocks)], q, kv["k"], kv["v"])
  (o,) = _proj(("o",), attn, layer, lora, cfg, dt, drop_key)
  x_BTD = sharding.constrain(x_BTD + o, ("batch", "length", "act_embed"))
  h = rms_norm(x_BTD, layer["mlp_norm"], cfg.rms_norm_eps, cfg.norm_offset)
  g, u = _proj(("gate", "up"), h, layer, lora, cfg, dt, drop_key)
  act = jax.nn.silu(g) if cfg.activation == "silu" else jax.nn.gelu(g, approximate=True)
  m = sharding.constrain(act * u, ("batch", "length", "act_mlp"))
  (down,) = _proj(("down",), m, layer, lora, cfg, dt, drop_key)
  x_BTD = sharding.constrain(x_BTD + down, ("batch", "length", "act_embed"))
  return x_BTD if kv is None else (x_BTD, kv)


def cached_hidden_states(params, tokens_BT, cfg: ModelConfig, cache, start_B, blocks_read=None):
  """Final-norm hidden states [B, T, D] of ``tokens_BT`` placed at positions (= cache slots) ``start_B`` ..
  ``start_B + T - 1`` of each row, attending to everything the cache holds before them; returns (h, cache).
  ``blocks_read`` (traced): attention reads only the cache's first ``blocks_read + 1`` blocks (a ``lax.switch``;
  every position attended to must lie in them), so a decode step's cost follows the longest sequence, not the
  cache's size; None: all of them. Layers run as a Python loop, each updating its own cache buffers in place;
  ``params`` may hold the layers stacked or as lists (``unstack_layers``, what a decode loop passes)."""
  B, T = tokens_BT.shape
  dt = jnp.dtype(cfg.dtype)
  positions_BT = start_B[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)
  x = jnp.take(params["embed"], tokens_BT, axis=0).astype(dt)
  if cfg.scale_embeddings:
    x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  rope = rope_tables(positions_BT, jnp.asarray(rope_inv_freq(cfg)), sum(b.shape[2] for b in cache[0]["v"]))
  layered = unstack_layers(params)
  lora = layered.get("lora") or [None] * cfg.num_layers
  cache = list(cache)
  for i in range(cfg.num_layers):
    x, cache[i] = _block(cfg, rope, x, layered["layers"][i], lora[i], positions_BT, None, None, kv=cache[i],
                         blocks_read=blocks_read)
  return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset), tuple(cache)


def hidden_states(params, tokens_BT, cfg: ModelConfig, *, positions_BT=None, segment_ids_BT=None,
                  dropout_rng=None, branch_ids_BT=None):
  """Final-norm hidden states [B, T, D] in the compute dtype. LoRA applies when ``params`` holds ``lora``.
  ``branch_ids_BT``: continuations sharing a prompt in one row (see ``kernels.attention_reference``)."""
  B, T = tokens_BT.shape
  dt = jnp.dtype(cfg.dtype)
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x = jnp.take(params["embed"], tokens_BT, axis=0).astype(dt)
  if cfg.scale_embeddings:  # in the compute dtype, as Gemma does
    x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dt)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  rope = rope_tables(positions_BT, jnp.asarray(rope_inv_freq(cfg)))
  lora = params.get("lora")

  def body(x, xs):
    layer, lora_l, i = xs
    key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    return _block(cfg, rope, x, layer, lora_l, positions_BT, segment_ids_BT, key, branch_ids_BT=branch_ids_BT), None

  if cfg.remat == "full":
    body = jax.checkpoint(body)
  elif cfg.remat == "dots":
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
  x, _ = jax.lax.scan(body, x, (params["layers"], lora, jnp.arange(cfg.num_layers)),
                      unroll=max(1, min(cfg.scan_unroll, cfg.num_layers)))
  return rms_norm(x, params["final_norm"], cfg.rms_norm_eps, cfg.norm_offset)


def logits_from_hidden(params, h_BTD, cfg: ModelConfig):
  dt = jnp.dtype(cfg.dtype)
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  logits = _vocab_matmul(h_BTD, w.astype(dt)).astype(jnp.float32)
  return sharding.constrain(logits, ("batch", "length", "act_vocab"))


def values_from_hidden(params, h_BTD):
  """Value/reward head on every position: [B, T, N] float32."""
  vh = params["value_head"]
  return (jnp.einsum("btd,dn->btn", h_BTD.astype(jnp.float32), vh["w"].astype(jnp.float32))
          + vh["b"].astype(jnp.float32))


def forward(params, tokens_BT, cfg: ModelConfig, **kwargs):
  """Logits [B, T, V] in float32."""
  return logits_from_hidden(params, hidden_states(params, tokens_BT, cfg, **kwargs), cfg)


def token_logprobs(logits_BTV, tokens_BT):
  """log p(token t+1 | prefix) for t in [0, T-1): [B, T-1] float32 (the shifted space).

  Computed over all T positions with rolled targets and sliced afterwards: slicing the [B, T, V] logits
  instead costs a full copy (and a pad in the backward pass)."""
  targets_BT = jnp.roll(tokens_BT, -1, axis=1)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return (picked_BT - logz_BT)[:, :-1]


LOGPROB_IMPLS = ("xla", "chunked", "pallas")
DEFAULT_CHUNK = 128  # positions per chunk for logprob_impl=chunked without model.logprob_chunk


def logprob_path(cfg: ModelConfig) -> str:
  """The log-prob implementation ``cfg`` runs: ``logprob_impl``, with ``xla`` meaning ``chunked`` when
  ``logprob_chunk`` > 0."""
  return "chunked" if cfg.logprob_impl == "xla" and cfg.logprob_chunk else cfg.logprob_impl


def target_logprobs(params, h_BTD, targets_BT, cfg: ModelConfig, *, temperature: float = 1.0,
                    with_entropy: bool = False):
  """log p(targets_BT | h_BTD) [B, T] float32 of ``softmax(logits / temperature)`` (and its entropy with
  ``with_entropy``), by ``cfg.logprob_impl``: ``xla`` all [B, T, V] logits at once (``chunked`` when
  ``cfg.logprob_chunk`` > 0), ``chunked`` C positions at a time under ``jax.checkpoint`` (peak memory no longer
  grows with T x V), ``pallas`` the fused kernel (vocabulary blocks, never [N, V]; where it cannot run, the XLA
  reference and one warning)."""
  B, T, D = h_BTD.shape
  w = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
  impl = logprob_path(cfg)
  if impl == "pallas":
    from jalign.kernels import logprob as fused
    interpret = kernels.interpret_mode()
    if interpret or jax.default_backend() == "gpu":
      out = fused.token_logprobs(h_BTD.reshape(B * T, D), w, targets_BT.reshape(B * T), temperature=temperature,
                                 return_entropy=with_entropy, interpret=interpret)
      return jax.tree.map(lambda x: x.reshape(B, T), out)
    kernels.fallback("fused log-probs", f"the kernel compiles for GPU (Triton); on {jax.default_backend()!r} it "
                     "runs only interpreted (JALIGN_PALLAS_INTERPRET=1)")
  C = cfg.logprob_chunk or DEFAULT_CHUNK

  def head(w, h_BCD, t_BC):
    logits_BCV = _vocab_matmul(h_BCD, w.astype(h_BCD.dtype)).astype(jnp.float32)
    if temperature != 1.0:
      logits_BCV = logits_BCV / temperature
    logz_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    logp_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0] - logz_BC
    if not with_entropy:
      return logp_BC
    probs_BCV = jnp.exp(logits_BCV - logz_BC[..., None])
    return logp_BC, logz_BC - jnp.sum(probs_BCV * logits_BCV, axis=-1)

  if impl != "chunked" or C >= T:
    return head(w, h_BTD, targets_BT)
  n = -(-T // C)
  pad = n * C - T
  h_nBCD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D).swapaxes(0, 1)
  t_nBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, n, C).swapaxes(0, 1)
  out = jax.lax.map(lambda xs: jax.checkpoint(head)(w, *xs), (h_nBCD, t_nBC))
  return jax.tree.map(lambda x_nBC: x_nBC.swapaxes(0, 1).reshape(B, n * C)[:, :T], out)


def logprobs_from_hidden(params, h_BTD, tokens_BT, cfg: ModelConfig, *, temperature: float = 1.0,
                         with_entropy: bool = False):
  """log p(token t+1 | prefix) [B, T-1] (the shifted space) from final hidden states, by ``cfg.logprob_impl``
  (see ``target_logprobs``). Targets are rolled over all T positions and the result sliced afterwards: slicing
  the hidden states instead costs a copy (and a pad in the backward pass)."""
  out = target_logprobs(params, h_BTD, jnp.roll(tokens_BT, -1, axis=1), cfg, temperature=temperature,
                        with_entropy=with_entropy)
  return jax.tree.map(lambda x: x[:, :-1], out)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), matmuls and attention scores."""
  D, H, K, Dh, F, L, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dh, cfg.ffn_size,
                          cfg.num_layers, cfg.vocab_size)
  per_layer = 2 * D * (H + 2 * K) * Dh + 2 * H * Dh * D + 2 * 3 * D * F + 2 * 2 * H * Dh * seq_len
  return 3.0 * (L * per_layer + 2 * D * V)
