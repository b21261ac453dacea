"""Pieces shared by the pairwise algorithms (reward models, DPO family, KTO): one forward over a [B, 2, T] batch
(chosen/rejected, or sample/KL-sample, interleaved as NeMo-Aligner does), the reference model's log-probs, and
reward statistics summed per pair so that the trainer can average them over the global batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jalign.models import lora, transformer

PAIR_AXES = {"tokens": ("batch", None, "length"), "loss_mask": ("batch", None, "length"),
             "segment_ids": ("batch", None, "length"), "margin": ("batch",), "chosen_reward": ("batch",),
             "rejected_reward": ("batch",), "ref_logps": ("batch", None)}
REFERENCE_MODES = ("auto", "copy", "lora_off", "precomputed")


def flat_pairs(batch):
  """[B, 2, T] -> [2B, T] (c0, r0, c1, r1, ...) for tokens, loss_mask, segment_ids; plus positions."""
  B, _, T = batch["tokens"].shape
  flat = {k: batch[k].reshape(2 * B, T) for k in ("tokens", "loss_mask", "segment_ids")}
  flat["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2 * B, T))
  return flat


def target_mask(flat):
  """[N, T-1]: token t+1 is a response token of the same (unpacked) sequence."""
  return flat["loss_mask"][:, 1:] & (flat["segment_ids"][:, 1:] > 0)


def sequence_logps(params, flat, model_cfg, rng=None):
  """Summed response log-probs and response lengths, both [N], of unpacked sequences
  (``flat``: tokens, loss_mask, segment_ids, positions, each [N, T])."""
  h_NTD = transformer.hidden_states(params, flat["tokens"], model_cfg, positions_BT=flat["positions"],
                                    segment_ids_BT=flat["segment_ids"], dropout_rng=rng)
  logp_NT = transformer.logprobs_from_hidden(params, h_NTD, flat["tokens"], model_cfg)
  mask_NT = target_mask(flat)
  return jnp.sum(jnp.where(mask_NT, logp_NT, 0.0), axis=-1), jnp.sum(mask_NT, axis=-1).astype(jnp.float32)


def pair_logps(params, batch, model_cfg, rng=None):
  """Summed response log-probs and response lengths, both [B, 2], from one forward over 2B sequences."""
  B = batch["tokens"].shape[0]
  s, n = sequence_logps(params, flat_pairs(batch), model_cfg, rng)
  return s.reshape(B, 2), n.reshape(B, 2)


def reference_mode(cfg) -> str:
  mode = cfg.reference
  if mode == "auto":
    return "lora_off" if cfg.model.lora.rank else "copy"
  return mode


def policy_params(params):
  """The policy's own params: no reference copy, no PPO critic, no KD teacher."""
  return {k: v for k, v in params.items() if k not in ("reference", "critic", "teacher")}


def reference_logps(params, batch, model_cfg, mode):
  """[B, 2] summed log-probs under the reference: a frozen copy (``params['reference']``), the same params with
  LoRA adapters off, or values precomputed before training (``batch['ref_logps']``)."""
  if mode == "precomputed":
    return batch["ref_logps"]
  ref = params["reference"] if mode == "copy" else lora.disabled(policy_params(params))
  logp, _ = pair_logps(jax.lax.stop_gradient(ref), batch, model_cfg)
  return jax.lax.stop_gradient(logp)


def reward_sums(r_chosen, r_rejected, w):
  """Per-pair sums (weighted by validity w) that the trainer divides by the number of pairs."""
  return {"acc": jnp.sum(w * (r_chosen > r_rejected)), "rewards_chosen_mean": jnp.sum(w * r_chosen),
          "rewards_rejected_mean": jnp.sum(w * r_rejected),
          "rewards_all_mean": jnp.sum(w * (r_chosen + r_rejected)) / 2,
          "_rewards_sq": jnp.sum(w * (r_chosen ** 2 + r_rejected ** 2)) / 2}


def finalize(m: dict) -> dict:
  """Averaged sums -> NeMo-Aligner's metrics (std from the mean of squares)."""
  m = dict(m)
  if "_rewards_sq" in m:
    sq = m.pop("_rewards_sq")
    m["rewards_all_std"] = jnp.sqrt(jnp.maximum(sq - m["rewards_all_mean"] ** 2, 0.0))
  return m
