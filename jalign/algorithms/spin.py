"""SPIN (self-play fine-tuning, Chen et al. 2024) as NeMo-Aligner runs it: DPO on SFT data where the chosen
response is the ground truth and the rejected one is what the previous iteration's model samples for the same
prompt, the reference being that previous model. Iteration k (0-based) uses beta = ``spin.ref_policy_kl_penalty[k]``.

Rows are pairs [N, 2, T]: slot 0 holds the SFT row (prompt + ground truth), slot 1 is filled at every step by the
source in ``jalign.rl.spin_source`` with the reference's sample; ``ref_logps`` [N, 2] are the summed reference
log-probs of both and ``beta`` [N] the iteration's beta. The logged rewards are beta * (log pi - log pi_ref), as
NeMo-Aligner's SPIN logs them (its DPO logs them unscaled).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import common, dpo

PAIR_KEYS = ("tokens", "loss_mask", "segment_ids")
RENAMED = {"rewards_chosen_mean": "rewards_actual_mean", "rewards_rejected_mean": "rewards_generated_mean"}


def betas(cfg) -> list[float]:
  """One beta per iteration: a single value applies to all of them."""
  b = [float(x) for x in cfg.spin.ref_policy_kl_penalty]
  return b * cfg.spin.max_iterations if len(b) == 1 else b


def validate(cfg):
  from jalign.config import ConfigError
  s = cfg.spin
  if s.max_iterations < 1:
    raise ConfigError(f"spin.max_iterations must be >= 1, got {s.max_iterations}")
  if len(s.ref_policy_kl_penalty) not in (1, s.max_iterations):
    raise ConfigError(f"spin.ref_policy_kl_penalty has {len(s.ref_policy_kl_penalty)} values: give one, or one "
                      f"per iteration (spin.max_iterations={s.max_iterations})")
  if any(b <= 0 for b in betas(cfg)):
    raise ConfigError(f"spin.ref_policy_kl_penalty must be > 0, got {tuple(s.ref_policy_kl_penalty)}")
  if s.steps_per_iteration < 0 or s.max_new_tokens < 0 or s.top_k < 0 or s.temperature < 0:
    raise ConfigError("spin.steps_per_iteration, max_new_tokens, top_k and temperature must be >= 0")
  if not 0 < s.top_p <= 1:
    raise ConfigError(f"spin.top_p={s.top_p} must be in (0, 1]")
  if cfg.model.reference_checkpoint:
    raise ConfigError("spin's reference is the previous iteration's model: leave model.reference_checkpoint empty")


def max_new_tokens(cfg) -> int:
  """NeMo-Aligner's default: half the sequence length."""
  return cfg.spin.max_new_tokens or cfg.data.max_seq_len // 2


def spin_losses(logp_B2, ref_B2, beta_B):
  """-log sigmoid(beta [rho(y_gt) - rho(y_gen)]) per pair [B], and the scaled rewards beta * rho (ground truth,
  generated), each [B]; ``logp_B2``/``ref_B2``: summed log-probs of (ground truth, generated) under policy and
  reference."""
  losses, (rho_gt, rho_gen) = dpo.preference_losses(logp_B2[:, 0], logp_B2[:, 1], ref_B2[:, 0], ref_B2[:, 1],
                                                    loss_type="dpo", beta=beta_B)
  return losses, (beta_B * rho_gt, beta_B * rho_gen)


# ------------------------------------------------------------------------------------------ algorithm API

def batch_axes(cfg) -> dict:
  return {**{k: common.PAIR_AXES[k] for k in PAIR_KEYS}, "ref_logps": ("batch", None), "beta": ("batch",)}


def pair_rows(sft_rows: dict, pad_id: int) -> dict:
  """SFT rows [N, T] -> pair rows [N, 2, T] with the ground truth in slot 0 and an empty slot 1."""
  N, T = sft_rows["tokens"].shape
  rows = {"tokens": np.full((N, 2, T), pad_id, np.int32), "loss_mask": np.zeros((N, 2, T), bool),
          "segment_ids": np.zeros((N, 2, T), np.int32)}
  for k in PAIR_KEYS:
    rows[k][:, 0] = sft_rows[k]
  rows["ref_logps"] = np.zeros((N, 2), np.float32)
  rows["beta"] = np.zeros((N,), np.float32)
  return rows


def load_data(path, tok, cfg):
  from jalign import data
  ex, skipped = data.load_sft_examples(path, tok, cfg.data, cfg.tokenizer.chat_template)
  rows = pair_rows(data.build_rows(ex, cfg.data.max_seq_len, tok.pad_id, packing=False), tok.pad_id)
  return rows, len(ex), skipped, ex


def make_loss(cfg, model_cfg):

  def loss_fn(params, batch, rng):
    logp, _ = common.pair_logps(common.policy_params(params), batch, model_cfg, rng)
    losses, (r_gt, r_gen) = spin_losses(logp, jax.lax.stop_gradient(batch["ref_logps"]), batch["beta"])
    w = jnp.any(batch["segment_ids"][:, 0] > 0, axis=-1).astype(jnp.float32)
    loss = jnp.sum(w * losses)
    sums = {RENAMED.get(k, k): v for k, v in common.reward_sums(r_gt, r_gen, w).items()}
    return loss, jnp.sum(w), {"loss": loss, **sums}

  return loss_fn


finalize = common.finalize
