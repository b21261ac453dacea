"""Online RL through the one training loop: every algorithm runs end to end on the toy task, logs NeMo-Aligner's
metric names, agrees with the sampler on log-probs, resumes exactly and stops on SIGTERM at a rollout boundary."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from jalign import config as config_lib
from jalign import train

SMALL = ["--config.rollout.num_prompts=8", "--config.rollout.eval_prompts=8", "--config.rollout.max_new_tokens=6",
         "--config.train.global_batch_size=16", "--config.eval.every_steps=0", "--config.train.log_every=100",
         "--config.checkpoint.async_save=False"]


def _cfg(name, *overrides):
  cfg, _ = config_lib.parse_args(["--config", f"configs/{name}_quickstart.py", *SMALL, *overrides])
  return cfg


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("name,extra", [
    ("grpo", ["--config.grpo.beta=0.04", "--config.grpo.kl_estimator=k3", "--config.grpo.loss_agg=dr_grpo",
              "--config.rollout.num_generations=4"]),
    ("grpo", ["--config.grpo.dynamic_sampling=True", "--config.grpo.scale_rewards=batch",
              "--config.grpo.mask_truncated=True", "--config.grpo.overlong_buffer=2", "--config.rollout.num_generations=4"]),
    ("rloo", ["--config.rollout.num_generations=4"]),
    ("ppo", ["--config.rollout.num_generations=2", "--config.ppo.entropy_coef=0.01"]),
    ("rs", ["--config.rs.top_n=2"]),
    ("online_dpo", ["--config.train.global_batch_size=8"]),
])
def test_algorithm_runs_and_logs_nemo_metrics(tmp_path, name, extra):
  cfg = _cfg(name, "--config.train.max_steps=2", "--config.checkpoint.every_steps=2", *extra)
  summary = train.run(cfg, str(tmp_path))
  assert summary["reason"] == "done"
  rows = _metrics(tmp_path)
  first = rows[0]
  for key in ("train_rollouts/rewards", "train_rollouts/response_lengths", "train_rollouts/rollout_size",
              "train_rollouts/fraction_of_samples_properly_ended", "timers/generate", "timers/rollout_time",
              "train_optim/loss", "train_optim/grad_norm", "train_optim/lr"):
    assert key in first, (key, sorted(first))
  if name in ("rloo", "ppo", "online_dpo") or "--config.grpo.beta=0.04" in extra:  # runs with a reference
    assert "train_rollouts/init_policy_kl" in first and "train_rollouts/init_policy_kl_k3" in first
  if name in ("grpo", "rloo", "ppo"):  # the sampler's log-probs are the trainer's (fp32, same temperature)
    assert first["train_rollouts/logprob_diff_max"] < 1e-4
    assert first["train_rollouts/logprob_diff_mean"] < 1e-5
  if "--config.grpo.dynamic_sampling=True" in extra:
    assert 1 <= first["train_rollouts/dynamic_sampling_rounds"] <= 4
  if name == "ppo":
    assert {"train_optim/ppo_ratio", "train_optim/critic_loss", "train_rollouts/advantages_std"} <= set(first)
  assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
  assert os.path.isdir(os.path.join(tmp_path, "model"))


def _losses_and_rewards(workdir):
  return [(r["step"], r.get("train_optim/loss"), r.get("train_rollouts/rewards")) for r in _metrics(workdir)
          if "train_optim/loss" in r]


def test_resume_repeats_the_uninterrupted_run(tmp_path):
  """Killed after a checkpoint and re-run, an RL run logs exactly the losses and rewards of an uninterrupted one
  (rollout seeds come from the rollout index; checkpoints hold the prompt order and the rollout index)."""
  over = ["--config.train.max_steps=6", "--config.checkpoint.every_steps=2", "--config.rollout.epochs=1"]
  full = tmp_path / "full"
  train.run(_cfg("grpo", *over, "--config.rollout.num_generations=4"), str(full))
  part = tmp_path / "part"
  train.run(_cfg("grpo", *over, "--config.rollout.num_generations=4", "--config.train.max_steps=2"), str(part))
  train.run(_cfg("grpo", *over, "--config.rollout.num_generations=4"), str(part))
  a, b = _losses_and_rewards(full), _losses_and_rewards(part)
  assert [s for s, _, _ in a] == list(range(1, 7))
  assert a == b


def test_sigterm_saves_at_the_next_rollout_boundary(tmp_path):
  """Two steps per rollout: a SIGTERM during the first step of rollout 2 stops (and saves) after its last."""
  cfg = _cfg("grpo", "--config.train.max_steps=8", "--config.checkpoint.every_steps=8",
             "--config.train.global_batch_size=16", "--config.rollout.num_generations=4")
  # 8 prompts x 4 samples = 32 rows = 2 steps of 16 per rollout

  def on_step(step, metrics):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  summary = train.run(cfg, str(tmp_path), on_step=on_step)
  assert summary["reason"] == "preempted" and summary["final_step"] == 4
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_rl_config_errors_are_one_line():
  with pytest.raises(config_lib.ConfigError, match="multiples of the 2 steps per rollout"):
    _cfg("grpo", "--config.train.max_steps=3", "--config.rollout.num_generations=4")
  with pytest.raises(config_lib.ConfigError, match="num_generations=2"):
    _cfg("online_dpo", "--config.rollout.num_generations=3")
  with pytest.raises(config_lib.ConfigError, match="reward.sources"):
    _cfg("grpo", "--config.reward.sources=fn:nodots", "--config.rollout.num_generations=4")
  with pytest.raises(config_lib.ConfigError, match="grpo.loss_agg"):
    _cfg("grpo", "--config.grpo.loss_agg=mean", "--config.rollout.num_generations=4")


def test_ppo_on_two_meshes_gives_the_same_run(tmp_path):
  """PPO (policy, critic, frozen reference) on one device, data-parallel on 4 devices and on an (fsdp 2, tensor 2)
  mesh: the same rollouts, rewards and losses."""
  over = ["--config.train.max_steps=2", "--config.checkpoint.every_steps=2", "--config.rollout.num_generations=2",
          "--config.train.global_batch_size=8"]
  # Each run in a fresh process with 4 simulated devices. XLA:CPU's in-process collectives inside the sampler's
  # while loop have deadlocked (all devices but one blocked, one waiting in an all-gather rendezvous) on this
  # 2-core machine with 8 devices; a run that hangs is retried once, a wrong result never is.
  def env(devices):
    return dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", f"--xla_force_host_platform_device_count={devices}"))

  for name, mesh, devices in (("one", [], 1), ("dp", [], 4),
                              ("3d", ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"], 4)):
    cmd = [sys.executable, "-m", "jalign.train", "--config", "configs/ppo_quickstart.py", *SMALL, *over, *mesh,
           "--workdir", str(tmp_path / name)]
    for attempt in range(2):
      try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(devices))
        break
      except subprocess.TimeoutExpired:
        shutil.rmtree(tmp_path / name, ignore_errors=True)
        if attempt:
          raise
    assert r.returncode == 0, (name, r.returncode, r.stderr[-3000:])
  one = _metrics(tmp_path / "one")
  keys = ("train_rollouts/rewards", "train_rollouts/response_lengths", "train_optim/loss", "train_optim/critic_loss")
  assert {k for r in one for k in r} >= set(keys)
  for other in ("dp", "3d"):
    got = _metrics(tmp_path / other)
    assert len(got) == len(one), other
    for ra, rb in zip(one, got):
      for k in keys:
        if k in ra:
          assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (other, ra["step"], k)


def one_character(prompts, responses, rows):
  """A reward the tiny model can learn in a few dozen steps: 1 for a one-character answer."""
  return [float(len(r.strip()) == 1) for r in responses]


@pytest.mark.parametrize("name,extra", [
    ("grpo", ["--config.rollout.num_generations=8"]),
    ("rloo", ["--config.rollout.num_generations=8"]),
    ("ppo", ["--config.rollout.num_generations=1", "--config.rollout.num_prompts=64", "--config.ppo.critic_lr=1e-3"]),
    ("rs", ["--config.rollout.num_generations=8", "--config.train.global_batch_size=16"]),
    ("online_dpo", ["--config.rollout.num_prompts=32", "--config.train.global_batch_size=32"]),
])
def test_each_algorithm_raises_its_reward(tmp_path, name, extra):
  """Every algorithm moves the greedy held-out reward of a learnable programmatic reward from 0 to above 0.3
  within 40 steps (seeded, not timed; measured 0.44-0.81): signs, advantages, masks and selection all have to be
  right."""
  cfg = _cfg(name, "--config.reward.sources=fn:test_rl:one_character", "--config.rollout.num_prompts=16",
             "--config.train.global_batch_size=64", "--config.train.max_steps=40", "--config.checkpoint.every_steps=40",
             "--config.eval.every_steps=40", "--config.rollout.eval_prompts=32", "--config.optim.lr=1e-4",
             "--config.optim.warmup_steps=5", *extra)
  summary = train.run(cfg, str(tmp_path))
  before = summary["initial_eval"]["val_rollouts/rewards"]
  after = [r for r in _metrics(tmp_path) if "val_rollouts/rewards" in r][-1]["val_rollouts/rewards"]
  assert before < 0.05 and after > 0.3, (before, after)


@pytest.mark.parametrize("name", ["grpo", "rloo", "ppo"])
def test_quickstart_raises_the_toy_grader_on_held_out_prompts(tmp_path, name):
  """``configs/{grpo,rloo,ppo}_quickstart.py`` as shipped (about 1.5, 2 and 3 minutes on 2 cores): the greedy
  mean toy-grader reward on the 200 held-out prompts rises from 0.291 by more than 0.04 (seeded, not timed;
  measured +0.05 to +0.085 over seeds 0-2). Greedy evaluation of the untrained model does not depend on the seed,
  so its spread over seeds is 0."""
  cfg, _ = config_lib.parse_args(["--config", f"configs/{name}_quickstart.py", "--config.eval.every_steps=100",
                                  "--config.checkpoint.async_save=False", "--config.train.log_every=100"])
  assert cfg.train.max_steps % 100 == 0
  summary = train.run(cfg, str(tmp_path))
  before = summary["initial_eval"]["val_rollouts/rewards"]
  after = [r for r in _metrics(tmp_path) if "val_rollouts/rewards" in r][-1]["val_rollouts/rewards"]
  assert before == pytest.approx(0.2912, abs=1e-3)
  assert after - before > 0.04, (before, after)
  with open(tmp_path / "rollouts" / f"val_step{cfg.train.max_steps}.jsonl") as f:
    table = [json.loads(line) for line in f]
  assert len(table) == 200 and {"prompt", "response", "reward"} <= set(table[0])
