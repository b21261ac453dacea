"""DRaFT+ (Direct Reward Fine-Tuning, regularised): the pure sampling-with-gradients, loss and metrics.

Sample x_0 with the current model (DDIM, classifier-free guidance) and back-propagate the reward through the last
``truncation_steps`` (K) denoising steps only:

  L = -mean_b R(x_0) + kl_coeff * mean_b [ mean_k sum_pixels (eps_theta - eps_init)^2 / D ]

where eps_init is the guided noise prediction of the LoRA-off view of the same params (the base model, no second
copy) on the same inputs (x_t, t, cond) as each differentiated step, held constant (NeMo-Aligner computes it under
``no_grad``), and D = H*W*C. The first S-K steps run with ``stop_gradient`` on both the params they see and the
state they produce; the K differentiated steps run under ``jax.checkpoint`` inside a scan, so the memory of
loss+grad holds one step's activations plus K small states, whatever the total number of sampling steps S.
(With K=1, as NeMo-Aligner's default, the regulariser is exactly mean_b sum (eps_theta - eps_init)^2 / D.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.diffusion import ddim


def row_keys(rng, seed_B):
  """One PRNG key per row: the row's seed folded into ``rng`` (or into key 0 when ``rng`` is None: fixed,
  reproducible noise, as evaluation uses)."""
  base = jax.random.PRNGKey(0) if rng is None else rng
  return jax.vmap(lambda s: jax.random.fold_in(base, s))(seed_B.astype(jnp.uint32))


def row_normal(keys_B, i, shape, dtype=jnp.float32):
  """[B, *shape] standard normals, row b from ``fold_in(keys_B[b], i)`` (i = 0: x_T; i = step + 1: DDIM noise)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape, dtype))(keys_B)


def guided_eps(model_fn, params, x_BHWC, t_B, cond_B, guidance):
  """Classifier-free-guided eps of ``model_fn(params, x, t, cond)``."""
  return ddim.cfg_eps(lambda x, t, c: model_fn(params, x, t, c), x_BHWC, t_B, cond_B, guidance)


def sample_with_grad(model_fn, ref_view, params, cond_B, keys_B, *, image_shape, steps: int, truncation_steps: int,
                     eta: float, guidance: float, num_train_timesteps: int):
  """(x0_BHWC, kl_B): a DDIM sample whose gradient w.r.t. ``params`` flows only through the last
  ``truncation_steps`` steps, and the per-row regulariser mean_k sum (eps_theta - eps_init)^2 / D over them.

  ``ref_view(params)`` is the reference (LoRA-off) view of the params; ``keys_B`` from :func:`row_keys`."""
  S, K = steps, truncation_steps
  if not 1 <= K <= S:
    raise ValueError(f"truncation_steps={K} must be in [1, steps={S}]")
  xs = (jnp.arange(S),) + tuple(jnp.asarray(v) for v in ddim.ddim_schedule(num_train_timesteps, S))
  head = jax.tree.map(lambda v: v[:S - K], xs)
  tail = jax.tree.map(lambda v: v[S - K:], xs)
  B = cond_B.shape[0]
  D = int(np.prod(image_shape))

  def noise(i, x):
    return row_normal(keys_B, i + 1, x.shape[1:], x.dtype)

  frozen = jax.lax.stop_gradient(params)

  def head_body(x, s):
    i, t, at, ap = s
    eps = guided_eps(model_fn, frozen, x, jnp.full((B,), t), cond_B, guidance)
    return ddim.ddim_step(x, eps, at, ap, eta, noise(i, x)), None

  @jax.checkpoint
  def tail_body(x, s):
    i, t, at, ap = s
    t_B = jnp.full((B,), t)
    eps = guided_eps(model_fn, params, x, t_B, cond_B, guidance)
    eps_init = jax.lax.stop_gradient(guided_eps(model_fn, ref_view(params), x, t_B, cond_B, guidance))
    kl_B = jnp.sum(jnp.square(eps - eps_init).reshape(B, -1), axis=1) / D
    return ddim.ddim_step(x, eps, at, ap, eta, noise(i, x)), kl_B

  x_T = row_normal(keys_B, 0, tuple(image_shape))
  x, _ = jax.lax.scan(head_body, x_T, head)
  x = jax.lax.stop_gradient(x)  # no gradient reaches the steps before the last K
  x0, kl_KB = jax.lax.scan(tail_body, x, tail)
  return x0, jnp.mean(kl_KB, axis=0)


def loss_terms(model_fn, ref_view, reward_fn, params, cond_B, keys_B, *, kl_coeff: float, **sample_kw):
  """Per-row (loss_B, reward_B, kl_B) with loss_B = -R(x0) + kl_coeff * kl; x0 is clipped to the image range
  [-1, 1] before the reward, as NeMo-Aligner clips the decoded image."""
  x0, kl_B = sample_with_grad(model_fn, ref_view, params, cond_B, keys_B, **sample_kw)
  r_B = reward_fn(jnp.clip(x0, -1.0, 1.0), cond_B)
  return -r_B + kl_coeff * kl_B, r_B, kl_B


def draftp_loss(model_fn, ref_view, reward_fn, params, batch, rng, *, kl_coeff: float, **sample_kw):
  """The trainer's loss: (loss_sum, weight, metric_sums) over the valid rows of ``batch`` {cond, seed, valid}.
  Metrics (per row, averaged by the trainer): ``loss``, ``reward``, ``kl_penalty`` (NeMo-Aligner's names)."""
  keys_B = row_keys(rng, batch["seed"])
  loss_B, r_B, kl_B = loss_terms(model_fn, ref_view, reward_fn, params, batch["cond"], keys_B, kl_coeff=kl_coeff,
                                 **sample_kw)
  v_B = batch["valid"].astype(jnp.float32)
  loss_sum = jnp.sum(v_B * loss_B)
  return loss_sum, jnp.sum(v_B), {"loss": loss_sum, "reward": jnp.sum(v_B * r_B),
                                  "kl_penalty": jnp.sum(v_B * kl_B)}
