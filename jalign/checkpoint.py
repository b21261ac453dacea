"""Orbax checkpoints: training state (async, keep-N, with the data-iterator state) and model directories.

A run's checkpoints live in ``WORKDIR/checkpoints/<step>/``; Orbax writes each step to a temporary directory
and renames it when complete, so a run killed during a save resumes from the last complete step.
A *model directory* (``model_config.json``, ``params/``, tokenizer files) is what ``model.checkpoint`` loads
and what a finished run exports to ``WORKDIR/model``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  pass


class Checkpointer:
  """A run's checkpoints: ``state`` (the arrays that change during training), ``data`` (iterator state) and
  ``meta`` (the run's config and digests that resume checks against)."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                        cleanup_tmp_directories=True)
    self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict, force: bool = False) -> bool:
    return self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(data_state),
                                                         meta=ocp.args.JsonSave(meta)), force=force)

  def read_meta(self, step: int) -> dict:
    path = os.path.join(self.directory, str(step), "meta")
    if not os.path.isdir(path):
      raise CheckpointError(f"{os.path.dirname(path)}: written by an older jalign (no meta); resume with the "
                            "version that wrote it, or start a new --workdir")
    return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state):
    out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    """Wait for pending saves and stop the manager's threads; a second call does nothing."""
    if self.mngr is None:
      return
    self.mngr.wait_until_finished()
    self.mngr.close()
    self.mngr = None


def flatten(params: dict, prefix="") -> list[tuple[str, object]]:
  """[("embed", x), ("layers.q", y), ...] in a fixed order."""
  out = []
  for k in sorted(params):
    v = params[k]
    out += flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
  return out


def unflatten(items) -> dict:
  out: dict = {}
  for name, v in items:
    node = out
    *parents, last = name.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def release_freed_memory():
  """Hand memory freed by the serialisation threads back to the OS (glibc keeps it in per-thread arenas)."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


@jax.jit
def _digest_words(x):
  """Two uint32 words of a tensor's exact bits: their sum and a position-weighted sum (both mod 2**32). Integer
  sums do not depend on reduction order, so the digest is the same however the tensor is sharded."""
  bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32))
  bits = bits.reshape(-1).astype(jnp.uint32)
  pos = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * pos, dtype=jnp.uint32)])


def tensor_digest(x) -> str:
  """Content digest of one tensor (dtype, shape and exact values)."""
  words = np.asarray(jax.device_get(_digest_words(x)))
  return f"{jnp.dtype(x.dtype).name}{list(x.shape)}:{int(words[0]):08x}{int(words[1]):08x}"


def tree_digest(tree) -> str:
  """Content digest of a params tree: names, dtypes, shapes and exact values of every tensor."""
  h = hashlib.sha256()
  for name, x in flatten(tree):
    h.update(f"{name}={tensor_digest(x)};".encode())
  return h.hexdigest()[:32]


def fingerprint(path: str) -> str:
  """Content digest of a model directory: its architecture and every tensor's digest (recorded in
  ``params/index.json`` when the directory was written; computed from the tensors for directories without)."""
  model_dir = resolve_model_dir(path)
  with open(os.path.join(model_dir, "params", "index.json")) as f:
    index = json.load(f)
  h = hashlib.sha256(json.dumps(read_model_config(model_dir), sort_keys=True).encode())
  for name in sorted(index):
    digest = index[name].get("digest")
    if digest is None:
      target = jax.ShapeDtypeStruct(tuple(index[name]["shape"]), jnp.dtype(index[name]["dtype"]),
                                    sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
      digest = tensor_digest(load_tensor(model_dir, name, target))
    h.update(f"{name}={digest};".encode())
  return h.hexdigest()[:32]


def save_model(directory: str, params, model_cfg_dict: dict, tokenizer_files=()):
  """Write a model directory: ``params/<name>/`` (one Orbax checkpoint per tensor, so a converter can stream
  tensors through without holding the model), ``params/index.json`` (shape, dtype and content digest per tensor),
  ``model_config.json`` and tokenizer files. ``params`` is a nested dict or an iterable of (dotted name, array)."""
  directory = os.path.abspath(directory)
  params_dir = os.path.join(directory, "params")
  main = jax.process_index() == 0
  if main:
    os.makedirs(params_dir, exist_ok=True)
  items = flatten(params) if isinstance(params, dict) else params
  index = {}
  for name, arr in items:
    # a synchronous checkpointer per tensor: nothing is kept alive between tensors
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      ckptr.save(os.path.join(params_dir, name), args=ocp.args.StandardSave({"x": arr}), force=True)
    index[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "digest": tensor_digest(arr)}
    del arr
    release_freed_memory()
  if main:
    with open(os.path.join(params_dir, "index.json"), "w") as f:
      json.dump(index, f, indent=2)
    with open(os.path.join(directory, "model_config.json"), "w") as f:
      json.dump(model_cfg_dict, f, indent=2, sort_keys=True)
    for src in tokenizer_files:
      if src and os.path.exists(src):
        shutil.copy(src, os.path.join(directory, os.path.basename(src)))


def read_model_config(path: str) -> dict:
  with open(os.path.join(path, "model_config.json")) as f:
    return json.load(f)


def resolve_model_dir(path: str) -> str:
  """A model directory, or a finished run's exported ``model/`` directory."""
  for cand in (path, os.path.join(path, "model")):
    if os.path.exists(os.path.join(cand, "model_config.json")) and os.path.isdir(os.path.join(cand, "params")):
      return cand
  raise CheckpointError(f"{path!r}: not a model directory (model_config.json + params/) nor a finished run "
                        "holding one in model/")


def load_tensor(model_dir: str, name: str, target):
  """One tensor (dotted name) of a model directory, restored into ``target`` (a ShapeDtypeStruct)."""
  params_dir = os.path.abspath(os.path.join(model_dir, "params"))
  return ocp.StandardCheckpointer().restore(os.path.join(params_dir, name), {"x": target})["x"]


def load_params(path: str, abstract_params: dict, optional=("value_head",)) -> dict:
  """Restore params into ``abstract_params`` (ShapeDtypeStructs with shardings), tensor by tensor. Keys in
  ``optional`` are loaded only when the checkpoint has them; a missing or mis-shaped tensor fails naming the
  tensor and both shapes. Tensors the model does not use (say, a reward head when fine-tuning) are skipped."""
  params_dir = os.path.abspath(os.path.join(resolve_model_dir(path), "params"))
  with open(os.path.join(params_dir, "index.json")) as f:
    index = json.load(f)
  saved_top = {name.split(".")[0] for name in index}
  wanted = {k: v for k, v in abstract_params.items() if k not in optional or k in saved_top}
  out = []
  for name, target in flatten(wanted):
    if name not in index:
      raise CheckpointError(f"{path}: tensor {name!r} missing from the checkpoint")
    if tuple(index[name]["shape"]) != tuple(target.shape):
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(index[name]['shape'])} in the checkpoint, "
                            f"the model expects {tuple(target.shape)}")
    out.append((name, load_tensor(os.path.dirname(params_dir), name, target)))
  return unflatten(out)
