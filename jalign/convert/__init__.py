"""Weights in and out: Hugging Face directories <-> jalign model directories (``python -m jalign.convert``)."""
from __future__ import annotations

import json
import os
import shutil

from jalign.convert.hf import SUPPORTED, ConversionError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def _copy_tokenizer(src: str, dst: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


def hf_model_config(src: str):
  """(ModelConfig, family) of an HF model directory."""
  from jalign.convert import hf
  from jalign.models import ModelConfig
  cfg_path = os.path.join(src, "config.json")
  if not os.path.exists(cfg_path):
    raise ConversionError(f"{src}: no config.json (not a Hugging Face model directory)")
  with open(cfg_path) as f:
    hf_cfg = json.load(f)
  cfg = ModelConfig(**hf.model_config_from_hf(hf_cfg))
  cfg.validate()
  return cfg, hf_cfg["model_type"]


def read_hf_dir(src: str):
  """(ModelConfig, numpy params, family) of an HF model directory."""
  from jalign.convert import hf
  cfg, family = hf_model_config(src)
  return cfg, hf.params_from_hf(src, cfg), family


def hf_to_jalign(src: str, dst: str) -> str:
  """HF directory -> jalign model directory (Orbax params, model_config.json, tokenizer files), streamed one
  parameter at a time."""
  from jalign import checkpoint
  from jalign.convert import hf
  cfg, family = hf_model_config(src)
  meta = cfg.to_dict()
  meta["hf_family"] = family
  checkpoint.save_model(dst, hf.iter_params_from_hf(src, cfg), meta)
  _copy_tokenizer(src, dst)
  return dst


def read_nemo(src: str):
  """(ModelConfig, numpy params, tokenizer files {name: bytes}) of a .nemo file or extracted directory."""
  from jalign.convert import nemo
  from jalign.models import ModelConfig
  with nemo.NemoDir(src) as nd:
    cfg_kw, params = nemo.params_from_nemo(nd)
    tok_files = {k: open(v, "rb").read() for k, v in nd.tokenizer_files().items()}
  cfg = ModelConfig(**cfg_kw)
  cfg.validate()
  return cfg, params, tok_files


def nemo_to_jalign(src: str, dst: str) -> str:
  """.nemo (tarball or extracted directory) -> jalign model directory; the tokenizer artifact is carried over."""
  from jalign import checkpoint
  cfg, params, tok_files = read_nemo(src)
  meta = cfg.to_dict()
  meta["hf_family"] = "mistral" if cfg.sliding_window else "llama"
  checkpoint.save_model(dst, params, meta)
  write_files(dst, tok_files)
  return dst


def write_files(directory: str, files: dict[str, bytes]) -> None:
  for name, data in files.items():
    with open(os.path.join(directory, name), "wb") as f:
      f.write(data)


def _jalign_dir_target(path: str):
  import jax

  from jalign import checkpoint
  from jalign.models import ModelConfig, param_shapes
  path = checkpoint.resolve_model_dir(path)
  meta = checkpoint.read_model_config(path)
  cfg = ModelConfig.from_config({k: v for k, v in meta.items() if k != "lora_targets"} |
                                {"lora_targets": tuple(meta.get("lora_targets", ("q", "v")))})
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), param_shapes(cfg))
  target.pop("lora", None)
  return path, cfg, meta, target


def read_jalign_dir(path: str):
  """(ModelConfig, params as numpy, metadata dict) of a jalign model directory."""
  import jax

  from jalign import checkpoint
  path, cfg, meta, target = _jalign_dir_target(path)
  params = checkpoint.load_params(path, target)
  return cfg, jax.device_get(params), meta


def _nonzero_value_bias(path: str, target):
  """The value head's bias (numpy) when it has a non-zero one, else None."""
  import jax
  import numpy as np

  from jalign import checkpoint
  leaf = target.get("value_head", {}).get("b")
  if leaf is None:
    return None
  b = np.asarray(jax.device_get(checkpoint.load_tensor(path, "value_head.b", leaf)))
  return b if np.any(b != 0) else None


def jalign_to_hf(src: str, dst: str, family: str | None = None, dtype: str = "float32",
                 drop_bias: bool = False) -> str:
  """jalign model directory -> HF directory loadable by transformers (and vLLM), one parameter at a time.

  HF's ``score`` layer has no bias, so a value head with a non-zero one is refused unless ``drop_bias``: then
  transformers' outputs lack the bias, which config.json records (``jalign_value_head_bias``) for jalign to
  restore."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jalign import checkpoint
  from jalign.convert import hf
  path, cfg, meta, target = _jalign_dir_target(src)
  family = family or meta.get("hf_family") or "llama"
  np_dtype = jnp.dtype(dtype)  # numpy dtypes, bfloat16 included (ml_dtypes)
  bias = _nonzero_value_bias(path, target)
  if bias is not None and not drop_bias:
    raise ConversionError(f"{src}: the value head has a non-zero bias {[float(f'{b:.4g}') for b in bias]} and "
                          "HF's `score` layer has none, so transformers would score rewards without it; pass "
                          f"--drop-bias to export anyway (config.json records it as {hf.VALUE_BIAS_KEY}, which "
                          "jalign restores)")

  def tensors():
    for name, leaf in checkpoint.flatten(target):
      arr = np.asarray(jax.device_get(checkpoint.load_tensor(path, name, leaf)))
      for hf_name, t in hf.hf_tensors_for(name, arr, cfg):
        yield hf_name, t.astype(np_dtype)
      del arr
      checkpoint.release_freed_memory()

  os.makedirs(dst, exist_ok=True)
  hf.write_safetensors(tensors(), dst)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(hf.hf_config_from_model(cfg.to_dict(), family, dtype, bias), f, indent=2)
  _copy_tokenizer(path, dst)
  return dst


__all__ = ["SUPPORTED", "ConversionError", "hf_to_jalign", "jalign_to_hf", "nemo_to_jalign", "read_hf_dir",
           "read_jalign_dir", "read_nemo"]
