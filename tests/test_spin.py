"""SPIN: its loss is DPO's (ground truth chosen, the reference's sample rejected, beta per iteration), it runs
through the one trainer loop on the toy task logging NeMo-Aligner's metrics, resumes exactly in the middle of an
iteration, and raises the held-out log-likelihood of ground-truth answers relative to generated ones."""
from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import config as config_lib
from jalign import train
from jalign.algorithms import dpo, spin
from jalign.models import ModelConfig, init_params
from jalign.rl import spin_source

# 3 iterations x 10 steps of 16 pairs from the SFT model; the whole eval set; a checkpoint every 5 steps
RUN = ["--config.spin.steps_per_iteration=10", "--config.train.max_steps=30", "--config.eval.every_steps=10",
       "--config.checkpoint.every_steps=5", "--config.checkpoint.keep=10", "--config.checkpoint.async_save=False",
       "--config.eval.num_samples=0", "--config.train.log_every=100"]


def _cfg(*overrides):
  cfg, _ = config_lib.parse_args(["--config", "configs/spin_quickstart.py", *overrides])
  return cfg


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------ the loss

def test_loss_is_dpo_with_per_row_beta_and_matches_numpy():
  rng = np.random.default_rng(0)
  logp, ref = rng.normal(-20, 5, (6, 2)).astype(np.float32), rng.normal(-20, 5, (6, 2)).astype(np.float32)
  beta = np.array([0.1, 0.1, 0.2, 0.2, 0.5, 0.5], np.float32)
  losses, (r_gt, r_gen) = spin.spin_losses(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(beta))
  z = beta * ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1]))
  np.testing.assert_allclose(losses, np.log1p(np.exp(-z)), rtol=1e-5)
  np.testing.assert_allclose(r_gt, beta * (logp[:, 0] - ref[:, 0]), rtol=1e-5)
  np.testing.assert_allclose(r_gen, beta * (logp[:, 1] - ref[:, 1]), rtol=1e-5)
  for b in (0.1, 0.5):
    rows = beta == b
    want, _ = dpo.preference_losses(logp[rows, 0], logp[rows, 1], ref[rows, 0], ref[rows, 1], beta=b)
    np.testing.assert_allclose(np.asarray(losses)[rows], want, rtol=1e-6)


