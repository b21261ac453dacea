"""``python -m jalign.distill topk --teacher CK --input sft.jsonl --k 32 --output DIR``: the teacher's top-K logits.

The teacher (a jalign model dir or run, an HF dir or a ``.nemo``) runs over the tokenised SFT rows (data settings
from ``--config``, the experiment the student will train with, else the defaults; flags override) and, per position
t of each row (t predicts token t+1), keeps its K largest logits minus the position's maximum (sorted descending),
their token ids and the log-sum-exp of the shifted logits. ``DIR`` then holds:

- ``index.json``: ``{"format": "jalign.topk", "version": 1, "k", "vocab_size", "num_rows", "teacher", "input",
  "input_sha256", "data": {...settings...}, "shards": [{"name", "rows", "length"}]}``;
- per shard ``NAME.tokens.npy`` int32 [n, L], ``NAME.loss_mask.npy`` bool [n, L] (token is a target),
  ``NAME.lengths.npy`` int32 [n], ``NAME.topk_logits.npy`` float32 [n, L, K], ``NAME.topk_token_ids.npy`` int32
  [n, L, K], ``NAME.log_sum_exp_logits.npy`` float32 [n, L]; positions past a row's length are zero (tokens: pad).

``load_topk_rows`` reads such a directory or NeMo-Aligner's KD JSONL (``compute_topk_logits.py``): one file, or a
path containing ``CHUNK_ID`` read for 0, 1, ... while the files exist; each line holds the SFT item's ``tokens``,
``labels`` (= tokens shifted left by one), ``loss_mask`` (per label) and ``topk_logits``, ``topk_token_ids``,
``log_sum_exp_logits``, one entry per token position.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys

import numpy as np

from jalign.data.formats import DataError, Example

FORMAT, VERSION = "jalign.topk", 1
ARRAYS = {"tokens": (np.int32, 2), "loss_mask": (np.bool_, 2), "lengths": (np.int32, 1),
          "topk_logits": (np.float32, 3), "topk_token_ids": (np.int32, 3), "log_sum_exp_logits": (np.float32, 2)}
CHUNK_ID = "CHUNK_ID"


@dataclasses.dataclass
class TopKRow:
  """One sequence of n tokens and, per position t (predicting token t+1), the teacher's top-K."""
  tokens: np.ndarray              # [n] int32
  loss_mask: np.ndarray           # [n] bool: token is a target
  topk_logits: np.ndarray         # [n, K] float32, sorted descending
  topk_token_ids: np.ndarray      # [n, K] int32
  log_sum_exp_logits: np.ndarray  # [n] float32


# ------------------------------------------------------------------------------------------- NeMo-Aligner JSONL

def chunk_files(path: str) -> list[str]:
  """``path`` itself, or the files ``path`` names with ``CHUNK_ID`` = 0, 1, ... (as NeMo-Aligner's chunked_jsonl)."""
  if CHUNK_ID not in path:
    return [path]
  files = []
  while os.path.exists(path.replace(CHUNK_ID, str(len(files)))):
    files.append(path.replace(CHUNK_ID, str(len(files))))
  if not files:
    raise DataError(path, 0, None, f"no chunk files found ({CHUNK_ID} = 0, 1, ...)")
  return files


def _array(obj, key, path, line, kind, ndim):
  """``obj[key]`` as a numpy array of ``ndim`` dimensions whose dtype kind is one of ``kind``."""
  if key not in obj:
    hint = (" (expected NeMo-Aligner KD rows or a jalign.distill directory; compute the teacher's top-K with "
            "python -m jalign.distill topk)") if key == "topk_logits" else ""
    raise DataError(path, line, key, "missing" + hint)
  try:
    a = np.asarray(obj[key])
  except (ValueError, TypeError):
    a = np.asarray([], object)
  want = {"i": "integers", "f": "numbers", "b": "0/1 values"}[kind[0]]
  if a.ndim != ndim or a.dtype.kind not in kind or (ndim and a.shape[0] == 0) or (ndim == 2 and a.shape[1] == 0):
    shape = "a list" if ndim == 1 else "a list of equal-length lists"
    raise DataError(path, line, key, f"expected {shape} of {want}")
  return a


