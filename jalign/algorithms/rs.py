"""Rejection sampling (NeMo-Aligner's ``rs``): G samples per prompt, keep the ``top_n`` with the highest reward,
then supervised fine-tuning on them: the token mean of -log pi over their response tokens (global batch)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jalign.algorithms import pg


def needs_reference(cfg) -> bool:
  return False


def batch_axes(cfg) -> dict:
  return dict(pg.ROLLOUT_AXES)


def select_top(rewards_N, group: int, top_n: int):
  """Indices of the ``top_n`` highest rewards of each group (ties: the earlier sample), groups in order."""
  r = np.asarray(rewards_N).reshape(-1, group)
  order = np.argsort(-r, axis=1, kind="stable")[:, :top_n]
  return (order + group * np.arange(len(r))[:, None]).reshape(-1)


def prepare(ro: dict, cfg, ctl: dict) -> tuple[dict, dict]:
  keep = select_top(ro["rewards"], cfg.rollout.num_generations, cfg.rs.top_n)
  rows = {k: ro[k][keep] for k in pg.ROLLOUT_AXES if k != "weight"}
  rows["weight"] = np.ones(len(keep), np.float32)
  return rows, {"selected_rewards": float(np.mean(ro["rewards"][keep]))}


def make_loss(cfg, model_cfg):
  def loss_fn(params, batch, rng):
    policy, _ = pg.policy_and_critic(params)
    logp = pg.token_logps(policy, batch, model_cfg, 1.0, rng=rng, window=cfg.rollout.max_new_tokens)
    mask = pg.row_mask(batch)
    loss = -pg.masked_sum(logp, mask)
    return loss, jnp.sum(mask).astype(jnp.float32), {"loss": loss}

  return loss_fn
