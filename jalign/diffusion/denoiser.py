"""A small class-conditional DiT that predicts the noise ε, as pure functions over a parameter dict.

The image ``x_BHWC`` is cut into P×P patches (N = (H/P)·(W/P) tokens of width D, fixed 2-D sin-cos positions);
the timestep (sinusoidal features through a two-layer MLP) plus a class embedding give one conditioning vector
``c_BD`` that modulates every block through adaLN-zero (shift, scale and gate per sub-layer, zero-initialised so
each block starts as the identity; Peebles & Xie, 2023). Blocks are bidirectional attention + GELU MLP, stacked
on a leading ``layers`` axis and run under ``lax.scan`` like the language model. Class id ``num_classes`` is the
null (unconditional) class used by classifier-free guidance; any id outside ``[0, num_classes)`` (e.g. -1) is
mapped to it.

LoRA adapters live under ``params["lora"][name] = {"a": [L, in..., r], "b": [L, r, out...]}`` for the
projections in ``lora_targets`` (``b`` zero-initialised: a fresh adapter is an exact no-op); ``lora_off`` is the
base view. Parameters are stored in ``param_dtype``, computed in ``dtype`` (LayerNorm and softmax in float32);
``apply`` returns ε in float32.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jalign import sharding
from jalign.models import lora, transformer

LORA_TARGETS = ("q", "k", "v", "o", "up", "down")
# Leading "input" dims (after the layer axis) of each projection; the rest are output dims.
_IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "down": 1}
ARCH_KEYS = ("image_size", "channels", "num_classes", "patch_size", "width", "depth", "num_heads", "mlp_ratio",
             "num_train_timesteps")


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
  image_size: int = 16
  channels: int = 3
  num_classes: int = 12        # conditional classes; id num_classes is the null class
  patch_size: int = 2
  width: int = 64              # D
  depth: int = 4               # blocks
  num_heads: int = 4
  mlp_ratio: int = 4           # MLP hidden = mlp_ratio * width
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = ("q", "k", "v", "o")
  dtype: str = "float32"       # compute dtype
  param_dtype: str = "float32"
  num_train_timesteps: int = 1000

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.channels

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @classmethod
  def from_config(cls, c) -> "DenoiserConfig":
    """From ``config.diffusion`` (a ConfigDict or dict); keys that are not fields are ignored."""
    d = dict(c)
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in fields}
    if "lora_targets" in kw:
      kw["lora_targets"] = tuple(kw["lora_targets"])
    cfg = cls(**kw)
    cfg.validate()
    return cfg

  def validate(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"diffusion.image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
    if self.width % self.num_heads or self.head_dim % 4:
      raise ValueError(f"diffusion.width={self.width} must split into num_heads={self.num_heads} heads of a size "
                       "divisible by 4")
    bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if bad:
      raise ValueError(f"diffusion.lora_targets: unknown {bad}; choose from {LORA_TARGETS}")
    if self.lora_rank < 0 or self.num_classes < 1 or self.num_train_timesteps < 2:
      raise ValueError("diffusion: lora_rank >= 0, num_classes >= 1 and num_train_timesteps >= 2 are required")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["lora_targets"] = list(self.lora_targets)
    return d


# ----------------------------------------------------------------------------------------------- parameters

def _layer_specs(cfg: DenoiserConfig) -> dict:
  L, D, H, Dh, F = cfg.depth, cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_ratio * cfg.width
  return {
      "ada": ((L, D, 6, D), ("layers", "embed", None, None)),  # c -> shift, scale, gate (attn), same (mlp)
      "ada_b": ((L, 6, D), ("layers", None, None)),
      "q": ((L, D, H, Dh), ("layers", "embed", "q_heads", "head_dim")),
      "k": ((L, D, H, Dh), ("layers", "embed", "kv_heads", "head_dim")),
      "v": ((L, D, H, Dh), ("layers", "embed", "kv_heads", "head_dim")),
      "o": ((L, H, Dh, D), ("layers", "q_heads", "head_dim", "embed")),
      "up": ((L, D, F), ("layers", "embed", "mlp")),
      "up_b": ((L, F), ("layers", "mlp")),
      "down": ((L, F, D), ("layers", "mlp", "embed")),
      "down_b": ((L, D), ("layers", "norm")),
  }


def param_specs(cfg: DenoiserConfig) -> dict:
  """Nested dict of (shape, logical_axes) for every parameter."""
  D, K, T = cfg.width, cfg.num_classes + 1, cfg.width
  specs = {
      "patch_in": ((cfg.patch_dim, D), (None, "embed")), "patch_in_b": ((D,), ("norm",)),
      "t_in": ((T, D), (None, "embed")), "t_in_b": ((D,), ("norm",)),
      "t_out": ((D, D), ("embed", "mlp")), "t_out_b": ((D,), ("norm",)),
      "class_embed": ((K, D), ("vocab", "embed")),
      "layers": _layer_specs(cfg),
      "final_ada": ((D, 2, D), ("embed", None, None)), "final_ada_b": ((2, D), (None, None)),
      "out": ((D, cfg.patch_dim), ("embed", None)), "out_b": ((cfg.patch_dim,), (None,)),
  }
  if cfg.lora_rank:
    lora = {}
    for name in cfg.lora_targets:
      shape, axes = specs["layers"][name]
      n = _IN_DIMS[name]
      lora[name] = {"a": ((cfg.depth, *shape[1:1 + n], cfg.lora_rank), ("layers", *axes[1:1 + n], "lora_rank")),
                    "b": ((cfg.depth, cfg.lora_rank, *shape[1 + n:]), ("layers", "lora_rank", *axes[1 + n:]))}
    specs["lora"] = lora
  return specs


def param_axes(cfg: DenoiserConfig) -> dict:
  return transformer.axes_from_specs(param_specs(cfg))


def param_shapes(cfg: DenoiserConfig) -> dict:
  return transformer.shapes_from_specs(param_specs(cfg), cfg.param_dtype)


_ZERO = ("ada", "ada_b", "final_ada", "final_ada_b", "out", "out_b")  # adaLN-zero and the zero output layer
_FAN_IN = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "down": 1}  # leading dims after the layer axis


def init_params(cfg: DenoiserConfig, rng) -> dict:
  """Random init: LeCun normal for projections, normal(0.02) for the class embedding, zeros for biases, the
  adaLN modulations, the output layer and LoRA ``b``."""
  flat, treedef = jax.tree.flatten_with_path(param_specs(cfg), is_leaf=transformer.is_spec)
  keys = jax.random.split(rng, len(flat))
  dt = jnp.dtype(cfg.param_dtype)
  out = []
  for (path, (shape, _)), key in zip(flat, keys):
    names = [str(getattr(p, "key", p)) for p in path]
    last = names[-1]
    if last in _ZERO or last.endswith("_b") or (names[0] == "lora" and last == "b"):
      x = jnp.zeros(shape, dt)
    else:
      if names[0] == "lora":  # a: [L, in..., r]
        fan_in = math.prod(shape[1:-1])
      elif names[0] == "layers":
        fan_in = math.prod(shape[1:1 + _FAN_IN[last]])
      elif last == "class_embed":
        fan_in = 1 / 0.02 ** 2
      else:
        fan_in = shape[0]
      x = (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(dt)
    out.append(x)
  return jax.tree.unflatten(treedef, out)


def lora_off(params: dict) -> dict:
  """The base model: the same arrays without the adapters (no copy)."""
  return lora.disabled(params)


def merge_lora(params: dict, cfg: DenoiserConfig) -> dict:
  """Base weights with ``alpha/rank * A @ B`` folded in, adapters removed (what a finished run exports); the
  language model's merge, whose projection names and input dims the denoiser shares."""
  return lora.merge(params, cfg)