def nemo_row(obj, path, line) -> TopKRow:
  """A NeMo-Aligner KD item -> TopKRow: the sequence is ``tokens`` up to the last trained label plus that label."""
  tokens = _array(obj, "tokens", path, line, "i", 1)
  labels = _array(obj, "labels", path, line, "i", 1)
  mask = _array(obj, "loss_mask", path, line, "bif", 1)
  logits = _array(obj, "topk_logits", path, line, "if", 2)
  ids = _array(obj, "topk_token_ids", path, line, "i", 2)
  lse = _array(obj, "log_sum_exp_logits", path, line, "if", 1)
  L, K = len(tokens), logits.shape[1]
  for key, a, shape in (("labels", labels, (L,)), ("loss_mask", mask, (L,)), ("topk_logits", logits, (L, K)),
                        ("topk_token_ids", ids, (L, K)), ("log_sum_exp_logits", lse, (L,))):
    if a.shape != shape:
      raise DataError(path, line, key, f"has shape {list(a.shape)}, expected {list(shape)} (tokens has {L})")
  if np.any(np.diff(logits, axis=-1) > 0):
    raise DataError(path, line, "topk_logits", "not sorted in descending order at every position")
  if np.any(ids < 0):
    raise DataError(path, line, "topk_token_ids", "negative token id")
  trained = np.nonzero(mask)[0]
  if not len(trained):
    raise DataError(path, line, "loss_mask", "no trainable tokens in this row")
  p = int(trained[-1])
  bad = np.nonzero(labels[:p] != tokens[1:p + 1])[0]
  if len(bad):
    raise DataError(path, line, "labels", f"labels[{bad[0]}] must equal tokens[{bad[0] + 1}] (labels are the "
                    "tokens shifted left by one)")
  pad = lambda a: np.concatenate([a[:p + 1], np.zeros((1,) + a.shape[1:], a.dtype)])
  return TopKRow(np.append(tokens[:p + 1], labels[p]).astype(np.int32),
                 np.concatenate([[False], mask[:p + 1] != 0]), pad(logits.astype(np.float32)),
                 pad(ids.astype(np.int32)), pad(lse.astype(np.float32)))


def read_nemo(path: str):
  """Yield (file, line, TopKRow) over every chunk file."""
  from jalign.data.formats import read_jsonl
  for f in chunk_files(path):
    for line, obj in read_jsonl(f):
      if isinstance(obj, DataError):
        raise obj
      yield f, line, nemo_row(obj, f, line)


# --------------------------------------------------------------------------------------------- jalign store

def _index_path(path: str) -> str:
  return os.path.join(path, "index.json") if os.path.isdir(path) else path


def read_index(path: str) -> dict:
  ipath = _index_path(path)
  if not os.path.exists(ipath):
    raise DataError(ipath, 0, None, "file not found")
  try:
    with open(ipath) as f:
      index = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(ipath, 0, None, f"malformed JSON: {e}") from None
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise DataError(ipath, 0, "format", f"expected {FORMAT!r} (a python -m jalign.distill topk index)")
  if index.get("version") != VERSION:
    raise DataError(ipath, 0, "version", f"{index.get('version')!r} is not supported (this jalign reads {VERSION})")
  for key, typ in (("k", int), ("shards", list), ("num_rows", int)):
    if not isinstance(index.get(key), typ):
      raise DataError(ipath, 0, key, f"missing or not a{'n integer' if typ is int else ' list'}")
  for i, s in enumerate(index["shards"]):
    if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("rows"), int)):
      raise DataError(ipath, 0, f"shards[{i}]", "expected {\"name\": str, \"rows\": int, \"length\": int}")
  return index


