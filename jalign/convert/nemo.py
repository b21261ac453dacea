"""NeMo ``.nemo`` checkpoints (Megatron-Core GPT) -> jalign parameters.

A ``.nemo`` is a tar archive (or its extracted directory) holding ``model_config.yaml``, the tokenizer artifacts
and the weights, either as a legacy torch state dict (``model_weights.ckpt``, or per model-parallel rank
``mp_rank_XX/`` / ``tp_rank_XX_pp_rank_XXX/``) or as a Megatron-Core distributed checkpoint
(``model_weights/``, torch_dist format, one tensor per parameter with a leading layer axis). Megatron's padded
vocabulary is cut back to the tokenizer's size, so padding ids can be neither sampled nor scored.

Reading needs ``torch`` (CPU build is enough). Nothing from the archive is executed: members with absolute
paths, ``..`` or links are refused, and pickled weights load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile

import numpy as np

from jalign.convert.hf import ConversionError


def safe_extract(archive: str, dst: str) -> None:
  """Extract a tar, refusing absolute paths, parent references, links and device files."""
  root = os.path.realpath(dst)
  with tarfile.open(archive) as tar:
    members = tar.getmembers()
    for m in members:
      name = m.name
      target = os.path.realpath(os.path.join(root, name))
      if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ConversionError(f"{archive}: refusing member {name!r} (absolute path or '..')")
      if not (target == root or target.startswith(root + os.sep)):
        raise ConversionError(f"{archive}: refusing member {name!r} (outside the target directory)")
      if m.issym() or m.islnk():
        raise ConversionError(f"{archive}: refusing member {name!r} (links are not allowed)")
      if not (m.isfile() or m.isdir()):
        raise ConversionError(f"{archive}: refusing member {name!r} (not a regular file or directory)")
    tar.extractall(root, members=members, filter="data")


class NemoDir:
  """An extracted .nemo (a temporary directory for a tarball; removed by ``close``)."""

  def __init__(self, path: str):
    self._tmp = None
    if os.path.isdir(path):
      self.dir = path
    elif os.path.isfile(path):
      self._tmp = tempfile.mkdtemp(prefix="jalign_nemo_")
      safe_extract(path, self._tmp)
      self.dir = self._tmp
    else:
      raise ConversionError(f"{path}: no such .nemo file or directory")
    cfg = os.path.join(self.dir, "model_config.yaml")
    if not os.path.exists(cfg):
      raise ConversionError(f"{path}: no model_config.yaml (not a .nemo checkpoint)")
    import yaml
    with open(cfg) as f:
      self.config = yaml.safe_load(f)

  def close(self):
    if self._tmp:
      shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def tokenizer_files(self) -> dict[str, str]:
    """{'tokenizer.model' | 'tokenizer.json' | ...: path} for the tokenizer artifacts in the archive."""
    out = {}
    for name in sorted(os.listdir(self.dir)):
      for kind in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if name == kind or name.endswith("_" + kind):
          out[kind] = os.path.join(self.dir, name)
    return out

  def tokenizer_vocab_size(self) -> int | None:
    """The size of the archive's tokenizer (None without one)."""
    from jalign.data import load_tokenizer
    files = self.tokenizer_files()
    path = files.get("tokenizer.json") or files.get("tokenizer.model")
    return load_tokenizer(path).vocab_size if path else None


