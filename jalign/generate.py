"""``python -m jalign.generate --checkpoint CK --input prompts.jsonl --output out.jsonl``: sample responses.

Input rows (detected per row by their keys):
- ``{"prompt": "..."}``: raw text, used as it is;
- ``{"prompt": [messages]}`` (TRL): the chat template plus the generation prompt;
- ``{"messages": [...]}`` (TRL): the same; a final assistant message is the reference reply and is left out, so the
  response replaces it;
- NeMo chat ``{"system", "conversations", "mask", "type"}``: the same rule (a final turn whose role is not in
  ``mask`` is replaced), rendered with ``data.chat_prompt_tokens`` up to the next reply's name (and its label
  with ``type: VALUE_TO_TEXT``);
- NeMo prompt/response ``{"input": ...}``: ``data.prompt_template`` up to ``{output}``.
SteerLM: ``--attributes 'quality:4,verbosity:0'`` (or a JSON object; a row's own ``attributes`` key wins) renders
the desired attributes as the reply's label (``<extra_id_2>quality:4,verbosity:0`` and a newline after the
assistant's name), exactly as ``type: VALUE_TO_TEXT`` training rendered them; a dict is written in
HelpSteer2's attribute order.
Each output line is the input row plus ``responses`` (``--n`` strings), ``finished`` (per response: ended by a stop
token or string, not by ``--max-new-tokens``) and, with ``--logprobs``, ``logprobs`` (per response, the log-prob
of each token the response text came from). A response excludes its stop token or string.

Tokenisation settings (``data.add_bos``, ``prompt_template``, ``chat_prompt_tokens``, ``tokenizer.chat_template``)
come from the training run's ``config.json`` when the checkpoint is a run (or a run's ``model/``); flags override.
Resumable: rows already in the output are kept and generation goes on at the next input row; row i samples from
seed ``--seed`` + i, so a resumed run writes what an uninterrupted one would.

Also ``generate()``: greedy-or-sampled continuation of token-id prompts (training samples, ``jalign.load``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys

from jalign import config as config_lib
from jalign.generation import Engine, SamplingParams

# end-of-turn tokens of common Hugging Face chat templates: stop ids when the tokenizer has them
HF_TURN_ENDS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
ADDED = ("responses", "logprobs", "finished")
WINDOW_BATCHES = 8  # prompts are sorted by length within windows of this many batches


def generate(params, cfg, prompts: list[list[int]], *, max_new_tokens: int, stop_ids=(), pad_id: int = 0,
             temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
  """Continue each prompt; a row stops at any of ``stop_ids`` (kept in the output) or after max_new_tokens."""
  engine = Engine(params, cfg, batch_size=min(len(prompts), 32), max_new_tokens=max_new_tokens, pad_id=pad_id)
  out = engine.generate(prompts, SamplingParams(temperature=temperature), stop_ids=sorted(stop_ids), seed=seed)
  return [samples[0]["tokens"] for samples in out]


class Prompts:
  """Input rows -> prompt token ids, rendered with the run's templates."""

  def __init__(self, tokenizer, data_cfg, chat_template):
    from jalign.data.formats import SegmentBuilder
    self.tok, self.cfg, self.b = tokenizer, data_cfg, SegmentBuilder(tokenizer, data_cfg, chat_template)

  def ids(self, obj, path, line, attributes=None) -> list[int]:
    """Prompt ids of a row; ``attributes`` (a dict or a SteerLM string; the row's ``attributes`` key wins) become
    the reply's label, as ``VALUE_TO_TEXT`` training rendered it."""
    from jalign.data import DataError, attributes as attrs
    from jalign.data.formats import tokenize_segments
    spec, label = obj.get("attributes", attributes), None
    if spec is not None:
      try:
        label = attrs.label(spec)
      except attrs.AttributeStringError as e:
        raise DataError(path, line, "attributes", str(e)) from None
    ids, _ = tokenize_segments(self.tok, self.segments(obj, path, line, label), add_bos=self.cfg.add_bos,
                               add_eos=False, answer_only=True)
    if not len(ids):
      raise DataError(path, line, None, "empty prompt")
    return ids.tolist()

  def segments(self, obj, path, line, label=None):
    from jalign.data import DataError, formats, templates
    if "conversations" in obj:
      return [(self._nemo_chat(obj, path, line, label), False)]
    if "messages" in obj:
      msgs = formats._messages(obj, "messages", path, line, self.b.roles)
      if msgs[-1]["role"] == "assistant":  # the reference reply: the response replaces it
        msgs = msgs[:-1]
      return [(self._chat(msgs, "messages", path, line, label), False)]
    if label is not None and (self.b.chat != "nemo" or "input" in obj):
      raise DataError(path, line, "attributes", "SteerLM attributes need a chat or raw-prompt row and the NeMo chat "
                      "template (tokenizer.chat_template=nemo)")
    if "input" in obj:
      values = {"input": formats._str(obj, "input", path, line), "output": ""}
      pieces = templates.nemo_prompt_pieces(self.cfg.prompt_template, values, self.b.space_sensitive)
      return templates.Pieces(itertools.takewhile(lambda piece: not piece[1], pieces))  # up to {output}
    if isinstance(obj.get("prompt"), list):
      msgs = formats._messages(obj, "prompt", path, line, self.b.roles)
      return [(self._chat(msgs, "prompt", path, line, label), False)]
    if "prompt" in obj:  # raw text; a label goes at its end (it should end with the assistant's name)
      text = formats._str(obj, "prompt", path, line)
      return [(text if label is None else text + templates.label_text(label, self.b.chat_tokens), False)]
    raise DataError(path, line, None, f"unrecognised row with keys {sorted(obj)}; expected prompt, messages, "
                    "conversations or input")

  def _chat(self, msgs, key, path, line, label=None) -> str:
    """Messages rendered with the chat template, followed by the generation prompt (and the label)."""
    from jalign.data import DataError, templates
    from jalign.data.formats import NEMO_ROLES
    if self.b.chat == "hf":
      if label is not None:
        raise DataError(path, line, "attributes", "SteerLM attributes need the NeMo chat template "
                        "(tokenizer.chat_template=nemo)")
      try:
        return templates.render_hf(self.tok.chat_template, msgs, add_generation_prompt=True, **self.b.special)
      except templates.TemplateError as e:
        raise DataError(path, line, key, f"chat template: {e}") from None
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else ""
    for j, m in enumerate(msgs):
      if m["role"] == "tool" or (m["role"] == "system" and j):
        raise DataError(path, line, f"{key}[{j}].role", "the NeMo template allows one system message, first, and "
                        "no tool role")
    turns = [(NEMO_ROLES[m["role"]], m["content"]) for m in msgs if m["role"] != "system"]
    return templates.nemo_generation_prompt(system, turns, tokens=self.b.chat_tokens, label=label)

  def _nemo_chat(self, obj, path, line, desired=None) -> str:
    """The conversation up to the next reply's name (and label: ``desired``, else the reference reply's with
    ``type: VALUE_TO_TEXT``); a final reply is the reference, left out."""
    from jalign.data import templates
    self.b.segments(obj, path, line)  # validates the row
    t, masked = self.b.chat_tokens, set(obj.get("mask", "User").split(","))
    labelled = obj.get("type") == "VALUE_TO_TEXT"
    turns = [(c["from"], c["value"], c.get("label") if labelled else None) for c in obj["conversations"]]
    replies = [r for r, _, _ in turns if r not in masked]
    role, label = replies[-1] if replies else "Assistant", None
    if turns[-1][0] not in masked:
      role, _, label = turns.pop()
    label_text = lambda lb: "" if lb is None else templates.label_text(lb, t)
    shown = [(r, label_text(lb) + v) for r, v, lb in turns]
    return templates.nemo_generation_prompt(obj.get("system", ""), shown, role, t,
                                            desired if desired is not None else label)


