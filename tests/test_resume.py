"""Checkpoints hold only what training changes; resume checks the config, the data and the frozen weights; the
reference log-prob cache is keyed by weight contents; user errors and stops through the CLI."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jalign import checkpoint
from jalign import config as config_lib
from jalign import train
from jalign.algorithms import reference

SFT_ROWS = 48


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  with open("examples/data/sft_train.jsonl") as f:
    lines = f.readlines()[:SFT_ROWS]
  path = str(d / "train.jsonl")
  with open(path, "w") as f:
    f.writelines(lines)
  return path


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  """A private copy of the shipped base model (tests rewrite it)."""
  dst = str(tmp_path_factory.mktemp("base") / "model")
  shutil.copytree("examples/tiny_model", dst)
  return dst


def make_cfg(path="configs/sft_tiny.py", **overrides):
  cfg = config_lib.base_config()
  config_lib._merge(cfg, config_lib.load_config_file(path))
  base = {"checkpoint.every_steps": "2", "eval.every_steps": "0", "eval.num_samples": "0", "data.eval_path": ""}
  config_lib.apply_overrides(cfg, {**base, **overrides})
  config_lib.validate(cfg)
  return cfg


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def saved_tree(workdir, step):
  meta = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", str(step), "state"))
  return meta.item_metadata.tree


def dir_bytes(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def lora_cfg(small_data, base_model, **extra):
  return make_cfg(**{"model.checkpoint": base_model, "model.lora.rank": "4", "data.train_path": small_data,
                     "train.max_steps": "4", "optim.warmup_steps": "0", **extra})


@pytest.fixture(scope="module")
def lora_runs(small_data, base_model, tmp_path_factory):
  """An uninterrupted 4-step LoRA run, and the same run preempted after step 2."""
  full = str(tmp_path_factory.mktemp("lora_full"))
  train.run(lora_cfg(small_data, base_model), full)
  cut = str(tmp_path_factory.mktemp("lora_cut"))

  def preempt(step, metrics):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  assert train.run(lora_cfg(small_data, base_model), cut, on_step=preempt)["reason"] == "preempted"
  return full, cut


def test_lora_checkpoint_holds_only_the_adapters(lora_runs, base_model):
  _, cut = lora_runs
  tree = saved_tree(cut, 2)
  assert set(tree) == {"step", "params", "opt_state", "rng"}
  assert set(tree["params"]) == {"lora"}
  # adapters + Adam moments are a small fraction of the 1.6 MB base model
  assert dir_bytes(os.path.join(cut, "checkpoints", "2")) < 0.5 * dir_bytes(os.path.join(base_model, "params"))


def test_resume_checks_config_data_and_frozen_weights(lora_runs, small_data, base_model, tmp_path):
  full, cut = lora_runs
  wd = str(tmp_path / "run")
  shutil.copytree(cut, wd)
  # keys that change what is trained are refused, naming each key with both values
  for key, value, shown in [("train.global_batch_size", "16", "train.global_batch_size (8 -> 16)"),
                            ("seed", "1", "seed (0 -> 1)"), ("optim.lr", "0.01", "optim.lr (0.003 -> 0.01)")]:
    with pytest.raises(config_lib.ConfigError, match=r"checkpoint 2 was written with a different config: .*"
                       + shown.replace("(", r"\(").replace(")", r"\)") + ".*force_resume"):
      train.run(lora_cfg(small_data, base_model, **{key: value}), wd)
  # the same data path with other contents is refused too
  original = open(small_data).read()
  try:
    with open(small_data, "a") as f:
      f.write(original.splitlines(keepends=True)[0])
    with pytest.raises(config_lib.ConfigError, match=r"the contents of data.train_path"):
      train.run(lora_cfg(small_data, base_model), wd)
  finally:
    with open(small_data, "w") as f:
      f.write(original)
  # nothing was overwritten by the refusals
  assert json.load(open(os.path.join(wd, "config.json")))["train"]["global_batch_size"] == 8
  # a safe change (logging cadence) resumes and logs exactly the uninterrupted run's losses
  out = train.run(lora_cfg(small_data, base_model, **{"train.log_every": "2"}), wd)
  assert out["start_step"] == 2 and out["reason"] == "done"
  np.testing.assert_allclose([losses(wd)[s] for s in range(1, 5)], [losses(full)[s] for s in range(1, 5)],
                             rtol=1e-6)
  # the base weights changed since the checkpoint: refused, even with force_resume
  moved = str(tmp_path / "base")
  shutil.copytree(base_model, moved)
  params = checkpoint.load_params(moved, _abstract(moved))
  params["final_norm"] = params["final_norm"] * 1.001
  checkpoint.save_model(moved, params, checkpoint.read_model_config(moved))
  cut2 = str(tmp_path / "cut2")
  shutil.copytree(cut, cut2)
  with pytest.raises(checkpoint.CheckpointError, match="are not those checkpoint 2 was trained with"):
    train.run(lora_cfg(small_data, moved, **{"checkpoint.force_resume": "True"}), cut2)


def _abstract(model_dir):
  with open(os.path.join(model_dir, "params", "index.json")) as f:
    index = json.load(f)
  return checkpoint.unflatten((n, jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"])))
                              for n, v in index.items())


def test_max_steps_change_and_force_resume(lora_runs, small_data, base_model, tmp_path):
  _, cut = lora_runs
  wd = str(tmp_path / "run")
  shutil.copytree(cut, wd)
  out = train.run(lora_cfg(small_data, base_model, **{"train.max_steps": "3"}), wd)
  assert out["start_step"] == 2 and out["final_step"] == 3
  out = train.run(lora_cfg(small_data, base_model, **{"train.max_steps": "4", "optim.lr": "0.001",
                                                      "checkpoint.force_resume": "True"}), wd)
  assert out["start_step"] == 3 and out["final_step"] == 4
  assert json.load(open(os.path.join(wd, "config.json")))["optim"]["lr"] == 0.001


def test_dpo_reference_copy_is_not_saved(tmp_path):
  """reference=copy keeps a frozen copy of the starting weights in the state; checkpoints leave it out and resume
  rebuilds it from model.checkpoint."""
  wd = str(tmp_path / "dpo")
  over = {"reference": "copy", "train.max_steps": "2", "checkpoint.every_steps": "1", "train.global_batch_size": "8"}
  out = train.run(make_cfg("configs/dpo_quickstart.py", **over), wd)
  assert "reference" in out["state"]["frozen"]
  assert set(saved_tree(wd, 2)) == {"step", "params", "opt_state", "rng"}
  out = train.run(make_cfg("configs/dpo_quickstart.py", **{**over, "train.max_steps": "3"}), wd)
  assert out["start_step"] == 2 and out["reason"] == "done"
  ref = out["state"]["frozen"]["reference"]
  start = checkpoint.load_params("examples/tiny_sft_model", jax.eval_shape(lambda: ref))
  assert checkpoint.tree_digest(ref) == checkpoint.tree_digest(start)


# ---------------------------------------------------------------------------------------------- weight digests

def test_fingerprint_follows_contents_not_paths(tmp_path):
  src = "examples/tiny_sft_model"
  params = checkpoint.load_params(src, _abstract(src))
  cfg = checkpoint.read_model_config(src)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  checkpoint.save_model(a, params, cfg)
  checkpoint.save_model(b, params, cfg)
  fp = checkpoint.fingerprint(a)
  assert checkpoint.fingerprint(b) == fp  # same contents elsewhere
  assert checkpoint.fingerprint(src) == fp  # a directory without recorded digests: computed from its tensors
  # retrained into the same directory: one value nudged by one ulp
  embed = np.array(params["embed"])
  embed[3, 5] = np.nextafter(embed[3, 5], np.float32(1))
  checkpoint.save_model(a, {**params, "embed": embed}, cfg)
  assert checkpoint.fingerprint(a) != fp
  # a permutation of the same values changes it too
  checkpoint.save_model(b, {**params, "embed": np.array(params["embed"])[::-1]}, cfg)
  assert checkpoint.fingerprint(b) != fp


def test_tensor_digest_is_independent_of_sharding():
  from jax.sharding import NamedSharding, PartitionSpec as P
  x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  sharded = jax.device_put(x, NamedSharding(mesh, P("a", "b")))
  assert checkpoint.tensor_digest(sharded) == checkpoint.tensor_digest(x)
  y = x.copy()
  y[0, 0], y[0, 1] = x[0, 1], x[0, 0]
  assert checkpoint.tensor_digest(y) != checkpoint.tensor_digest(x)


def test_reference_cache_is_keyed_by_weight_contents(tmp_path):
  """Retraining a model into the same directory invalidates the cached reference log-probs."""
  model = str(tmp_path / "model")
  shutil.copytree("examples/tiny_sft_model", model)
  cfg = make_cfg("configs/dpo_quickstart.py", **{"model.checkpoint": model, "reference": "precomputed"})
  rows = {k: np.arange(12, dtype=np.int32).reshape(2, 2, 3) for k in ("tokens", "loss_mask", "segment_ids")}
  calls = []

  def compute(r):
    calls.append(1)
    return np.full((2, 2), len(calls), np.float32)

  cache = str(tmp_path / "reference_logps.npz")

  def cached():
    return reference.reference_cache(cache, {"train": rows}, reference.weights_source(cfg, train.model_config_for(cfg)),
                                 True, compute)["train"][0, 0]

  assert cached() == 1 and cached() == 1  # reused
  params = checkpoint.load_params(model, _abstract(model))
  checkpoint.save_model(model, {**params, "final_norm": np.asarray(params["final_norm"]) * 2},
                        checkpoint.read_model_config(model))
  assert cached() == 2  # same path, new contents: recomputed
  assert cached() == 2


# ---------------------------------------------------------------------------------------------- the CLI

def cli(workdir, *flags, config="configs/sft_tiny.py", timeout=300, **popen):
  args = [sys.executable, "-m", "jalign.train", "--config", config, "--workdir", str(workdir),
          "--config.eval.every_steps=0", "--config.eval.num_samples=0", *flags]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  if popen:
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(res, code, pattern):
  assert res.returncode == code, res.stderr[-3000:]
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  errors = [ln for ln in res.stderr.splitlines() if ln.startswith("jalign: error: ")]
  assert len(errors) == 1, res.stderr[-3000:]
  assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("flags, pattern", [
    (["--config.mesh.data=3"], r"needs 3 devices, 1 are available.*mesh\.data"),
    (["--config.data.prompt_template={input}"], r"data.prompt_template='\{input\}' has no \{output\}"),
    (["--config.tokenizer.chat_template=hf"], r"tokenizer.chat_template=hf but the tokenizer .* has no chat template"),
    (["--config.model.checkpoint=no/such/dir"], r"'no/such/dir': not a model directory"),
    (["--config.data.train_path=no/such.jsonl"], r"no/such.jsonl: file not found"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, flags, pattern, small_data):
  assert_one_line_error(cli(tmp_path / "wd", f"--config.data.train_path={small_data}", *flags), 2, pattern)


def test_non_finite_exits_3_and_sigterm_exits_143(tmp_path, small_data):
  res = cli(tmp_path / "nan", f"--config.data.train_path={small_data}", "--config.optim.lr=1e30",
            "--config.optim.warmup_steps=0", "--config.checkpoint.every_steps=1")
  assert_one_line_error(res, 3, r"non-finite step \d+ .*the last good checkpoint \(step \d+\) is intact")
  wd = tmp_path / "term"
  proc = cli(wd, f"--config.data.train_path={small_data}", "--config.train.max_steps=100000",
             "--config.checkpoint.every_steps=100000", popen=True)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  stopped = [int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()]
  assert len(stopped) == 1 and stopped[0] >= 2 and f"stopped (preempted) at step {stopped[0]}" in out + err


@pytest.fixture(scope="module")
def messages_data(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  d = tmp_path_factory.mktemp("hf_chat")
  rows = [{"messages": [{"role": "user", "content": f"What is {i}+1?"},
                        {"role": "assistant", "content": f"{i + 1}"}]} for i in range(16)]
  with open(d / "train.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator([json.dumps(r) for r in rows] * 5, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(d / "tokenizer.json"))
  return d


@pytest.mark.parametrize("template, pattern", [
    ("{% for m in messages %}{{ m.content }}", r"chat template: TemplateSyntaxError"),
    ("{% for m in messages %}{{ m.content + 1 }}{% endfor %}", r"chat template: TypeError"),
    ("{{ raise_exception('system message required') }}", r"chat template: system message required"),
])
def test_chat_template_that_fails_to_render_is_one_line(tmp_path, messages_data, template, pattern):
  tok_dir = tmp_path / "tok"
  shutil.copytree(messages_data, tok_dir)
  with open(tok_dir / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}, f)
  res = cli(tmp_path / "wd", f"--config.data.train_path={tok_dir / 'train.jsonl'}",
            f"--config.tokenizer.path={tok_dir}", "--config.tokenizer.chat_template=hf")
  assert_one_line_error(res, 2, r"train.jsonl:1: field 'messages': " + pattern)


def test_keys_added_at_their_default_do_not_block_resume():
  """A checkpoint written before a config key existed resumes when the key keeps its default; a real change to
  the same key is still refused."""
  cfg = config_lib.base_config()
  meta = {"config": json.loads(config_lib.to_json(cfg)), "data_digest": "d"}
  del meta["config"]["data"]["shared_prompt"], meta["config"]["model"]["logprob_impl"]
  train.check_resume(meta, cfg, "d", 2)
  cfg.data.shared_prompt = True
  with pytest.raises(config_lib.ConfigError, match=r"data.shared_prompt \(None -> True\)"):
    train.check_resume(meta, cfg, "d", 2)
