"""Preference, reward-label and unpaired (KTO) records from JSONL, validated with file, line and field.

Pairs (reward models, the DPO family), detected per row by their keys:
- NeMo-Aligner DPO: ``{"prompt": str, "chosen_response": str, "rejected_response": str}`` (template already
  applied) or the chat form (``prompt`` a message list, responses one message each); optional
  ``chosen_reward``/``rejected_reward`` (RPO);
- TRL: ``{"prompt", "chosen", "rejected"}`` as strings or message lists, or implicit-prompt
  ``{"chosen", "rejected"}`` (the prompt is the common prefix); optional ``margin``;
- NeMo-Aligner RM comparisons: ``{"text"}`` lines alternating chosen (line 2k+1) and rejected (line 2k+2);
- NeMo-Aligner packed DPO: a ``.npy`` file from ``prepare_packed_dpo_dataset.py`` (``load_nemo_packed``).
Reward labels (SteerLM / HelpSteer2 regression): ``{"text", "label": [N numbers, -100 = missing]}``; the
HelpSteer2-Preference BT variants read two consecutive such lines as a pair, ``label[0]`` of the first being the
preference strength in -3..3.
Unpaired (KTO): NeMo ``{"prompt", "response", "preference": "chosen"|"rejected"}`` or TRL
``{"prompt", "completion", "label": bool}``.

Each row follows its own format's conventions: NeMo rows are tokenised as NeMo-Aligner does (the prompt's tokens
untrained, everything after them trained, an EOS only with ``data.append_eod``; a message-list DPO row is
rendered whole, so its response includes the assistant header), TRL rows as TRL does (the reply after the
generation prompt, and, for strings, an EOS after each response that does not already end with one).
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass

import numpy as np

from jalign.data.formats import (DataError, Example, SegmentBuilder, _messages, _str, collect, finish, read_jsonl,
                                 tokenize_segments, truncate)
from jalign.data.pipeline import first_fit_decreasing
from jalign.data.tokenizers import Tokenizer

MISSING = -100


@dataclass
class Pair:
  chosen: Example
  rejected: Example
  line: int
  margin: float = 0.0
  chosen_reward: float = 1.0     # NeMo-Aligner's data.default_chosen_reward
  rejected_reward: float = 0.0   # ... and default_rejected_reward


class PairTokenizer:
  """Turns one preference row (any accepted form) into a tokenised Pair."""

  def __init__(self, tok: Tokenizer, data_cfg, chat_template: str = "nemo"):
    self.tok, self.cfg = tok, data_cfg
    self.builder = SegmentBuilder(tok, data_cfg, chat_template)
    self.roles = self.builder.roles

  def encode(self, segs, eos, path, line) -> Example:
    toks, mask = tokenize_segments(self.tok, segs, add_bos=self.cfg.add_bos, add_eos=eos, answer_only=True)
    return Example(*truncate(toks, mask, self.cfg.max_seq_len, self.cfg.truncation, path, line))

  def string_response(self, prompt, resp, path, line, field, eos) -> Example:
    """Prompt + response strings (not truncated): the tokens of prompt + response, trained after the prompt's
    own tokens, which must be a prefix of them."""
    prompt_ids, ids = self.tok.encode(prompt), self.tok.encode(prompt + resp)
    if ids[:len(prompt_ids)] != prompt_ids:
      raise DataError(path, line, field, "the prompt's tokens are not a prefix of the tokens of prompt + "
                      "response (a token spans the boundary); end the prompt where the tokenizer splits, "
                      "e.g. after a newline or special token")
    bos = [self.tok.bos_id] if self.cfg.add_bos and self.tok.bos_id is not None else []
    end = [self.tok.eos_id] if eos and self.tok.eos_id is not None else []
    n_prompt = len(bos) + len(prompt_ids)
    toks = np.asarray(bos + ids + end, np.int32)
    return Example(toks, np.arange(len(toks)) >= n_prompt)

  def _string_pair(self, prompt, chosen, rejected, path, line, fields, eos):
    """``eos``: one flag per response."""
    return [self.string_response(prompt, r, path, line, f, e) for r, f, e in zip((chosen, rejected), fields, eos)]

  def trl_eos(self, text) -> bool:
    """TRL appends EOS to a string response unless it already ends with one."""
    return not (self.tok.eos_token and text.endswith(self.tok.eos_token))

  def _implicit(self, chosen, rejected, path, line, eos):
    """No prompt given: the response starts where the two token sequences first differ (not truncated).
    ``eos``: one flag per sequence."""
    seqs = [tokenize_segments(self.tok, [(t, True)], add_bos=self.cfg.add_bos, add_eos=e,
                              answer_only=True)[0] for t, e in zip((chosen, rejected), eos)]
    n = min(map(len, seqs))
    common = int(np.argmin(seqs[0][:n] == seqs[1][:n])) if (seqs[0][:n] != seqs[1][:n]).any() else n
    if common == len(seqs[0]) and len(seqs[0]) == len(seqs[1]):
      raise DataError(path, line, "rejected", "identical to chosen")
    return [Example(s, np.arange(len(s)) >= common) for s in seqs]

  def chat_response(self, prompt_msgs, msgs, path, line, eos) -> Example:
    """TRL's labelling (not truncated): the reply after the prompt's generation prompt."""
    segs = self.builder._chat(prompt_msgs + msgs, path, line, trainable_from=len(prompt_msgs))
    return Example(*tokenize_segments(self.tok, segs, add_bos=self.cfg.add_bos, add_eos=eos, answer_only=True))

  def _chat_pair(self, prompt_msgs, chosen_msgs, rejected_msgs, path, line):
    return [self.chat_response(prompt_msgs, m, path, line, False) for m in (chosen_msgs, rejected_msgs)]

  def _nemo_chat_pair(self, prompt_msgs, chosen_msg, rejected_msg, path, line):
    """NeMo-Aligner's labelling: the prompt conversation and prompt + response are rendered whole; everything
    after the prompt's tokens (the assistant header included) is the response."""
    prompt = self.builder.render(prompt_msgs, path, line)
    out = []
    for m, f in ((chosen_msg, "chosen_response"), (rejected_msg, "rejected_response")):
      full = self.builder.render(prompt_msgs + m, path, line)
      if not full.startswith(prompt):
        raise DataError(path, line, f, "the chat template renders the prompt differently once a reply follows")
      out.append(self.string_response(prompt, full[len(prompt):], path, line, f, self.cfg.append_eod))
    return out

  def pair(self, obj: dict, path: str, line: int) -> Pair:
    if "chosen_response" in obj or "rejected_response" in obj:  # NeMo-Aligner DPO
      if isinstance(obj.get("prompt"), list):
        p = _messages(obj, "prompt", path, line, self.roles)
        c = _messages({"c": [obj.get("chosen_response")]}, "c", path, line, self.roles)
        r = _messages({"r": [obj.get("rejected_response")]}, "r", path, line, self.roles)
        ex = self._nemo_chat_pair(p, c, r, path, line)
      else:
        ex = self._string_pair(_str(obj, "prompt", path, line), _str(obj, "chosen_response", path, line, False),
                               _str(obj, "rejected_response", path, line, False), path, line,
                               ("chosen_response", "rejected_response"), (self.cfg.append_eod,) * 2)
    elif "chosen" in obj or "rejected" in obj:  # TRL
      if "chosen" not in obj or "rejected" not in obj:
        raise DataError(path, line, "rejected" if "chosen" in obj else "chosen", "missing")
      conversational = isinstance(obj["chosen"], list)
      if "prompt" in obj:
        if conversational:
          ex = self._chat_pair(_messages(obj, "prompt", path, line, self.roles),
                               _messages(obj, "chosen", path, line, self.roles),
                               _messages(obj, "rejected", path, line, self.roles), path, line)
        else:
          c, r = _str(obj, "chosen", path, line, False), _str(obj, "rejected", path, line, False)
          ex = self._string_pair(_str(obj, "prompt", path, line), c, r, path, line, ("chosen", "rejected"),
                                 (self.trl_eos(c), self.trl_eos(r)))
      elif conversational:
        c = _messages(obj, "chosen", path, line, self.roles)
        r = _messages(obj, "rejected", path, line, self.roles)
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
          n += 1
        ex = self._chat_pair(c[:n], c[n:], r[n:], path, line)
      else:
        c, r = _str(obj, "chosen", path, line, False), _str(obj, "rejected", path, line, False)
        ex = self._implicit(c, r, path, line, (self.trl_eos(c), self.trl_eos(r)))
    else:
      raise DataError(path, line, None, f"unrecognised preference row with keys {sorted(obj)}; expected "
                      "prompt/chosen_response/rejected_response, prompt/chosen/rejected, chosen/rejected, or "
                      "alternating {\"text\"} lines")
    pair = Pair(*truncate_pair(*ex, self.cfg.max_seq_len, self.cfg.truncation, path, line), line)
    for key in ("margin", "chosen_reward", "rejected_reward"):
      if key in obj:
        setattr(pair, key, _number(obj, key, path, line))
    return pair


