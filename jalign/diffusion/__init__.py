"""Diffusion models for DRaFT+: a small class-conditional DiT denoiser, DDIM sampling with classifier-free
guidance, and the toy coloured-shapes task (docs/diffusion.md).

``model_family(cfg)`` is what diffusion algorithms (``ddpm``, ``draftp``) hand the shared trainer in place of the
language model (see ``jalign.algorithms``); ``load(path)`` reads a denoiser model directory back.
"""
from __future__ import annotations

import types

from jalign.diffusion import ddim, toy
from jalign.diffusion.denoiser import (ARCH_KEYS, DenoiserConfig, apply, init_params, lora_off, merge_lora,
                                       param_axes, param_shapes)

FAMILY = "denoiser"  # model_config.json's "family" for a denoiser model directory

__all__ = ["DenoiserConfig", "apply", "ddim", "init_params", "load", "lora_off", "merge_lora", "model_family",
           "param_axes", "param_shapes", "save", "toy"]


def is_denoiser_dir(path: str) -> bool:
  from jalign import checkpoint
  try:
    return checkpoint.read_model_config(checkpoint.resolve_model_dir(path)).get("family") == FAMILY
  except (checkpoint.CheckpointError, OSError):
    return False


def config_for(cfg) -> DenoiserConfig:
  """The denoiser config of ``config.diffusion``; with ``diffusion.checkpoint``, architecture keys come from the
  checkpoint's model_config.json."""
  from jalign import checkpoint
  d = cfg.diffusion.to_dict()
  if cfg.diffusion.checkpoint:
    model_dir = checkpoint.resolve_model_dir(cfg.diffusion.checkpoint)
    saved = checkpoint.read_model_config(model_dir)
    if saved.get("family") != FAMILY:
      raise checkpoint.CheckpointError(f"diffusion.checkpoint={cfg.diffusion.checkpoint!r} is not a denoiser "
                                       "model directory (model_config.json has no family='denoiser')")
    d.update({k: saved[k] for k in ARCH_KEYS if k in saved})
  from jalign.config import ConfigError
  if not 0.0 <= cfg.diffusion.class_dropout < 1.0:
    raise ConfigError(f"diffusion.class_dropout={cfg.diffusion.class_dropout} must be in [0, 1)")
  try:
    return DenoiserConfig.from_config(d)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def export_config(dcfg: DenoiserConfig) -> dict:
  """model_config.json of an exported (LoRA-merged) denoiser."""
  return {**dcfg.to_dict(), "lora_rank": 0, "family": FAMILY}


def model_family(cfg):
  """The trainer's model hook for denoisers: config, init/shapes/axes, the checkpoint to start from, export."""
  from jalign.diffusion import denoiser
  dcfg = config_for(cfg)
  return types.SimpleNamespace(
      config=dcfg, init_params=init_params, param_shapes=param_shapes, param_axes=param_axes,
      checkpoint=cfg.diffusion.checkpoint, flops_per_token=denoiser.flops_per_token,
      seq_len=dcfg.num_patches, export=lambda params: (merge_lora(params, dcfg), export_config(dcfg)))


def save(directory: str, params: dict, dcfg: DenoiserConfig):
  """Write a denoiser model directory (LoRA merged in)."""
  from jalign import checkpoint
  checkpoint.save_model(directory, merge_lora(params, dcfg), export_config(dcfg))


def load(path: str, **overrides) -> tuple[dict, DenoiserConfig]:
  """(params, config) of a denoiser model directory or a finished run holding one in model/; ``overrides``
  replace config fields (e.g. ``dtype="bfloat16"``)."""
  import dataclasses

  import jax

  from jalign import checkpoint
  model_dir = checkpoint.resolve_model_dir(path)
  saved = checkpoint.read_model_config(model_dir)
  if saved.get("family") != FAMILY:
    raise checkpoint.CheckpointError(f"{path}: not a denoiser model directory (no family='denoiser')")
  dcfg = DenoiserConfig.from_config({**saved, "lora_rank": 0})
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), param_shapes(dcfg))
  params = checkpoint.load_params(model_dir, abstract)
  if overrides:
    dcfg = dataclasses.replace(dcfg, **overrides)
  return params, dcfg


def evaluate(params, dcfg: DenoiserConfig, *, per_class: int = 4, steps: int = 50, eta: float = 0.0,
             guidance: float = 7.5, seed: int = 0, prompts=None) -> tuple[dict, "np.ndarray", "np.ndarray"]:
  """Sample ``per_class`` images for each prompt id (all toy prompts unless given) with DDIM + guidance and grade
  them (``toy.grade``); returns (grades, images [n, H, W, C], prompt ids [n])."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  ids = np.repeat(np.arange(toy.NUM_CLASSES) if prompts is None else np.asarray(prompts), per_class)
  key = jax.random.PRNGKey(seed)
  x_T = jax.random.normal(key, (len(ids), dcfg.image_size, dcfg.image_size, dcfg.channels))
  run = jax.jit(lambda p, x, c, k: ddim.sample(lambda xx, t, cc: apply(p, xx, t, cc, dcfg), x, c, steps=steps,
                                               eta=eta, guidance=guidance, key=k,
                                               num_train_timesteps=dcfg.num_train_timesteps))
  images = np.asarray(run(params, x_T, jnp.asarray(ids, jnp.int32), jax.random.fold_in(key, 1)))
  return toy.grade(images, ids), images, ids