def model_config_from_nemo(y: dict, vocab_size: int, num_value_heads: int = 0) -> dict:
  if not y.get("mcore_gpt", True):
    raise ConversionError("only Megatron-Core GPT checkpoints (mcore_gpt: true) are supported")
  norm = y.get("normalization", "rmsnorm")
  act = y.get("activation", "fast-swiglu")
  if norm != "rmsnorm" or act not in ("fast-swiglu", "swiglu"):
    raise ConversionError(f"unsupported .nemo model (normalization={norm!r}, activation={act!r}); supported: "
                          "Llama/Mistral-style rmsnorm + swiglu")
  if y.get("position_embedding_type", "rope") != "rope":
    raise ConversionError(f"unsupported position_embedding_type {y.get('position_embedding_type')!r}")
  heads = y["num_attention_heads"]
  cfg = dict(vocab_size=vocab_size, hidden_size=y["hidden_size"], num_layers=y["num_layers"], num_heads=heads,
             num_kv_heads=y.get("num_query_groups") or heads,
             head_dim=y.get("kv_channels") or y["hidden_size"] // heads, ffn_size=y["ffn_hidden_size"],
             rope_theta=float(y.get("rotary_base", 10000.0)), rms_norm_eps=float(y.get("layernorm_epsilon", 1e-5)),
             qkv_bias=bool(y.get("bias", False)),
             tie_embeddings=bool(y.get("share_embeddings_and_output_weights", False)) or bool(num_value_heads),
             num_value_heads=num_value_heads)
  window = y.get("window_size")
  if window:
    cfg["sliding_window"] = int(window[0] if isinstance(window, (list, tuple)) else window)
  factor = y.get("seq_len_interpolation_factor")
  if factor and float(factor) != 1.0:
    cfg.update(rope_scaling="linear", rope_factor=float(factor))
  return cfg


# ----------------------------------------------------------------------------------------- reading weights

_RANK_DIR = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")


def _torch_load(path):
  import torch
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  return {k: v for k, v in sd.items() if hasattr(v, "numpy")}


def _strip(name: str) -> str:
  for p in ("model.module.", "model."):
    if name.startswith(p):
      return name[len(p):]
  return name


def _merge_tp(shards: list[dict]) -> dict:
  """Megatron tensor-parallel shards -> full tensors (QKV in whole query groups and embeddings split on dim 0,
  fc1 stored per rank as [gate_shard; up_shard], proj/fc2 split on dim 1, norms replicated)."""
  if len(shards) == 1:
    return shards[0]
  out = {}
  for k in shards[0]:
    parts = [s[k] for s in shards]
    if parts[0].ndim == 1 and not k.endswith("linear_qkv.bias"):  # norms and the rm_head bias: replicated
      out[k] = parts[0]
    elif k.endswith("linear_fc1.weight"):
      halves = [np.split(p, 2, axis=0) for p in parts]
      out[k] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
    elif k.endswith(("linear_proj.weight", "linear_fc2.weight")) or k == "rm_head.weight":  # row-parallel
      out[k] = np.concatenate(parts, axis=1)
    else:  # linear_qkv weight/bias, word embeddings, output layer
      out[k] = np.concatenate(parts, axis=0)
  return out


def read_legacy(d: str, y: dict) -> dict:
  """Flat {key without 'model.' prefix: numpy} with per-layer keys, merging TP and PP ranks."""
  single = os.path.join(d, "model_weights.ckpt")
  if os.path.isfile(single):
    return {_strip(k): v.float().numpy() for k, v in _torch_load(single).items()}
  ranks = {}
  for name in os.listdir(d):
    m = _RANK_DIR.match(name)
    if m and os.path.isfile(os.path.join(d, name, "model_weights.ckpt")):
      tp = int(m.group(1) if m.group(1) is not None else m.group(2))
      pp = int(m.group(3) or 0)
      ranks[(pp, tp)] = os.path.join(d, name, "model_weights.ckpt")
  if not ranks:
    raise ConversionError(f"{d}: no model_weights.ckpt, rank directories or model_weights/ found")
  pps = sorted({p for p, _ in ranks})
  layers_per_stage = y["num_layers"] // len(pps)
  out = {}
  for pp in pps:
    tps = sorted(t for p, t in ranks if p == pp)
    shards = [{_strip(k): v.float().numpy() for k, v in _torch_load(ranks[(pp, t)]).items()} for t in tps]
    for k, v in _merge_tp(shards).items():
      m = re.match(r"decoder\.layers\.(\d+)\.(.*)", k)
      if m:
        k = f"decoder.layers.{int(m.group(1)) + pp * layers_per_stage}.{m.group(2)}"
      out[k] = v
  return out


def read_distributed(d: str) -> dict:
  """Megatron-Core distributed checkpoint: {key: numpy}, homogeneous layers stacked as [L, ...]."""
  import torch
  import torch.distributed.checkpoint as dcp
  from torch.distributed.checkpoint.metadata import TensorStorageMetadata
  reader = dcp.FileSystemReader(d)
  meta = reader.read_metadata()
  sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata) and not k.endswith("_extra_state")}
  dcp.load(sd, storage_reader=reader, no_dist=True)
  return {_strip(k): v.float().numpy() for k, v in sd.items()}


