"""Orbax checkpoints: training state (async, keep-N, with the data-iterator state) and model directories.

A run's checkpoints live in ``WORKDIR/checkpoints/<step>/``; Orbax writes each step to a temporary directory
and renames it when complete, so a run killed during a save resumes from the last complete step.
A *model directory* (``model_config.json``, ``params/``, tokenizer files) is what ``model.checkpoint`` loads
and what a finished run exports to ``WORKDIR/model``.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  pass


class Checkpointer:
  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                        cleanup_tmp_directories=True)
    self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    return self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, step: int, abstract_state):
    out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                           data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def save_model(directory: str, params, model_cfg_dict: dict, tokenizer_files=()):
  """Write a model directory (params through Orbax; config and tokenizer files beside them)."""
  directory = os.path.abspath(directory)
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  params_dir = os.path.join(directory, "params")
  ckptr.save(params_dir, params, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
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


def load_params(path: str, abstract_params: dict, optional=("value_head",)) -> dict:
  """Restore params into ``abstract_params`` (ShapeDtypeStructs with shardings). Keys in ``optional`` are
  loaded only when the checkpoint has them; a missing or mis-shaped tensor fails naming the tensor and both
  shapes. Checkpoint entries the model does not use (say, a reward head when fine-tuning) are read and dropped."""
  ckpt_dir = os.path.abspath(os.path.join(resolve_model_dir(path), "params"))
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(ckpt_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = dict(getattr(tree, "tree", tree))
  wanted = {k: v for k, v in abstract_params.items() if k not in optional or k in tree}
  _check_shapes(wanted, tree, path)
  some = jax.tree.leaves(abstract_params)[0].sharding
  replicated = (jax.sharding.NamedSharding(some.mesh, jax.sharding.PartitionSpec())
                if isinstance(some, jax.sharding.NamedSharding) else some)
  target = dict(wanted)
  for k in tree:
    if k not in target:
      target[k] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
                               tree[k])
  restored = ckptr.restore(ckpt_dir, target)
  return {k: restored[k] for k in wanted}


def _check_shapes(expected, saved, path, prefix=""):
  for k, v in expected.items():
    name = f"{prefix}{k}"
    if k not in saved:
      raise CheckpointError(f"{path}: tensor {name!r} missing from the checkpoint")
    if isinstance(v, dict):
      _check_shapes(v, saved[k], path, name + "/")
    elif tuple(saved[k].shape) != tuple(v.shape):
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(saved[k].shape)} in the checkpoint, "
                            f"the model expects {tuple(v.shape)}")
