"""Hugging Face model directories <-> jalign parameters, tensor by tensor.

Supported architectures: Llama (2, 3, 3.1 RoPE scaling), Mistral (sliding window), Qwen2/2.5 (q/k/v bias,
tied embeddings) and Gemma (embedding scaling, (1+w) RMSNorm, GeGLU), as ``...ForCausalLM`` or
``...ForSequenceClassification`` (the ``score`` head becomes jalign's value head). Both transformers 4.x and
5.x ``config.json`` layouts are read (5.x moves ``rope_theta`` into ``rope_parameters``).
"""
from __future__ import annotations

import json
import os

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
SUPPORTED = tuple(f"{name}{head}" for name in ("Llama", "Mistral", "Qwen2", "Gemma")
                  for head in ("ForCausalLM", "ForSequenceClassification"))
HF_CLASS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma"}


class ConversionError(ValueError):
  pass


# HF's ``score`` layer has no bias: jalign-to-hf --drop-bias records the value head's here, and reading restores it
VALUE_BIAS_KEY = "jalign_value_head_bias"


def model_config_from_hf(hf: dict) -> dict:
  """jalign ModelConfig fields from an HF ``config.json`` dict."""
  arch = (hf.get("architectures") or [""])[0]
  family = hf.get("model_type", "")
  if arch not in SUPPORTED or family not in FAMILIES:
    raise ConversionError(f"unsupported architecture {arch or family!r}; supported: {', '.join(SUPPORTED)}")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = rope.get("rope_theta") or hf.get("rope_theta") or 10000.0
  rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
  heads = hf["num_attention_heads"]
  cfg = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
             num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
             head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_size=hf["intermediate_size"],
             rope_theta=float(theta), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
             qkv_bias=bool(hf.get("attention_bias", False)) or family == "qwen2",
             tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma")),
             sliding_window=0)
  if family == "mistral" and hf.get("sliding_window"):
    cfg["sliding_window"] = int(hf["sliding_window"])
  if family == "qwen2" and hf.get("use_sliding_window") and hf.get("sliding_window"):
    cfg["sliding_window"] = int(hf["sliding_window"])
  if rtype == "linear":
    cfg.update(rope_scaling="linear", rope_factor=float(rope["factor"]))
  elif rtype == "llama3":
    cfg.update(rope_scaling="llama3", rope_factor=float(rope["factor"]),
               rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]),
               rope_original_max_position=int(rope["original_max_position_embeddings"]))
  elif rtype != "default":
    raise ConversionError(f"unsupported rope scaling {rtype!r}; supported: default, linear, llama3")
  if family == "gemma":
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if "gelu" not in act:
      raise ConversionError(f"unsupported Gemma activation {act!r}")
    cfg.update(activation="gelu_tanh", norm_offset=1.0, scale_embeddings=True)
  else:
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise ConversionError(f"unsupported activation {act!r} for {arch}")
  if arch.endswith("ForSequenceClassification"):
    cfg["num_value_heads"] = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 1)
    cfg["tie_embeddings"] = True  # no LM head in the checkpoint: the (unused) output layer is the embedding
  return cfg


def hf_config_from_model(cfg: dict, family: str, dtype: str = "float32", value_bias=None) -> dict:
  """An HF ``config.json`` dict for jalign ModelConfig fields (readable by transformers 4.x and 5.x), recording
  ``value_bias`` (the value head's bias) when given."""
  if family not in FAMILIES:
    raise ConversionError(f"unknown family {family!r}; choose from {FAMILIES}")
  head = "ForSequenceClassification" if cfg.get("num_value_heads") else "ForCausalLM"
  rope = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
  if cfg["rope_scaling"] == "linear":
    rope.update(rope_type="linear", factor=cfg["rope_factor"])
  elif cfg["rope_scaling"] == "llama3":
    rope.update(rope_type="llama3", factor=cfg["rope_factor"], low_freq_factor=cfg["rope_low_freq_factor"],
                high_freq_factor=cfg["rope_high_freq_factor"],
                original_max_position_embeddings=cfg["rope_original_max_position"])
  hf = {"architectures": [HF_CLASS[family] + head], "model_type": family, "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_layers"],
        "num_attention_heads": cfg["num_heads"], "num_key_value_heads": cfg["num_kv_heads"],
        "head_dim": cfg["head_dim"] or cfg["hidden_size"] // cfg["num_heads"],
        "intermediate_size": cfg["ffn_size"], "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_theta": cfg["rope_theta"], "rope_parameters": rope,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "tie_word_embeddings": cfg["tie_embeddings"], "max_position_embeddings": 8192,
        "torch_dtype": dtype, "dtype": dtype}
  if family == "llama":
    hf.update(attention_bias=cfg["qkv_bias"], mlp_bias=False, hidden_act="silu")
  elif family == "mistral":
    hf.update(sliding_window=cfg["sliding_window"] or None, hidden_act="silu")
  elif family == "qwen2":
    hf.update(hidden_act="silu", use_sliding_window=bool(cfg["sliding_window"]),
              sliding_window=cfg["sliding_window"] or None)
  else:
    hf.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")
  if cfg.get("num_value_heads"):
    hf.update(num_labels=cfg["num_value_heads"], pad_token_id=0,
              id2label={str(i): f"LABEL_{i}" for i in range(cfg["num_value_heads"])},
              label2id={f"LABEL_{i}": i for i in range(cfg["num_value_heads"])})
  if value_bias is not None:
    hf[VALUE_BIAS_KEY] = [float(b) for b in value_bias]
  return hf


