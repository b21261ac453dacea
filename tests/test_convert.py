"""HF <-> jalign conversion: logit parity with transformers, exact round trips, clear errors."""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jalign  # noqa: E402
from jalign import convert  # noqa: E402
from jalign.convert import hf as hf_lib  # noqa: E402

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama31": ("LlamaConfig", "LlamaForCausalLM",
                {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}),
}


def build_hf(tmp_path, name):
  cfg_cls, model_cls, extra = ARCHS[name]
  torch.manual_seed(0)
  cfg = getattr(transformers, cfg_cls)(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       rms_norm_eps=1e-6, **extra)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.copy_((0.0 if name == "gemma" else 1.0) + 0.1 * torch.randn_like(p))
      elif pname.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  d = tmp_path / f"hf_{name}"
  model.save_pretrained(d, safe_serialization=True)
  return model, str(d)


def greedy_torch(model, prompt, n):
  ids = torch.tensor([prompt])
  with torch.no_grad():
    for _ in range(n):
      nxt = model(ids).logits[0, -1].argmax()
      ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
  return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_parity_and_exact_round_trip(tmp_path, arch):
  model, src = build_hf(tmp_path, arch)
  dst = str(tmp_path / "jalign")
  convert.hf_to_jalign(src, dst)
  loaded = jalign.load(dst)
  tokens = np.random.RandomState(0).randint(0, 101, (2, 20))
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(loaded(tokens))
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
  prompt = [5, 17, 42]
  (gen,) = loaded.generate([prompt], max_new_tokens=20)
  assert gen == greedy_torch(model, prompt, 20)
  # back to HF: every tensor reproduced exactly, and transformers loads it
  back = str(tmp_path / "back")
  convert.jalign_to_hf(dst, back)
  orig, again = hf_lib.HFTensors(src), hf_lib.HFTensors(back)
  assert set(again.weight_map) == set(orig.weight_map)
  for k in orig.weight_map:
    np.testing.assert_array_equal(again.get(k), orig.get(k), err_msg=k)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(torch.tensor(tokens)).logits.numpy(), want, atol=1e-5)


def test_transformers_4x_config_layout(tmp_path):
  _, src = build_hf(tmp_path, "llama31")
  with open(os.path.join(src, "config.json")) as f:
    v5 = json.load(f)
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters",)}
  rope = dict(v5.get("rope_parameters") or v5.get("rope_scaling"))
  v4["rope_theta"] = rope.pop("rope_theta", 10000.0)
  v4["rope_scaling"] = rope
  assert hf_lib.model_config_from_hf(v4) == hf_lib.model_config_from_hf(v5)
  assert hf_lib.model_config_from_hf(v5)["rope_scaling"] == "llama3"


