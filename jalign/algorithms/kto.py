"""KTO on unpaired data (NeMo-Aligner's ``algorithms/kto.py``; TRL's KTOTrainer).

Each batch row holds a sample (prompt + response, desirable or not) and its KL sample (the same prompt with
another row's response). With rho = log pi - log pi_ref (summed over response tokens) and the reference point
z = max(0, mean rho(KL samples)), detached:
desirable ``lambda_D * (1 - sigmoid(beta (rho - z)))``, undesirable ``lambda_U * (1 - sigmoid(beta (z - rho)))``;
the loss is the mean over samples. Rewards are logged unscaled (rho), as NeMo-Aligner does.

z is taken over what one ``loss_fn`` call sees: a micro-batch (all data-parallel ranks together), as in
NeMo-Aligner. So KTO is the one algorithm whose training loss depends on ``train.micro_batch_size``: with gradient
accumulation each sample is measured against its own micro-batch's z, and the logged ``kl`` is the mean of those z.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.algorithms import common
from jalign.data import preference


def kto_losses(rho, rho_kl, desirable, valid, *, beta=0.2, desirable_weight=1.0, undesirable_weight=1.0):
  """Per-sample losses [B] and the reference point z (a scalar)."""
  z = jnp.sum(jnp.where(valid, rho_kl, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
  z = jax.lax.stop_gradient(jnp.maximum(z, 0.0))
  good = desirable_weight * (1 - jax.nn.sigmoid(beta * (rho - z)))
  bad = undesirable_weight * (1 - jax.nn.sigmoid(beta * (z - rho)))
  return jnp.where(desirable, good, bad), z


def batch_axes(cfg) -> dict:
  keys = ["tokens", "loss_mask", "segment_ids", "desirable"]
  if common.reference_mode(cfg) == "precomputed":
    keys.append("ref_logps")
  return common.batch_axes(cfg, keys)


WINDOWED = True  # make_loss takes the response window of padded pair rows


def load_data(path, tok, cfg):
  (samples, kl, good), skipped = preference.load_unpaired(path, tok, cfg.data, cfg.tokenizer.chat_template)
  rows = preference.pair_rows(list(zip(samples, kl)), {"desirable": good}, cfg.data, tok.pad_id)
  return rows, len(samples), skipped, [s for s, g in zip(samples, good) if g]


def make_loss(cfg, model_cfg, window: int = 0):
  """``window``: the LM-head window of padded pair rows (``common.response_window``); 0: every position."""
  k = cfg.kto
  mode = common.reference_mode(cfg)

  def loss_fn(params, batch, rng):
    logp, _ = common.pair_logps(common.policy_params(params), batch, model_cfg, rng, window)
    ref = common.reference_logps(params, batch, model_cfg, mode, window)
    rho = logp - ref  # [..., 2]: sample, KL sample
    w = common.pair_weights(batch)
    losses, z = kto_losses(rho[..., 0], rho[..., 1], batch["desirable"], w > 0, beta=k.beta,
                           desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)
    good = w * batch["desirable"]
    bad = w * (~batch["desirable"])
    r = rho[..., 0]
    loss = jnp.sum(w * losses)
    return loss, jnp.sum(w), {
        "loss": loss, "kl": z * jnp.sum(w), "_chosen_sum": jnp.sum(good * r), "_n_chosen": jnp.sum(good),
        "_rejected_sum": jnp.sum(bad * r), "_n_rejected": jnp.sum(bad), "rewards_all_mean": jnp.sum(w * r),
        "_rewards_sq": jnp.sum(w * r ** 2)}

  return loss_fn


def finalize(m: dict) -> dict:
  m = dict(m)
  m["rewards_chosen_mean"] = m.pop("_chosen_sum") / jnp.maximum(m.pop("_n_chosen"), 1e-9)
  m["rewards_rejected_mean"] = m.pop("_rejected_sum") / jnp.maximum(m.pop("_n_rejected"), 1e-9)
  m["rewards_margin"] = m["rewards_chosen_mean"] - m["rewards_rejected_mean"]
  return common.finalize(m)


