"""DPO-family losses against independent implementations: TRL's own loss methods where TRL has them as callable
functions (SimPO via CPOTrainer.cpo_loss, ORPO via ORPOTrainer.odds_ratio_loss), torch implementations of the
NeMo-Aligner / TRL formulas otherwise, and hand-derived values."""
import types

import jax
import numpy as np
import pytest

from jalign.algorithms.dpo import preference_losses

try:  # the torch/TRL references come with the test extra; the other tests run without it
  import torch
  F = torch.nn.functional
except ImportError:
  torch = F = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (pip install -e '.[test]')")

RNG = np.random.RandomState(0)
PC, PR = -RNG.rand(16) * 20, -RNG.rand(16) * 20         # summed log-probs
RC, RR = PC + RNG.randn(16), PR + RNG.randn(16)
GC, GR = RNG.randint(0, 5, 16).astype(np.float64), RNG.randint(0, 5, 16).astype(np.float64)


def ours(loss_type, **kw):
  loss, _ = preference_losses(PC, PR, RC, RR, loss_type=loss_type, **kw)
  return np.asarray(loss)


def t(x):
  return torch.tensor(x, dtype=torch.float64)


@needs_torch
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_and_cdpo_against_torch(beta, eps):
  z = beta * ((t(PC) - t(RC)) - (t(PR) - t(RR)))
  want = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
  np.testing.assert_allclose(ours("dpo", beta=beta, label_smoothing=eps), want.numpy(), rtol=1e-5)


@needs_torch
def test_ipo_hinge_rpo_against_torch():
  beta, scale = 0.3, 0.7
  d = (t(PC) - t(RC)) - (t(PR) - t(RR))
  np.testing.assert_allclose(ours("ipo", beta=beta), ((d - 1 / (2 * beta)) ** 2).numpy(), rtol=1e-5)
  np.testing.assert_allclose(ours("hinge", beta=beta), torch.relu(1 - beta * d).numpy(), rtol=1e-5, atol=1e-7)
  gt = scale * (t(GC) - t(GR))
  kw = dict(beta=beta, chosen_rewards=GC, rejected_rewards=GR, gt_reward_scale=scale)
  np.testing.assert_allclose(ours("rpo_sq", **kw), ((beta * d - gt) ** 2).numpy(), rtol=1e-5)
  p, q = torch.distributions.Bernoulli(torch.sigmoid(beta * d)), torch.distributions.Bernoulli(torch.sigmoid(gt))
  np.testing.assert_allclose(ours("rpo_bwd_kl", **kw), torch.distributions.kl_divergence(q, p).numpy(),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(ours("rpo_fwd_kl", **kw), torch.distributions.kl_divergence(p, q).numpy(),
                             rtol=1e-4, atol=1e-7)


def test_hand_derived_values():
  zero = np.zeros(1)
  assert np.allclose(preference_losses(zero, zero, zero, zero)[0], np.log(2))          # -log sigmoid(0)
  at = np.array([1 / (2 * 0.25)])
  assert np.allclose(preference_losses(at, zero, zero, zero, loss_type="ipo", beta=0.25)[0], 0)
  assert np.allclose(preference_losses(np.array([1.0]), zero, zero, zero, loss_type="rpo_bwd_kl", beta=2.0,
                                       chosen_rewards=np.array([2.0]), rejected_rewards=zero)[0], 0, atol=1e-7)
  g = jax.grad(lambda c: preference_losses(c, zero, zero, zero, beta=0.5)[0].sum())(zero)
  assert np.allclose(g, -0.5 * 0.5)  # d/dc -log sigmoid(b c) = -b sigmoid(-b c)


def test_rewards_are_unscaled_log_ratios():
  _, (rc, rr) = preference_losses(PC, PR, RC, RR, beta=0.7)
  np.testing.assert_allclose(rc, PC - RC)
  np.testing.assert_allclose(rr, PR - RR)


@needs_torch
def test_simpo_against_trl_cpo_loss():
  from trl.experimental.cpo import CPOTrainer
  avg_c, avg_r = PC / 17, PR / 23
  stub = types.SimpleNamespace(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1, loss_type="simpo", alpha=0.0,
                               accelerator=types.SimpleNamespace(device="cpu"))
  want, _, _ = CPOTrainer.cpo_loss(stub, t(avg_c), t(avg_r))
  got, _ = preference_losses(avg_c, avg_r, loss_type="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5)


@needs_torch
def test_orpo_against_trl_odds_ratio_loss():
  from trl.experimental.orpo import ORPOTrainer
  avg_c, avg_r = PC / 17, PR / 23
  stub = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device="cpu"))
  trl_losses = ORPOTrainer.odds_ratio_loss(stub, t(avg_c), t(avg_r))[0]  # beta * logsigmoid(log_odds)
  got, _ = preference_losses(avg_c, avg_r, loss_type="orpo", beta=0.1)
  np.testing.assert_allclose(np.asarray(got), -trl_losses.numpy(), rtol=1e-5)