def value_bias_from_hf(hf: dict, n: int) -> np.ndarray:
  """The value-head bias recorded in an HF ``config.json`` dict; zeros when none is."""
  b = hf.get(VALUE_BIAS_KEY)
  if b is None:
    return np.zeros(n, np.float32)
  if len(b) != n:
    raise ConversionError(f"config.json: {VALUE_BIAS_KEY} has {len(b)} values; the score head has {n} outputs")
  return np.asarray(b, np.float32)


# --------------------------------------------------------------------------------------------- tensors

class HFTensors:
  """Lazy access to the tensors of an HF directory (``model.safetensors`` or a sharded index)."""

  def __init__(self, directory: str):
    from safetensors import safe_open
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        wm = json.load(f)["weight_map"]
    elif os.path.exists(single):
      with safe_open(single, framework="np") as f:
        wm = {k: "model.safetensors" for k in f.keys()}
    else:
      raise ConversionError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    self.weight_map = wm

  def __contains__(self, name):
    return name in self.weight_map

  def get(self, name: str) -> np.ndarray:
    """A copy of one tensor; the file is mapped only while reading it, so the pages of tensors already read do
    not stay resident."""
    from safetensors import safe_open
    if name not in self.weight_map:
      raise ConversionError(f"{self.directory}: tensor {name!r} is missing")
    with safe_open(os.path.join(self.directory, self.weight_map[name]), framework="np") as f:
      return np.array(f.get_tensor(name))

