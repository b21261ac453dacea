"""SteerLM 2.0 data and iterations.

``python -m jalign.steerlm2 generate --config CFG --output OUT.jsonl [--model DIR] [--config.key=value ...]``
  samples ``steerlm2.num_responses`` responses per (prompt, attribute string) from the model (Q', default
  ``model.checkpoint``), scores log P(a|x,y) with ``steerlm2.attribute_model``, log P(y|x) with
  ``steerlm2.unconditional_checkpoint`` and log Q'(y|a,x) with the sampling model, and writes NeMo-Aligner's
  SteerLM 2.0 JSONL.
``python -m jalign.steerlm2 iterate --config CFG --iterations K --workdir DIR``
  runs K iterations; iteration i generates ``DIR/iter_<i>/steerlm2.jsonl`` from the previous iteration's model
  (the first from ``model.checkpoint``) and trains ``algorithm=steerlm2`` on it into ``DIR/iter_<i>/`` (its model in
  ``DIR/iter_<i>/model``). P(y|x) stays the first model unless ``steerlm2.unconditional_checkpoint`` is set.
  Re-running resumes: finished data files and runs are kept.

log P(a|x,y) from predicted attribute values yhat (a regression reward model's head, or a program): the attributes
named in a are independent, and each value a_k in 0..4 has probability softmax_v(-(v - yhat_k)^2 / (2 sigma^2))
over v = 0..4 (``steerlm2.attribute_sigma``); log P(a|x,y) is the sum of their logs.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

import numpy as np

from jalign import config as config_lib
from jalign.algorithms import steerlm2 as algo
from jalign.data import attributes as attrs

log = logging.getLogger("jalign.steerlm2")


class SteerLM2Error(ValueError):
  """A setting or input the generator cannot use; ``str()`` is one line."""


# ---------------------------------------------------------------------------------------------- P(a|x,y)

def attribute_logprob(label: dict[str, int], predicted: dict[str, float], sigma: float) -> float:
  """log P(a|x,y): per attribute of ``label``, a distribution over 0..4 centred on the predicted value."""
  levels = np.arange(attrs.HIGH + 1, dtype=np.float64)
  total = 0.0
  for name, want in label.items():
    if name not in predicted:
      raise SteerLM2Error(f"the attribute model predicts no {name!r} (it gives {', '.join(predicted)})")
    scores = -(levels - float(predicted[name])) ** 2 / (2 * sigma ** 2)
    total += scores[want] - np.logaddexp.reduce(scores)
  return float(total)


def toy_attributes(prompts, responses, rows) -> list[dict]:
  """The toy task's exact attributes (``jalign.toy.attributes``) of each response to the row's last prompt turn:
  ``fn:jalign.steerlm2:toy_attributes``."""
  from jalign import toy
  return [toy.attributes(row["prompt_turns"][-1]["value"], r) for r, row in zip(responses, rows, strict=True)]


class FunctionAttributes:
  """``fn:module:function``: ``function(prompts, responses, rows)`` returns one {attribute: value} per response."""

  def __init__(self, spec: str):
    module, sep, name = spec[len("fn:"):].rpartition(":")
    try:
      self.fn = getattr(importlib.import_module(module), name) if sep else None
    except (ImportError, AttributeError) as e:
      raise SteerLM2Error(f"steerlm2.attribute_model={spec!r}: {e}") from None
    if self.fn is None:
      raise SteerLM2Error(f"steerlm2.attribute_model={spec!r}: expected fn:package.module:function")
    self.spec = spec

  def __call__(self, groups: list[algo.Group], chat) -> list[list[dict]]:
    flat = [(g, r) for g in groups for r in g.responses]
    rows = [algo.row_dict(algo.Group(g.system, g.prompt_turns, g.label)) for g, _ in flat]
    out = self.fn([algo.prompt_text(g, chat, False) for g, _ in flat], [r.value for _, r in flat], rows)
    if len(out) != len(flat) or not all(isinstance(d, dict) for d in out):
      raise SteerLM2Error(f"steerlm2.attribute_model={self.spec}: expected {len(flat)} dicts of attribute values")
    return _regroup(out, groups)


class RegressionAttributes:
  """``rm:DIR``: a regression reward model's head, its outputs named by the RM run's ``rm.attribute_names``, else
  ``steerlm2.attribute_names``, reading each response as NeMo-Aligner's regression rows do (prompt, response,
  ``end_of_turn``, ``label_start``), tokenised with the settings of the run that trained it."""

  def __init__(self, spec: str, names, batch_size: int):
    import jalign
    from jalign.data import preference, templates
    from jalign.score import Scorer, _run_config, data_settings
    path = spec[len("rm:"):]
    model = jalign.load(path)
    n = model.config.num_value_heads
    if not n or model.tokenizer is None:
      raise SteerLM2Error(f"steerlm2.attribute_model={spec}: not a reward model with a tokenizer")
    names = tuple((_run_config(path) or {}).get("rm", {}).get("attribute_names", ())) or tuple(names)
    if n > len(names):
      raise SteerLM2Error(f"steerlm2.attribute_model={spec}: {n} outputs but {len(names)} attribute names "
                          "(rm.attribute_names of its run, else steerlm2.attribute_names)")
    data_cfg, template = data_settings(argparse.Namespace(checkpoint=path, add_bos=None, add_eos=None,
                                                          max_seq_len=None, truncation="error", chat_template=None))
    data_cfg.max_seq_len = sys.maxsize
    self.pair_tok = preference.PairTokenizer(model.tokenizer, data_cfg, template)
    self.chat = templates.ChatTokens(**data_cfg.chat_prompt_tokens)
    self.append_eod, self.names, self.n = data_cfg.append_eod, tuple(names)[:n], n
    self.scorer = Scorer(model, batch_size=batch_size)

  def __call__(self, groups: list[algo.Group], chat) -> list[list[dict]]:
    c, exs = self.chat, []
    for g in groups:
      for r in g.responses:
        text = algo.prompt_text(g, c, False) + f"{r.value}{c.end_of_turn}{c.label_start}"
        segs, _ = self.pair_tok.builder.segments({"text": text}, "<generated>", 0)
        exs.append(self.pair_tok.encode(segs, self.append_eod, "<generated>", 0))
    vals = [np.atleast_1d(np.asarray(v, np.float64)) for v in self.scorer(exs)]
    return _regroup([dict(zip(self.names, v.tolist())) for v in vals], groups)


def _regroup(flat, groups):
  out, k = [], 0
  for g in groups:
    out.append(flat[k:k + len(g.responses)])
    k += len(g.responses)
  return out


def attribute_model(cfg):
  s = cfg.steerlm2
  spec = s.attribute_model
  if spec.startswith("fn:"):
    return FunctionAttributes(spec)
  if spec.startswith("rm:"):
    return RegressionAttributes(spec, s.attribute_names, s.batch_size)
  raise SteerLM2Error(f"steerlm2.attribute_model={spec!r}: expected rm:REWARD_MODEL_DIR or fn:module:function")


# ---------------------------------------------------------------------------------------------- prompts

def read_prompts(path: str, limit: int = 0) -> list[tuple[str, list[tuple[str, str]]]]:
  """(system, prompt turns) of NeMo chat rows (``conversations``) or TRL ``messages`` rows; a final reply (an even
  number of turns) is the reference and is left out."""
  from jalign.data import DataError, formats
  out = []
  for line, obj in formats.read_jsonl(path):
    if isinstance(obj, DataError):
      raise obj
    if "conversations" in obj:
      system, convs = obj.get("system", ""), obj["conversations"]
      key, role_key, text_key = "conversations", "from", "value"
    elif "messages" in obj:
      msgs = formats._messages(obj, "messages", path, line, formats.HF_ROLES)
      system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
      convs = [{"from": formats.NEMO_ROLES.get(m["role"], m["role"]), "value": m["content"]} for m in msgs
               if m["role"] != "system"]
      key, role_key, text_key = "messages", "from", "value"
    else:
      raise DataError(path, line, None, f"unrecognised prompt row with keys {sorted(obj)}; expected conversations "
                      "(NeMo chat) or messages (TRL)")
    if not isinstance(system, str):
      raise DataError(path, line, "system", f"expected a string, got {type(system).__name__}")
    if not isinstance(convs, list) or not convs:
      raise DataError(path, line, key, "expected a non-empty list of turns")
    turns = []
    for j, t in enumerate(convs):
      if not (isinstance(t, dict) and isinstance(t.get(role_key), str) and isinstance(t.get(text_key), str)):
        raise DataError(path, line, f"{key}[{j}]", "expected an object with string 'from' and 'value'")
      turns.append((t[role_key], t[text_key]))
    if len(turns) % 2 == 0:
      turns = turns[:-1]
    if not turns:
      raise DataError(path, line, key, "no prompt turn left once the final reply is removed")
    out.append((system, turns))
    if limit and len(out) == limit:
      break
  return out


# ---------------------------------------------------------------------------------------------- scoring

def _bucket(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def sequence_logps(model, examples, batch_size: int) -> np.ndarray:
  """Summed log-probs of each Example's trained tokens under ``model`` (a ``jalign.load`` result), float64 [n]."""
  import jax

  from jalign.algorithms import common
  fn = jax.jit(lambda p, flat: common.sequence_logps(p, flat, model.config)[0])
  out = np.zeros(len(examples))
  for s in range(0, len(examples), batch_size):
    chunk = examples[s:s + batch_size]
    T = _bucket(max(len(e.tokens) for e in chunk))
    flat = {"tokens": np.full((batch_size, T), model.tokenizer.pad_id, np.int32),
            "loss_mask": np.zeros((batch_size, T), bool), "segment_ids": np.zeros((batch_size, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (batch_size, T))}
    for j, e in enumerate(chunk):
      n = len(e.tokens)
      flat["tokens"][j, :n], flat["loss_mask"][j, :n], flat["segment_ids"][j, :n] = e.tokens, e.loss_mask, 1
    out[s:s + len(chunk)] = np.asarray(fn(model.params, flat), np.float64)[:len(chunk)]
  return out


def _load(path: str, what: str):
  import jalign
  if not path:
    raise SteerLM2Error(f"{what} is empty")
  model = jalign.load(path)
  if model.tokenizer is None:
    raise SteerLM2Error(f"{what}={path}: has no tokenizer")
  return model


def generate_groups(cfg, policy, unconditional, attributes, seed: int) -> tuple[list[algo.Group], dict]:
  """Sample, score and return the SteerLM 2.0 groups, with summary statistics."""
  from jalign import generate
  from jalign.data import preference, templates
  from jalign.generation import Engine, SamplingParams
  s, tok = cfg.steerlm2, policy.tokenizer
  chat = templates.ChatTokens(**cfg.data.chat_prompt_tokens)
  known = tuple(s.attribute_names)
  labels = []
  for lab in s.labels:
    try:
      labels.append((lab, attrs.parse(lab, known)))
    except ValueError as e:
      raise SteerLM2Error(f"steerlm2.labels: {e}") from None
  if not s.prompts_path:
    raise SteerLM2Error("steerlm2.prompts_path is empty")
  prompts = read_prompts(s.prompts_path, s.num_prompts)
  groups = [algo.Group(system, turns, lab) for system, turns in prompts for lab, _ in labels]
  bos = [tok.bos_id] if cfg.data.add_bos and tok.bos_id is not None else []
  ids = [bos + tok.encode(algo.prompt_text(g, chat)) for g in groups]
  for g, p in zip(groups, ids):
    if len(p) > s.max_prompt_len:
      raise SteerLM2Error(f"a prompt of {len(p)} tokens (with label {g.label!r}) is longer than "
                          f"steerlm2.max_prompt_len={s.max_prompt_len}")
  stops = generate.stop_ids(tok, "nemo", chat)
  engine = Engine(policy.params, policy.config, batch_size=min(s.batch_size, len(ids)),
                  max_new_tokens=s.max_new_tokens, top_k_cap=max(64, s.top_k), pad_id=tok.pad_id)
  samples = engine.generate(ids, SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p),
                            n=s.num_responses, stop_ids=stops, seed=seed)
  respond = generate.Responses(tok, stops, chat.end_of_turn, ())
  for g, outs in zip(groups, samples):
    g.responses = [algo.Response("Assistant", respond(o)[0], 0.0, 0.0, 0.0) for o in outs]
  pair_tok = preference.PairTokenizer(tok, cfg.data, "nemo")
  cond = [e for g in groups for e in algo.encode_group(g, pair_tok, chat, "<generated>", 0)]
  uncond = [e for g in groups for e in algo.encode_group(g, pair_tok, chat, "<generated>", 0, with_label=False)]
  log_q = sequence_logps(policy, cond, s.batch_size)
  log_p_y = sequence_logps(unconditional, uncond, s.batch_size)
  predicted = attributes(groups, chat)
  k, hits = 0, []
  for g, (lab, want), preds in zip(groups, [x for _ in prompts for x in labels], predicted):
    for r, pred in zip(g.responses, preds):
      r.log_p_a = attribute_logprob(want, pred, s.attribute_sigma)
      r.log_p_y, r.log_q = float(log_p_y[k]), float(log_q[k])
      hits.append(all(round(float(pred[n])) == v for n, v in want.items()))
      k += 1
  stats = {"groups": len(groups), "responses": k,
           "mean_log_p_a": float(np.mean([r.log_p_a for g in groups for r in g.responses])),
           "label_match": float(np.mean(hits))}
  return groups, stats


