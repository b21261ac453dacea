"""Batches for training and evaluation: packing or padding, then a Grain pipeline.

Rows are fixed-length arrays ``tokens``, ``loss_mask``, ``segment_ids`` (0 = padding, 1.. = packed sequences)
and ``positions`` (restarting at 0 in every segment). Training data is shuffled by seed (reshuffled every epoch),
repeated, and split so that process p of P reads rows p, p+P, ...; the P local batches of a step together hold
exactly the rows a single process would read for that step.
"""
from __future__ import annotations

import grain
import numpy as np

from jalign.data.formats import Example

FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")


def _empty_rows(n, T, pad_id):
  return {"tokens": np.full((n, T), pad_id, np.int32), "loss_mask": np.zeros((n, T), bool),
          "segment_ids": np.zeros((n, T), np.int32), "positions": np.zeros((n, T), np.int32)}


def pad_examples(examples: list[Example], T: int, pad_id: int) -> dict:
  rows = _empty_rows(len(examples), T, pad_id)
  for i, ex in enumerate(examples):
    n = len(ex.tokens)
    rows["tokens"][i, :n] = ex.tokens
    rows["loss_mask"][i, :n] = ex.loss_mask
    rows["segment_ids"][i, :n] = 1
    rows["positions"][i, :n] = np.arange(n)
  return rows


def first_fit_decreasing(lengths, T: int, max_items: int = 0) -> list[list[int]]:
  """Indices of items grouped into bins of capacity T (at most ``max_items`` each; 0: no limit): longest first
  (ties in input order), each into the first bin it fits. Deterministic for a given list of lengths."""
  lengths = np.asarray(lengths)
  capacity = np.zeros(0, np.int64)
  count = np.zeros(0, np.int64)
  bins: list[list[int]] = []
  for i in np.argsort(-lengths, kind="stable"):
    ok = capacity >= lengths[i]
    if max_items:
      ok &= count < max_items
    fits = np.nonzero(ok)[0]
    if len(fits):
      b = int(fits[0])
    else:
      b = len(bins)
      bins.append([])
      capacity, count = np.append(capacity, T), np.append(count, 0)
    bins[b].append(int(i))
    capacity[b] -= lengths[i]
    count[b] += 1
  return bins


def pack_examples(examples: list[Example], T: int, pad_id: int) -> dict:
  """First-fit-decreasing packing into rows of length T (deterministic for a given example list)."""
  lengths = np.array([len(e.tokens) for e in examples])
  bins = first_fit_decreasing(lengths, T)
  rows = _empty_rows(len(bins), T, pad_id)
  for r, members in enumerate(bins):
    pos = 0
    for s, i in enumerate(members, start=1):
      ex, n = examples[i], lengths[i]
      rows["tokens"][r, pos:pos + n] = ex.tokens
      rows["loss_mask"][r, pos:pos + n] = ex.loss_mask
      rows["segment_ids"][r, pos:pos + n] = s
      rows["positions"][r, pos:pos + n] = np.arange(n)
      pos += n
  return rows


def build_rows(examples, T, pad_id, packing: bool) -> dict:
  return pack_examples(examples, T, pad_id) if packing else pad_examples(examples, T, pad_id)


class _Rows:
  """Random-access source over row arrays (what Grain's MapDataset.source needs)."""

  def __init__(self, rows):
    self.rows = rows
    self.n = len(next(iter(rows.values())))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.rows.items()}


def train_dataset(rows: dict, *, global_batch: int, seed: int, shuffle: bool, process_index: int,
                  process_count: int) -> grain.IterDataset:
  if global_batch % process_count:
    raise ValueError(f"train.global_batch_size={global_batch} must be a multiple of the {process_count} processes")
  ds = grain.MapDataset.source(_Rows(rows))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)[process_index::process_count]
  return ds.batch(global_batch // process_count, drop_remainder=True).to_iter_dataset()


def eval_batches(rows: dict, *, global_batch: int, pad_id: int, process_index: int, process_count: int,
                 max_batches: int = 0):
  """Deterministic eval batches; the last one is filled with empty rows (segment_ids and loss_mask zero)."""
  n = len(next(iter(rows.values())))
  n_batches = -(-n // global_batch)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  total = n_batches * global_batch
  if total > n:
    rows = {k: np.concatenate([v, np.full((total - n,) + v.shape[1:], pad_id if k == "tokens" else 0, v.dtype)])
            for k, v in rows.items()}
  local = global_batch // process_count
  for b in range(n_batches):
    idx = b * global_batch + process_index + process_count * np.arange(local)
    yield {k: v[idx] for k, v in rows.items()}
