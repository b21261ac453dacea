"""DRaFT+ on the shared trainer (algorithm=draftp; the math is in ``jalign.diffusion.draftp``).

The model is the diffusion denoiser (``jalign.diffusion.model_family``) with LoRA: only the adapters train, and
the regulariser's eps_init is the same params with the adapters off. A batch row is a prompt (class id), the seed
of its noise and a validity flag (0 on eval padding). Training draws fresh noise each step (the step's rng with
the row's seed folded in); evaluation uses the seeds alone, so ``val_reward`` is the mean reward of fixed,
held-out noise: the same images before and after training, up to what training changed.
"""
from __future__ import annotations

import numpy as np

from jalign import diffusion
from jalign.diffusion import denoiser, rewards, toy
from jalign.diffusion import draftp as draftp_math

BATCH_AXES = {"cond": ("batch",), "seed": ("batch",), "valid": ("batch",)}


def validate(cfg):
  from jalign.config import ConfigError
  d = cfg.draftp
  if cfg.diffusion.lora_rank <= 0:
    raise ConfigError("algorithm=draftp trains LoRA adapters on the denoiser (eps_init is the LoRA-off view): set "
                      "diffusion.lora_rank > 0")
  if d.inference_steps < 1 or not 1 <= d.truncation_steps <= d.inference_steps:
    raise ConfigError(f"draftp.truncation_steps={d.truncation_steps} must be in [1, draftp.inference_steps="
                      f"{d.inference_steps}]")
  if d.kl_coeff < 0 or d.eta < 0:
    raise ConfigError("draftp.kl_coeff and draftp.eta must be >= 0")
  try:
    rewards.check_spec(d.reward_model)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def prompt_rows(path: str) -> dict:
  """Rows {cond, seed, valid} from ``toy:N[:SEED]`` (N prompts cycling over the toy task's, noise seeds
  SEED*10^6 + row) or a text file with one prompt per line (NeMo-Aligner's DRaFT+ data is plain prompts)."""
  from jalign.data import DataError
  if path.startswith("toy:"):
    n, seed = toy.toy_spec(path)
    cond = np.arange(n) % toy.NUM_CLASSES
    seeds = seed * 10 ** 6 + np.arange(n)
  else:
    try:
      with open(path) as f:
        lines = [(i, ln.strip()) for i, ln in enumerate(f, 1) if ln.strip()]
    except OSError as e:
      raise DataError(path, None, None, e.strerror or str(e)) from None
    cond = []
    for i, text in lines:
      try:
        cond.append(toy.prompt_id(text))
      except ValueError as e:
        raise DataError(path, i, None, str(e)) from None
    cond = np.array(cond, np.int32)
    seeds = np.arange(len(cond))
  return {"cond": cond.astype(np.int32), "seed": seeds.astype(np.int32), "valid": np.ones(len(cond), np.float32)}


# ------------------------------------------------------------------------------------------ algorithm API

def model_family(cfg):
  return diffusion.model_family(cfg)


def batch_axes(cfg) -> dict:
  return BATCH_AXES


def load_data(path, tok, cfg):
  rows = prompt_rows(path)
  return rows, len(rows["cond"]), 0, []


def sampler_kwargs(cfg, dcfg) -> dict:
  d = cfg.draftp
  return dict(image_shape=(dcfg.image_size, dcfg.image_size, dcfg.channels), steps=d.inference_steps,
              truncation_steps=d.truncation_steps, eta=d.eta, guidance=d.unconditional_guidance_scale,
              num_train_timesteps=dcfg.num_train_timesteps)


def make_loss(cfg, dcfg):
  reward_fn = rewards.get(cfg.draftp.reward_model)
  kw = sampler_kwargs(cfg, dcfg)

  def model_fn(params, x, t, c):
    return denoiser.apply(params, x, t, c, dcfg)

  def loss_fn(params, batch, rng):
    return draftp_math.draftp_loss(model_fn, denoiser.lora_off, reward_fn, params, batch, rng,
                                   kl_coeff=cfg.draftp.kl_coeff, **kw)
  return loss_fn