def test_training_loss_equals_jalign_dpo_with_precomputed_reference():
  """On a real pair batch the SPIN loss_fn is the DPO loss_fn (reference=precomputed, same beta); its rewards are
  DPO's scaled by beta, under NeMo-Aligner's SPIN names."""
  model_cfg = ModelConfig.from_config(config_lib.base_config().model.to_dict())
  params = init_params(model_cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  B, T = 4, 12
  tokens = rng.integers(3, model_cfg.vocab_size, (B, 2, T)).astype(np.int32)
  seg = np.zeros((B, 2, T), np.int32)
  mask = np.zeros((B, 2, T), bool)
  for b in range(B):
    for j, n in enumerate((T - b, T - 2 - b)):
      seg[b, j, :n], mask[b, j, 4:n] = 1, True
  batch = {"tokens": tokens, "loss_mask": mask, "segment_ids": seg,
           "ref_logps": rng.normal(-40, 3, (B, 2)).astype(np.float32), "chosen_reward": np.ones(B, np.float32),
           "rejected_reward": np.zeros(B, np.float32), "beta": np.full(B, 0.3, np.float32)}
  spin_cfg = _cfg()
  dpo_cfg = config_lib.base_config()
  dpo_cfg.algorithm, dpo_cfg.reference = "dpo", "precomputed"
  dpo_cfg.dpo.beta = 0.3
  s_fn, d_fn = spin.make_loss(spin_cfg, model_cfg), dpo.make_loss(dpo_cfg, model_cfg)
  (s_loss, s_w, s_m), s_g = jax.jit(lambda p: (s_fn(p, batch, None), jax.grad(lambda q: s_fn(q, batch, None)[0])(p)))(
      params)
  (d_loss, d_w, d_m), d_g = jax.jit(lambda p: (d_fn(p, batch, None), jax.grad(lambda q: d_fn(q, batch, None)[0])(p)))(
      params)
  np.testing.assert_allclose(s_loss, d_loss, rtol=1e-6)
  assert float(s_w) == float(d_w) == B
  np.testing.assert_allclose(s_m["acc"], d_m["acc"])
  np.testing.assert_allclose(s_m["rewards_actual_mean"], 0.3 * d_m["rewards_chosen_mean"], rtol=1e-5)
  np.testing.assert_allclose(s_m["rewards_generated_mean"], 0.3 * d_m["rewards_rejected_mean"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_g), jax.tree.leaves(d_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_generated_rows_and_iteration_order():
  batch = {"tokens": np.zeros((2, 2, 8), np.int32), "loss_mask": np.zeros((2, 2, 8), bool),
           "segment_ids": np.zeros((2, 2, 8), np.int32)}
  batch["tokens"][:, 0, :6] = [[5, 6, 7, 8, 9, 4], [5, 6, 8, 9, 4, 0]]
  samples = [{"tokens": [11, 12, 4]}, {"tokens": [13, 14, 15, 16, 17, 18]}]
  lengths = spin_source.fill_generated(batch, np.array([3, 4]), samples, pad_id=0)
  assert lengths.tolist() == [3, 4]  # the second sample is cut at the row length
  assert batch["tokens"][0, 1].tolist() == [5, 6, 7, 11, 12, 4, 0, 0]
  assert batch["loss_mask"][0, 1].tolist() == [False] * 3 + [True] * 3 + [False] * 2
  assert batch["tokens"][1, 1].tolist() == [5, 6, 8, 9, 13, 14, 15, 16]
  assert batch["segment_ids"][1, 1].tolist() == [1] * 8
  assert spin_source.prompt_lengths(np.array([[0, 0, 1, 1], [0, 0, 0, 0]], bool)).tolist() == [2, 4]
  # one pass per iteration: the steps of an iteration visit every row once, each iteration in its own order
  it0 = np.concatenate([spin_source.iteration_rows(12, 4, 0, 0, t, True) for t in range(3)])
  it1 = np.concatenate([spin_source.iteration_rows(12, 4, 0, 1, t, True) for t in range(3)])
  assert sorted(it0) == sorted(it1) == list(range(12)) and it0.tolist() != it1.tolist()


def test_config_checks():
  assert _cfg("--config.spin.ref_policy_kl_penalty=0.1").spin.ref_policy_kl_penalty == (0.1,)
  assert spin.betas(_cfg("--config.spin.ref_policy_kl_penalty=0.1,0.2,0.3")) == pytest.approx([0.1, 0.2, 0.3])
  assert spin.betas(_cfg()) == [0.2, 0.2, 0.2]
  with pytest.raises(config_lib.ConfigError, match="one per iteration"):
    _cfg("--config.spin.ref_policy_kl_penalty=0.1,0.2")
  with pytest.raises(config_lib.ConfigError, match="must be > 0"):
    _cfg("--config.spin.ref_policy_kl_penalty=0.0")
  with pytest.raises(config_lib.ConfigError, match="data.packing"):
    _cfg("--config.data.packing=True")


def test_max_steps_must_cover_the_iterations(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"spin.max_iterations=3 x 10 steps per iteration = 30"):
    train.run(_cfg(*RUN, "--config.train.max_steps=20"), str(tmp_path))


# ------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("spin_full"))
  summary = train.run(_cfg(*RUN), workdir)
  return workdir, summary


def test_run_logs_nemo_metrics_tables_and_references(full_run):
  workdir, summary = full_run
  assert summary["reason"] == "done" and summary["final_step"] == 30
  steps = [r for r in _metrics(workdir) if "loss" in r]
  assert [r["step"] for r in steps] == list(range(1, 31))
  for k in ("loss", "acc", "rewards_actual_mean", "rewards_generated_mean", "avg_generated_lengths", "iteration",
            "rewards_all_mean", "rewards_all_std", "grad_norm", "lr"):
    assert all(np.isfinite(r[k]) for r in steps), k
  assert [r["iteration"] for r in steps] == [0] * 10 + [1] * 10 + [2] * 10
  # each iteration's first step: policy == reference, so every reward is 0 and the loss is log 2
  for r in (steps[0], steps[10], steps[20]):
    assert r["rewards_actual_mean"] == pytest.approx(0, abs=1e-4) and r["loss"] == pytest.approx(np.log(2), 1e-4)
  assert 0 < np.mean([r["avg_generated_lengths"] for r in steps]) <= 12
  evals = [r for r in _metrics(workdir) if "val_loss" in r]
  assert [r["step"] for r in evals] == [0, 10, 20, 30]
  for k in range(3):
    with open(os.path.join(workdir, "spin", f"generations_iter{k}.jsonl")) as f:
      table = [json.loads(line) for line in f]
    assert len(table) == 10 * 16 and {t["iteration"] for t in table} == {k}
    assert {"prompt", "response", "ground_truth", "finished", "step"} <= set(table[0])
    assert os.path.exists(os.path.join(workdir, "spin", f"reference_{k}", "params", "index.json"))
  assert os.path.isdir(os.path.join(workdir, "model"))


def test_spin_raises_ground_truth_over_generated_on_held_out_prompts(full_run):
  """val_gt_minus_generated: summed log-likelihood of the eval answers minus that of the starting model's samples
  (T=1, seeded) for the same prompts, at the start and after each iteration."""
  workdir, _ = full_run
  margins = [r["val_gt_minus_generated"] for r in _metrics(workdir) if "val_gt_minus_generated" in r]
  print("val_gt_minus_generated per iteration:", [round(m, 3) for m in margins])
  assert len(margins) == 4
  assert all(m > margins[0] + 0.05 for m in margins[1:]), margins  # above the start after every iteration
  assert margins[-1] > margins[0] + 0.1 and max(margins) > margins[0] + 0.15, margins


def test_resume_in_the_middle_of_an_iteration_repeats_the_run(full_run, tmp_path):
  """SIGTERM at step 15 (iteration 1, its 6th step) saves there; the resumed run reloads iteration 1's reference
  from disk and logs exactly what the uninterrupted run did, ending with the same weights."""
  full, _ = full_run
  part = str(tmp_path)

  def on_step(step, metrics):
    if step == 15:
      os.kill(os.getpid(), signal.SIGTERM)

  first = train.run(_cfg(*RUN), part, on_step=on_step)
  assert first["reason"] == "preempted" and first["final_step"] == 15
  second = train.run(_cfg(*RUN), part)
  assert second["start_step"] == 15 and second["final_step"] == 30
  keys = ("loss", "acc", "rewards_actual_mean", "rewards_generated_mean", "avg_generated_lengths", "iteration",
          "val_loss", "val_gt_minus_generated")
  pick = lambda rows: [(r["step"], {k: r[k] for k in keys if k in r}) for r in rows]
  assert pick(_metrics(part)) == pick(_metrics(full))
  with open(os.path.join(part, "spin", "generations_iter1.jsonl")) as f:
    assert len(f.readlines()) == 10 * 16  # the lines of the steps after the checkpoint were not doubled
  a, b = jax.device_get(full_run[1]["state"]["params"]), jax.device_get(second["state"]["params"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