def stop_ids(tok, chat_template: str, chat_tokens) -> list[int]:
  """EOS and the template's turn tokens: NeMo's turn start and end of turn when they are single, non-blank tokens;
  for HF templates the usual end-of-turn tokens the tokenizer has."""
  names = (chat_tokens.turn_start, chat_tokens.end_of_turn) if chat_template == "nemo" else HF_TURN_ENDS
  ids = {tok.token_to_id(s) for s in names if s.strip()} | {tok.eos_id}
  return sorted(i for i in ids if i is not None)


class Responses:
  """Engine samples -> (text, logprobs, finished): stop token, NeMo end of turn and stop strings cut off."""

  def __init__(self, tok, stops: list[int], end_of_turn: str, stop_strings):
    self.tok, self.stops, self.end_of_turn, self.strings = tok, set(stops), end_of_turn, stop_strings

  def __call__(self, sample):
    toks, finished = sample["tokens"], sample["finished"]
    if finished and toks and toks[-1] in self.stops:
      toks = toks[:-1]
    text = full = self.tok.decode(toks)
    if finished and self.end_of_turn and text.endswith(self.end_of_turn):  # it closes the reply, before turn_start
      text = text[:-len(self.end_of_turn)]
    cuts = [text.find(s) for s in self.strings if s in text]
    if cuts:
      text, finished = text[:min(cuts)], True
    kept = len(toks) if text == full else self._covering(toks, len(text))
    return text, sample["logprobs"][:kept], finished

  def _covering(self, toks, n_chars) -> int:
    """How many leading tokens it takes to decode at least ``n_chars`` characters."""
    k = 0
    while k < len(toks) and len(self.tok.decode(toks[:k])) < n_chars:
      k += 1
    return k


