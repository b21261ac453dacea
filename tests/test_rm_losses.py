"""Reward-model losses against TRL's RewardTrainer.compute_loss (called with a stub trainer and a model that
returns given rewards), torch implementations of the NeMo-Aligner formulas, and hand-derived values."""
import collections
import types

import numpy as np
import pytest

from jalign.algorithms import common, rm

try:  # the torch/TRL references come with the test extra; the other tests run without it
  import torch
  F = torch.nn.functional
except ImportError:
  torch = F = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (pip install -e '.[test]')")

RNG = np.random.RandomState(0)
RC, RR, M = RNG.randn(12), RNG.randn(12), RNG.rand(12)


def trl_loss(r_c, r_r, margin=None, center=None):
  from trl import RewardTrainer
  metrics = collections.defaultdict(lambda: collections.defaultdict(list))
  acc = types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
  stub = types.SimpleNamespace(model=types.SimpleNamespace(training=False), accelerator=acc, _metrics=metrics,
                               args=types.SimpleNamespace(center_rewards_coefficient=center),
                               _total_train_tokens=0, _tp_size=1)
  rewards = torch.tensor(np.concatenate([r_c, r_r]), dtype=torch.float64)[:, None]
  model = lambda **kw: types.SimpleNamespace(logits=rewards)
  inputs = {"attention_mask": torch.ones(2 * len(r_c), 4)}
  if margin is not None:
    inputs["margin"] = torch.tensor(margin, dtype=torch.float64)
  return float(RewardTrainer.compute_loss(stub, model, inputs)), metrics["eval"]["accuracy"][0]


@needs_torch
@pytest.mark.parametrize("margin,center", [(None, None), (M, None), (None, 0.01), (M, 0.01)])
def test_bradley_terry_against_trl(margin, center):
  want, want_acc = trl_loss(RC, RR, margin, center)
  got = rm.bradley_terry(RC, RR, margin, center or 0.0)
  np.testing.assert_allclose(float(np.mean(got)), want, rtol=1e-5)
  metrics = common.finalize({k: v / len(RC) for k, v in common.reward_sums(RC, RR, np.ones(len(RC))).items()})
  np.testing.assert_allclose(float(metrics["acc"]), want_acc)
  all_r = np.concatenate([RC, RR])
  np.testing.assert_allclose([float(metrics[k]) for k in ("rewards_chosen_mean", "rewards_rejected_mean",
                                                          "rewards_all_mean", "rewards_all_std")],
                             [RC.mean(), RR.mean(), all_r.mean(), all_r.std()], rtol=1e-5)


def test_regression_masked_mse():
  pred = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  labels = np.array([[1.0, -100, 4.0], [-100, -100, 2.0]])
  assert np.isclose(float(rm.regression(pred, labels)), (0 + 1 + 4) / 3)
  assert float(rm.regression(pred, np.full_like(labels, -100))) == 0.0


@needs_torch
@pytest.mark.parametrize("variant", rm.HELPSTEER_VARIANTS)
def test_helpsteer_variants_against_torch(variant):
  strength = RNG.randint(-3, 4, 12).astype(np.float64)
  t_first, t_second = torch.tensor(RC), torch.tensor(RR)
  s = torch.tensor(strength)
  r_c = torch.where(s < 0, t_first, t_second)
  r_r = torch.where(s < 0, t_second, t_first)
  want = {"regular_bt": -F.logsigmoid(r_c - r_r), "margin_bt": -F.logsigmoid(r_c - r_r - s.abs()),
          "scaled_bt": -s.abs() * F.logsigmoid(r_c - r_r)}[variant].mean()
  got, got_c, got_r = rm.helpsteer_bt(RC, RR, strength, variant)
  np.testing.assert_allclose(float(np.mean(got)), float(want), rtol=1e-5)
  np.testing.assert_allclose(got_c, r_c.numpy())
  np.testing.assert_allclose(got_r, r_r.numpy())
  with pytest.raises(ValueError, match="variant='bt'"):
    rm.helpsteer_bt(RC, RR, strength, "bt")
