"""Rewards for online RL: one call per rollout turns the decoded samples into one number per sample.

Sources (``reward.sources``, one spec string each), summed with weights:
- ``fn:package.module:function``: ``function(prompts, responses, rows)`` returns N numbers (a programmatic grader,
  e.g. ``fn:jalign.toy:reward``);
- ``rm:PATH`` or ``rm:PATH@K``: a jalign reward model (a run directory or a model directory) reading each sample's
  full text (prompt + generated tokens, stop token included) tokenised with the settings of the run that trained
  it; ``@K`` picks attribute K of a multi-attribute head;
- ``http://...`` / ``https://...``: POST ``{"rows": [{"prompt", "response"}, ...]}`` (jalign's ``/v1/score``) in
  batches; the answer is ``{"rewards": [...]}``, ``{"scores": [...]}`` or a bare list.
The total is ``sum_k w_k r_k``, then optionally standardised, ``(total - mean) / std`` (NeMo-Aligner's
``reward_standardization``). Any unusable source or reward raises ``RewardError``, one line naming the source.
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import importlib
import json
import logging
import math
import numbers
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

KINDS = "fn:MODULE:FUNCTION, rm:PATH[@K] or an http(s):// URL"


class RewardError(ValueError):
  """A reward source that cannot be set up, or that gave unusable rewards; ``str()`` is one line naming it."""


@dataclasses.dataclass
class Samples:
  """One rollout's decoded samples, N of them."""
  prompts: list[str]      # prompt text as rendered for the policy (chat template + generation prompt)
  responses: list[str]    # the response with the stop token / end of turn stripped (what a grader reads)
  texts: list[str]        # prompt text + the raw decoded generated tokens, stop token included (what an RM reads)
  rows: list[dict]        # the data row each prompt came from
  finished: list[bool]    # ended by a stop token (not by the length cap)

  def __post_init__(self):
    n = len(self.prompts)
    for f in dataclasses.fields(self):
      if len(getattr(self, f.name)) != n:
        raise ValueError(f"Samples: {len(getattr(self, f.name))} {f.name} for {n} prompts")

  def __len__(self) -> int:
    return len(self.prompts)


# ---------------------------------------------------------------------------------------------- spec strings

def _fn_target(spec: str) -> tuple[str, str]:
  module, sep, name = spec[len("fn:"):].rpartition(":")
  if not sep or not all(p.isidentifier() for p in module.split(".")) or not name.isidentifier():
    raise RewardError(f"reward source {spec!r}: expected fn:package.module:function")
  return module, name


def _rm_target(spec: str) -> tuple[str, int | None]:
  body = spec[len("rm:"):]
  m = re.fullmatch(r"(.+)@(\d+)", body)
  path, k = (m.group(1), int(m.group(2))) if m else (body, None)
  if not path:
    raise RewardError(f"reward source {spec!r}: expected rm:PATH or rm:PATH@K")
  return path, k


def check_spec(spec: str) -> None:
  """Cheap checks of one source spec (no imports, no loading); RewardError when malformed."""
  if not isinstance(spec, str):
    raise RewardError(f"reward source {spec!r}: expected a string: {KINDS}")
  if spec.startswith("fn:"):
    _fn_target(spec)
  elif spec.startswith("rm:"):
    path, _ = _rm_target(spec)
    if not os.path.exists(path):
      raise RewardError(f"reward source {spec!r}: {path} does not exist")
  elif spec.startswith(("http://", "https://")):
    if not urllib.parse.urlsplit(spec).netloc:
      raise RewardError(f"reward source {spec!r}: the URL has no host")
  else:
    raise RewardError(f"reward source {spec!r}: expected {KINDS}")


def short_name(spec: str) -> str:
  """The per-source metric name: the function ("module:function"), "rm" (+ "@K") or the URL."""
  if spec.startswith("fn:"):
    return spec[len("fn:"):]
  if spec.startswith("rm:"):
    _, k = _rm_target(spec)
    return "rm" if k is None else f"rm@{k}"
  return spec


def unique_names(names: Sequence[str]) -> list[str]:
  """Names that occur more than once get _1, _2, ... in order."""
  counts, seen, out = collections.Counter(names), collections.Counter(), []
  for name in names:
    if counts[name] == 1:
      out.append(name)
      continue
    while True:
      seen[name] += 1
      cand = f"{name}_{seen[name]}"
      if cand not in counts:
        break
    out.append(cand)
  return out


# ---------------------------------------------------------------------------------------------- checks

def _short(x, n: int = 80) -> str:
  s = " ".join(repr(x).split())
  return s if len(s) <= n else s[:n - 3] + "..."