def truncate_pair(chosen: Example, rejected: Example, max_len, policy, path, line):
  """Fit a pair into ``max_len`` keeping one prompt for both: ``right`` cuts each sequence's end, ``left`` drops
  the same leading tokens of the shared prompt from both."""
  n = max(len(chosen.tokens), len(rejected.tokens))
  if n <= max_len or policy != "left":
    return [Example(*truncate(e.tokens, e.loss_mask, max_len, policy, path, line)) for e in (chosen, rejected)]
  cut, prompt = n - max_len, min(int(np.argmax(e.loss_mask)) for e in (chosen, rejected))
  if cut >= prompt:
    raise DataError(path, line, None, f"{n} tokens > data.max_seq_len={max_len}, but the shared prompt has only "
                    f"{prompt} tokens to left-truncate (a response alone is too long)")
  return [Example(e.tokens[cut:], e.loss_mask[cut:]) for e in (chosen, rejected)]


def _number(obj, key, path, line):
  v = obj[key]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise DataError(path, line, key, f"expected a finite number, got {v!r}")
  return float(v)


def _alternating(path, data_cfg, make_pair):
  """NeMo comparisons / HelpSteer pairs: line 2k+1 and 2k+2 form pair k. An odd count is an error."""
  rows = []
  for line, obj in read_jsonl(path):
    if isinstance(obj, DataError):  # a broken line would shift every later pair: never skipped
      raise obj
    rows.append((line, obj))
  if len(rows) % 2:
    raise DataError(path, rows[-1][0], None, f"{len(rows)} rows: pair files need an even number of lines "
                    "(line 2k+1 chosen/first, line 2k+2 rejected/second); this last line has no partner")
  return finish(path, *collect((a + b for a, b in zip(rows[::2], rows[1::2])), data_cfg, make_pair))


