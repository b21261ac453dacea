"""DDPM pretraining of the diffusion denoiser: the standard ε-prediction MSE (Ho et al., 2020).

For each image x_0 a timestep t ~ U{0..N-1} and noise ε ~ N(0, I) give x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε;
the loss is the per-image mean of (ε_θ(x_t, t, y) - ε)², averaged over the batch. A fraction
``diffusion.class_dropout`` of the labels is replaced by the null class so the same network also learns the
unconditional ε that classifier-free guidance needs. Evaluation uses fixed draws and no label dropout.
The model is the denoiser (``jalign.diffusion.model_family``), not the language model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign import diffusion
from jalign.diffusion import ddim, denoiser, toy

BATCH_AXES = {"images": ("batch", None, None, None), "labels": ("batch",), "weight": ("batch",)}


def noised(x0_BHWC, noise_BHWC, t_B, alphas_cumprod):
  """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
  ab_B111 = jnp.asarray(alphas_cumprod, jnp.float32)[t_B][:, None, None, None]
  return jnp.sqrt(ab_B111) * x0_BHWC + jnp.sqrt(1.0 - ab_B111) * noise_BHWC


def loss_fn(params, batch, dcfg, class_dropout: float, rng=None):
  """Returns (summed per-image MSE, number of images, summed metrics); padded rows have weight 0."""
  x0_BHWC, labels_B, w_B = batch["images"], batch["labels"], batch["weight"]
  B, N = labels_B.shape[0], dcfg.num_train_timesteps
  t_key, n_key, d_key = jax.random.split(jax.random.PRNGKey(0) if rng is None else rng, 3)
  t_B = jax.random.randint(t_key, (B,), 0, N)
  noise_BHWC = jax.random.normal(n_key, x0_BHWC.shape, jnp.float32)
  drop_B = jax.random.bernoulli(d_key, class_dropout, (B,)) if rng is not None else jnp.zeros((B,), bool)
  cond_B = jnp.where(drop_B, dcfg.num_classes, labels_B)
  x_t = noised(x0_BHWC.astype(jnp.float32), noise_BHWC, t_B, ddim.alphas_cumprod(N))
  eps_BHWC = denoiser.apply(params, x_t, t_B, cond_B, dcfg)
  mse_B = jnp.mean(jnp.square(eps_BHWC - noise_BHWC), axis=(1, 2, 3))
  loss_sum = jnp.sum(w_B * mse_B)
  return loss_sum, jnp.sum(w_B), {"loss": loss_sum}


# ------------------------------------------------------------------------------------------ algorithm API

def model_family(cfg):
  return diffusion.model_family(cfg)


def batch_axes(cfg) -> dict:
  return BATCH_AXES


def load_data(path, tok, cfg):
  rows = toy.load_images(path, cfg.diffusion.image_size)
  rows["weight"] = np.ones(len(rows["labels"]), np.float32)
  return rows, len(rows["labels"]), 0, []


def make_loss(cfg, dcfg):
  p = cfg.diffusion.class_dropout
  return lambda params, batch, rng: loss_fn(params, batch, dcfg, p, rng)
