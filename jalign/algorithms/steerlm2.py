"""SteerLM 2.0 (NeMo-Aligner's ``train_steerlm2.py``): train Q_theta(y|a,x) towards P(y|a,x) ~ P(a|x,y) P(y|x)
from n responses per (prompt x, attribute string a) sampled from an earlier SteerLM model Q'(y|a,x).

One row of the batch is one group, a (x, a) with its responses, shaped ``[N, T]`` (N = the most responses of any
group; missing ones are padding), so a group never straddles micro-batches or devices. Per group:

  w_i = softmax_i(log P(a|x,y_i) + log P(y_i|x) - log Q'(y_i|a,x))     (from the data)
  b_i = softmax_i(log Q_theta(y_i|a,x) - log Q'(y_i|a,x))               (no gradient)
  L   = sum_i (w_i - b_i) NLL_theta(y_i) / avg_tokens                   (NLL summed over y_i's tokens)

where ``avg_tokens`` is the mean number of response tokens of the group's responses; the logged loss is the mean
of L over the groups of the global batch, and ``distance`` the mean of KL(w || b). NeMo-Aligner's row format and
its attribute strings are read (and written, for ``python -m jalign.steerlm2``) here.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms import common
from jalign.data import attributes

LOG_FIELDS = ("log(P(a|x,y))", "log(P(y|x))", "log(Q(y|a,x))")
GROUP_AXES = {"tokens": ("batch", None, "length"), "loss_mask": ("batch", None, "length"),
              "segment_ids": ("batch", None, "length"), "logw": ("batch", None), "logq": ("batch", None),
              "valid": ("batch", None)}


# ------------------------------------------------------------------------------------------ rows

@dataclass
class Response:
  role: str
  value: str
  log_p_a: float   # log P(a|x,y)
  log_p_y: float   # log P(y|x)
  log_q: float     # log Q'(y|a,x)


@dataclass
class Group:
  """One SteerLM 2.0 row: a prompt (system + odd number of turns), an attribute string and its responses."""
  system: str
  prompt_turns: list[tuple[str, str]]
  label: str
  responses: list[Response] = field(default_factory=list)


def _error(path, line, fld, msg):
  from jalign.data import DataError
  return DataError(path, line, fld, msg)


def _string(obj, key, path, line, fld=None):
  v = obj.get(key)
  if not isinstance(v, str):
    raise _error(path, line, fld or key, "missing" if key not in obj else f"expected a string, got "
                 f"{type(v).__name__}")
  return v


def _log_value(obj, key, path, fld, line):
  v = obj.get(key)
  if isinstance(v, bool) or not isinstance(v, numbers.Real):
    raise _error(path, line, fld, "missing" if key not in obj else f"expected a number, got {type(v).__name__}")
  if not math.isfinite(v):
    raise _error(path, line, fld, f"expected a finite number, got {v}")
  return float(v)


def parse_row(obj: dict, path: str, line: int, known=attributes.HELPSTEER2) -> Group:
  """Validate one decoded JSON row; a DataError names file, line and field."""
  system = _string(obj, "system", path, line)
  turns = obj.get("prompt_turns")
  if not isinstance(turns, list) or not turns:
    raise _error(path, line, "prompt_turns", "expected a non-empty list of turns")
  if len(turns) % 2 == 0:
    raise _error(path, line, "prompt_turns", f"{len(turns)} turns: the prompt must have an odd number of turns "
                 "(it ends with the turn the responses answer)")
  prompt = []
  for j, t in enumerate(turns):
    f = f"prompt_turns[{j}]"
    if not isinstance(t, dict):
      raise _error(path, line, f, f"expected an object, got {type(t).__name__}")
    prompt.append((_string(t, "from", path, line, f + ".from"), _string(t, "value", path, line, f + ".value")))
  label = _string(obj, "label", path, line)
  try:
    attributes.parse(label, known)
  except ValueError as e:
    raise _error(path, line, "label", str(e)) from None
  resp = obj.get("responses")
  if not isinstance(resp, list) or not resp:
    raise _error(path, line, "responses", "expected a non-empty list of responses")
  out = []
  for j, r in enumerate(resp):
    f = f"responses[{j}]"
    if not isinstance(r, dict):
      raise _error(path, line, f, f"expected an object, got {type(r).__name__}")
    role = _string(r, "from", path, line, f + ".from")
    if out and role != out[0].role:
      raise _error(path, line, f + ".from", f"{role!r}: all responses must be from the same role "
                   f"({out[0].role!r})")
    out.append(Response(role, _string(r, "value", path, line, f + ".value"),
                        *(_log_value(r, k, path, f"{f}.{k}", line) for k in LOG_FIELDS)))
  return Group(system, prompt, label, out)


def row_dict(g: Group) -> dict:
  """The row in NeMo-Aligner's key order (what ``json.dumps`` writes)."""
  return {"system": g.system, "prompt_turns": [{"from": r, "value": v} for r, v in g.prompt_turns],
          "label": g.label,
          "responses": [{"from": r.role, "value": r.value, LOG_FIELDS[0]: r.log_p_a, LOG_FIELDS[1]: r.log_p_y,
                         LOG_FIELDS[2]: r.log_q} for r in g.responses]}


