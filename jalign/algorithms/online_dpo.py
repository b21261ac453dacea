"""Online DPO: two samples per prompt from the current policy, ranked by the reward (the higher one is chosen;
ties are left out), then the DPO-family loss of ``online_dpo.loss`` against the reference (a frozen copy, or the
LoRA-off view). Log-probs at temperature 1, summed over each response."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import common, dpo, pg

PAIR_KEYS = ("tokens", "loss_mask", "segment_ids")


def needs_reference(cfg) -> bool:
  return True


def batch_axes(cfg) -> dict:
  return {**{k: common.PAIR_AXES[k] for k in PAIR_KEYS}, "ref_logps": ("batch", None), "weight": ("batch",)}


def prepare(ro: dict, cfg, ctl: dict) -> tuple[dict, dict]:
  r = ro["rewards"].reshape(-1, 2)
  first_wins = r[:, 0] >= r[:, 1]
  order = np.where(first_wins[:, None], [0, 1], [1, 0]) + 2 * np.arange(len(r))[:, None]  # [P, 2]: chosen, rejected
  mask = ro["loss_mask"][:, 1:]
  ref_sum, _ = pg.sequence_scores(ro["ref_logps"], mask)
  rows = {k: ro[k][order] for k in PAIR_KEYS}
  rows["ref_logps"] = ref_sum[order].astype(np.float32)
  rows["weight"] = (r[:, 0] != r[:, 1]).astype(np.float32)
  return rows, {"reward_margin": float(np.abs(r[:, 0] - r[:, 1]).mean()),
                "fraction_of_ties": float(1.0 - rows["weight"].mean())}


def make_loss(cfg, model_cfg):
  d = cfg.online_dpo

  def loss_fn(params, batch, rng):
    logp, _ = common.pair_logps(common.policy_params(params), batch, model_cfg, rng)
    ref = jax.lax.stop_gradient(batch["ref_logps"])
    losses, (rho_c, rho_r) = dpo.preference_losses(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], loss_type=d.loss,
                                                   beta=d.beta)
    w = batch["weight"]
    loss = jnp.sum(w * losses)
    return loss, jnp.sum(w), {"loss": loss, **common.reward_sums(rho_c, rho_r, w)}

  return loss_fn


finalize = common.finalize