def _one_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _numbers(values, n: int, who: str) -> np.ndarray:
  """``values`` as float64 [n]: a sequence of n finite numbers, else RewardError."""
  if isinstance(values, np.ndarray):
    if values.ndim != 1:
      raise RewardError(f"{who} returned an array of shape {values.shape}; expected {n} numbers")
    values = values.tolist()
  elif isinstance(values, (str, bytes, dict)) or not isinstance(values, collections.abc.Iterable):
    raise RewardError(f"{who} returned {_short(values)}; expected a sequence of {n} numbers")
  values = list(values)
  if len(values) != n:
    raise RewardError(f"{who} returned {len(values)} values for {n} samples")
  for i, v in enumerate(values):
    if isinstance(v, (list, tuple, np.ndarray)):
      raise RewardError(f"{who}: reward {i} is a list {_short(v)} (a multi-attribute reward?); each sample needs "
                        "a single-number reward")
    if not isinstance(v, numbers.Real) or not math.isfinite(v):
      raise RewardError(f"{who}: reward {i} is {_short(v)}, not a finite number")
  return np.asarray(values, np.float64)


# ---------------------------------------------------------------------------------------------- sources

class FunctionSource:
  """``fn:package.module:function``: ``function(prompts, responses, rows)`` -> N numbers."""

  def __init__(self, spec: str):
    self.spec = spec
    module, name = _fn_target(spec)
    try:
      mod = importlib.import_module(module)
    except Exception as e:  # a missing module, or one that fails while importing
      raise RewardError(f"reward source {spec}: cannot import {module}: {_one_line(e)}") from e
    self.fn = getattr(mod, name, None)
    if not callable(self.fn):
      raise RewardError(f"reward source {spec}: module {module} has no function {name}")

  def __call__(self, samples: Samples) -> np.ndarray:
    try:
      out = self.fn(list(samples.prompts), list(samples.responses), list(samples.rows))
    except Exception as e:
      raise RewardError(f"reward source {self.spec} raised {_one_line(e)}") from e
    return _numbers(out, len(samples), f"reward source {self.spec}")


class RewardModelSource:
  """``rm:PATH[@K]``: a jalign reward model scoring each sample's full text (``Samples.texts``) as a ``{"text"}``
  row, tokenised with its training run's data settings (add_bos, append_eod, ...), as ``jalign.score`` does."""

  def __init__(self, spec: str, batch_size: int = 16):
    import argparse

    import jalign
    from jalign.checkpoint import CheckpointError
    from jalign.data import TokenizerError, preference
    from jalign.score import Scorer, _run_config, data_settings
    self.spec = spec
    path, k = _rm_target(spec)
    try:
      model = jalign.load(path)
    except (CheckpointError, TokenizerError, OSError, ValueError) as e:
      raise RewardError(f"reward source {spec}: cannot load the reward model: {_one_line(e)}") from e
    if model.tokenizer is None:
      raise RewardError(f"reward source {spec}: {path} has no tokenizer")
    n = model.config.num_value_heads
    if not n:
      raise RewardError(f"reward source {spec}: {path} has no reward (value) head")
    if k is None and n > 1:
      rm_cfg = (_run_config(path) or {}).get("rm", {})
      index = rm_cfg.get("reward_index") if rm_cfg.get("loss", "regression") != "regression" else None
      hint = f"; its training run compared pairs on attribute {index}" if index is not None else ""
      raise RewardError(f"reward source {spec}: the reward head has {n} attributes; add @K to pick one "
                        f"(rm:{path}@0 .. rm:{path}@{n - 1}){hint}")
    if k is not None and k >= n:
      raise RewardError(f"reward source {spec}: @{k} is out of range; the reward head has {n} attributes")
    data_cfg, template = data_settings(argparse.Namespace(
        checkpoint=path, add_bos=None, add_eos=None, max_seq_len=None, truncation="error", chat_template=None))
    self.max_len, self.warned = data_cfg.max_seq_len, False
    data_cfg.max_seq_len = sys.maxsize  # lengths are checked in _encode, with a message for RL
    try:
      self.pair_tok = preference.PairTokenizer(model.tokenizer, data_cfg, template)
    except ValueError as e:
      raise RewardError(f"reward source {spec}: {_one_line(e)}") from e
    self.append_eod = data_cfg.append_eod
    # a one-hot merge picks attribute K (Scorer's weights); the jitted Scorer is reused across calls
    self.scorer = Scorer(model, batch_size=batch_size, weights=np.eye(n)[k or 0])

  def _encode(self, i: int, text: str):
    from jalign.data import DataError
    try:  # NeMo-Aligner reward-model rows: an EOS only with data.append_eod, as in training
      segs, _ = self.pair_tok.builder.segments({"text": text}, f"samples[{i}]", 0)
      ex = self.pair_tok.encode(segs, self.append_eod, f"samples[{i}]", 0)
    except DataError as e:
      raise RewardError(f"reward source {self.spec}: {e}") from e
    if len(ex.tokens) > self.max_len and not self.warned:  # scored all the same: it is a soft limit
      self.warned = True
      log.warning("reward source %s: sample %d is %d tokens, more than the reward model's data.max_seq_len=%d "
                  "(what it was trained on); longer samples are scored as they are", self.spec, i, len(ex.tokens),
                  self.max_len)
    return ex

  def __call__(self, samples: Samples) -> np.ndarray:
    examples = [self._encode(i, t) for i, t in enumerate(samples.texts)]
    return _numbers(self.scorer(examples), len(samples), f"reward source {self.spec}")