def format_row(g: Group) -> str:
  return json.dumps(row_dict(g), ensure_ascii=False)


def read_groups(path: str, data_cfg, known=attributes.HELPSTEER2) -> tuple[list[Group], int]:
  """The Groups of a file; bad rows raise, or are skipped and counted with ``data.skip_invalid``."""
  from jalign.data import formats
  return formats.finish(path, *formats.collect(formats.read_jsonl(path), data_cfg,
                                               lambda line, obj: parse_row(obj, path, line, known)))


# ------------------------------------------------------------------------------------------ rendering

def prompt_text(g: Group, chat_tokens, with_label: bool = True) -> str:
  """NeMo-Aligner's SteerLM 2.0 prompt: system and prompt turns, the responder's name, then (``with_label``)
  ``label_start`` + the attribute string + ``end_of_turn``."""
  t = chat_tokens
  text = f"{t.system_turn_start}System{t.end_of_name}{g.system}{t.end_of_turn}"
  for role, value in g.prompt_turns:
    text += f"{t.turn_start}{role}{t.end_of_name}{value}{t.end_of_turn}"
  text += f"{t.turn_start}{g.responses[0].role if g.responses else 'Assistant'}{t.end_of_name}"
  return text + (f"{t.label_start}{g.label}{t.end_of_turn}" if with_label else "")


def response_text(value: str, chat_tokens) -> str:
  """What a response trains on: its text, ``end_of_turn`` and the next ``turn_start``."""
  return f"{value}{chat_tokens.end_of_turn}{chat_tokens.turn_start}"


def encode_group(g: Group, pair_tok, chat_tokens, path, line, with_label=True):
  """One Example (prompt untrained, response trained) per response, each truncated per ``data.truncation``."""
  from jalign.data import formats
  prompt = prompt_text(g, chat_tokens, with_label)
  out = []
  for j, r in enumerate(g.responses):
    ex = pair_tok.string_response(prompt, response_text(r.value, chat_tokens), path, line,
                                  f"responses[{j}].value", False)
    toks, mask = formats.truncate(ex.tokens, ex.loss_mask, pair_tok.cfg.max_seq_len, pair_tok.cfg.truncation,
                                  path, line)
    out.append(formats.Example(toks, mask))
  return out