def read_store(path: str):
  """Yield (file, row number, TopKRow) of a ``jalign.distill`` directory, checking every array's shape and type."""
  index = read_index(path)
  root, K = os.path.dirname(os.path.abspath(_index_path(path))), index["k"]
  for s in index["shards"]:
    arrays = {}
    for key, (dtype, ndim) in ARRAYS.items():
      f = os.path.join(root, f"{s['name']}.{key}.npy")
      if not os.path.exists(f):
        raise DataError(f, 0, None, "file not found (listed in index.json)")
      try:
        a = np.load(f, mmap_mode="r")
      except ValueError as e:
        raise DataError(f, 0, None, f"not a .npy array: {e}") from None
      n_expect = (s["rows"],) + ((s.get("length"),) if ndim > 1 else ()) + ((K,) if ndim == 3 else ())
      if a.dtype != dtype or a.shape != n_expect:
        raise DataError(f, 0, key, f"{a.dtype}{list(a.shape)}, index.json says {np.dtype(dtype)}{list(n_expect)}")
      arrays[key] = a
    for i in range(s["rows"]):
      n = int(arrays["lengths"][i])
      if not 2 <= n <= s["length"]:
        raise DataError(os.path.join(root, f"{s['name']}.lengths.npy"), 0, "lengths",
                        f"row {i}: length {n} not in [2, {s['length']}]")
      yield (os.path.join(root, s["name"]), i + 1,
             TopKRow(*(np.asarray(arrays[k][i, :n]) for k in ("tokens", "loss_mask", "topk_logits",
                                                                "topk_token_ids", "log_sum_exp_logits"))))


def write_store(out_dir: str, rows: list[TopKRow], meta: dict, rows_per_shard: int = 4096, pad_id: int = 0):
  """Write ``rows`` as shards of ``rows_per_shard`` plus ``index.json`` (written last, replacing an old one)."""
  os.makedirs(out_dir, exist_ok=True)
  K = rows[0].topk_logits.shape[1]
  shards = []
  for start in range(0, len(rows), rows_per_shard):
    part = rows[start:start + rows_per_shard]
    name, L = f"shard-{len(shards):05d}", max(len(r.tokens) for r in part)
    arr = {"tokens": np.full((len(part), L), pad_id, np.int32), "loss_mask": np.zeros((len(part), L), bool),
           "lengths": np.array([len(r.tokens) for r in part], np.int32),
           "topk_logits": np.zeros((len(part), L, K), np.float32),
           "topk_token_ids": np.zeros((len(part), L, K), np.int32),
           "log_sum_exp_logits": np.zeros((len(part), L), np.float32)}
    for i, r in enumerate(part):
      n = len(r.tokens)
      for key in ("tokens", "loss_mask", "topk_logits", "topk_token_ids", "log_sum_exp_logits"):
        arr[key][i, :n] = getattr(r, key)
    for key, a in arr.items():
      np.save(os.path.join(out_dir, f"{name}.{key}.npy"), a)
    shards.append({"name": name, "rows": len(part), "length": L})
  index = {"format": FORMAT, "version": VERSION, "k": K, "num_rows": len(rows), **meta, "shards": shards}
  tmp = os.path.join(out_dir, "index.json.tmp")
  with open(tmp, "w") as f:
    json.dump(index, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, "index.json"))
  return index


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


# ------------------------------------------------------------------------------------------ rows for training

def read_topk(path: str):
  """Yield (file, line or row number, TopKRow) from a jalign.distill directory (or its index.json) or NeMo JSONL."""
  if os.path.isdir(path) or path.endswith(".json"):
    return read_store(path)
  return read_nemo(path)