# ------------------------------------------------------------------------------------------------- forward

def timestep_features(t_B, dim: int, max_period: float = 10000.0):
  """[B, dim] sinusoidal features of (float) timesteps: cos then sin at geometric frequencies."""
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float32) / half)
  arg_BF = t_B.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(arg_BF), jnp.sin(arg_BF)], axis=-1)


def pos_embed_2d(grid: int, dim: int) -> np.ndarray:
  """[grid*grid, dim] fixed 2-D sin-cos positions (half the channels for rows, half for columns)."""
  quarter = dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

  def emb(pos):
    arg = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
  return np.concatenate([emb(ys), emb(xs)], axis=1).astype(np.float32)


def patchify(x_BHWC, p: int):
  B, H, W, C = x_BHWC.shape
  x = x_BHWC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x_BNP, p: int, size: int, channels: int):
  B, g = x_BNP.shape[0], size // p
  x = x_BNP.reshape(B, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, size, size, channels)


def _layer_norm(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  mu = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
  return (x32 - mu) * jax.lax.rsqrt(var + eps)


def _matmul(x, w, n_in):
  """Contract the last ``n_in`` dims of x with the first ``n_in`` dims of w (as one 2-D matmul)."""
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  y = x.reshape(-1, math.prod(in_shape)) @ w.reshape(math.prod(in_shape), math.prod(out_shape))
  return y.reshape(*x.shape[:x.ndim - n_in], *out_shape)


def _proj(name, x, layer, lora, cfg, dt):
  """x @ W[name] (+ alpha/rank * x @ A @ B when the name has an adapter)."""
  n = _IN_DIMS[name]
  y = _matmul(x, layer[name].astype(dt), n)
  if lora is not None and name in lora:
    a, b = lora[name]["a"].astype(dt), lora[name]["b"].astype(dt)
    y = y + (cfg.lora_alpha / cfg.lora_rank) * _matmul(_matmul(x, a, n), b, 1)
  return y


def _block(cfg: DenoiserConfig, x_BND, c_BD, layer, lora):
  dt = jnp.dtype(cfg.dtype)
  mod_B6D = jnp.einsum("bd,dke->bke", jax.nn.silu(c_BD), layer["ada"].astype(dt)) + layer["ada_b"].astype(dt)
  shift1, scale1, gate1, shift2, scale2, gate2 = (mod_B6D[:, i, None, :] for i in range(6))
  h_BND = (_layer_norm(x_BND) * (1 + scale1) + shift1).astype(dt)
  q_BNHK, k_BNHK, v_BNHK = (_proj(n, h_BND, layer, lora, cfg, dt) for n in ("q", "k", "v"))
  q_BNHK = sharding.constrain(q_BNHK, ("batch", "length", "act_heads", None))
  s_BHNM = jnp.einsum("bnhk,bmhk->bhnm", q_BNHK, k_BNHK).astype(jnp.float32) / math.sqrt(cfg.head_dim)
  p_BHNM = jax.nn.softmax(s_BHNM, axis=-1).astype(dt)
  attn_BNHK = jnp.einsum("bhnm,bmhk->bnhk", p_BHNM, v_BNHK)
  x_BND = x_BND + gate1 * _proj("o", attn_BNHK, layer, lora, cfg, dt)
  x_BND = sharding.constrain(x_BND, ("batch", "length", "act_embed"))
  h_BND = (_layer_norm(x_BND) * (1 + scale2) + shift2).astype(dt)
  u_BNF = jax.nn.gelu(_proj("up", h_BND, layer, lora, cfg, dt) + layer["up_b"].astype(dt))
  u_BNF = sharding.constrain(u_BNF, ("batch", "length", "act_mlp"))
  x_BND = x_BND + gate2 * (_proj("down", u_BNF, layer, lora, cfg, dt) + layer["down_b"].astype(dt))
  return sharding.constrain(x_BND.astype(dt), ("batch", "length", "act_embed"))


def null_class(cond_B, cfg: DenoiserConfig):
  """Class ids with every id outside [0, num_classes) mapped to the null class ``num_classes``."""
  cond_B = cond_B.astype(jnp.int32)
  return jnp.where((cond_B < 0) | (cond_B >= cfg.num_classes), cfg.num_classes, cond_B)


def apply(params: dict, x_BHWC, t_B, cond_B, cfg: DenoiserConfig):
  """Predicted noise ε [B, H, W, C] (float32) for noisy images ``x_BHWC`` at integer timesteps ``t_B`` with
  class ids ``cond_B`` (the null class, or -1, for unconditional); LoRA applied when ``params`` has ``"lora"``."""
  dt = jnp.dtype(cfg.dtype)
  D, p = cfg.width, cfg.patch_size
  patches_BNP = patchify(x_BHWC.astype(dt), p)
  x_BND = patches_BNP @ params["patch_in"].astype(dt) + params["patch_in_b"].astype(dt)
  x_BND = x_BND + pos_embed_2d(cfg.image_size // p, D).astype(dt)
  x_BND = sharding.constrain(x_BND, ("batch", "length", "act_embed"))
  t_BD = jax.nn.silu(timestep_features(t_B, D).astype(dt) @ params["t_in"].astype(dt) + params["t_in_b"].astype(dt))
  t_BD = t_BD @ params["t_out"].astype(dt) + params["t_out_b"].astype(dt)
  c_BD = t_BD + params["class_embed"].astype(dt)[null_class(cond_B, cfg)]
  lora = params.get("lora")

  def body(x, xs):
    layer, lora_layer = xs
    return _block(cfg, x, c_BD, layer, lora_layer), None

  x_BND, _ = jax.lax.scan(body, x_BND, (params["layers"], lora))
  mod_B2D = (jnp.einsum("bd,dke->bke", jax.nn.silu(c_BD), params["final_ada"].astype(dt))
             + params["final_ada_b"].astype(dt))
  h_BND = (_layer_norm(x_BND) * (1 + mod_B2D[:, 1, None, :]) + mod_B2D[:, 0, None, :]).astype(dt)
  out_BNP = h_BND @ params["out"].astype(dt) + params["out_b"].astype(dt)
  return unpatchify(out_BNP.astype(jnp.float32), p, cfg.image_size, cfg.channels)


def flops_per_token(cfg: DenoiserConfig, seq_len: int) -> float:
  """Training FLOPs per patch token (forward + backward = 3x forward): projections and attention scores."""
  D, F = cfg.width, cfg.mlp_ratio * cfg.width
  per_layer = 2 * D * 6 * D / seq_len + 2 * 4 * D * D + 2 * 2 * D * F + 2 * 2 * D * seq_len
  return 3.0 * (cfg.depth * per_layer + 2 * cfg.patch_dim * D * 2)
