"""REINFORCE with the RLOO baseline (NeMo-Aligner's ``reinforce``): G samples per prompt scored by the reward,
R_i = r_i - beta * mean_t KL_t(pi_old || pi_ref) (|log r| with ``use_absolute_kl``), baseline b_i = the mean of
the group's *other* ended samples' R (b_i = R_i when at most one ended), and the plain policy-gradient loss
mean_t(-log pi_t (R_i - b_i)) over the response tokens of ended samples (token mean over the global batch).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jalign.algorithms import pg

GROUPED = True  # training rows come in groups of rollout.num_generations (kept whole per micro-batch)


def needs_reference(cfg) -> bool:
  return cfg.rloo.kl_coef > 0


def batch_axes(cfg) -> dict:
  return {**pg.ROLLOUT_AXES, "advantages": pg.TOKEN_AXES}


def prepare(ro: dict, cfg, ctl: dict) -> tuple[dict, dict]:
  r, G = cfg.rloo, cfg.rollout.num_generations
  mask = ro["loss_mask"][:, 1:]
  rewards = ro["rewards"].astype(np.float64)
  kl_mean = np.zeros_like(rewards)
  if needs_reference(cfg):
    kl = np.abs(ro["logps"] - ro["ref_logps"]) if r.use_absolute_kl else ro["logps"] - ro["ref_logps"]
    s, n = pg.sequence_scores(kl, mask)
    kl_mean = s / np.maximum(n, 1)
  shaped = rewards - ctl["kl_coef"] * kl_mean
  ended = ro["finished"] if r.unfinished == "mask" else np.ones_like(ro["finished"])
  adv = shaped - pg.rloo_baseline(shaped, ended, G)
  rows = {k: ro[k] for k in pg.ROLLOUT_AXES if k != "weight"}
  rows.update(weight=ended.astype(np.float32), advantages=np.where(mask, adv[:, None], 0.0).astype(np.float32))
  return rows, {"rewards_with_kl": float(shaped.mean()), "advantages_mean": float(adv.mean()),
                "advantages_std": float(adv.std())}


def make_loss(cfg, model_cfg):
  T = cfg.rollout.temperature
  group = pg.prompt_group(cfg, model_cfg)

  def loss_fn(params, batch, rng):
    policy, _ = pg.policy_and_critic(params)
    logp = pg.token_logps(policy, batch, model_cfg, T, rng=rng, window=cfg.rollout.max_new_tokens, group=group)
    mask = pg.row_mask(batch)
    loss = pg.masked_sum(-logp * batch["advantages"], mask)
    return loss, jnp.sum(mask).astype(jnp.float32), {"loss": loss, **pg.token_sums(mask, logprob=logp)}

  return loss_fn


finalize = pg.finalize