def stack_groups(groups: list[list], T: int, N: int, pad_id: int) -> dict:
  """Examples of each group -> tokens/loss_mask/segment_ids [G, N, T] and valid [G, N]."""
  G = len(groups)
  rows = {"tokens": np.full((G, N, T), pad_id, np.int32), "loss_mask": np.zeros((G, N, T), bool),
          "segment_ids": np.zeros((G, N, T), np.int32), "valid": np.zeros((G, N), bool)}
  for g, exs in enumerate(groups):
    for i, ex in enumerate(exs):
      n = len(ex.tokens)
      rows["tokens"][g, i, :n], rows["loss_mask"][g, i, :n] = ex.tokens, ex.loss_mask
      rows["segment_ids"][g, i, :n], rows["valid"][g, i] = 1, True
  return rows


# ------------------------------------------------------------------------------------------ the math

def masked_log_softmax(x_GN, valid_GN):
  """log softmax over each group's valid entries; 0 at padding."""
  return jnp.where(valid_GN, jax.nn.log_softmax(jnp.where(valid_GN, x_GN, -jnp.inf), axis=-1), 0.0)


def group_terms(logq_theta_GN, ntok_GN, logw_GN, logq_prime_GN, valid_GN):
  """Per group: (sum_i (w_i - b_i) * NLL_i / avg_tokens with b held constant, KL(w || b)), both [G]."""
  log_w = masked_log_softmax(logw_GN, valid_GN)
  log_b = jax.lax.stop_gradient(masked_log_softmax(logq_theta_GN - logq_prime_GN, valid_GN))
  w, b = jnp.where(valid_GN, jnp.exp(log_w), 0.0), jnp.where(valid_GN, jnp.exp(log_b), 0.0)
  n = jnp.maximum(jnp.sum(valid_GN, axis=-1), 1)
  avg_tokens_G = jnp.maximum(jnp.sum(jnp.where(valid_GN, ntok_GN, 0.0), axis=-1) / n, 1.0)
  nll_GN = jnp.where(valid_GN, -logq_theta_GN, 0.0)
  loss_G = jnp.sum((w - b) * nll_GN, axis=-1) / avg_tokens_G
  kl_G = jnp.sum(w * (log_w - log_b), axis=-1)
  return loss_G, kl_G


# ------------------------------------------------------------------------------------------ algorithm API

def batch_axes(cfg) -> dict:
  return GROUP_AXES


def load_data(path, tok, cfg):
  from jalign.data import formats, preference, templates
  pair_tok = preference.PairTokenizer(tok, cfg.data, cfg.tokenizer.chat_template)
  chat = templates.ChatTokens(**cfg.data.chat_prompt_tokens)
  known = tuple(cfg.steerlm2.attribute_names)

  def make(line, obj):
    g = parse_row(obj, path, line, known)
    return g, encode_group(g, pair_tok, chat, path, line)
  items, skipped = formats.finish(path, *formats.collect(formats.read_jsonl(path), cfg.data, make))
  N = max(len(g.responses) for g, _ in items)
  rows = stack_groups([exs for _, exs in items], cfg.data.max_seq_len, N, tok.pad_id)
  logw, logq = np.zeros(rows["valid"].shape, np.float32), np.zeros(rows["valid"].shape, np.float32)
  for k, (g, _) in enumerate(items):
    for i, r in enumerate(g.responses):
      logw[k, i], logq[k, i] = r.log_p_a + r.log_p_y - r.log_q, r.log_q
  rows.update(logw=logw, logq=logq)
  return rows, len(items), skipped, []


def make_loss(cfg, model_cfg):
  def loss_fn(params, batch, rng):
    G, N, T = batch["tokens"].shape
    flat = {k: batch[k].reshape(G * N, T) for k in ("tokens", "loss_mask", "segment_ids")}
    flat["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (G * N, T))
    logp, ntok = common.sequence_logps(params, flat, model_cfg, rng)
    valid = batch["valid"]
    loss_G, kl_G = group_terms(logp.reshape(G, N), ntok.reshape(G, N), batch["logw"], batch["logq"], valid)
    has = jnp.any(valid, axis=-1).astype(jnp.float32)
    loss = jnp.sum(has * loss_G)
    return loss, jnp.sum(has), {"loss": loss, "distance": jnp.sum(has * kl_G)}

  return loss_fn
