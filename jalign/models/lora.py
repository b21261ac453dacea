"""LoRA helpers: adapters live under ``params["lora"]`` next to the base weights they modify.

- ``disabled(params)``: the same base arrays without adapters (the frozen reference model, no copy).
- ``merge(params, cfg)``: base weights with ``alpha/rank * A @ B`` folded in, adapters removed.
- ``split_trainable``: with LoRA on, only adapters (and a value head, if any) are trained.
"""
from __future__ import annotations

import jax.numpy as jnp

from jalign.models.transformer import _IN_DIMS, ModelConfig


def disabled(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != "lora"}


def merge(params: dict, cfg: ModelConfig) -> dict:
  if "lora" not in params:
    return params
  out = disabled(params)
  layers = dict(out["layers"])
  scale = cfg.lora_alpha / cfg.lora_rank
  for name, ab in params["lora"].items():
    a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
    n_in = _IN_DIMS[name]
    ins = "hd"[:n_in] if n_in == 2 else "x"
    outs = "yz"[:b.ndim - 2]
    delta = jnp.einsum(f"l{ins}r,lr{outs}->l{ins}{outs}", a, b) * scale
    w = layers[name]
    layers[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  out["layers"] = layers
  return out


def trainable_keys(params: dict) -> tuple[str, ...]:
  if "lora" in params:
    return tuple(k for k in ("lora", "value_head") if k in params)
  return tuple(params)


def split_trainable(params: dict) -> tuple[dict, dict]:
  keys = trainable_keys(params)
  return ({k: v for k, v in params.items() if k in keys}, {k: v for k, v in params.items() if k not in keys})
