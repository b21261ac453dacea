"""Annealed Importance Guidance (AIG): sample with a per-step mix of the base and the DRaFT+ model.

At step i of T (i = 0 is the noisiest), ``eps = (1 - w_i) eps_base + w_i eps_draft`` with ``w_i`` from a schedule
(NeMo-Aligner's ``weight_type``): ``base`` 0, ``draft`` 1, ``linear`` i/T, ``power_p`` (i/T)^p, ``step_f``
1[i/T >= f]. Early (coarse) steps stay close to the diverse base model, late (detail) steps follow the tuned one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.diffusion import ddim

SCHEDULES = ("base", "draft", "linear", "power_2", "step_0.6")  # the five compared in docs/draftp.md


def parse_schedule(name: str) -> tuple[str, float]:
  """'power_2.0' -> ('power', 2.0); 'linear' -> ('linear', 0.0); unknown names raise ValueError."""
  if name in ("base", "draft", "linear"):
    return name, 0.0
  kind, _, arg = name.partition("_")
  if kind in ("power", "step") and arg:
    try:
      return kind, float(arg)
    except ValueError:
      pass
  raise ValueError(f"AIG schedule {name!r}: choose base, draft, linear, power_<p> or step_<f>")


def weights(name: str, steps: int) -> np.ndarray:
  """[T] draft weights w_i, i = 0..T-1 (sampling order)."""
  kind, a = parse_schedule(name)
  frac = np.arange(steps, dtype=np.float64) / steps
  w = {"base": np.zeros_like(frac), "draft": np.ones_like(frac), "linear": frac,
       "power": frac ** a, "step": (frac >= a).astype(np.float64)}[kind]
  return w.astype(np.float32)


def sample(base_eps_fn, draft_eps_fn, x_T, cond_B, *, schedule: str, steps: int, eta: float, guidance: float,
           key, num_train_timesteps: int = 1000):
  """x_0 from DDIM with classifier-free guidance, each model guided on its own, mixed per step by ``schedule``.

  ``*_eps_fn(x, t_B, cond_B) -> eps`` (unguided); both see the same state and noise."""
  w_S = jnp.asarray(weights(schedule, steps))
  B = x_T.shape[0]

  def body(x, xs):
    i, t, at, ap, w = xs
    t_B = jnp.full((B,), t, jnp.int32)
    eps = (1.0 - w) * ddim.cfg_eps(base_eps_fn, x, t_B, cond_B, guidance)
    eps = eps + w * ddim.cfg_eps(draft_eps_fn, x, t_B, cond_B, guidance)
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return ddim.ddim_step(x, eps, at, ap, eta, noise), None

  xs = (jnp.arange(steps),) + tuple(jnp.asarray(v) for v in ddim.ddim_schedule(num_train_timesteps, steps)) + (w_S,)
  x0, _ = jax.lax.scan(body, x_T, xs)
  return x0

