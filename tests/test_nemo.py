""".nemo -> jalign: files built from an HF model following NeMo's documented mapping (fused QKV interleaved per
query group, linear_fc1 = [gate; up], layer norms inside the fused linears), in the legacy single-file, legacy
tensor-parallel and Megatron-Core distributed layouts."""
import io
import os
import shutil
import tarfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

import jalign  # noqa: E402
from jalign import convert  # noqa: E402
from jalign.convert import nemo as nemo_lib  # noqa: E402

from hf_reference import tiny_hf_model  # noqa: E402
from test_convert import build_hf  # noqa: E402

TOKENIZER = "examples/tiny_model/tokenizer.model"


def mcore_state_dict(model):
  """HF Llama weights -> Megatron-Core GPT keys (without the 'model.' prefix), per layer."""
  c = model.config
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  H, K, D = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
  d = D // H
  G = H // K
  out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
         "decoder.final_layernorm.weight": sd["model.norm.weight"],
         "output_layer.weight": sd["lm_head.weight"]}
  for i in range(c.num_hidden_layers):
    p = f"model.layers.{i}."
    q = sd[p + "self_attn.q_proj.weight"].reshape(H, d, D)
    k = sd[p + "self_attn.k_proj.weight"].reshape(K, d, D)
    v = sd[p + "self_attn.v_proj.weight"].reshape(K, d, D)
    qkv = np.concatenate([np.concatenate([q[g * G:(g + 1) * G], k[g:g + 1], v[g:g + 1]]) for g in range(K)])
    t = f"decoder.layers.{i}."
    out[t + "self_attention.linear_qkv.weight"] = qkv.reshape((H + 2 * K) * d, D)
    out[t + "self_attention.linear_qkv.layer_norm_weight"] = sd[p + "input_layernorm.weight"]
    out[t + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
    out[t + "mlp.linear_fc1.layer_norm_weight"] = sd[p + "post_attention_layernorm.weight"]
    out[t + "mlp.linear_fc1.weight"] = np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
    out[t + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
  return out


def model_config_yaml(model):
  c = model.config
  return {"mcore_gpt": True, "transformer_engine": True, "num_layers": c.num_hidden_layers,
          "hidden_size": c.hidden_size, "ffn_hidden_size": c.intermediate_size,
          "num_attention_heads": c.num_attention_heads, "num_query_groups": c.num_key_value_heads,
          "encoder_seq_length": 128, "max_position_embeddings": 128, "normalization": "rmsnorm",
          "layernorm_epsilon": c.rms_norm_eps, "activation": "fast-swiglu", "position_embedding_type": "rope",
          "rotary_base": 10000, "rotary_percentage": 1.0, "bias": False,
          "share_embeddings_and_output_weights": False, "make_vocab_size_divisible_by": 128,
          "tokenizer": {"library": "sentencepiece", "type": None, "model": "nemo:a1b2c3_tokenizer.model"}}


def tp_split(sd, tp, G_plus_2, d):
  """Megatron tensor-parallel shards: QKV in whole query groups, fc1 per rank [gate_shard; up_shard]."""
  ranks = [{} for _ in range(tp)]
  for k, v in sd.items():
    if k.endswith("linear_qkv.weight"):
      groups = v.reshape(-1, G_plus_2 * d, v.shape[-1])
      parts = [p.reshape(-1, v.shape[-1]) for p in np.split(groups, tp)]
    elif k.endswith("linear_fc1.weight"):
      gate, up = np.split(v, 2)
      parts = [np.concatenate([g, u]) for g, u in zip(np.split(gate, tp), np.split(up, tp))]
    elif k.endswith(("linear_proj.weight", "linear_fc2.weight")):
      parts = np.split(v, tp, axis=1)
    elif v.ndim == 2:  # embeddings, output layer
      parts = np.split(v, tp)
    else:
      parts = [v] * tp
    for r in range(tp):
      ranks[r][k] = parts[r]
  return ranks


def pad_vocab(sd, rows):
  """Megatron's padded vocabulary: embedding and output rows past the real ones (random here, so that rows kept
  by mistake change the logits' shape and values)."""
  rng = np.random.RandomState(1)
  for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
    v = sd[k]
    sd[k] = np.concatenate([v, rng.normal(0, 1, (rows - len(v), v.shape[1])).astype(v.dtype)])


def write_nemo(model, root, layout, as_tar=True, padded_vocab=None):
  d = os.path.join(root, f"{layout}_dir")
  os.makedirs(d)
  with open(os.path.join(d, "model_config.yaml"), "w") as f:
    yaml.safe_dump(model_config_yaml(model), f)
  shutil.copy(TOKENIZER, os.path.join(d, "a1b2c3_tokenizer.model"))
  sd = mcore_state_dict(model)
  if padded_vocab:
    pad_vocab(sd, padded_vocab)
  to_torch = lambda s: {"model." + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in s.items()}
  if layout == "legacy":
    torch.save(to_torch(sd), os.path.join(d, "model_weights.ckpt"))
  elif layout == "tp2":
    c = model.config
    pad_vocab(sd, -(-len(sd["output_layer.weight"]) // 2) * 2)  # at least a multiple of TP
    G = c.num_attention_heads // c.num_key_value_heads
    for r, shard in enumerate(tp_split(sd, 2, G + 2, c.hidden_size // c.num_attention_heads)):
      os.makedirs(os.path.join(d, f"mp_rank_{r:02d}"))
      torch.save(to_torch(shard), os.path.join(d, f"mp_rank_{r:02d}", "model_weights.ckpt"))
  elif layout == "pp2":  # pipeline parallel: each stage holds its own layers, numbered from 0
    L = model.config.num_hidden_layers
    for stage in range(2):
      shard = {}
      for k, v in sd.items():
        if k.startswith("decoder.layers."):
          i, rest = k[len("decoder.layers."):].split(".", 1)
          if int(i) // (L // 2) == stage:
            shard[f"decoder.layers.{int(i) - stage * (L // 2)}.{rest}"] = v
        elif (k.startswith("embedding") and stage == 0) or (not k.startswith("embedding") and stage == 1):
          shard[k] = v
      rank_dir = os.path.join(d, f"tp_rank_00_pp_rank_{stage:03d}")
      os.makedirs(rank_dir)
      torch.save(to_torch(shard), os.path.join(rank_dir, "model_weights.ckpt"))
  else:  # Megatron-Core distributed: homogeneous layers stacked on a leading axis
    import torch.distributed.checkpoint as dcp
    L = model.config.num_hidden_layers
    stacked = {k: v for k, v in sd.items() if not k.startswith("decoder.layers.")}
    names = {k.split(".", 3)[3] for k in sd if k.startswith("decoder.layers.")}
    for n in names:
      stacked[f"decoder.layers.{n}"] = np.stack([sd[f"decoder.layers.{i}.{n}"] for i in range(L)])
    dcp.save(to_torch(stacked), storage_writer=dcp.FileSystemWriter(os.path.join(d, "model_weights")),
             no_dist=True)
  if not as_tar:
    return d
  path = os.path.join(root, f"{layout}.nemo")
  with tarfile.open(path, "w:") as tar:
    tar.add(d, arcname=".")
  return path


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  model, _ = build_hf(tmp_path_factory.mktemp("hf"), "llama")
  return model


@pytest.mark.parametrize("layout,as_tar", [("legacy", True), ("tp2", True), ("pp2", False), ("dist", True),
                                           ("dist", False)])
def test_nemo_matches_hf_logits(hf_llama, tmp_path, layout, as_tar):
  src = write_nemo(hf_llama, str(tmp_path), layout, as_tar)
  dst = str(tmp_path / "jalign")
  convert.nemo_to_jalign(src, dst)
  assert os.path.exists(os.path.join(dst, "tokenizer.model"))  # the tokenizer artifact is carried over
  tokens = np.random.RandomState(0).randint(0, 101, (2, 16))
  with torch.no_grad():
    want = hf_llama(torch.tensor(tokens)).logits.numpy()
  for loaded in (jalign.load(dst), jalign.load(src)):
    got = np.asarray(loaded(tokens))[..., :want.shape[-1]]  # a padded vocab adds columns
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("layout", ["legacy", "tp2", "dist"])
def test_padded_vocab_rows_are_dropped(tmp_path, layout):
  """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP (320 -> 512 at 128 x 2):
  only the tokenizer's rows are converted, and their logits are the HF model's."""
  import sentencepiece as spm
  vocab = spm.SentencePieceProcessor(model_file=TOKENIZER).get_piece_size()
  assert vocab == 320
  model = tiny_hf_model("llama", vocab_size=vocab)
  src = write_nemo(model, str(tmp_path), layout, padded_vocab=512)
  cfg, params, _ = convert.read_nemo(src)
  assert cfg.vocab_size == vocab and params["embed"].shape == (vocab, 64) and params["lm_head"].shape == (64, vocab)
  tokens = np.random.RandomState(0).randint(0, vocab, (2, 16))
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()
  dst = str(tmp_path / "jalign")
  convert.nemo_to_jalign(src, dst)
  for loaded in (jalign.load(dst), jalign.load(src)):
    got = np.asarray(loaded(tokens))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_rm_head_becomes_value_head(hf_llama, tmp_path):
  d = write_nemo(hf_llama, str(tmp_path), "legacy", as_tar=False)
  sd = torch.load(os.path.join(d, "model_weights.ckpt"), weights_only=True)
  sd["model.rm_head.weight"] = torch.randn(1, 64)
  sd["model.rm_head.bias"] = torch.tensor([0.5])
  del sd["model.output_layer.weight"]
  torch.save(sd, os.path.join(d, "model_weights.ckpt"))
  cfg, params, _ = convert.read_nemo(d)
  assert cfg.num_value_heads == 1
  np.testing.assert_array_equal(params["value_head"]["w"], sd["model.rm_head.weight"].numpy().T)
  np.testing.assert_array_equal(params["value_head"]["b"], [0.5])


def _evil_tar(path, member, kind="file"):
  with tarfile.open(path, "w:") as tar:
    data = b"model_config: nope\n"
    info = tarfile.TarInfo("model_config.yaml")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    info = tarfile.TarInfo(member)
    if kind == "symlink":
      info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
      tar.addfile(info)
    else:
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("member,kind,why", [("../escape.txt", "file", "'..'"), ("/abs.txt", "file", "absolute"),
                                             ("link", "symlink", "links")])
def test_unsafe_archives_are_refused(tmp_path, member, kind, why):
  path = str(tmp_path / "evil.nemo")
  _evil_tar(path, member, kind)
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(convert.ConversionError, match=f"refusing member .*{why}"):
    nemo_lib.safe_extract(path, str(out))
  assert not (tmp_path / "escape.txt").exists() and os.listdir(out) == []
