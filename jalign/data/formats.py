"""SFT records from JSONL, in NeMo-Aligner's and TRL's formats, with validation that names file, line and field.

Accepted rows (detected per row by their keys):
- NeMo prompt/response: ``{"input": ..., "output": ...}`` rendered with ``data.prompt_template``, each template
  piece tokenised on its own as NeMo does;
- NeMo chat: ``{"system", "conversations": [{"from", "value", "label"}], "mask", "type"}`` with any role names,
  rendered with ``data.chat_prompt_tokens``;
- TRL conversational: ``{"messages": [{"role", "content"}]}``;
- TRL prompt/completion: ``{"prompt": str, "completion": str}`` or both as message lists;
- TRL language modelling: ``{"text": str}`` (every token trained on).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from jalign.data import attributes, templates
from jalign.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

NEMO_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
HF_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
  """One bad row (or file): ``str()`` is a one-line message naming file, line and field."""

  def __init__(self, path, line, field, msg):
    self.path, self.line, self.field = path, line, field
    where = f"{path}:{line}" if line else f"{path}"
    fld = f" field {field!r}:" if field else ""
    super().__init__(f"{where}:{fld} {msg}")


@dataclass
class Example:
  tokens: np.ndarray      # [n] int32
  loss_mask: np.ndarray   # [n] bool: token is a training target


def read_jsonl(path: str):
  """Yield (line_number, dict); raises DataError for a missing/empty file, bad bytes, bad JSON, non-objects."""
  if not os.path.exists(path):
    raise DataError(path, 0, None, "file not found")
  n = 0
  with open(path, "rb") as f:
    for i, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      n += 1
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield i, DataError(path, i, None, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})")
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        yield i, DataError(path, i, None, f"malformed JSON: {e.msg} at column {e.colno}")
        continue
      if not isinstance(obj, dict):
        yield i, DataError(path, i, None, f"expected a JSON object, got {type(obj).__name__}")
        continue
      yield i, obj
  if n == 0:
    raise DataError(path, 0, None, "file is empty")


def _str(obj, key, path, line, allow_empty=True):
  if key not in obj:
    raise DataError(path, line, key, "missing")
  v = obj[key]
  if not isinstance(v, str):
    raise DataError(path, line, key, f"expected a string, got {type(v).__name__}")
  if not allow_empty and not v.strip():
    raise DataError(path, line, key, "is empty")
  return v


def _messages(obj, key, path, line, roles):
  msgs = obj.get(key)
  if not isinstance(msgs, list):
    raise DataError(path, line, key, f"expected a list of messages, got {type(msgs).__name__}")
  if not msgs:
    raise DataError(path, line, key, "empty conversation")
  out = []
  for j, m in enumerate(msgs):
    f = f"{key}[{j}]"
    if not isinstance(m, dict):
      raise DataError(path, line, f, f"expected an object, got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str):
      raise DataError(path, line, f + ".role", "missing or not a string")
    if role not in roles:
      raise DataError(path, line, f + ".role", f"unknown role {role!r}; expected one of {list(roles)}")
    if not isinstance(content, str):
      raise DataError(path, line, f + ".content", f"expected a string, got {type(content).__name__}")
    out.append({"role": role, "content": content})
  return out


def _train_only_after(segs, n_chars):
  """Keep a segment trainable only if it starts at or after character ``n_chars`` (the prompt's end)."""
  out, pos = [], 0
  for t, tr in segs:
    out.append((t, tr and pos >= n_chars))
    pos += len(t)
  return out


class SegmentBuilder:
  """Turns one JSON row into segments, following ``data`` config and the chat template choice."""

  def __init__(self, tokenizer: Tokenizer, data_cfg, chat_template: str = "nemo"):
    self.tok, self.cfg, self.chat = tokenizer, data_cfg, chat_template
    if chat_template == "hf" and not tokenizer.chat_template:
      raise ValueError(f"tokenizer.chat_template='hf' but {tokenizer.path} has no chat_template in "
                       "tokenizer_config.json")
    self.special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    self.roles = NEMO_ROLES if chat_template == "nemo" else HF_ROLES
    self.chat_tokens = templates.ChatTokens(**data_cfg.chat_prompt_tokens)
    self._space_sensitive = None

  @property
  def space_sensitive(self) -> bool:
    """NeMo's test: does 'x y' tokenise differently from 'x' followed by 'y'?"""
    if self._space_sensitive is None:
      enc = self.tok.encode
      self._space_sensitive = enc("x y") != enc("x") + enc("y")
    return self._space_sensitive

  def _chat(self, msgs, path, line, trainable_from=0):
    """Messages -> segments with the configured template; assistant messages at index >= trainable_from train."""
    if self.chat == "hf":
      try:
        segs = templates.hf_chat_segments(self.tok.chat_template, msgs, **self.special)
        if trainable_from:
          segs = _train_only_after(segs, len(templates.render_hf(
              self.tok.chat_template, msgs[:trainable_from], add_generation_prompt=True, **self.special)))
      except templates.TemplateError as e:
        raise DataError(path, line, "messages", f"chat template: {e}") from None
      return segs
    system = ""
    if msgs[0]["role"] == "system":
      system, msgs = msgs[0]["content"], msgs[1:]
      trainable_from = max(trainable_from - 1, 0)
    for j, m in enumerate(msgs):
      if m["role"] == "system":
        raise DataError(path, line, f"messages[{j}].role", "the NeMo template allows one system message, first")
      if m["role"] == "tool":
        raise DataError(path, line, f"messages[{j}].role", "the NeMo template has no tool role")
    if not msgs:
      raise DataError(path, line, "messages", "no user or assistant turns")
    turns = [(NEMO_ROLES[m["role"]], m["content"], None) for m in msgs]
    segs = templates.nemo_chat_segments(system, turns, mask_role="User", tokens=self.chat_tokens)
    if trainable_from:  # prompt/completion: nothing inside the prompt trains
      segs = _train_only_after(segs, len(templates.nemo_generation_prompt(
          system, [(r, v) for r, v, _ in turns[:trainable_from]], tokens=self.chat_tokens)))
    return segs

  def render(self, msgs, path, line) -> str:
    """The conversation as one string, as NeMo-Aligner's DPO renders a message list (no generation prompt)."""
    if self.chat == "hf":
      try:
        return templates.render_hf(self.tok.chat_template, msgs, **self.special)
      except templates.TemplateError as e:
        raise DataError(path, line, "messages", f"chat template: {e}") from None
    return "".join(t for t, _ in self._chat(msgs, path, line))

  def segments(self, obj: dict, path: str, line: int) -> tuple[templates.Segments, bool]:
    """(segments, add_eos) for one row."""
    if "conversations" in obj:
      return self._nemo_chat(obj, path, line), False
    if "messages" in obj:
      return self._chat(_messages(obj, "messages", path, line, self.roles), path, line), False
    if "input" in obj or "output" in obj:
      values = {"input": _str(obj, "input", path, line), "output": _str(obj, "output", path, line, False)}
      return templates.nemo_prompt_pieces(self.cfg.prompt_template, values, self.space_sensitive), self.cfg.add_eos
    if "prompt" in obj and "completion" in obj:
      if isinstance(obj["prompt"], list):
        p = _messages(obj, "prompt", path, line, self.roles)
        c = _messages(obj, "completion", path, line, self.roles)
        return self._chat(p + c, path, line, trainable_from=len(p)), False
      return [(_str(obj, "prompt", path, line), False),
              (_str(obj, "completion", path, line, allow_empty=False), True)], self.cfg.add_eos
    if "text" in obj:
      return [(_str(obj, "text", path, line, allow_empty=False), True)], self.cfg.add_eos
    raise DataError(path, line, None, f"unrecognised row with keys {sorted(obj)}; expected input/output, "
                    "conversations, messages, prompt/completion or text")

  def _nemo_chat(self, obj, path, line):
    system = obj.get("system", "")
    if not isinstance(system, str):
      raise DataError(path, line, "system", f"expected a string, got {type(system).__name__}")
    convs = obj["conversations"]
    if not isinstance(convs, list):
      raise DataError(path, line, "conversations", f"expected a list, got {type(convs).__name__}")
    if not convs:
      raise DataError(path, line, "conversations", "empty conversation")
    mask = obj.get("mask", "User")
    if not isinstance(mask, str) or not mask:
      raise DataError(path, line, "mask", f"expected a role name (or names joined by commas), got {mask!r}")
    label_type = obj.get("type")
    if label_type not in (None, "VALUE_TO_TEXT"):
      raise DataError(path, line, "type", f"{label_type!r} is not supported; use VALUE_TO_TEXT or null")
    turns = []
    for j, t in enumerate(convs):
      f = f"conversations[{j}]"
      if not isinstance(t, dict):
        raise DataError(path, line, f, f"expected an object, got {type(t).__name__}")
      role = t.get("from")
      if not isinstance(role, str) or not role:
        raise DataError(path, line, f + ".from", f"expected a role name, got {role!r}")
      value = t.get("value")
      if not isinstance(value, str):
        raise DataError(path, line, f + ".value", f"expected a string, got {type(value).__name__}")
      label = t.get("label")
      if label is not None and not isinstance(label, str):
        raise DataError(path, line, f + ".label", f"expected a string or null, got {type(label).__name__}")
      if label is not None and label_type == "VALUE_TO_TEXT":  # a SteerLM attribute string
        try:
          attributes.parse(label)
        except attributes.AttributeStringError as e:
          raise DataError(path, line, f + ".label", str(e)) from None
      turns.append((role, value, label))
    for m in mask.split(","):
      if m not in {r for r, _, _ in turns}:
        raise DataError(path, line, "mask", f"role {m!r} does not occur in the conversation")
    return templates.nemo_chat_segments(system, turns, mask, label_type, self.chat_tokens)


def _char_offsets(tok: Tokenizer, text: str):
  """Token ids and the character offset where each token starts."""
  if tok.kind == "sentencepiece":
    pieces = tok.sp.encode(text, return_type="proto").pieces
    char_of_byte = np.repeat(np.arange(len(text)), [len(ch.encode("utf-8")) for ch in text])
    char_of_byte = np.append(char_of_byte, len(text))
    return [p.id for p in pieces], [int(char_of_byte[p.begin]) for p in pieces]
  enc = tok.tok.encode(text, add_special_tokens=False)
  return enc.ids, [s for s, _ in enc.offsets]


def _whole_string(tok: Tokenizer, segs, answer_only):
  """Tokenise the concatenation; a token is trainable when its first character lies in a trainable segment."""
  text = "".join(t for t, _ in segs)
  ids, starts = _char_offsets(tok, text)
  flag = np.zeros(len(text) + 1, dtype=bool)
  pos = 0
  for t, tr in segs:
    flag[pos:pos + len(t)] = tr or not answer_only
    pos += len(t)
  return ids, [bool(flag[min(s, len(text))]) for s in starts]


def tokenize_segments(tok: Tokenizer, segs, *, add_bos: bool, add_eos: bool, answer_only: bool):
  """Token ids and loss mask; ``templates.Pieces`` are tokenised piece by piece, other segments as one string."""
  if isinstance(segs, templates.Pieces):
    ids, mask = [], []
    for t, tr in segs:
      piece = tok.encode(t)
      ids, mask = ids + piece, mask + [tr or not answer_only] * len(piece)
  else:
    ids, mask = _whole_string(tok, segs, answer_only)
  if add_bos and tok.bos_id is not None:
    ids, mask = [tok.bos_id] + ids, [False] + mask
  if add_eos and tok.eos_id is not None:
    ids, mask = ids + [tok.eos_id], mask + [bool(segs[-1][1]) or not answer_only]
  return np.asarray(ids, np.int32), np.asarray(mask, bool)


def truncate(tokens, mask, max_len: int, policy: str, path, line):
  if len(tokens) <= max_len:
    return tokens, mask
  if policy == "error":
    raise DataError(path, line, None, f"{len(tokens)} tokens > data.max_seq_len={max_len} "
                    "(set data.truncation=left|right, or data.skip_invalid=True)")
  if policy == "right":
    tokens, mask = tokens[:max_len], mask[:max_len]
  else:
    tokens, mask = tokens[-max_len:], mask[-max_len:]
  if not mask[1:].any():
    raise DataError(path, line, None, f"no response tokens left after {policy}-truncation to "
                    f"data.max_seq_len={max_len} (prompt alone is longer)")
  return tokens, mask


def collect(items, data_cfg, make):
  """``make(*item)`` for each item (items holding a DataError from ``read_jsonl`` raise it). A DataError stops the
  load unless ``data.skip_invalid``; then the row is skipped and its message kept. Returns (results, skipped)."""
  out, skipped = [], []
  for item in items:
    try:
      for x in item:
        if isinstance(x, DataError):
          raise x
      out.append(make(*item))
    except DataError as e:
      if not data_cfg.skip_invalid:
        raise
      skipped.append(str(e))
  return out, skipped


def finish(path, items, skipped):
  """Log the skipped rows; refuse a file with nothing usable. Returns (items, number skipped)."""
  if skipped:
    log.warning("%s: skipped %d invalid rows (data.skip_invalid=True); first: %s", path, len(skipped), skipped[0])
  if not items:
    raise DataError(path, 0, None, f"no usable rows ({len(skipped)} skipped)")
  return items, len(skipped)


def load_sft_examples(path: str, tokenizer: Tokenizer, data_cfg, chat_template="nemo"):
  """All rows of one file as Examples, or a DataError on the first bad row (counted skips if skip_invalid)."""
  builder = SegmentBuilder(tokenizer, data_cfg, chat_template)

  def make(line, obj):
    segs, eos = builder.segments(obj, path, line)
    toks, mask = tokenize_segments(tokenizer, segs, add_bos=data_cfg.add_bos, add_eos=eos,
                                   answer_only=data_cfg.answer_only_loss)
    toks, mask = truncate(toks, mask, data_cfg.max_seq_len, data_cfg.truncation, path, line)
    if not mask[1:].any():
      raise DataError(path, line, None, "no trainable tokens in this row")
    return Example(toks, mask)
  return finish(path, *collect(read_jsonl(path), data_cfg, make))