def _is_comparison_file(path):
  for _, obj in read_jsonl(path):
    return isinstance(obj, dict) and "text" in obj and not ({"chosen", "chosen_response"} & set(obj))
  return False


def load_pairs(path: str, tok: Tokenizer, data_cfg, chat_template="nemo") -> tuple[list[Pair], int]:
  """Preference pairs from any accepted pair format (file-level: NeMo packed ``.npy``, NeMo comparisons; else per
  row)."""
  if path.endswith(".npy"):
    return load_nemo_packed(path, tok, data_cfg)
  pt = PairTokenizer(tok, data_cfg, chat_template)
  if _is_comparison_file(path):
    def make(l1, o1, l2, o2):
      c, r = _str(o1, "text", path, l1, False), _str(o2, "text", path, l2, False)
      if c == r:
        raise DataError(path, l2, "text", f"identical to line {l1}")
      ex = pt._implicit(c, r, path, l1, (data_cfg.append_eod,) * 2)
      return Pair(*truncate_pair(*ex, data_cfg.max_seq_len, data_cfg.truncation, path, l1), l1)
    return _alternating(path, data_cfg, make)
  return finish(path, *collect(read_jsonl(path), data_cfg, lambda line, obj: pt.pair(obj, path, line)))


# ------------------------------------------------------------------------------------------ NeMo-Aligner packed DPO

