"""Knowledge distillation from a teacher's top-K logits (NeMo-Aligner's ``megatron_gpt_knowledge_distillation.py``).

Per target token, with the teacher's K largest logits ``t_k`` (sorted descending) and their token ids:
``q = softmax(target_logits_scale * t)`` and ``p = softmax(logits_scale * student_logits[ids])``, both renormalised
over the K ids only. ``fwd_kl = sum_k q_k (log q_k - log p_k)``, ``bwd_kl = sum_k p_k (log p_k - log q_k)``.
The per-token loss is ``kd_loss_weight * KL + sft_loss_weight * CE`` (CE: the full-vocabulary NLL of the data
token under the scaled student logits), averaged over the target tokens of the global batch.

``kd.mode=offline`` reads the top-K from files (``python -m jalign.distill topk``, or NeMo-Aligner's KD JSONL);
``kd.mode=online`` runs the frozen teacher (``kd.teacher_checkpoint``, ``params["teacher"]``) in the same step.
``sft_loss`` is logged even when its weight is 0 (NeMo-Aligner logs 0 then): it is the student's NLL.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jalign.algorithms import common, sft
from jalign.models import transformer

LOSSES = ("fwd_kl", "bwd_kl")
MODES = ("offline", "online")
TOPK_AXES = {"topk_logits": ("batch", None, None), "topk_token_ids": ("batch", None, None)}


def topk_kl(student_logits_BTV, teacher_topk_BTK, topk_ids_BTK, *, bwd=False, logits_scale=1.0,
            target_logits_scale=1.0):
  """[B, T] KL between teacher and student distributions renormalised over the teacher's top-K ids."""
  s_BTK = logits_scale * jnp.take_along_axis(student_logits_BTV, topk_ids_BTK, axis=-1)
  logp_BTK = jax.nn.log_softmax(s_BTK, axis=-1)
  logq_BTK = jax.nn.log_softmax(target_logits_scale * teacher_topk_BTK.astype(jnp.float32), axis=-1)
  if bwd:
    return jnp.sum(jnp.exp(logp_BTK) * (logp_BTK - logq_BTK), axis=-1)
  return jnp.sum(jnp.exp(logq_BTK) * (logq_BTK - logp_BTK), axis=-1)


def teacher_topk(teacher_logits_BTV, k):
  """The teacher's K largest logits (sorted descending, minus the row maximum, as NeMo-Aligner stores them), their
  ids and the log-sum-exp of the shifted logits: [B, T, K], [B, T, K], [B, T]."""
  shifted_BTV = teacher_logits_BTV - jnp.max(teacher_logits_BTV, axis=-1, keepdims=True)
  vals_BTK, ids_BTK = jax.lax.top_k(shifted_BTV, k)
  return vals_BTK, ids_BTK.astype(jnp.int32), jax.nn.logsumexp(shifted_BTV, axis=-1)


def kd_token_losses(student_logits_BTV, tokens_BT, teacher_topk_BTK, topk_ids_BTK, kd_cfg):
  """Per-position (KD, CE) in the shifted space, both [B, T-1]: position t predicts token t+1."""
  s = kd_cfg.logits_scale
  kl_BT = topk_kl(student_logits_BTV, teacher_topk_BTK, topk_ids_BTK, bwd=kd_cfg.kd_loss == "bwd_kl",
                  logits_scale=s, target_logits_scale=kd_cfg.target_logits_scale)
  ce_BT = -transformer.token_logprobs(s * student_logits_BTV, tokens_BT)
  return kl_BT[:, :-1], ce_BT


def masked_sums(kl_BT, ce_BT, mask_BT, kd_loss_weight, sft_loss_weight):
  """(loss sum, number of target tokens, metric sums): the trainer divides the sums by the token count."""
  kd_sum = jnp.sum(jnp.where(mask_BT, kl_BT, 0.0))
  sft_sum = jnp.sum(jnp.where(mask_BT, ce_BT, 0.0))
  loss = kd_loss_weight * kd_sum + sft_loss_weight * sft_sum
  return loss, jnp.sum(mask_BT).astype(jnp.float32), {"loss": loss, "kd_loss": kd_sum, "sft_loss": sft_sum}