def generate_file(cfg, model_path: str, output: str, seed: int, unconditional_path: str = "") -> dict:
  """Write the SteerLM 2.0 JSONL for ``model_path`` (Q') to ``output`` (atomically); returns the statistics."""
  policy = _load(model_path, "the sampling model (model.checkpoint / --model)")
  uncond_path = unconditional_path or cfg.steerlm2.unconditional_checkpoint or model_path
  unconditional = policy if uncond_path == model_path else _load(uncond_path, "steerlm2.unconditional_checkpoint")
  groups, stats = generate_groups(cfg, policy, unconditional, attribute_model(cfg), seed)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output + ".tmp", "w") as f:
    for g in groups:
      f.write(algo.format_row(g) + "\n")
  os.replace(output + ".tmp", output)
  log.info("wrote %d groups (%d responses) to %s: mean log P(a|x,y) %.3f, label match %.3f", stats["groups"],
           stats["responses"], output, stats["mean_log_p_a"], stats["label_match"])
  return stats


# ---------------------------------------------------------------------------------------------- iterations

def iterate(cfg, iterations: int, workdir: str) -> list[dict]:
  """K rounds of generate -> train; iteration i lives in ``workdir/iter_<i>``. Returns one summary per round."""
  from jalign import train
  if cfg.algorithm != "steerlm2":
    raise SteerLM2Error(f"iterate trains algorithm=steerlm2; the config has algorithm={cfg.algorithm!r}")
  if iterations < 1:
    raise SteerLM2Error(f"--iterations must be >= 1, got {iterations}")
  first = cfg.model.checkpoint
  if not first:
    raise SteerLM2Error("model.checkpoint is empty: iteration 0 samples from it")
  uncond = cfg.steerlm2.unconditional_checkpoint or first
  out, start = [], first
  for i in range(iterations):
    d = os.path.join(workdir, f"iter_{i}")
    data = os.path.join(d, "steerlm2.jsonl")
    stats = None
    if not os.path.exists(data):
      stats = generate_file(cfg, start, data, cfg.seed + i, uncond)
    icfg = cfg.copy_and_resolve_references()
    with icfg.unlocked():
      icfg.model.checkpoint, icfg.data.train_path = start, data
    summary = train.run(icfg, d)
    summary.pop("state", None)
    if summary["reason"] != "done":
      raise SteerLM2Error(f"iteration {i} stopped ({summary['reason']}); re-run to resume")
    out.append({"iteration": i, "data": data, "model": os.path.join(d, "model"), "generation": stats})
    start = os.path.join(d, "model")
  return out