def load_topk_rows(path: str, k: int, max_len: int, pad_id: int, vocab_size: int, source: str = ""):
  """Training rows (tokens, loss_mask, segment_ids, positions [N, max_len]; topk_logits, topk_token_ids
  [N, max_len, k], the first k of each position) and the Examples. ``source``: the SFT file a jalign.distill
  directory must have been computed from (its SHA-256 is compared)."""
  if source and (os.path.isdir(path) or path.endswith(".json")):
    want = read_index(path).get("input_sha256")
    if want and os.path.exists(source) and sha256(source) != want:
      raise DataError(source, 0, None, f"the top-K in {path} were computed from a different file (SHA-256 "
                      f"{want[:12]}...); recompute them with python -m jalign.distill topk --input {source}")
  out = []
  for f, line, r in read_topk(path):
    n, K = len(r.tokens), r.topk_logits.shape[1]
    if K < k:
      raise DataError(f, line, "topk_logits", f"{K} logits per position, fewer than kd.k={k}")
    if n > max_len:
      raise DataError(f, line, None, f"{n} tokens > data.max_seq_len={max_len}")
    if r.topk_token_ids[:, :k].max() >= vocab_size or r.tokens.max() >= vocab_size:
      raise DataError(f, line, "topk_token_ids", f"token id >= the student's vocabulary size {vocab_size}")
    if not r.loss_mask.any():
      raise DataError(f, line, "loss_mask", "no trainable tokens in this row")
    out.append(r)
  if not out:
    raise DataError(path, 0, None, "no rows")
  N = len(out)
  rows = {"tokens": np.full((N, max_len), pad_id, np.int32), "loss_mask": np.zeros((N, max_len), bool),
          "segment_ids": np.zeros((N, max_len), np.int32), "positions": np.zeros((N, max_len), np.int32),
          "topk_logits": np.zeros((N, max_len, k), np.float32),
          "topk_token_ids": np.zeros((N, max_len, k), np.int32)}
  for i, r in enumerate(out):
    n = len(r.tokens)
    rows["tokens"][i, :n], rows["loss_mask"][i, :n] = r.tokens, r.loss_mask
    rows["segment_ids"][i, :n], rows["positions"][i, :n] = 1, np.arange(n)
    rows["topk_logits"][i, :n], rows["topk_token_ids"][i, :n] = r.topk_logits[:, :k], r.topk_token_ids[:, :k]
  return rows, [Example(r.tokens, r.loss_mask) for r in out]


# ------------------------------------------------------------------------------------------- teacher forward

