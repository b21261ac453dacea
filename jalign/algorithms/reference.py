"""Reference log-probs computed once before offline preference training (``reference=precomputed``), and the
cache that reuses them while the data and the starting weights are unchanged."""
from __future__ import annotations

import json
import os

import numpy as np

FORWARD_KEYS = ("tokens", "loss_mask", "segment_ids", "positions", "branch_ids", "pair_valid")


def forward_keys(rows) -> list[str]:
  """The row arrays the log-prob forward reads (padded pairs: tokens, loss_mask, segment_ids; packed rows add
  positions, branch_ids, pair_valid)."""
  return [k for k in FORWARD_KEYS if k in rows]


def precompute_logps(ref_fn, ref_params, rows, gb, batch_sh, pad_id, pid, nproc):
  """[N, 2] (packed rows: [N, P, 2]) summed reference log-probs of every row, one global batch at a time."""
  import jax

  from jalign import data, trainer
  n = len(rows["tokens"])
  out = None
  sub = {k: rows[k] for k in forward_keys(rows)}
  local = gb // nproc
  for b, batch in enumerate(data.eval_batches(sub, global_batch=gb, pad_id=pad_id, process_index=pid,
                                              process_count=nproc)):
    vals = np.asarray(jax.device_get(ref_fn(ref_params, trainer.to_global(batch, batch_sh))))
    out = np.zeros((n,) + vals.shape[1:], np.float32) if out is None else out
    idx = np.concatenate([b * gb + p + nproc * np.arange(local) for p in range(nproc)])
    keep = idx < n
    out[idx[keep]] = vals[keep]
  return out


def reference_cache(path, named_rows, source, write, compute):
  """Reference log-probs per split, reused from ``path`` when the data and starting weights are unchanged."""
  import hashlib
  out, cached = {}, {}
  if os.path.exists(path):
    with np.load(path) as f:
      cached = {k: f[k] for k in f.files}
  for name, rows in named_rows.items():
    h = hashlib.sha256(source.encode())
    for k in forward_keys(rows):
      h.update(np.ascontiguousarray(rows[k]).tobytes())
    digest = np.frombuffer(h.digest(), np.uint8)
    if name in cached and np.array_equal(cached.get(name + "_hash"), digest):
      out[name] = cached[name]
    else:
      out[name] = compute(rows)
      cached[name], cached[name + "_hash"] = out[name], digest
  if write:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **cached)
    os.replace(tmp, path)
  return out


def weights_source(cfg, model_cfg) -> str:
  """What the reference log-probs depend on besides the data: the starting and reference weights' contents
  (random init: the seed), the architecture and dtypes."""
  from jalign import checkpoint
  start = checkpoint.fingerprint(cfg.model.checkpoint) if cfg.model.checkpoint else f"init seed={cfg.seed}"
  ref = checkpoint.fingerprint(cfg.model.reference_checkpoint) if cfg.model.reference_checkpoint else ""
  return json.dumps({"start": start, "reference": ref, "model": model_cfg.to_dict()}, sort_keys=True, default=str)


def attach(r, rows, eval_rows):
  """``reference=precomputed``: add ``ref_logps`` to the train (and eval) rows, from the cache when it matches.
  ``r`` is the run (train.Run); the starting weights are built only when the cache misses."""
  import jax

  from jalign import checkpoint, sharding
  from jalign.algorithms import common
  from jalign.models import lora
  base_sh = {k: r.param_sh[k] for k in r.base_keys}
  ref_fn = jax.jit(sharding.bind(lambda p, b: common.pair_logps(p, b, r.model_cfg)[0], r.mesh, r.rules),
                   in_shardings=(base_sh, {k: r.batch_sh[k] for k in forward_keys(rows)}),
                   out_shardings=sharding.replicated(r.mesh))
  ref_params = {}

  def compute(rows_):
    if not ref_params:
      ref_params.update(lora.disabled(r.policy(r.initial_state())))
      if r.cfg.model.reference_checkpoint:
        ref_params.update(checkpoint.load_params(r.cfg.model.reference_checkpoint, r.base_abs))
    return precompute_logps(ref_fn, ref_params, rows_, r.gb, r.batch_sh, r.tok.pad_id, r.pid, r.nproc)

  named = {"train": rows, **({"eval": eval_rows} if eval_rows is not None else {})}
  cache = os.path.join(r.workdir, "reference_logps.npz")
  for name, logps in reference_cache(cache, named, weights_source(r.cfg, r.model_cfg), r.main_proc,
                                     compute).items():
    named[name]["ref_logps"] = logps