def params_from_nemo(nemo: NemoDir, dtype=np.float32):
  """(ModelConfig kwargs, jalign params) of an extracted .nemo."""
  y = nemo.config
  dist_dir = os.path.join(nemo.dir, "model_weights")
  stacked = os.path.isdir(dist_dir)
  sd = read_distributed(dist_dir) if stacked else read_legacy(nemo.dir, y)
  embed = sd.get("embedding.word_embeddings.weight")
  if embed is None:
    raise ConversionError(f"{nemo.dir}: tensor 'embedding.word_embeddings.weight' is missing")
  # Megatron pads the vocabulary (make_vocab_size_divisible_by x TP): rows past the tokenizer's are padding
  vocab = min(embed.shape[0], nemo.tokenizer_vocab_size() or embed.shape[0])
  embed = embed[:vocab]
  n_val = sd["rm_head.weight"].shape[0] if "rm_head.weight" in sd else 0
  cfg = model_config_from_nemo(y, vocab, n_val)
  L, D, H, K, F = cfg["num_layers"], cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"], cfg["ffn_size"]
  Dh = cfg["head_dim"]
  G = H // K

  def layer(i, name):
    key = f"decoder.layers.{name}" if stacked else f"decoder.layers.{i}.{name}"
    if key not in sd:
      raise ConversionError(f"{nemo.dir}: tensor {'model.' + key!r} is missing")
    w = sd[key]
    return w[i] if stacked else w

  def expect(name, w, shape):
    if tuple(w.shape) != tuple(shape):
      raise ConversionError(f"{nemo.dir}: tensor 'model.decoder.layers.*.{name}' has shape {tuple(w.shape)}, "
                            f"expected {tuple(shape)}")
    return w

  cols = {k: [] for k in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down", "q_bias", "k_bias",
                          "v_bias")}
  for i in range(L):
    qkv = expect("self_attention.linear_qkv.weight", layer(i, "self_attention.linear_qkv.weight"),
                 ((H + 2 * K) * Dh, D)).reshape(K, G + 2, Dh, D)
    cols["q"].append(qkv[:, :G].reshape(H, Dh, D).transpose(2, 0, 1))
    cols["k"].append(qkv[:, G].transpose(2, 0, 1))
    cols["v"].append(qkv[:, G + 1].transpose(2, 0, 1))
    if cfg["qkv_bias"]:
      b = layer(i, "self_attention.linear_qkv.bias").reshape(K, G + 2, Dh)
      cols["q_bias"].append(b[:, :G].reshape(H, Dh))
      cols["k_bias"].append(b[:, G])
      cols["v_bias"].append(b[:, G + 1])
    cols["attn_norm"].append(layer(i, "self_attention.linear_qkv.layer_norm_weight"))
    cols["o"].append(expect("self_attention.linear_proj.weight", layer(i, "self_attention.linear_proj.weight"),
                            (D, H * Dh)).T.reshape(H, Dh, D))
    cols["mlp_norm"].append(layer(i, "mlp.linear_fc1.layer_norm_weight"))
    fc1 = expect("mlp.linear_fc1.weight", layer(i, "mlp.linear_fc1.weight"), (2 * F, D))
    cols["gate"].append(fc1[:F].T)
    cols["up"].append(fc1[F:].T)
    cols["down"].append(expect("mlp.linear_fc2.weight", layer(i, "mlp.linear_fc2.weight"), (D, F)).T)
  params = {"embed": embed.astype(dtype),
            "layers": {k: np.stack(v).astype(dtype) for k, v in cols.items() if v},
            "final_norm": sd["decoder.final_layernorm.weight"].astype(dtype)}
  if not cfg["tie_embeddings"]:
    if "output_layer.weight" not in sd:
      raise ConversionError(f"{nemo.dir}: tensor 'model.output_layer.weight' is missing")
    params["lm_head"] = sd["output_layer.weight"][:vocab].T.astype(dtype)
  if n_val:
    params["value_head"] = {"w": sd["rm_head.weight"].T.astype(dtype),
                            "b": sd.get("rm_head.bias", np.zeros(n_val)).astype(dtype)}
  return cfg, params