def _bucket(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def compute_topk(params, model_cfg, examples: list[Example], k: int, batch_size: int, pad_id: int,
                 progress=None) -> list[TopKRow]:
  """The teacher's top-K at every position of every example; rows of similar length are batched together."""
  import jax

  from jalign.algorithms import kd
  from jalign.models import transformer

  @jax.jit
  def fn(p, tokens_BT, segment_ids_BT):
    logits_BTV = transformer.forward(p, tokens_BT, model_cfg, segment_ids_BT=segment_ids_BT)
    return kd.teacher_topk(logits_BTV, k)

  out = [None] * len(examples)
  order = np.argsort([len(e.tokens) for e in examples], kind="stable")
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    T = _bucket(max(len(examples[i].tokens) for i in idx))
    tokens = np.full((batch_size, T), pad_id, np.int32)
    seg = np.zeros((batch_size, T), np.int32)
    for j, i in enumerate(idx):
      n = len(examples[i].tokens)
      tokens[j, :n], seg[j, :n] = examples[i].tokens, 1
    vals, ids, lse = (np.asarray(x) for x in fn(params, tokens, seg))
    for j, i in enumerate(idx):
      n, ex = len(examples[i].tokens), examples[i]
      out[i] = TopKRow(np.asarray(ex.tokens, np.int32), np.asarray(ex.loss_mask, bool), vals[j, :n], ids[j, :n],
                       lse[j, :n])
    if progress is not None:
      progress.update(len(idx))
  return out


# ------------------------------------------------------------------------------------------------------ CLI

class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2
    print(f"jalign.distill: error: {message}", file=sys.stderr)
    sys.exit(2)


def _bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes"):
    return True
  if s.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def data_settings(args):
  """(data config, chat template): ``--config``'s (else the defaults), then the flags."""
  from jalign import config as config_lib
  cfg = config_lib.base_config()
  if args.config:
    config_lib._merge(cfg, config_lib.load_config_file(args.config))
  d = cfg.data
  for key in ("max_seq_len", "add_bos", "add_eos", "truncation"):
    if getattr(args, key) is not None:
      d[key] = getattr(args, key)
  return d, args.chat_template or cfg.tokenizer.chat_template


def topk_main(args) -> int:
  import jalign
  from jalign.data import load_sft_examples
  if args.k < 1 or args.batch_size < 1 or args.rows_per_shard < 1:
    raise ValueError("--k, --batch-size and --rows-per-shard must be >= 1")
  data_cfg, template = data_settings(args)
  model = jalign.load(args.teacher)
  if model.tokenizer is None:
    raise ValueError(f"{args.teacher} has no tokenizer")
  if args.k > model.config.vocab_size:
    raise ValueError(f"--k {args.k} > the teacher's vocabulary size {model.config.vocab_size}")
  examples, _ = load_sft_examples(args.input, model.tokenizer, data_cfg, template)
  from tqdm import tqdm
  with tqdm(total=len(examples), desc="teacher top-K", file=sys.stderr, disable=None) as bar:
    rows = compute_topk(model.params, model.config, examples, args.k, args.batch_size, model.tokenizer.pad_id, bar)
  meta = {"vocab_size": model.config.vocab_size, "teacher": os.path.abspath(args.teacher),
          "input": os.path.abspath(args.input), "input_sha256": sha256(args.input),
          "data": {**{key: data_cfg[key] for key in ("max_seq_len", "add_bos", "add_eos", "truncation",
                                                    "answer_only_loss", "prompt_template")},
                   "chat_prompt_tokens": data_cfg.chat_prompt_tokens.to_dict(), "chat_template": template}}
  index = write_store(args.output, rows, meta, args.rows_per_shard, model.tokenizer.pad_id)
  print(f"wrote the teacher's top-{args.k} logits of {index['num_rows']} rows in {len(index['shards'])} shard(s) "
        f"-> {args.output} (train with algorithm=kd, kd.topk_path={args.output})")
  return 0


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  p = _Parser(prog="python -m jalign.distill", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
  t = sub.add_parser("topk", help="store the teacher's top-K logits of SFT rows")
  t.add_argument("--teacher", required=True, help="a jalign model dir or run, an HF dir or a .nemo")
  t.add_argument("--input", required=True, help="SFT JSONL (the formats algorithm=sft reads)")
  t.add_argument("--output", required=True, help="output directory")
  t.add_argument("--k", type=int, default=32)
  t.add_argument("--config", help="experiment config whose data.* and tokenizer.chat_template tokenise the rows")
  t.add_argument("--max-seq-len", dest="max_seq_len", type=int)
  t.add_argument("--add-bos", dest="add_bos", type=_bool)
  t.add_argument("--add-eos", dest="add_eos", type=_bool)
  t.add_argument("--truncation", choices=("error", "left", "right"))
  t.add_argument("--chat-template", choices=("nemo", "hf"))
  t.add_argument("--batch-size", type=int, default=16)
  t.add_argument("--rows-per-shard", type=int, default=4096)
  args = p.parse_args(argv)

  from jalign.checkpoint import CheckpointError
  from jalign.config import ConfigError
  from jalign.data import TokenizerError
  try:
    return topk_main(args)
  except (ValueError, DataError, TokenizerError, CheckpointError, ConfigError, OSError) as e:
    print(f"jalign.distill: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
