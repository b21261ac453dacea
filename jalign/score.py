"""``python -m jalign.score --checkpoint RM --input in.jsonl --output out.jsonl``: score rows with a reward model.

Each output line is the input row plus its score(s):
- single rows (``text``, ``messages``, ``prompt``/``completion``, ``input``/``output``, NeMo chat) get ``reward``;
- pair rows (TRL ``prompt``/``chosen``/``rejected``, NeMo DPO) get ``chosen_reward`` and ``rejected_reward``.
A multi-attribute head writes a list per row, or one number with ``--attribute-weights`` (NeMo's
``merge_attributes``). ``--reward-mean/--reward-std`` standardise: r <- (r - mean) / std.

``--rewardbench``: the input is in RewardBench's format (``prompt``, ``chosen``, ``rejected``, ``subset``; prompt
and responses are plain text, rendered as one user and one assistant turn with the chat template); prints
accuracy per subset, section scores and the overall score, and writes them to ``--report``.

``--annotate`` (SteerLM): each reply of NeMo chat rows is scored by a regression (attribute) RM on the text it was
trained on (the conversation up to the reply, then ``<extra_id_2>``) and labelled ``quality:4,toxicity:0,...``
(``type: VALUE_TO_TEXT``; values rounded and clipped to 0-4; names from ``--attribute-names``, the RM run's
``rm.attribute_names`` or HelpSteer2's nine; ``--attributes`` picks which are written).

``--reference REF``: score with a DPO policy's implicit reward, sum log pi(response) - sum log pi_ref(response),
instead of a reward head (as RewardBench evaluates DPO models).

Tokenisation settings (``data.add_bos``, ``add_eos``, ``append_eod``, ``max_seq_len``, ``prompt_template``,
``chat_prompt_tokens``, ``tokenizer.chat_template``)
come from the training run's ``config.json`` when the checkpoint is a run (or a run's ``model/``); flags override.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

log = logging.getLogger("jalign.score")


def _run_config(checkpoint: str):
  for d in (checkpoint, os.path.dirname(os.path.abspath(checkpoint))):
    p = os.path.join(d, "config.json")
    if os.path.exists(p) and not os.path.exists(os.path.join(d, "model.safetensors")):
      with open(p) as f:
        cfg = json.load(f)
      if "data" in cfg:
        return cfg
  return None


# what decides how a run tokenised its rows, read back from its config.json
RUN_DATA_KEYS = ("add_bos", "add_eos", "append_eod", "max_seq_len", "prompt_template", "chat_prompt_tokens")


def data_settings(args):
  from jalign import config as config_lib
  d = config_lib.base_config().data
  template = "nemo"
  run = _run_config(args.checkpoint)
  if run:
    d.update({k: run["data"][k] for k in RUN_DATA_KEYS if k in run["data"]})
    template = run.get("tokenizer", {}).get("chat_template", template)
  for k in ("add_bos", "add_eos", "max_seq_len"):
    if getattr(args, k) is not None:
      d[k] = getattr(args, k)
  d.truncation = args.truncation
  return d, args.chat_template or template


def _bucket(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


class Scorer:
  """Batched scores of tokenised sequences (Examples) with a reward head or a policy/reference pair."""

  def __init__(self, model, reference=None, batch_size=16, mean=0.0, std=1.0, weights=None):
    import jax

    from jalign.algorithms import common, rm
    self.model, self.batch_size = model, batch_size
    self.mean, self.std, self.weights = mean, std, weights
    cfg = model.config
    if reference is not None:
      def f(p, ref, flat):
        s, _ = common.sequence_logps(p, flat, cfg)
        s_ref, _ = common.sequence_logps(ref, flat, cfg)
        return s - s_ref
      self._fn = jax.jit(f)
      self._args = (model.params, reference.params)
    else:
      if not cfg.num_value_heads:
        raise ValueError("the checkpoint has no reward (value) head; pass --reference REF to score a DPO policy "
                         "by its implicit reward")
      self._fn = jax.jit(lambda p, flat: rm.last_token_values(p, flat["tokens"], flat["segment_ids"], cfg))
      self._args = (model.params,)

  def __call__(self, examples, progress=None) -> list:
    pad = self.model.tokenizer.pad_id
    out = [None] * len(examples)
    order = np.argsort([len(e.tokens) for e in examples], kind="stable")  # similar lengths together
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      T = _bucket(max(len(examples[i].tokens) for i in idx))
      B = self.batch_size
      flat = {"tokens": np.full((B, T), pad, np.int32), "loss_mask": np.zeros((B, T), bool),
              "segment_ids": np.zeros((B, T), np.int32),
              "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))}
      for j, i in enumerate(idx):
        ex = examples[i]
        n = len(ex.tokens)
        flat["tokens"][j, :n], flat["loss_mask"][j, :n], flat["segment_ids"][j, :n] = ex.tokens, ex.loss_mask, 1
      vals = np.asarray(self._fn(*self._args, flat), np.float64)
      for j, i in enumerate(idx):
        out[i] = self._post(vals[j])
      if progress is not None:
        progress.update(len(idx))
    return out

  def _post(self, v):
    v = (v - self.mean) / self.std
    if np.ndim(v) == 0:
      return float(v)
    if self.weights is not None:
      return float(np.dot(v, self.weights))
    return float(v[0]) if len(v) == 1 else [float(x) for x in v]


def _rewardbench_row(obj, path, line):
  from jalign.data import DataError
  for k in ("prompt", "chosen", "rejected", "subset"):
    if not isinstance(obj.get(k), str):
      raise DataError(path, line, k, "missing or not a string (RewardBench rows need prompt, chosen, rejected, "
                      "subset)")
  return {"prompt": [{"role": "user", "content": obj["prompt"]}],
          "chosen": [{"role": "assistant", "content": obj["chosen"]}],
          "rejected": [{"role": "assistant", "content": obj["rejected"]}]}


def tokenize_rows(path, tok, data_cfg, chat_template, rewardbench=False):
  """[(row, kind, examples)]: kind "pair" (two Examples) or "single" (one)."""
  from jalign.data import DataError, preference
  from jalign.data.formats import read_jsonl
  pt = preference.PairTokenizer(tok, data_cfg, chat_template)
  out = []
  for line, obj in read_jsonl(path):
    if isinstance(obj, DataError):
      raise obj
    if rewardbench:
      pair = pt.pair(_rewardbench_row(obj, path, line), path, line)
      out.append((obj, "pair", [pair.chosen, pair.rejected]))
    elif {"chosen", "rejected", "chosen_response", "rejected_response"} & set(obj):
      pair = pt.pair(obj, path, line)
      out.append((obj, "pair", [pair.chosen, pair.rejected]))
    else:  # the mask marks the response (all of a plain text), used by implicit rewards
      segs, eos = pt.builder.segments(obj, path, line)
      if "text" in obj:  # NeMo-Aligner reward-model rows: an EOS only with data.append_eod, as in training
        eos = data_cfg.append_eod
      out.append((obj, "single", [pt.encode(segs, eos, path, line)]))
  return out


def attribute_names(checkpoint, model, override=None) -> tuple[str, ...]:
  """Names of the reward head's outputs: ``override``, else the RM run's ``rm.attribute_names``, else HelpSteer2's
  nine for a nine-output head."""
  from jalign.data import attributes
  n = model.config.num_value_heads
  names = list(override) if override else None
  if names is None:
    run = _run_config(checkpoint) or {}
    names = list(run.get("rm", {}).get("attribute_names", ())) or None
  if names is None and n == len(attributes.HELPSTEER2):
    names = list(attributes.HELPSTEER2)
  if names is None:
    raise ValueError(f"the reward head has {n} outputs: name them with --attribute-names a,b,... (or "
                     "rm.attribute_names in the RM's training config)")
  if len(names) != n:
    raise ValueError(f"{len(names)} attribute names for a reward head of {n} outputs")
  return tuple(names)


def annotation_rows(path, tok, data_cfg):
  """[(row, [(turn index, Example)])]: each reply of a NeMo chat row (a turn whose role is not masked) as the
  regression RM's training text, the conversation up to and including the reply followed by ``label_start``."""
  from jalign.data import DataError, preference, templates
  from jalign.data.formats import read_jsonl
  pt = preference.PairTokenizer(tok, data_cfg, "nemo")
  t = pt.builder.chat_tokens
  out = []
  for line, obj in read_jsonl(path):
    if isinstance(obj, DataError):
      raise obj
    if not isinstance(obj, dict) or "conversations" not in obj:
      raise DataError(path, line, "conversations", "--annotate takes NeMo chat rows (system, conversations, mask)")
    pt.builder.segments(obj, path, line)  # validates the row
    turns, masked = obj["conversations"], set(obj.get("mask", "User").split(","))
    replies = []
    for j, turn in enumerate(turns):
      if turn["from"] in masked:
        continue
      text = templates.nemo_generation_prompt(obj.get("system", ""), [(c["from"], c["value"]) for c in turns[:j]],
                                              turn["from"], t) + turn["value"] + t.end_of_turn + t.label_start
      segs, _ = pt.builder.segments({"text": text}, path, line)
      replies.append((j, pt.encode(segs, data_cfg.append_eod, path, line)))
    out.append((obj, replies))
  return out