def _layer_map(cfg):
  """jalign layer param -> (HF name in layer i, to_jalign(W), to_hf(w))."""
  D, H, K = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
  Dh = cfg.dh
  m = {
      "attn_norm": ("input_layernorm.weight", lambda w: w, lambda w: w),
      "mlp_norm": ("post_attention_layernorm.weight", lambda w: w, lambda w: w),
      "q": ("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, Dh), lambda w: w.reshape(D, H * Dh).T),
      "k": ("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, Dh), lambda w: w.reshape(D, K * Dh).T),
      "v": ("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, Dh), lambda w: w.reshape(D, K * Dh).T),
      "o": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D), lambda w: w.reshape(H * Dh, D).T),
      "gate": ("mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
      "up": ("mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
      "down": ("mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
  }
  if cfg.qkv_bias:
    m["q_bias"] = ("self_attn.q_proj.bias", lambda w: w.reshape(H, Dh), lambda w: w.reshape(H * Dh))
    m["k_bias"] = ("self_attn.k_proj.bias", lambda w: w.reshape(K, Dh), lambda w: w.reshape(K * Dh))
    m["v_bias"] = ("self_attn.v_proj.bias", lambda w: w.reshape(K, Dh), lambda w: w.reshape(K * Dh))
  return m


def _expect(name, arr, shape, where):
  if tuple(arr.shape) != tuple(shape):
    raise ConversionError(f"{where}: tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
  return arr


def iter_params_from_hf(directory: str, cfg, dtype=np.float32):
  """Yield (dotted jalign name, numpy array) one parameter at a time: at most one stacked parameter and one
  source tensor are in memory at once."""
  from jalign.models.transformer import param_specs
  t = HFTensors(directory)
  specs = param_specs(cfg)
  yield "embed", _expect("model.embed_tokens.weight", t.get("model.embed_tokens.weight"), specs["embed"][0],
                         directory).astype(dtype)
  yield "final_norm", _expect("model.norm.weight", t.get("model.norm.weight"), specs["final_norm"][0],
                              directory).astype(dtype)
  for name, (hf_name, to_j, _) in _layer_map(cfg).items():
    shape = specs["layers"][name][0]
    arr = np.empty(shape, dtype)
    for i in range(cfg.num_layers):
      full = f"model.layers.{i}.{hf_name}"
      w = t.get(full)
      try:
        arr[i] = to_j(w)
      except ValueError:
        raise ConversionError(f"{directory}: tensor {full!r} has shape {tuple(w.shape)}, which does not fit "
                              f"jalign's {shape[1:]}") from None
      del w
    yield f"layers.{name}", arr
    del arr
  if not cfg.tie_embeddings:
    yield "lm_head", np.ascontiguousarray(_expect("lm_head.weight", t.get("lm_head.weight"),
                                                  specs["lm_head"][0][::-1], directory).T, dtype=dtype)
  if cfg.num_value_heads:
    w = _expect("score.weight", t.get("score.weight"), (cfg.num_value_heads, cfg.hidden_size), directory)
    if "score.bias" in t:
      b = t.get("score.bias")
    else:
      with open(os.path.join(directory, "config.json")) as f:
        b = value_bias_from_hf(json.load(f), cfg.num_value_heads)
    yield "value_head.w", w.T.astype(dtype)
    yield "value_head.b", b.astype(dtype)


def params_from_hf(directory: str, cfg, dtype=np.float32) -> dict:
  """Read an HF directory into jalign params (numpy)."""
  from jalign.checkpoint import unflatten
  return unflatten(iter_params_from_hf(directory, cfg, dtype))


def hf_tensors_for(name: str, arr: np.ndarray, cfg):
  """HF (name, tensor) pairs for one jalign parameter (dotted name; LoRA must already be merged)."""
  if name == "embed":
    yield "model.embed_tokens.weight", arr
  elif name == "final_norm":
    yield "model.norm.weight", arr
  elif name == "lm_head":
    if not cfg.tie_embeddings and not cfg.num_value_heads:
      yield "lm_head.weight", np.ascontiguousarray(arr.T)
  elif name.startswith("layers."):
    hf_name, _, to_hf = _layer_map(cfg)[name.split(".", 1)[1]]
    for i in range(cfg.num_layers):
      yield f"model.layers.{i}.{hf_name}", np.ascontiguousarray(to_hf(arr[i]))
  elif name == "value_head.w":
    yield "score.weight", np.ascontiguousarray(arr.T)


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32",
              "int64": "I64", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class _ShardWriter:
  """One safetensors file written as tensors arrive: data goes to a side file, and the header (which must come
  first) is written when the shard closes, so only the tensor in hand is ever in memory."""

  def __init__(self, path):
    self.path, self.header, self.size = path, {}, 0
    self.data = open(path + ".data", "wb")

  def add(self, name, arr):
    arr = np.ascontiguousarray(arr)
    self.header[name] = {"dtype": _ST_DTYPES[str(arr.dtype)], "shape": list(arr.shape),
                         "data_offsets": [self.size, self.size + arr.nbytes]}
    self.data.write(memoryview(arr.reshape(-1).view(np.uint8)))
    self.size += arr.nbytes

  def close(self):
    self.data.close()
    head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(self.path, "wb") as out, open(self.path + ".data", "rb") as src:
      out.write(len(head).to_bytes(8, "little"))
      out.write(head)
      while chunk := src.read(64 << 20):
        out.write(chunk)
    os.remove(self.path + ".data")


def write_safetensors(tensors, directory: str, max_shard_bytes: int = 4 << 30):
  """Write (name, array) pairs as safetensors shards of at most ``max_shard_bytes`` (with an index when there
  is more than one), one tensor in memory at a time."""
  os.makedirs(directory, exist_ok=True)
  shards = [_ShardWriter(os.path.join(directory, "shard-00001.tmp"))]
  for name, arr in tensors:
    if shards[-1].size and shards[-1].size + arr.nbytes > max_shard_bytes:
      shards[-1].close()
      shards.append(_ShardWriter(os.path.join(directory, f"shard-{len(shards) + 1:05d}.tmp")))
    shards[-1].add(name, arr)
    del arr
  shards[-1].close()
  if len(shards) == 1:
    os.replace(shards[0].path, os.path.join(directory, "model.safetensors"))
    return
  weight_map, total = {}, 0
  for i, sh in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    os.replace(sh.path, os.path.join(directory, fname))
    weight_map.update({k: fname for k in sh.header})
    total += sh.size
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