# ------------------------------------------------------------------------------------------ algorithm API

def check_config(cfg):
  """Called by ``config.validate`` for ``algorithm=kd``."""
  from jalign.config import ConfigError
  k = cfg.kd
  if k.kd_loss not in LOSSES:
    raise ConfigError(f"kd.kd_loss={k.kd_loss!r}: choose from {', '.join(LOSSES)}")
  if k.mode not in MODES:
    raise ConfigError(f"kd.mode={k.mode!r}: choose from {', '.join(MODES)}")
  if k.kd_loss_weight == 0 and k.sft_loss_weight == 0:
    raise ConfigError("kd.kd_loss_weight and kd.sft_loss_weight cannot both be 0")
  if k.k < 1:
    raise ConfigError(f"kd.k must be >= 1, got {k.k}")
  if k.mode == "online" and not k.teacher_checkpoint:
    raise ConfigError("kd.mode=online needs kd.teacher_checkpoint (the teacher's model directory)")
  if k.mode == "offline" and k.teacher_checkpoint:
    raise ConfigError("kd.teacher_checkpoint is for kd.mode=online; offline KD reads kd.topk_path")


def teacher_config(cfg):
  """The online teacher's architecture (its model directory's), run in the student's compute dtype; None offline."""
  if cfg.kd.mode != "online":
    return None
  from jalign import checkpoint
  d = dict(checkpoint.read_model_config(checkpoint.resolve_model_dir(cfg.kd.teacher_checkpoint)))
  d.update(lora_rank=0, num_value_heads=0, dtype=cfg.model.dtype, attention=cfg.model.attention,
           remat="none", logprob_chunk=0)
  return transformer.ModelConfig.from_config(d)


def batch_axes(cfg) -> dict:
  return sft.BATCH_AXES if cfg.kd.mode == "online" else {**sft.BATCH_AXES, **TOPK_AXES}


def load_data(path, tok, cfg):
  if cfg.kd.mode == "online":
    return sft.load_data(path, tok, cfg)
  from jalign import distill, train
  from jalign.data import DataError
  store = (cfg.kd.topk_path if path == cfg.data.train_path else cfg.kd.eval_topk_path) or path
  if store != path and distill.CHUNK_ID not in store and not os.path.exists(store):
    raise DataError(store, 0, None, "not found; compute the teacher's top-K with python -m jalign.distill topk "
                    f"--teacher TEACHER --input {path} --output {store}")
  vocab = train.model_config_for(cfg).vocab_size
  rows, examples = distill.load_topk_rows(store, cfg.kd.k, cfg.data.max_seq_len, tok.pad_id, vocab,
                                          source=path if store != path else "")
  return rows, len(examples), 0, examples


def make_loss(cfg, model_cfg):
  kd_cfg = cfg.kd
  teacher_cfg = teacher_config(cfg)

  def loss_fn(params, batch, rng):
    kw = dict(positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"])
    logits_BTV = transformer.forward(common.policy_params(params), batch["tokens"], model_cfg, dropout_rng=rng,
                                     **kw)
    if teacher_cfg is None:
      topk_BTK, ids_BTK = batch["topk_logits"], batch["topk_token_ids"]
    else:
      t_logits_BTV = transformer.forward(jax.lax.stop_gradient(params["teacher"]), batch["tokens"], teacher_cfg,
                                         **kw)
      topk_BTK, ids_BTK, _ = teacher_topk(t_logits_BTV, kd_cfg.k)
    kl_BT, ce_BT = kd_token_losses(logits_BTV, batch["tokens"], jax.lax.stop_gradient(topk_BTK), ids_BTK,
                                   kd_cfg)
    return masked_sums(kl_BT, ce_BT, sft.target_mask(batch), kd_cfg.kd_loss_weight, kd_cfg.sft_loss_weight)

  return loss_fn
