"""End-to-end runs of ``jalign.train``: resume equality, preemption, interrupted saves, NaN, 2 processes."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from jalign import config as config_lib
from jalign import train
from jalign.trainer import NonFiniteLoss

STEPS = 6
OVERRIDES = {"train.max_steps": str(STEPS), "checkpoint.every_steps": "2", "eval.every_steps": "0",
             "train.log_every": "1"}


def make_cfg(**extra):
  cfg = config_lib.load_config_file("configs/sft_tiny.py")
  merged = config_lib.base_config()
  config_lib._merge(merged, cfg)
  config_lib.apply_overrides(merged, {**OVERRIDES, **extra})
  config_lib.validate(merged)
  return merged


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run (8 simulated devices)."""
  wd = str(tmp_path_factory.mktemp("ref"))
  summary = train.run(make_cfg(), wd)
  assert summary["reason"] == "done"
  return wd


def test_outputs_and_metrics(reference):
  rows = [json.loads(ln) for ln in open(os.path.join(reference, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  for key in ("loss", "lr", "grad_norm", "step_time", "consumed_samples", "tokens_per_sec"):
    assert key in rows[0], key
  assert rows[-1]["consumed_samples"] == STEPS * 8
  assert glob.glob(os.path.join(reference, "tensorboard", "events.out.tfevents.*"))
  assert json.load(open(os.path.join(reference, "config.json")))["train"]["max_steps"] == STEPS
  assert sorted(os.listdir(os.path.join(reference, "checkpoints"))) == ["4", "6"]  # keep=2
  assert os.path.exists(os.path.join(reference, "model", "model_config.json"))


def test_preempt_and_resume_give_identical_losses(reference, tmp_path):
  """SIGTERM at step 3 writes a checkpoint and stops; a half-written later save is ignored; re-running the same
  command resumes and logs exactly the losses of the uninterrupted run."""
  wd = str(tmp_path / "run")

  def preempt(step, metrics):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  first = train.run(make_cfg(), wd, on_step=preempt)
  assert first["reason"] == "preempted" and first["final_step"] == 3
  ckdir = os.path.join(wd, "checkpoints")
  assert sorted(os.listdir(ckdir)) == ["2", "3"]
  # a save killed half-way leaves Orbax's temporary directory behind
  partial = os.path.join(ckdir, "5.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(ckdir, "3"), partial)
  shutil.rmtree(os.path.join(partial, "state"))
  second = train.run(make_cfg(), wd)
  assert second["start_step"] == 3 and second["reason"] == "done"
  ref, got = losses(reference), losses(wd)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-6)


def _restore_params(wd, step):
  import orbax.checkpoint as ocp
  path = os.path.join(wd, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def test_nan_stops_with_last_checkpoint_finite(tmp_path):
  """lr=1e30: a later step's gradient norm or updated weights are not finite (its loss may still be). That step's
  state is never saved, and the message names a checkpoint whose weights really are finite."""
  import re
  wd = str(tmp_path / "nan")
  with pytest.raises(NonFiniteLoss, match=r"non-finite step (\d+).*the last good checkpoint \(step (\d+)\)") as e:
    train.run(make_cfg(**{"optim.lr": "1e30", "optim.warmup_steps": "0", "checkpoint.every_steps": "1"}), wd)
  bad, named = map(int, re.search(r"non-finite step (\d+).*\(step (\d+)\)", str(e.value)).groups())
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert steps[-1] == named == bad - 1
  for s in steps:
    for x in jax.tree.leaves(_restore_params(wd, s)):
      assert np.isfinite(np.asarray(x)).all(), s


def test_init_from_model_checkpoint(reference, tmp_path):
  wd = str(tmp_path / "ft")
  summary = train.run(make_cfg(**{"model.checkpoint": os.path.join(reference, "model"), "train.max_steps": "2",
                                  "model.lora.rank": "4"}), wd)
  first = losses(wd)[1]
  ref_last = losses(reference)[STEPS]
  assert first < losses(reference)[1] and abs(first - ref_last) < 0.5  # starts where the reference ended
  assert set(summary["state"]["params"]) == {"lora"}  # only adapters are trained


def run_two_processes(config, workdir, overrides):
  """``python -m jalign.train`` as two processes of 2 CPU devices each; returns their outputs."""
  port = portpicker.pick_unused_port()
  env = dict(os.environ, XLA_FLAGS="", JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
  if "train.compile_cache" in overrides:  # the run's own cache applies, not the suite's
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  args = [sys.executable, "-m", "jalign.train", "--config", config, "--workdir", workdir,
          f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  procs = [subprocess.Popen(args + [f"--config.distributed.process_id={i}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-4000:] for o in outs)
  return outs


def test_two_processes_match_single_process(reference, tmp_path):
  wd = str(tmp_path / "mp")
  cache = tmp_path / "xla"
  outs = run_two_processes("configs/sft_tiny.py", wd, {**OVERRIDES, "train.compile_cache": str(cache)})
  assert "2 process(es)" in outs[0]
  assert any(cache.iterdir()), "train.compile_cache holds the compiled steps"
  ref, got = losses(reference), losses(wd)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-5)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["4", "6"]


def test_config_errors_name_the_key():
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'optim.lrr'; did you mean optim.lr"):
    make_cfg(**{"optim.lrr": "1"})
  with pytest.raises(config_lib.ConfigError, match=r"--config.train.max_steps='ten': expected an integer"):
    make_cfg(**{"train.max_steps": "ten"})
  with pytest.raises(config_lib.ConfigError, match="global_batch_size=8 is not a multiple"):
    make_cfg(**{"train.micro_batch_size": "3"})


def test_precomputed_reference_with_two_processes(tmp_path):
  """Each process computes the reference log-probs of its own rows; the cache written by two processes holds
  every row's values in file order, as one process computes them (44 pairs: the last global batch is partial)."""
  data = str(tmp_path / "pairs.jsonl")
  with open("examples/data/dpo_train.jsonl") as f:
    lines = f.readlines()[:44]
  with open(data, "w") as f:
    f.writelines(lines)
  over = {"reference": "precomputed", "data.train_path": data, "data.eval_path": "", "train.max_steps": "1",
          "train.global_batch_size": "8", "eval.num_samples": "0", "eval.every_steps": "0"}
  cfg = config_lib.base_config()
  config_lib._merge(cfg, config_lib.load_config_file("configs/dpo_quickstart.py"))
  config_lib.apply_overrides(cfg, over)
  one = str(tmp_path / "one")
  train.run(cfg, one)
  two = str(tmp_path / "two")
  run_two_processes("configs/dpo_quickstart.py", two, over)
  with np.load(os.path.join(one, "reference_logps.npz")) as a, np.load(os.path.join(two, "reference_logps.npz")) as b:
    assert a["train"].shape == (44, 2) and np.all(a["train"] < 0)
    np.testing.assert_allclose(b["train"], a["train"], rtol=1e-5)