def read_rows(path, prompts: Prompts, max_len: int, attributes=None):
  """[(row, prompt ids)] for every input row; the first bad row raises a DataError. ``attributes``: the SteerLM
  attributes every reply is asked for (a row's own ``attributes`` key wins)."""
  from jalign.data import DataError
  from jalign.data.formats import read_jsonl
  out = []
  for line, obj in read_jsonl(path):
    if isinstance(obj, DataError):
      raise obj
    ids = prompts.ids(obj, path, line, attributes)
    if len(ids) > max_len:
      raise DataError(path, line, None, f"prompt of {len(ids)} tokens is longer than the longest the engine takes "
                      f"({max_len})")
    out.append((obj, ids))
  return out


def _strip(row):
  return {k: v for k, v in row.items() if k not in ADDED}


def rows_done(output, rows) -> int:
  """How many rows ``output`` already holds; a truncated last line is cut off the file. Raises ValueError when a
  kept row is not the input row at its place."""
  if not os.path.exists(output):
    return 0
  with open(output, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  if end < len(data):  # an interrupted write
    with open(output, "r+b") as f:
      f.truncate(end)
  lines = data[:end].splitlines()
  if len(lines) > len(rows):
    raise ValueError(f"{output} has {len(lines)} rows, more than the input's {len(rows)}; choose another --output")
  for i, raw in enumerate(lines):
    try:
      kept = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ValueError(f"{output}:{i + 1}: not a JSON row; remove the file to start again") from None
    if not isinstance(kept, dict) or _strip(kept) != _strip(rows[i][0]):
      raise ValueError(f"{output}:{i + 1}: is not input row {i + 1}; remove the file (or choose another --output) "
                       "to start again")
  return len(lines)


def windows(start: int, total: int, size: int):
  """[start, total) cut at multiples of ``size``: a resumed run batches the rest as an uninterrupted one."""
  while start < total:
    end = min(total, (start // size + 1) * size)
    yield start, end
    start = end


def run(engine, rows, start, out_file, sampling, args, respond, stops, progress):
  """Generate rows[start:], sorted by prompt length within windows, and write them in input order."""
  B = args.batch_size
  for lo, hi in windows(start, len(rows), B * WINDOW_BATCHES):
    order = sorted(range(lo, hi), key=lambda i: len(rows[i][1]))
    results = {}
    for c in range(0, len(order), B):
      idx = order[c:c + B]
      out = engine.generate([rows[i][1] for i in idx], sampling, n=args.n, stop_ids=stops,
                            seed=[args.seed + i for i in idx])
      results.update(zip(idx, out))
      progress.update(len(idx))
    for i in range(lo, hi):
      texts, logprobs, finished = zip(*(respond(s) for s in results[i]))
      row = {**_strip(rows[i][0]), "responses": list(texts), "finished": list(finished)}
      if args.logprobs:
        row["logprobs"] = list(logprobs)
      out_file.write(json.dumps(row) + "\n")
    out_file.flush()


def _check(args):
  for name, ok in (("--n", args.n >= 1), ("--max-new-tokens", args.max_new_tokens >= 1),
                   ("--batch-size", args.batch_size >= 1), ("--temperature", args.temperature >= 0),
                   ("--top-k", args.top_k >= 0), ("--top-p", 0 < args.top_p <= 1), ("--min-p", 0 <= args.min_p <= 1),
                   ("--repetition-penalty", args.repetition_penalty > 0), ("--min-tokens", args.min_tokens >= 0),
                   ("--seed", args.seed >= 0)):
    if not ok:
      raise ValueError(f"{name}={getattr(args, name[2:].replace('-', '_'))} is out of range")
  if args.n > 1 and args.temperature == 0:
    raise ValueError("--n > 1 with greedy decoding (--temperature 0) gives identical responses; set --temperature")
  if not os.path.exists(args.input):
    raise ValueError(f"{args.input}: file not found")
  if os.path.abspath(args.output) == os.path.abspath(args.input):
    raise ValueError("--output must differ from --input")
  if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
    raise ValueError(f"{args.output}: its directory does not exist")


def _parser():
  p = argparse.ArgumentParser(prog="python -m jalign.generate", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a run, a jalign model dir, an HF dir or a .nemo")
  p.add_argument("--input", required=True, help="JSONL prompts")
  p.add_argument("--output", help="JSONL: input rows plus responses (default: INPUT.generated.jsonl)")
  p.add_argument("--n", type=int, default=1, help="responses per prompt")
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: off")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--min-p", type=float, default=0.0)
  p.add_argument("--repetition-penalty", type=float, default=1.0)
  p.add_argument("--min-tokens", type=int, default=0, help="no stop token before this many new tokens")
  p.add_argument("--seed", type=int, default=0, help="row i samples from seed + i")
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut off the response")
  p.add_argument("--batch-size", type=int, default=16, help="prompts per engine call")
  p.add_argument("--logprobs", action="store_true", help="add per-token log-probs of each response")
  p.add_argument("--add-bos", dest="add_bos", type=lambda s: s.lower() in ("1", "true", "yes"))
  p.add_argument("--chat-template", choices=("nemo", "hf"))
  p.add_argument("--compile-cache", default=config_lib.COMPILE_CACHE,
                 help="JAX's persistent compilation cache: a restart loads the compiled sampler (\"\": off)")
  p.add_argument("--attributes", type=_attributes_arg,
                 help="SteerLM: desired attributes for every reply, 'quality:4,verbosity:0' or a JSON object "
                 "(a row's own 'attributes' key wins); rendered after <extra_id_2> as training rendered labels")
  return p


def _attributes_arg(text: str):
  if text.lstrip().startswith("{"):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from None
  return text


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = _parser().parse_args(argv)
  args.output = args.output or os.path.splitext(args.input)[0] + ".generated.jsonl"
  config_lib.enable_compile_cache(args.compile_cache)

  import jalign
  from jalign.data import DataError, TokenizerError
  from jalign.score import data_settings
  try:
    _check(args)
    model = jalign.load(args.checkpoint)
    if model.tokenizer is None:
      raise ValueError(f"{args.checkpoint} has no tokenizer")
    tok = model.tokenizer
    data_cfg, template = data_settings(argparse.Namespace(**vars(args), add_eos=None, max_seq_len=None,
                                                          truncation="error"))
    prompts = Prompts(tok, data_cfg, template)
    engine = Engine(model.params, model.config, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    top_k_cap=args.top_k, pad_id=tok.pad_id)
    rows = read_rows(args.input, prompts, engine.buckets[-1], args.attributes)
    start = rows_done(args.output, rows)
  except (ValueError, DataError, TokenizerError, FileNotFoundError) as e:
    print(f"jalign.generate: error: {e}", file=sys.stderr)
    return 2

  from tqdm import tqdm
  stops = stop_ids(tok, template, prompts.b.chat_tokens)
  end_of_turn = prompts.b.chat_tokens.end_of_turn if template == "nemo" else ""
  respond = Responses(tok, stops, end_of_turn, args.stop)
  sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens)
  with open(args.output, "a") as f, tqdm(total=len(rows), initial=start, desc="generate", file=sys.stderr,
                                         disable=None) as bar:
    run(engine, rows, start, f, sampling, args, respond, stops, bar)
  print(f"generated {len(rows) - start} rows ({start} already there) -> {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