def main(argv=None) -> int:
  from jalign import train
  train.setup_logging()
  argv = sys.argv[1:] if argv is None else argv
  from jalign.checkpoint import CheckpointError
  from jalign.data import DataError, TokenizerError
  from jalign.trainer import NonFiniteLoss
  try:
    if not argv or argv[0] not in ("generate", "iterate"):
      raise SteerLM2Error("usage: python -m jalign.steerlm2 generate --config CFG --output OUT.jsonl [--model DIR] "
                          "| iterate --config CFG --iterations K --workdir DIR")
    cmd = argv[0]
    cfg, flags = config_lib.parse_args(argv[1:])
    allowed = {"generate": ("output", "model", "seed"), "iterate": ("iterations", "workdir")}[cmd]
    extra = [f"--{k}" for k in flags if k not in allowed]
    if extra:
      raise SteerLM2Error(f"unknown flag(s) for {cmd}: {', '.join(extra)}")
    if cmd == "generate":
      if "output" not in flags:
        raise SteerLM2Error("--output OUT.jsonl is required")
      seed = flags.get("seed", str(cfg.seed))
      if not seed.isdigit():
        raise SteerLM2Error(f"--seed {seed!r}: expected a non-negative integer")
      generate_file(cfg, flags.get("model", cfg.model.checkpoint), flags["output"], int(seed))
    else:
      if "workdir" not in flags or "iterations" not in flags:
        raise SteerLM2Error("--iterations K and --workdir DIR are required")
      try:
        k = int(flags["iterations"])
      except ValueError:
        raise SteerLM2Error(f"--iterations {flags['iterations']!r}: expected an integer") from None
      for r in iterate(cfg, k, flags["workdir"]):
        print(json.dumps(r))
  except (SteerLM2Error, config_lib.ConfigError, DataError, TokenizerError, CheckpointError) as e:
    print(f"jalign: error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLoss as e:
    print(f"jalign: error: {e}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