def test_unknown_loss_and_missing_rewards():
  with pytest.raises(ValueError, match="loss_type='sigmoid'"):
    preference_losses(PC, PR, RC, RR, loss_type="sigmoid")
  with pytest.raises(ValueError, match="needs chosen_reward/rejected_reward"):
    preference_losses(PC, PR, RC, RR, loss_type="rpo_sq")


@needs_torch
def test_kto_against_torch():
  """TRL's KTO loss (v0.28 ``kto_loss``: clamped, detached mean KL log-ratio as reference point) in torch."""
  from jalign.algorithms.kto import kto_losses
  rho, rho_kl = PC - RC, PR - RR
  good = RNG.rand(16) < 0.5
  beta, wd, wu = 0.3, 1.0, 1.33
  z = t(rho_kl).mean().clamp(min=0)
  lc = wd * (1 - torch.sigmoid(beta * (t(rho[good]) - z)))
  lr = wu * (1 - torch.sigmoid(beta * (z - t(rho[~good]))))
  want = torch.cat([lc, lr]).mean()
  got, got_z = kto_losses(rho, rho_kl, good, np.ones(16, bool), beta=beta, desirable_weight=wd,
                          undesirable_weight=wu)
  np.testing.assert_allclose(float(np.mean(got)), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(got_z), float(z), rtol=1e-6)
  _, z0 = kto_losses(rho - 100, rho_kl - 100, good, np.ones(16, bool))  # negative mean KL -> z = 0
  assert float(z0) == 0.0
  # padding rows do not move the reference point
  _, zp = kto_losses(np.r_[rho, 0.0], np.r_[rho_kl, 1e6], np.r_[good, True], np.r_[np.ones(16, bool), False],
                     beta=beta)
  np.testing.assert_allclose(float(zp), float(z), rtol=1e-6)


def test_pair_forward_matches_separate_forwards():
  """The interleaved [B, 2, T] forward gives the same response log-probs as running chosen and rejected rows
  separately, and the DPO loss_fn equals preference_losses on those values."""
  import jax.numpy as jnp

  from jalign import config as config_lib
  from jalign.algorithms import common, dpo
  from jalign.models import ModelConfig, init_params, transformer
  cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64)
  params = init_params(cfg, jax.random.PRNGKey(0))
  ref = jax.tree.map(lambda x: x * 0.9, params)
  rng = np.random.RandomState(1)
  B, T = 3, 12
  tokens = rng.randint(0, 64, (B, 2, T)).astype(np.int32)
  lengths = np.array([[12, 9], [7, 11], [10, 10]])
  seg = (np.arange(T) < lengths[..., None]).astype(np.int32)
  mask = (np.arange(T) >= 4) & (seg > 0)
  batch = {"tokens": tokens, "loss_mask": mask, "segment_ids": seg, "chosen_reward": np.ones(B),
           "rejected_reward": np.zeros(B)}

  fwd = jax.jit(lambda p, x: transformer.token_logprobs(transformer.forward(p, x, cfg), x))

  def separate(p, j):
    out = []
    for i in range(B):
      n = lengths[i, j]
      lp = np.asarray(fwd(p, jnp.asarray(tokens[i, j, :n][None])))[0]
      out.append(lp[3:].sum())  # targets at positions 4..n-1
    return np.array(out)

  got, n = common.pair_logps(params, batch, cfg)
  np.testing.assert_allclose(np.asarray(got), np.stack([separate(params, 0), separate(params, 1)], 1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(n), lengths - 4)
  c = config_lib.base_config()
  c.algorithm, c.reference = "dpo", "copy"
  loss_sum, weight, m = dpo.make_loss(c, cfg)({**params, "reference": ref}, batch, None)
  want, _ = preference_losses(separate(params, 0), separate(params, 1), separate(ref, 0), separate(ref, 1),
                              beta=c.dpo.beta)
  assert float(weight) == B
  np.testing.assert_allclose(float(loss_sum) / B, float(np.mean(want)), rtol=1e-5)
  np.testing.assert_allclose(float(m["sft_loss"]) / B, -np.mean(separate(params, 0)), rtol=1e-5)
