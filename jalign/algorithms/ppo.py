"""PPO with NeMo-Aligner's semantics: per-token rewards r * [last response token] - beta * KL_t (|log r| with
``use_absolute_kl``, the default; k1 otherwise), GAE (gamma, lambda), advantages whitened over the whole rollout,
the clipped surrogate (optional dual clip), the clipped value loss 0.5 max((V - G)^2, (V_clip - G)^2), an entropy
bonus, and unfinished samples masked out of the loss (or penalised). The critic is a second model in the same
state (``params["critic"]``, initialised from the reward model, trained with its own learning rate); the KL
coefficient can follow the adaptive controller of Ziegler et al.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import pg


def needs_reference(cfg) -> bool:
  return cfg.ppo.kl_coef > 0 or bool(cfg.ppo.adaptive_kl_target)


def batch_axes(cfg) -> dict:
  keys = ("old_logps", "advantages", "returns", "old_values")
  return {**pg.ROLLOUT_AXES, **{k: pg.TOKEN_AXES for k in keys}}


def token_rewards(rewards_N, kl_NT, mask_NT, kl_coef: float):
  """r at the position that predicts the last response token, minus kl_coef * KL on every response token."""
  last = mask_NT.shape[1] - 1 - np.argmax(mask_NT[:, ::-1], axis=1)
  out = -kl_coef * np.where(mask_NT, kl_NT, 0.0)
  has = mask_NT.any(axis=1)
  out[np.arange(len(out))[has], last[has]] += rewards_N[has]
  return out


_gae = jax.jit(pg.gae, static_argnums=(3, 4))  # one compile per rollout shape, not a trace per rollout


def prepare(ro: dict, cfg, ctl: dict) -> tuple[dict, dict]:
  p = cfg.ppo
  mask = np.asarray(ro["loss_mask"][:, 1:], bool)
  rewards = ro["rewards"].astype(np.float64)
  if p.unfinished == "penalty":
    rewards = rewards - p.unfinished_penalty * (~ro["finished"])
  kl = np.zeros(mask.shape)
  if needs_reference(cfg):
    d = ro["logps"] - ro["ref_logps"]
    kl = np.abs(d) if p.use_absolute_kl else d
  per_tok = token_rewards(rewards, kl, mask, ctl["kl_coef"])
  adv, ret = jax.device_get(_gae(jnp.asarray(per_tok, jnp.float32), jnp.asarray(ro["values"]), jnp.asarray(mask),
                                p.gamma, p.lam))
  adv, ret = np.asarray(adv), np.asarray(ret)
  raw_mean, raw_std = ctl["moments"](adv, mask)
  if p.normalize_advantages:
    adv = np.where(mask, (adv - raw_mean) / np.sqrt(raw_std ** 2 + 1e-8), 0.0)
  weight = ro["finished"].astype(np.float32) if p.unfinished == "mask" else np.ones(len(rewards), np.float32)
  rows = {k: ro[k] for k in pg.ROLLOUT_AXES if k != "weight"}
  rows.update(weight=weight, old_logps=ro["logps"], advantages=adv.astype(np.float32),
              returns=np.where(mask, ret, 0.0).astype(np.float32), old_values=ro["values"])
  s_ret, n = pg.sequence_scores(ret, mask)
  s_val, _ = pg.sequence_scores(ro["values"], mask)
  nt = max(int(n.sum()), 1)
  return rows, {"rewards_with_kl": float(per_tok.sum(axis=1).mean()), "advantages_mean": float(raw_mean),
                "advantages_std": float(raw_std), "returns_mean": float(s_ret.sum() / nt),
                "values_mean": float(s_val.sum() / nt)}


def make_loss(cfg, model_cfg, critic_cfg):
  p, T = cfg.ppo, cfg.rollout.temperature

  def loss_fn(params, batch, rng):
    policy, critic = pg.policy_and_critic(params)
    mask = pg.row_mask(batch)
    logp, ent = pg.token_logps(policy, batch, model_cfg, T, with_entropy=True, rng=rng,
                              window=cfg.rollout.max_new_tokens)
    surr, ratio, clipped = pg.clipped_surrogate(logp, batch["old_logps"], batch["advantages"], p.ratio_eps,
                                                p.ratio_eps, p.dual_clip)
    v = pg.token_values(critic, batch, critic_cfg)
    old_v, ret = batch["old_values"], batch["returns"]
    vf = (v - ret) ** 2
    if p.value_clip:
      vf = jnp.maximum(vf, (old_v + jnp.clip(v - old_v, -p.value_clip, p.value_clip) - ret) ** 2)
    actor = pg.masked_sum(surr - p.entropy_coef * ent, mask)
    critic_loss = pg.masked_sum(0.5 * vf, mask)
    loss = actor + critic_loss
    return loss, jnp.sum(mask).astype(jnp.float32), {
        "loss": loss, "actor_loss": actor, "critic_loss": critic_loss,
        **pg.token_sums(mask, ppo_ratio=ratio, ppo_ratio_clamped=clipped, scaled_entropy=p.entropy_coef * ent,
                        values=v)}

  return loss_fn


def adapt_kl(kl_coef: float, kl: float, cfg, n_steps: int) -> float:
  """Ziegler et al.'s adaptive KL controller: move beta towards the target KL, at most 20% per horizon."""
  target = cfg.ppo.adaptive_kl_target
  if not target:
    return kl_coef
  err = float(np.clip(kl / target - 1.0, -0.2, 0.2))
  return kl_coef * (1.0 + err * n_steps / cfg.ppo.adaptive_kl_horizon)


finalize = pg.finalize