class HttpSource:
  """``http(s)://...``: POST ``{"rows": [{"prompt", "response"}, ...]}`` in batches of ``batch_size``."""

  def __init__(self, url: str, batch_size: int = 16, timeout_s: float = 60.0):
    self.url, self.batch_size, self.timeout_s = url, batch_size, timeout_s

  def __call__(self, samples: Samples) -> np.ndarray:
    out = [np.zeros(0)]
    for s in range(0, len(samples), self.batch_size):
      rows = [{"prompt": p, "response": r}
              for p, r in zip(samples.prompts[s:s + self.batch_size], samples.responses[s:s + self.batch_size])]
      out.append(self._post(rows))
    return np.concatenate(out)

  def _post(self, rows: list[dict]) -> np.ndarray:
    who = f"reward source {self.url}"
    req = urllib.request.Request(self.url, json.dumps({"rows": rows}).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
        raw = resp.read()
    except urllib.error.HTTPError as e:
      raise RewardError(f"{who}: HTTP {e.code} {e.reason}: {_error_body(e)}") from None
    except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out (URLError is an OSError)
      reason = getattr(e, "reason", e)
      if isinstance(reason, TimeoutError):
        raise RewardError(f"{who}: no answer within timeout_s={self.timeout_s:g}") from None
      raise RewardError(f"{who}: request failed: {' '.join(str(reason).split())}") from None
    try:
      body = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
      raise RewardError(f"{who}: the answer is not JSON: {_short(raw)}") from None
    if isinstance(body, dict):
      key = next((k for k in ("rewards", "scores") if k in body), None)
      if key is None:
        raise RewardError(f'{who}: expected {{"rewards": [...]}}, {{"scores": [...]}} or a JSON list; got an object '
                          f"with keys {_short(sorted(body))}")
      body = body[key]
    if not isinstance(body, list):
      raise RewardError(f"{who}: expected a list of rewards, got {_short(body)}")
    return _numbers(body, len(rows), who)


def _error_body(e: urllib.error.HTTPError) -> str:
  try:
    return " ".join(e.read(300).decode("utf-8", "replace").split()) or "(empty body)"
  except OSError:
    return "(no body)"


def make_source(spec: str, batch_size: int = 16, timeout_s: float = 60.0):
  """The callable ``samples -> float64 [N]`` for one spec."""
  check_spec(spec)
  if spec.startswith("fn:"):
    return FunctionSource(spec)
  if spec.startswith("rm:"):
    return RewardModelSource(spec, batch_size)
  return HttpSource(spec, batch_size, timeout_s)


# ---------------------------------------------------------------------------------------------- the sum

class Rewards:
  """``rewards(samples) -> (total float32 [N], {name: float32 [N]})``: ``total = sum_k w_k r_k`` (weights 1.0 by
  default), then with ``standardize`` ``(total - mean) / std``. Sources are set up (imported, loaded) here."""

  def __init__(self, sources: Sequence[str], weights: Sequence[float] = (), *, standardize: bool = False,
               mean: float = 0.0, std: float = 1.0, batch_size: int = 16, timeout_s: float = 60.0):
    if isinstance(sources, str):
      raise RewardError(f"reward sources must be a list of spec strings, got the string {sources!r}")
    sources = list(sources)
    if not sources:
      raise RewardError(f"no reward sources; give at least one: {KINDS}")
    weights = [float(w) for w in weights] or [1.0] * len(sources)
    if len(weights) != len(sources):
      raise RewardError(f"{len(weights)} reward weights for {len(sources)} reward sources")
    if not all(math.isfinite(w) for w in weights):
      raise RewardError(f"reward weights must be finite numbers, got {weights}")
    if standardize and not (math.isfinite(mean) and std > 0 and math.isfinite(std)):
      raise RewardError(f"reward standardisation needs a finite mean and std > 0, got mean={mean}, std={std}")
    if batch_size < 1 or not timeout_s > 0:
      raise RewardError(f"reward batch_size must be >= 1 and timeout_s > 0, got {batch_size} and {timeout_s}")
    for spec in sources:
      check_spec(spec)
    self.specs, self.weights = sources, weights
    self.standardize, self.mean, self.std = standardize, float(mean), float(std)
    self.names = unique_names([short_name(s) for s in sources])
    self.sources = [make_source(s, batch_size, timeout_s) for s in sources]

  def __call__(self, samples: Samples) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    n = len(samples)
    total, per = np.zeros(n, np.float64), {}
    for name, source, w in zip(self.names, self.sources, self.weights):
      r = source(samples) if n else np.zeros(0)
      per[name] = r.astype(np.float32)
      total += w * r
    if self.standardize:
      total = (total - self.mean) / self.std
    return total.astype(np.float32), per
