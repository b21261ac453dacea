"""Supervised fine-tuning: token-level negative log-likelihood on the trainable (answer) tokens.

The loss is a global token mean over the whole global batch (sum of NLL / number of target tokens), so it does
not depend on how the batch is split into micro-batches or devices. (NeMo-Aligner averages per micro-batch and
then over micro-batches; the two agree when every micro-batch has the same number of target tokens.)
"""
from __future__ import annotations

import jax.numpy as jnp

from jalign.models import transformer

BATCH_AXES = {"tokens": ("batch", "length"), "loss_mask": ("batch", "length"),
              "segment_ids": ("batch", "length"), "positions": ("batch", "length")}


def target_mask(batch):
  """[B, T-1]: token t+1 is a target (trainable, same segment as its context, not padding)."""
  seg = batch["segment_ids"]
  return batch["loss_mask"][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)


def loss_fn(params, batch, model_cfg, rng=None):
  """Returns (summed NLL, number of target tokens, summed metrics). ``token_acc`` (the target has the largest
  logit) needs the full logits: it is logged with ``model.logprob_impl=xla`` only."""
  h_BTD = transformer.hidden_states(params, batch["tokens"], model_cfg, positions_BT=batch["positions"],
                                    segment_ids_BT=batch["segment_ids"], dropout_rng=rng)
  mask_BT = target_mask(batch)
  metrics = {}
  if transformer.logprob_path(model_cfg) == "xla":
    logits_BTV = transformer.logits_from_hidden(params, h_BTD, model_cfg)
    logp_BT = transformer.token_logprobs(logits_BTV, batch["tokens"])
    # the target has the largest logit: the pick and the max the log-softmax reads anyway (a variadic argmax
    # over the vocabulary is a pass of its own, slow on XLA:CPU); a tie for the largest counts as correct
    picked_BT = jnp.take_along_axis(logits_BTV, jnp.roll(batch["tokens"], -1, axis=1)[..., None], axis=-1)[..., 0]
    correct = (picked_BT >= jnp.max(logits_BTV, axis=-1))[:, :-1]
    metrics["token_acc"] = jnp.sum(correct & mask_BT).astype(jnp.float32)
  else:
    logp_BT = transformer.logprobs_from_hidden(params, h_BTD, batch["tokens"], model_cfg)
  nll_sum = -jnp.sum(jnp.where(mask_BT, logp_BT, 0.0))
  n_tokens = jnp.sum(mask_BT).astype(jnp.float32)
  return nll_sum, n_tokens, {"loss": nll_sum, **metrics}


# ------------------------------------------------------------------------------------------ algorithm API

def batch_axes(cfg) -> dict:
  return BATCH_AXES


def load_data(path, tok, cfg):
  from jalign import data
  ex, skipped = data.load_sft_examples(path, tok, cfg.data, cfg.tokenizer.chat_template)
  return data.build_rows(ex, cfg.data.max_seq_len, tok.pad_id, cfg.data.packing), len(ex), skipped, ex


def make_loss(cfg, model_cfg):
  return lambda params, batch, rng: loss_fn(params, batch, model_cfg, rng)