NEMO_PACKED_KEYS = ("input_ids", "labels", "reward", "lengths", "seq_boundaries")


def _array(obj, key, path, row, integers: bool):
  """``obj[key]`` as a 1-D array of integers (int64) or of finite numbers (float64)."""
  try:
    v = np.asarray(obj[key], None if integers else np.float64)
  except (TypeError, ValueError):  # ragged or not numbers
    v = np.zeros((0, 0))
  ok = v.ndim == 1 and (v.size == 0 or (np.issubdtype(v.dtype, np.integer) if integers else np.isfinite(v).all()))
  if not ok:
    raise DataError(path, row, key, f"expected a list of {'integers' if integers else 'finite numbers'}")
  return v.astype(np.int64 if integers else np.float64)


def _nemo_packed_row(i, obj, path, tok, data_cfg) -> list[Pair]:
  """The pairs of one packed row, checked: its sequences lie back to back in ``input_ids`` between
  ``seq_boundaries`` (chosen then rejected of each pair), ``lengths`` are those sequences' lengths, ``reward``
  one value per sequence and ``labels`` the unshifted ``input_ids`` with -100 on untrained tokens."""
  row = f"row {i}"
  if not isinstance(obj, dict):
    raise DataError(path, row, None, f"expected a dict with keys {', '.join(NEMO_PACKED_KEYS)}, got "
                    f"{type(obj).__name__}")
  for k in NEMO_PACKED_KEYS:
    if k not in obj:
      raise DataError(path, row, k, "missing")
  ids, labels, lengths, bounds = (_array(obj, k, path, row, True)
                                  for k in ("input_ids", "labels", "lengths", "seq_boundaries"))
  reward = _array(obj, "reward", path, row, False)
  n = len(ids)
  if len(labels) != n:
    raise DataError(path, row, "labels", f"{len(labels)} values for {n} input_ids")
  if len(bounds) < 3 or len(bounds) % 2 == 0 or bounds[0] != 0 or bounds[-1] != n or (np.diff(bounds) <= 0).any():
    raise DataError(path, row, "seq_boundaries", f"expected 0, then the end of each pair's chosen and rejected "
                    f"sequence, increasing to len(input_ids)={n}; got {bounds.tolist()}")
  seq_lens = np.diff(bounds)
  if lengths.tolist() != seq_lens.tolist():
    raise DataError(path, row, "lengths", f"{lengths.tolist()} are not the sequence lengths {seq_lens.tolist()} "
                    "that seq_boundaries give")
  if len(reward) != len(seq_lens):
    raise DataError(path, row, "reward", f"{len(reward)} values for {len(seq_lens)} sequences (one per chosen "
                    "and rejected)")
  out = np.nonzero((ids < 0) | (ids >= tok.vocab_size))[0]
  if len(out):
    raise DataError(path, row, "input_ids", f"token id {ids[out[0]]} is outside the tokenizer's "
                    f"{tok.vocab_size} ids")
  bad = np.nonzero((labels != MISSING) & (labels != ids))[0]
  if len(bad):
    j = int(bad[0])
    raise DataError(path, row, "labels", f"labels[{j}]={labels[j]} is neither -100 nor input_ids[{j}]={ids[j]}")
  pairs = []
  for j in range(len(seq_lens) // 2):
    a, m, b = bounds[2 * j:2 * j + 3]
    ex = [Example(ids[s:e].astype(np.int32), labels[s:e] != MISSING) for s, e in ((a, m), (m, b))]
    ex = truncate_pair(*ex, data_cfg.max_seq_len, data_cfg.truncation, path, f"{row} pair {j}")
    pairs.append(Pair(*ex, i, chosen_reward=float(reward[2 * j]), rejected_reward=float(reward[2 * j + 1])))
  return pairs


def load_nemo_packed(path: str, tok: Tokenizer, data_cfg) -> tuple[list[Pair], int]:
  """Pairs from NeMo-Aligner's packed DPO file (``prepare_packed_dpo_dataset.py`` writes
  ``packed_{size}_seed{seed}.npy``: a pickled array of dicts ``{input_ids, labels, reward, lengths,
  seq_boundaries}``, one per packed row). NeMo-Aligner predicts ``labels[t + 1]`` from ``input_ids[..t]`` within
  each sequence, positions restarting at 0: the loss mask here is ``labels != -100``. The tokens are used as they
  are (no template, BOS or EOS added); each sequence is held to ``data.max_seq_len`` by ``data.truncation``.
  The file is a pickle: load only files you trust."""
  try:
    arr = np.load(path, allow_pickle=True)
  except FileNotFoundError:
    raise DataError(path, 0, None, "file not found") from None
  except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
    raise DataError(path, 0, None, f"not a NeMo-Aligner packed DPO file (a .npy array of dicts): {e}") from None
  if arr.ndim != 1:
    raise DataError(path, 0, None, f"expected a 1-D array of dicts (one per packed row), got shape {arr.shape}")
  rows, skipped = finish(path, *collect(enumerate(arr), data_cfg,
                                        lambda i, obj: _nemo_packed_row(i, obj, path, tok, data_cfg)))
  return [p for r in rows for p in r], skipped


# ------------------------------------------------------------------------------------------ reward labels

def _labels(obj, path, line, n, lo, hi):
  lab = obj.get("label")
  if not isinstance(lab, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lab):
    raise DataError(path, line, "label", f"expected a list of {n} numbers, got {lab!r}")
  if len(lab) != n:
    raise DataError(path, line, "label", f"has {len(lab)} values, rm.num_attributes={n}")
  for j, v in enumerate(lab):
    if v != MISSING and not (lo <= v <= hi):
      raise DataError(path, line, f"label[{j}]", f"{v} is out of range [{lo}, {hi}] (rm.label_range; "
                      f"{MISSING} marks a missing attribute)")
  return np.asarray(lab, np.float32)


def _single(builder, data_cfg, obj, path, line):
  """One whole sequence of a NeMo-Aligner reward-model row (an EOS only with ``data.append_eod``)."""
  segs, _ = builder.segments(obj, path, line)
  toks, _ = tokenize_segments(builder.tok, segs, add_bos=data_cfg.add_bos, add_eos=data_cfg.append_eod,
                              answer_only=False)
  toks, mask = truncate(toks, np.ones(len(toks), bool), data_cfg.max_seq_len, data_cfg.truncation, path, line)
  return Example(toks, mask)


def load_regression(path, tok, data_cfg, num_attributes, label_range, chat_template="nemo"):
  """[(Example, labels[A])] from regression rows (any SFT-style text row plus ``label``)."""
  builder = SegmentBuilder(tok, data_cfg, chat_template)
  lo, hi = label_range

  def make(line, obj):
    return _single(builder, data_cfg, obj, path, line), _labels(obj, path, line, num_attributes, lo, hi)
  return finish(path, *collect(read_jsonl(path), data_cfg, make))


def load_helpsteer_pairs(path, tok, data_cfg, num_attributes, chat_template="nemo"):
  """HelpSteer2-Preference: consecutive lines form a pair; ``label[0]`` of the first is the strength -3..3
  (negative: the first response is preferred). Returns Pairs with chosen=first, rejected=second and the
  strength in ``margin``."""
  builder = SegmentBuilder(tok, data_cfg, chat_template)

  def make(l1, o1, l2, o2):
    lab = o1.get("label")
    if not isinstance(lab, list) or not lab:
      raise DataError(path, l1, "label", f"expected a list whose first value is the preference strength, "
                      f"got {lab!r}")
    s = lab[0]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or s != int(s) or not -3 <= s <= 3:
      raise DataError(path, l1, "label[0]", f"preference strength {s!r} is not an integer in -3..3")
    return Pair(_single(builder, data_cfg, o1, path, l1), _single(builder, data_cfg, o2, path, l2), l1,
                margin=float(s))
  return _alternating(path, data_cfg, make)


# ------------------------------------------------------------------------------------------ KTO

def load_unpaired(path, tok, data_cfg, chat_template="nemo"):
  """KTO rows -> (samples, kl_samples, desirable): the KL sample of row i is prompt i with the response of row
  i+1 (cyclic), NeMo-Aligner's mismatched pairs."""
  pt = PairTokenizer(tok, data_cfg, chat_template)

  def make(line, obj):
    if "preference" in obj:
      pref = obj["preference"]
      if pref not in ("chosen", "rejected"):
        raise DataError(path, line, "preference", f"expected 'chosen' or 'rejected', got {pref!r}")
      resp_key, good, nemo = "response", pref == "chosen", True
    elif "label" in obj:
      if not isinstance(obj["label"], bool):
        raise DataError(path, line, "label", f"expected true or false, got {obj['label']!r}")
      resp_key, good, nemo = "completion", obj["label"], False
    else:
      raise DataError(path, line, None, f"unrecognised KTO row with keys {sorted(obj)}; expected "
                      "prompt/response/preference or prompt/completion/label")
    if isinstance(obj.get("prompt"), list):
      prompt = _messages(obj, "prompt", path, line, pt.roles)
      resp = _messages(obj, resp_key, path, line, pt.roles)
    else:
      prompt, resp = _str(obj, "prompt", path, line), _str(obj, resp_key, path, line, False)
    return line, prompt, resp, good, nemo

  rows, skipped = finish(path, *collect(read_jsonl(path), data_cfg, make))
  if len(rows) < 2:
    raise DataError(path, 0, None, "KTO needs at least 2 rows (the KL reference pairs each prompt with the "
                    "next row's response)")

  def encode(line, prompt, resp, nemo):
    if isinstance(prompt, list) != isinstance(resp, list):
      raise DataError(path, line, None, "mixes message-list and string rows; use one form per file")
    if isinstance(prompt, list):  # TRL: no EOS after a chat template
      ex = pt.chat_response(prompt, resp, path, line, nemo and data_cfg.append_eod)
    else:
      eos = data_cfg.append_eod if nemo else pt.trl_eos(resp)
      ex = pt.string_response(prompt, resp, path, line, "response", eos)
    return Example(*truncate(ex.tokens, ex.loss_mask, data_cfg.max_seq_len, data_cfg.truncation, path, line))

  samples, kl, good = [], [], []
  for i, (line, prompt, resp, g, nemo) in enumerate(rows):
    samples.append(encode(line, prompt, resp, nemo))
    kl.append(encode(line, prompt, rows[(i + 1) % len(rows)][2], nemo))
    good.append(g)
  return (samples, kl, np.asarray(good)), skipped


# ------------------------------------------------------------------------------------------ arrays

def stack_pairs(seqs: list[tuple[Example, Example]], T: int, pad_id: int) -> dict:
  """[N, 2, T] tokens / loss_mask / segment_ids (1 on real tokens) for N pairs of sequences."""
  n = len(seqs)
  tokens = np.full((n, 2, T), pad_id, np.int32)
  mask = np.zeros((n, 2, T), bool)
  seg = np.zeros((n, 2, T), np.int32)
  for i, pair in enumerate(seqs):
    for j, ex in enumerate(pair):
      k = len(ex.tokens)
      tokens[i, j, :k], mask[i, j, :k], seg[i, j, :k] = ex.tokens, ex.loss_mask, 1
  return {"tokens": tokens, "loss_mask": mask, "segment_ids": seg}


def stack_single(examples: list[Example], T: int, pad_id: int) -> dict:
  n = len(examples)
  tokens = np.full((n, T), pad_id, np.int32)
  seg = np.zeros((n, T), np.int32)
  for i, ex in enumerate(examples):
    tokens[i, :len(ex.tokens)], seg[i, :len(ex.tokens)] = ex.tokens, 1
  return {"tokens": tokens, "segment_ids": seg}


def shared_prefix(group, share_trained=False) -> int:
  """Leading tokens every sequence of ``group`` has in common, cut at the first trained token of any of them
  unless ``share_trained`` (reward models read only each sequence's last token)."""
  n = min(len(e.tokens) for e in group)
  p = n
  for e in group[1:]:
    diff = np.nonzero(e.tokens[:n] != group[0].tokens[:n])[0]
    p = min(p, int(diff[0])) if len(diff) else p
  if not share_trained:
    p = min([p] + [int(np.argmax(e.loss_mask)) if e.loss_mask.any() else len(e.tokens) for e in group])
  return p


def pack_pairs(seqs: list[tuple[Example, ...]], row_len: int, pad_id: int, *, shared_prompt: bool = False,
               max_pairs: int = 0, share_trained: bool = False) -> dict:
  """Pairs (or any same-size tuples of sequences: 1-tuples for single sequences) placed in rows of ``row_len``
  tokens, first-fit-decreasing by the tokens a pair takes (ties in input order; deterministic), at most
  ``max_pairs`` per row (0: no limit; 1: one pair per row, in input order). Nothing is dropped: a pair longer
  than a row is a ValueError (the loaders hold each sequence to ``data.max_seq_len`` first).

  Returns [N, row_len] ``tokens``, ``loss_mask``, ``segment_ids`` (0: padding), ``positions`` (and
  ``branch_ids`` with ``shared_prompt``) and ``pair_index`` [N, P]: the input index of the pair in each row's k-th
  slot (-1: empty). Sequence j of slot k is segment k*G + j + 1 (G sequences per pair), positions from 0. With
  ``shared_prompt`` slot k is one segment (k + 1): the ``shared_prefix`` once without its last token (branch 0,
  positions 0..s-1), then each sequence from that token on (branch j + 1, positions from s): attention with
  branch ids gives each sequence exactly its own context, as a separate forward would.
  """
  G = len(seqs[0])
  trunk = [max(shared_prefix(g, share_trained) - 1, 0) if shared_prompt else 0 for g in seqs]
  sizes = np.array([t + sum(len(e.tokens) - t for e in g) for g, t in zip(seqs, trunk)])
  if sizes.max() > row_len:
    i = int(np.argmax(sizes))
    raise ValueError(f"pair {i} takes {sizes[i]} tokens > row_len={row_len}")
  bins = [[i] for i in range(len(seqs))] if max_pairs == 1 else first_fit_decreasing(sizes, row_len, max_pairs)
  n, P = len(bins), max(map(len, bins))
  rows = {"tokens": np.full((n, row_len), pad_id, np.int32), "loss_mask": np.zeros((n, row_len), bool),
          "segment_ids": np.zeros((n, row_len), np.int32), "positions": np.zeros((n, row_len), np.int32)}
  if shared_prompt:
    rows["branch_ids"] = np.zeros((n, row_len), np.int32)
  rows["pair_index"] = np.full((n, P), -1, np.int32)
  for r, members in enumerate(bins):
    at = 0
    for k, i in enumerate(members):
      rows["pair_index"][r, k] = i
      t, g = trunk[i], seqs[i]
      parts = [(g[0].tokens[:t], np.zeros(t, bool), 0, 0, k + 1)] if t else []
      parts += [(e.tokens[t:], e.loss_mask[t:], t, j + 1, k + 1 if shared_prompt else k * G + j + 1)
                for j, e in enumerate(g)]
      for toks, mask, start, branch, seg in parts:
        span = slice(at, at + len(toks))
        rows["tokens"][r, span], rows["loss_mask"][r, span], rows["segment_ids"][r, span] = toks, mask, seg
        rows["positions"][r, span] = start + np.arange(len(toks))
        if shared_prompt:
          rows["branch_ids"][r, span] = branch
        at += len(toks)
  return rows


def slot_values(pair_index, values) -> np.ndarray:
  """Per-pair ``values`` [N, ...] placed in the slots of packed rows: [rows, P, ...], zero in empty slots."""
  values = np.asarray(values)
  out = np.zeros(pair_index.shape + values.shape[1:], values.dtype)
  used = pair_index >= 0
  out[used] = values[pair_index[used]]
  return out


def pair_rows(seqs: list[tuple[Example, ...]], values: dict, data_cfg, pad_id: int, *,
              share_trained: bool = False) -> dict:
  """Training rows of pairs (or 1-tuples of single sequences) in the layout ``data_cfg`` selects, with the
  per-pair ``values`` ([N, ...] arrays, e.g. rewards).

  Padded (default): [N, 2, T] ``tokens``, ``loss_mask``, ``segment_ids`` (single sequences: [N, T] ``tokens``,
  ``segment_ids``) and the values [N, ...]. ``data.packing`` / ``data.shared_prompt``: ``pack_pairs`` rows of
  G x T tokens (G sequences per pair, T = ``data.max_seq_len``: any pair the loaders admit fits), several pairs
  per row with packing, one without (then the rows are cut to the longest one, rounded up to ``ROW_MULTIPLE``:
  a shared prompt shortens every row); ``pair_valid`` and the values per slot, [rows, P, ...]."""
  T = data_cfg.max_seq_len
  if not (data_cfg.packing or data_cfg.shared_prompt):
    rows = (stack_pairs(seqs, T, pad_id) if len(seqs[0]) == 2 else stack_single([g[0] for g in seqs], T, pad_id))
    return {**rows, **{k: np.asarray(v) for k, v in values.items()}}
  rows = pack_pairs(seqs, len(seqs[0]) * T, pad_id, shared_prompt=data_cfg.shared_prompt,
                    max_pairs=0 if data_cfg.packing else 1, share_trained=share_trained)
  index = rows.pop("pair_index")
  if not data_cfg.packing:
    used = int(np.max(np.nonzero(np.any(rows["segment_ids"] > 0, axis=0))[0], initial=0)) + 1
    L = min(-(-used // ROW_MULTIPLE) * ROW_MULTIPLE, rows["tokens"].shape[1])
    rows = {k: v[:, :L] for k, v in rows.items()}
  return {**rows, "pair_valid": index >= 0, **{k: slot_values(index, v) for k, v in values.items()}}


TOKEN_KEYS = ("tokens", "loss_mask", "segment_ids", "positions", "branch_ids")
ROW_MULTIPLE = 64  # unpacked shared-prompt rows: their length rounded up to this (few distinct shapes)


def match_slots(*row_sets) -> list[dict]:
  """Packed row sets (train, eval) widened to the same number of pair slots P (the new slots empty) and the same
  row length (padding: segment 0), so that one compiled step takes them all."""
  P = max(r["pair_valid"].shape[1] for r in row_sets)
  L = max(r["tokens"].shape[1] for r in row_sets)
  return [{k: np.pad(v, [(0, 0), (0, (L if k in TOKEN_KEYS else P) - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
           for k, v in r.items()} for r in row_sets]