def annotate(rows, scores, names, keep) -> list[dict]:
  """Rows with each scored reply labelled (``type: VALUE_TO_TEXT``) by the attributes in ``keep``, values rounded
  and clipped to 0-4."""
  from jalign.data import attributes
  idx = [names.index(k) for k in keep]
  it, out = iter(scores), []
  for obj, replies in rows:
    obj = {**obj, "type": "VALUE_TO_TEXT", "conversations": [dict(c) for c in obj["conversations"]]}
    for j, _ in replies:
      v = next(it)
      v = [v] if not isinstance(v, list) else v
      obj["conversations"][j]["label"] = attributes.from_scores(keep, [v[i] for i in idx])
    out.append(obj)
  return out


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  p = argparse.ArgumentParser(prog="python -m jalign.score", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="reward model (or DPO policy with --reference): a run, a "
                 "jalign model dir, an HF dir or a .nemo")
  p.add_argument("--input", required=True)
  p.add_argument("--output", help="JSONL with the scores added (default: INPUT.scored.jsonl)")
  p.add_argument("--rewardbench", action="store_true", help="the input is RewardBench rows; print the report")
  p.add_argument("--report", help="with --rewardbench: write the report as JSON here")
  p.add_argument("--reference", help="reference model: score by the implicit reward of a DPO policy")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--reward-mean", type=float, default=0.0)
  p.add_argument("--reward-std", type=float, default=1.0)
  p.add_argument("--attribute-weights", help="comma-separated weights merging a multi-attribute head")
  p.add_argument("--max-seq-len", dest="max_seq_len", type=int)
  p.add_argument("--add-bos", dest="add_bos", type=lambda s: s.lower() in ("1", "true", "yes"))
  p.add_argument("--add-eos", dest="add_eos", type=lambda s: s.lower() in ("1", "true", "yes"))
  p.add_argument("--truncation", default="error", choices=("error", "left", "right"))
  p.add_argument("--chat-template", choices=("nemo", "hf"))
  p.add_argument("--annotate", action="store_true", help="SteerLM: label each reply of NeMo chat rows with the "
                 "regression RM's attributes (type VALUE_TO_TEXT, values rounded and clipped to 0-4)")
  p.add_argument("--attribute-names", help="names of the head's outputs (default: the RM run's "
                 "rm.attribute_names, or HelpSteer2's nine for a nine-output head)")
  p.add_argument("--attributes", help="with --annotate: the attributes written, comma-separated, in the head's "
                 "order (default: all)")
  args = p.parse_args(argv)

  import jalign
  from jalign.checkpoint import CheckpointError
  from jalign.data import DataError, TokenizerError
  from jalign import rewardbench
  try:
    if args.reward_std <= 0:
      raise ValueError("--reward-std must be > 0")
    model = jalign.load(args.checkpoint)
    if model.tokenizer is None:
      raise ValueError(f"{args.checkpoint} has no tokenizer")
    reference = jalign.load(args.reference) if args.reference else None
    weights = None
    if args.attribute_weights:
      weights = np.array([float(w) for w in args.attribute_weights.split(",")])
      if len(weights) != model.config.num_value_heads:
        raise ValueError(f"--attribute-weights has {len(weights)} values; the head has "
                         f"{model.config.num_value_heads} attributes")
    data_cfg, template = data_settings(args)
    scorer = Scorer(model, reference, args.batch_size, args.reward_mean, args.reward_std, weights)
    if args.annotate:
      if weights is not None or reference is not None or args.rewardbench:
        raise ValueError("--annotate writes every attribute: drop --attribute-weights, --reference, --rewardbench")
      names = attribute_names(args.checkpoint, model,
                              args.attribute_names.split(",") if args.attribute_names else None)
      keep = tuple(args.attributes.split(",")) if args.attributes else names
      if [k for k in names if k in keep] != list(keep):
        raise ValueError(f"--attributes {','.join(keep)}: each must be one of {','.join(names)}, in that order")
      return _annotate(args, annotation_rows(args.input, model.tokenizer, data_cfg), scorer, names, keep)
    rows = tokenize_rows(args.input, model.tokenizer, data_cfg, template, args.rewardbench)
  except (ValueError, DataError, TokenizerError, CheckpointError, FileNotFoundError) as e:
    print(f"jalign.score: error: {e}", file=sys.stderr)
    return 2

  from tqdm import tqdm
  examples = [ex for _, _, exs in rows for ex in exs]
  with tqdm(total=len(examples), desc="score", file=sys.stderr, disable=None) as bar:
    scores = scorer(examples, bar)
  output = args.output or os.path.splitext(args.input)[0] + ".scored.jsonl"
  tmp = output + ".tmp"
  it = iter(scores)
  chosen, rejected, subsets = [], [], []
  with open(tmp, "w") as f:
    for obj, kind, _ in rows:
      obj = dict(obj)
      if kind == "pair":
        obj["chosen_reward"], obj["rejected_reward"] = next(it), next(it)
        chosen.append(obj["chosen_reward"])
        rejected.append(obj["rejected_reward"])
        subsets.append(obj.get("subset", "all"))
      else:
        obj["reward"] = next(it)
      f.write(json.dumps(obj) + "\n")
  os.replace(tmp, output)
  flat = [x for s in scores for x in (s if isinstance(s, list) else [s])]
  print(f"scored {len(rows)} rows -> {output} (reward mean {np.mean(flat):.4f}, std {np.std(flat):.4f}; use "
        "--reward-mean/--reward-std to standardise)")
  if args.rewardbench:
    if any(isinstance(c, list) for c in chosen):
      print("jalign.score: error: --rewardbench needs one score per response: pass --attribute-weights",
            file=sys.stderr)
      return 2
    rep = rewardbench.report(subsets, chosen, rejected)
    print(rewardbench.format_report(rep))
    if args.report:
      with open(args.report, "w") as f:
        json.dump(rep, f, indent=2)
  return 0


def _annotate(args, rows, scorer, names, keep) -> int:
  from tqdm import tqdm
  examples = [ex for _, replies in rows for _, ex in replies]
  with tqdm(total=len(examples), desc="annotate", file=sys.stderr, disable=None) as bar:
    scores = scorer(examples, bar)
  output = args.output or os.path.splitext(args.input)[0] + ".annotated.jsonl"
  with open(output + ".tmp", "w") as f:
    for obj in annotate(rows, scores, names, keep):
      f.write(json.dumps(obj) + "\n")
  os.replace(output + ".tmp", output)
  print(f"annotated {len(examples)} replies in {len(rows)} rows with {','.join(keep)} -> {output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
