"""DDIM sampling (Song et al., 2021) with classifier-free guidance (Ho & Salimans, 2022).

Noise schedule: Stable Diffusion's "scaled linear" betas, the schedule NeMo's DRaFT+ models use
(``linear_start=0.00085, linear_end=0.012``): ``beta_t = (sqrt(0.00085) + t/(N-1) (sqrt(0.012) - sqrt(0.00085)))^2``
for t = 0..N-1 and ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``. A forward sample is
``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.

Sampling visits ``steps`` timesteps spaced evenly from N-1 down ("trailing" spacing, so the first step starts at
the noisiest timestep even for few steps); the last step goes to alpha_bar = 1, i.e. returns the predicted x_0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BETA_START, BETA_END = 0.00085, 0.012


def alphas_cumprod(num_train_timesteps: int = 1000) -> np.ndarray:
  """[N] alpha_bar_t of the scaled-linear beta schedule (float64)."""
  betas = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def ddim_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
  """[steps] int timesteps, descending: round(N - i N / steps) - 1 for i = 0..steps-1 (starts at N-1)."""
  if not 1 <= steps <= num_train_timesteps:
    raise ValueError(f"steps={steps} must be in [1, num_train_timesteps={num_train_timesteps}]")
  return (np.round(num_train_timesteps - np.arange(steps) * num_train_timesteps / steps) - 1).astype(np.int32)


def ddim_schedule(num_train_timesteps: int, steps: int):
  """(t [S] int32, alpha_t [S], alpha_prev [S]) for the S sampling steps; alpha_prev of the last step is 1."""
  ab = alphas_cumprod(num_train_timesteps)
  t = ddim_timesteps(num_train_timesteps, steps)
  alpha_t = ab[t]
  alpha_prev = np.concatenate([ab[t[1:]], [1.0]])
  return t, alpha_t.astype(np.float32), alpha_prev.astype(np.float32)


def ddim_step(x_t, eps, alpha_t, alpha_prev, eta, noise):
  """One DDIM update x_t -> x_prev (alphas are alpha_bar values: scalars, or [B] broadcast over H, W, C):

    x0    = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise

  eta = 0 is deterministic DDIM, eta = 1 is DDPM's ancestral variance."""
  def bcast(a):
    a = jnp.asarray(a, jnp.float32)
    return a.reshape(a.shape + (1,) * (x_t.ndim - a.ndim)) if a.ndim else a
  a_t, a_prev = bcast(alpha_t), bcast(alpha_prev)
  x0 = (x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
  sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t)) * jnp.sqrt(1.0 - a_t / a_prev)
  direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
  return jnp.sqrt(a_prev) * x0 + direction + sigma * noise


def cfg_eps(eps_fn, x, t, cond, guidance, *, null_class: int = -1):
  """Classifier-free guidance: eps_uncond + g (eps_cond - eps_uncond), both from one batched call of
  ``eps_fn(x [2B..], t [2B], cond [2B])`` (the second half with the null class). g = 1 (a Python number) makes
  one conditional call."""
  if isinstance(guidance, (int, float)) and guidance == 1.0:
    return eps_fn(x, t, cond)
  B = x.shape[0]
  eps = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
               jnp.concatenate([cond, jnp.full_like(cond, null_class)]))
  eps_cond, eps_uncond = eps[:B], eps[B:]
  return eps_uncond + guidance * (eps_cond - eps_uncond)


def sample(eps_fn, x_T, cond, *, steps: int = 50, eta: float = 0.0, guidance: float = 7.5, key=None,
           num_train_timesteps: int = 1000, null_class: int = -1, clip_x0: bool = False):
  """x_0 [B, H, W, C] from noise ``x_T`` by ``steps`` DDIM steps under ``lax.scan`` (jit-able; differentiable
  through every step). ``eps_fn(x_BHWC, t_B, cond_B) -> eps``; ``key`` draws the per-step noise (needed when
  eta > 0); ``clip_x0`` clips the final x_0 to [-1, 1]."""
  t_S, a_S, ap_S = ddim_schedule(num_train_timesteps, steps)
  if key is None:
    key = jax.random.PRNGKey(0)
  B = x_T.shape[0]

  def body(x, xs):
    i, t, a_t, a_prev = xs
    eps = cfg_eps(eps_fn, x, jnp.full((B,), t, jnp.int32), cond, guidance, null_class=null_class)
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    return ddim_step(x, eps, a_t, a_prev, eta, noise).astype(x.dtype), None

  x0, _ = jax.lax.scan(body, x_T.astype(jnp.float32), (jnp.arange(steps), t_S, a_S, ap_S))
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0