def test_errors_name_architecture_and_tensor(tmp_path):
  _, src = build_hf(tmp_path, "llama")
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  bad = dict(cfg, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(convert.ConversionError, match="unsupported architecture 'GPT2LMHeadModel'; supported: "
                     "LlamaForCausalLM"):
    hf_lib.model_config_from_hf(bad)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(src, "model.safetensors"))
  missing = tmp_path / "missing"
  shutil.copytree(src, missing)
  save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k},
            str(missing / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
    convert.hf_to_jalign(str(missing), str(tmp_path / "o1"))
  shaped = tmp_path / "shaped"
  shutil.copytree(src, shaped)
  save_file(dict(tensors, **{"model.norm.weight": np.ones(63, np.float32)}), str(shaped / "model.safetensors"))
  with pytest.raises(convert.ConversionError, match=r"'model.norm.weight' has shape \(63,\), expected \(64,\)"):
    convert.hf_to_jalign(str(shaped), str(tmp_path / "o2"))


def test_value_head_exports_as_sequence_classification(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
  model = transformers.LlamaForSequenceClassification(cfg).eval()
  src = str(tmp_path / "rm")
  model.save_pretrained(src)
  dst = str(tmp_path / "j")
  convert.hf_to_jalign(src, dst)
  loaded = jalign.load(dst)
  assert loaded.config.num_value_heads == 3
  from jalign.models import transformer
  tokens = np.array([[5, 6, 7, 8, 9]])
  h = transformer.hidden_states(loaded.params, tokens, loaded.config)
  ours = np.asarray(transformer.values_from_hidden(loaded.params, h))[:, -1]
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  back = str(tmp_path / "back")
  convert.jalign_to_hf(dst, back)
  again = transformers.AutoModelForSequenceClassification.from_pretrained(back).eval()
  with torch.no_grad():
    np.testing.assert_allclose(again(torch.tensor(tokens)).logits.numpy(), theirs, atol=1e-5)


def test_cli(tmp_path):
  from jalign.convert.__main__ import main
  _, src = build_hf(tmp_path, "qwen2")
  assert main(["hf-to-jalign", src, str(tmp_path / "j")]) == 0
  assert main(["jalign-to-hf", str(tmp_path / "j"), str(tmp_path / "h"), "--dtype", "bfloat16"]) == 0
  cfg = json.load(open(tmp_path / "h" / "config.json"))
  assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is True
  assert main(["hf-to-jalign", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2


def _regression_rm(directory):
  """The SFT quickstart model with a random 3-attribute value head whose bias is non-zero."""
  from jalign import checkpoint
  cfg, params, meta = convert.read_jalign_dir("examples/tiny_sft_model")
  rng = np.random.RandomState(0)
  bias = np.array([0.75, -1.25, 2.5], np.float32)
  params["value_head"] = {"w": rng.normal(0, 0.1, (cfg.hidden_size, 3)).astype(np.float32), "b": bias}
  checkpoint.save_model(directory, params, dict(meta, num_value_heads=3))
  shutil.copy("examples/tiny_sft_model/tokenizer.model", directory)
  return bias


def _scores(checkpoint, rows_path, out_path):
  from jalign import score
  assert score.main(["--checkpoint", checkpoint, "--input", rows_path, "--output", out_path, "--add-bos", "true",
                     "--add-eos", "false"]) == 0
  return np.array([json.loads(ln)["reward"] for ln in open(out_path)])


def test_value_head_bias_is_recorded_on_export(tmp_path, capsys):
  """HF's `score` layer has no bias: jalign-to-hf refuses a non-zero one unless --drop-bias, which records it in
  config.json; transformers' logits plus it, and jalign.score of the exported directory, equal the original's."""
  from jalign.convert.__main__ import main
  from jalign.data import load_tokenizer
  rm = str(tmp_path / "rm")
  bias = _regression_rm(rm)
  texts = ["what is 2+3? 5.", "reverse abc: cba.", "what is 7+1? 9.", "hello"]
  rows = tmp_path / "rows.jsonl"
  rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  want = _scores(rm, str(rows), str(tmp_path / "want.jsonl"))
  assert want.shape == (4, 3)

  hf_dir = str(tmp_path / "hf")
  capsys.readouterr()
  assert main(["jalign-to-hf", rm, hf_dir]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jalign.convert: error: ") and err.count("\n") == 1 and "--drop-bias" in err
  assert not os.path.exists(hf_dir)
  assert main(["jalign-to-hf", rm, hf_dir, "--drop-bias"]) == 0

  model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
  assert type(model).__name__ == "LlamaForSequenceClassification"
  recorded = np.array(model.config.jalign_value_head_bias)
  np.testing.assert_array_equal(recorded, bias)
  tok = load_tokenizer(rm)
  for text, w in zip(texts, want):
    with torch.no_grad():
      logits = model(torch.tensor([[tok.bos_id] + tok.encode(text)])).logits[0].numpy()
    np.testing.assert_allclose(logits + recorded, w, atol=1e-5, rtol=0)

  back = str(tmp_path / "back")
  assert main(["hf-to-jalign", hf_dir, back]) == 0
  np.testing.assert_array_equal(convert.read_jalign_dir(back)[1]["value_head"]["b"], bias)
  for ckpt in (hf_dir, back):
    np.testing.assert_allclose(_scores(ckpt, str(rows), str(tmp_path / "got.jsonl")), want, atol=1e-5, rtol=0)


def _tiny_tokenizer(directory, vocab_size):
  """A WordPiece-free character-level tokenizer.json (+ config) of at most ``vocab_size`` tokens."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  chars = list("abcdefghijklmnopqrstuvwxyz0123456789+=?. \n")
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
  assert len(vocab) <= vocab_size
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  tok.decoder = decoders.Fuse()
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def test_round_trip_through_sft(tmp_path):
  """HF -> jalign -> a few SFT steps -> HF: transformers' logits equal jalign.load of the trained run."""
  from jalign import config as config_lib
  from jalign import train
  _, src = build_hf(tmp_path, "llama")
  _tiny_tokenizer(src, 101)
  base = str(tmp_path / "base")
  convert.hf_to_jalign(src, base)
  data = tmp_path / "sft.jsonl"
  with open(data, "w") as f:
    for i in range(16):
      f.write(json.dumps({"prompt": f"what is {i}+1?", "completion": f" {i + 1}."}) + "\n")
  cfg = config_lib.base_config()
  config_lib.apply_overrides(cfg, {"model.checkpoint": base, "data.train_path": str(data), "data.max_seq_len": "32",
                                   "train.max_steps": "3", "train.global_batch_size": "8", "optim.lr": "1e-2",
                                   "checkpoint.every_steps": "3", "eval.every_steps": "0"})
  config_lib.validate(cfg)
  run = str(tmp_path / "run")
  train.run(cfg, run)
  out = str(tmp_path / "hf_out")
  convert.jalign_to_hf(run, out)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.random.RandomState(1).randint(0, 101, (2, 16))
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens)).logits.numpy()
  trained = jalign.load(run)
  ours = np.asarray(trained(tokens))
  np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())
  assert np.abs(ours - np.asarray(jalign.load(base)(tokens))).max() > 1e-3  # training changed the weights
  assert trained.tokenizer is not None and trained.tokenizer.encode("1+1") == [30, 39, 30]


def test_streaming_safetensors_writer_shards(tmp_path):
  import ml_dtypes
  from safetensors.numpy import load_file
  ts = [("a", np.arange(6, dtype=np.float32).reshape(2, 3)), ("b", np.ones(5, ml_dtypes.bfloat16)),
        ("c", np.arange(4, dtype=np.float16))]
  hf_lib.write_safetensors(iter(ts), str(tmp_path), max_shard_bytes=30)
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                                 "c": "model-00002-of-00002.safetensors"}
  got = {**load_file(str(tmp_path / "model-00001-of-00002.safetensors")),
         **load_file(str(tmp_path / "model-00002-of-00002.safetensors"))}
  for name, arr in ts:
    assert got[name].dtype == arr.dtype and np.array_equal(got[name], arr)
  assert not [f for f in os.listdir(tmp_path) if f.endswith((".tmp", ".data"))]
