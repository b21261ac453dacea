"""Numbers checked against values computed independently of the code under test: the SFT loss on packed rows
against a per-sequence NLL in numpy, train-step gradients and ``grad_norm`` against ``jax.grad`` of the
documented mean loss, the LR schedule against its closed form, the weight-decay mask, KTO's per-micro-batch
reference point, and one packed SFT run end to end."""
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jalign import config as config_lib
from jalign import train, trainer
from jalign.algorithms import kto, sft
from jalign.data.formats import Example
from jalign.data.pipeline import pack_examples
from jalign.models import ModelConfig, init_params, transformer

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64)
T = 16
LENGTHS = (11, 10, 9, 7, 6, 5, 4, 3)  # packs into 4 rows of 16, the last one partly padding


def _examples():
  rng = np.random.RandomState(0)
  out = []
  for n in LENGTHS:
    mask = rng.rand(n) < 0.6
    mask[0] = True  # a trainable first token: must not become a target across a packing boundary
    out.append(Example(tokens=rng.randint(1, CFG.vocab_size, n).astype(np.int32), loss_mask=mask))
  return out


def _params(seed=0):
  return init_params(CFG, jax.random.PRNGKey(seed))


def _unpacked(examples, width):
  """Each sequence alone in its own row (trailing padding, which a causal model never attends to)."""
  tokens = np.zeros((len(examples), width), np.int32)
  for i, e in enumerate(examples):
    tokens[i, :len(e.tokens)] = e.tokens
  return tokens


def _log_softmax_np(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _capture():
  """An 'optimizer' whose state is the gradient it was given and whose update is zero."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _state(params, optimizer):
  return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": {},
          "opt_state": optimizer.init(params), "rng": jax.random.PRNGKey(1)}


# ---------------------------------------------------------------------------------------------- SFT loss

def test_sft_loss_on_packed_rows_matches_per_sequence_nll():
  """Documented rule: in each sequence, token j >= 1 is a target when its loss_mask is set (the first token of a
  sequence has no context; padding never counts). The packed loss is the sum of those NLLs over the number of
  targets."""
  ex = _examples()
  params = _params()
  batch = pack_examples(ex, T, pad_id=0)
  assert len(batch["tokens"]) == 4 and (batch["segment_ids"][:3] > 1).any(axis=1).all()  # really packed
  nll_sum, n_tokens, m = jax.jit(lambda p, b: sft.loss_fn(p, b, CFG))(params, batch)

  logits_NTV = np.asarray(jax.jit(lambda p, t: transformer.forward(p, t, CFG))(params, _unpacked(ex, T)))
  want_sum, want_n, want_correct = 0.0, 0, 0
  for e, logits_TV in zip(ex, logits_NTV):
    n = len(e.tokens)
    logp_TV = _log_softmax_np(logits_TV[:n - 1])  # position j-1 predicts token j
    for j in range(1, n):
      if e.loss_mask[j]:
        want_sum -= logp_TV[j - 1, e.tokens[j]]
        want_n += 1
        want_correct += int(np.argmax(logits_TV[j - 1]) == e.tokens[j])
  assert float(n_tokens) == want_n
  np.testing.assert_allclose(float(nll_sum), want_sum, rtol=1e-5)
  np.testing.assert_allclose(float(nll_sum) / float(n_tokens), want_sum / want_n, rtol=1e-5)
  assert float(m["token_acc"]) == want_correct


# ---------------------------------------------------------------------------------------------- gradients

def _reference_sft_loss(examples):
  """The documented SFT loss, written without the code's masks: mean NLL over targets, each sequence run alone."""
  tokens_NT = jnp.asarray(_unpacked(examples, T))
  target_NT = np.zeros((len(examples), T - 1), np.float32)
  for i, e in enumerate(examples):
    target_NT[i, :len(e.tokens) - 1] = e.loss_mask[1:]

  def loss(params):
    logp_NTV = jax.nn.log_softmax(transformer.forward(params, tokens_NT, CFG)[:, :-1])
    picked_NT = jnp.take_along_axis(logp_NTV, tokens_NT[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked_NT * target_NT) / target_NT.sum()

  return loss


@pytest.fixture(scope="module")
def sft_reference():
  ex = _examples()
  params = _params()
  loss, grads = jax.jit(jax.value_and_grad(_reference_sft_loss(ex)))(params)
  return ex, params, float(loss), grads


@pytest.mark.parametrize("n_micro", [1, 2])
def test_train_step_gradients_match_jax_grad_of_mean_loss(sft_reference, n_micro):
  """The step's gradient (and the logged grad_norm) is the gradient of the global token-mean loss, whatever the
  micro-batch split (here the two micro-batches hold different numbers of targets)."""
  ex, params, want_loss, want = sft_reference
  opt = _capture()
  batch = pack_examples(ex, T, pad_id=0)
  schedule = optax.constant_schedule(0.5)
  step = jax.jit(trainer.make_train_step(lambda p, b, r: sft.loss_fn(p, b, CFG, r), opt, schedule, n_micro))
  new_state, m = step(_state(params, opt), batch)
  got = new_state["opt_state"]
  np.testing.assert_allclose(float(m["loss"]), want_loss, rtol=1e-5)
  want_norm = math.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(want)))
  np.testing.assert_allclose(float(m["grad_norm"]), want_norm, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), got, want)
  assert float(m["lr"]) == 0.5 and float(m["weight"]) == sum(int(e.loss_mask[1:].sum()) for e in ex)


# ---------------------------------------------------------------------------------------------- schedule

def expected_lr(s, *, lr, min_lr, warmup, max_steps, schedule):
  """Closed form at optimizer step s (0-based): linear warmup 0 -> lr over `warmup` steps, then decay to min_lr
  over the remaining max_steps - warmup steps (and flat after)."""
  if s < warmup:
    return lr * s / warmup
  t = min(s - warmup, max(max_steps - warmup, 1)) / max(max_steps - warmup, 1)
  if schedule == "cosine":
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
  if schedule == "linear":
    return lr + (min_lr - lr) * t
  return lr


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 4])
def test_lr_schedule_closed_form(schedule, warmup):
  c = ml_collections.ConfigDict(dict(lr=2e-3, min_lr=2e-4, warmup_steps=warmup, schedule=schedule))
  fn = trainer.make_schedule(c, 20)
  for s in (0, 1, 2, 3, 4, 5, 9, 13, 19, 20, 30):
    want = expected_lr(s, lr=2e-3, min_lr=2e-4, warmup=warmup, max_steps=20, schedule=schedule)
    assert float(fn(s)) == pytest.approx(want, rel=1e-5, abs=1e-12), (s, float(fn(s)), want)


# ---------------------------------------------------------------------------------------------- weight decay

DECAYED = {"embed", "lm_head", "layers/q", "layers/k", "layers/v", "layers/o", "layers/gate", "layers/up",
           "layers/down", "value_head/w", "lora/q/a", "lora/q/b", "lora/v/a", "lora/v/b"}
NOT_DECAYED = {"final_norm", "layers/attn_norm", "layers/mlp_norm", "layers/q_bias", "layers/k_bias",
               "layers/v_bias", "value_head/b"}


def test_weight_decay_mask():
  """One AdamW step with zero gradients: matrices shrink by exactly lr * wd * param, norms and biases stay."""
  cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn_size=32,
                    qkv_bias=True, num_value_heads=2, lora_rank=2)
  shapes = transformer.param_shapes(cfg)
  leaves, treedef = jax.tree.flatten_with_path(shapes)
  names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
  assert set(names) == DECAYED | NOT_DECAYED
  rng = np.random.RandomState(0)
  params = jax.tree.unflatten(treedef, [1.0 + rng.randn(*s.shape).astype(np.float32) for _, s in leaves])
  lr, wd = 0.1, 0.5
  c = ml_collections.ConfigDict(dict(lr=lr, min_lr=0.0, warmup_steps=0, schedule="constant", b1=0.9, b2=0.98,
                                     eps=1e-8, weight_decay=wd))
  opt, _ = trainer.make_optimizer(c, 10, grad_clip=1.0)

  @jax.jit
  def step(params):
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    return optax.apply_updates(params, updates)

  new = step(params)
  for name, p, q in zip(names, jax.tree.leaves(params), jax.tree.leaves(new)):
    want = np.asarray(p) * (1 - lr * wd) if name in DECAYED else np.asarray(p)
    np.testing.assert_allclose(np.asarray(q), want, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------- KTO

def _kto_batch(params):
  """4 rows of (sample, KL sample); reference log-probs chosen so that the KL samples' log-ratio is +3 in rows 0
  and 2 (micro-batch 0 of 2) and -3 in rows 1 and 3 (micro-batch 1)."""
  rng = np.random.RandomState(1)
  B, Tk, prompt = 4, 12, 4
  tokens = rng.randint(1, CFG.vocab_size, (B, 2, Tk)).astype(np.int32)
  lengths = rng.randint(7, Tk + 1, (B, 2))
  seg = (np.arange(Tk) < lengths[..., None]).astype(np.int32)
  mask = (np.arange(Tk) >= prompt) & (seg > 0)
  # policy log-probs of every sequence, in numpy from the model's logits
  flat = tokens.reshape(2 * B, Tk)
  logits = np.asarray(jax.jit(lambda p, t: transformer.forward(p, t, CFG))(params, flat))
  logp = np.zeros(2 * B)
  for i, (t, mk, n) in enumerate(zip(flat, mask.reshape(2 * B, Tk), lengths.reshape(-1))):
    lp = _log_softmax_np(logits[i, :n - 1])
    logp[i] = sum(lp[j - 1, t[j]] for j in range(1, n) if mk[j])
  logp = logp.reshape(B, 2)
  rho = np.stack([rng.uniform(-2, 2, B), np.array([3.0, -3.0, 3.0, -3.0])], axis=1)
  batch = {"tokens": tokens, "loss_mask": mask, "segment_ids": seg, "desirable": np.array([1, 0, 0, 1], bool),
           "ref_logps": (logp - rho).astype(np.float32)}
  return batch, rho


def _kto_loss_np(rho, rho_kl, desirable, beta):
  z = max(0.0, float(np.mean(rho_kl)))
  sig = lambda x: 1 / (1 + np.exp(-x))
  return np.where(desirable, 1 - sig(beta * (rho - z)), 1 - sig(beta * (z - rho))), z


def test_kto_reference_point_is_per_micro_batch():
  """KTO's z is the mean KL-sample log-ratio of each micro-batch (as NeMo-Aligner): with 2 micro-batches the loss
  is the mean of the per-micro-batch losses, which differs from the loss with one z over the global batch."""
  cfg = config_lib.base_config()
  cfg.algorithm, cfg.reference, cfg.kto.beta = "kto", "precomputed", 1.0
  params = _params(3)
  batch, rho = _kto_batch(params)
  opt = _capture()
  loss_fn = kto.make_loss(cfg, CFG)
  got = {}
  for n_micro in (1, 2):
    step = jax.jit(trainer.make_train_step(loss_fn, opt, optax.constant_schedule(0.0), n_micro, kto.finalize))
    _, m = step(_state(params, opt), batch)
    got[n_micro] = (float(m["loss"]), float(m["kl"]))
  good = batch["desirable"]
  glob_losses, z_glob = _kto_loss_np(rho[:, 0], rho[:, 1], good, 1.0)
  micro_losses, zs = [], []
  for rows in ([0, 2], [1, 3]):  # micro-batch i takes rows i, i + n_micro, ...
    l, z = _kto_loss_np(rho[rows, 0], rho[rows, 1], good[rows], 1.0)
    micro_losses.append(l.mean())
    zs.append(z)
  assert zs == pytest.approx([3.0, 0.0], abs=1e-4) and z_glob == pytest.approx(0.0, abs=1e-4)
  np.testing.assert_allclose(got[1], (glob_losses.mean(), z_glob), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[2], (np.mean(micro_losses), np.mean(zs)), rtol=1e-4, atol=1e-5)
  assert abs(np.mean(micro_losses) - glob_losses.mean()) > 0.05


# ---------------------------------------------------------------------------------------------- end to end

PACKED_STEPS = 8


def test_packed_sft_run_end_to_end(tmp_path, capsys):
  """data.packing=True through the CLI's run on the shipped toy data: rows really are packed, the loss is finite
  and falls, and the logged lr follows the closed-form schedule (step k logs the lr of optimizer step k - 1)."""
  cfg = config_lib.load_config_file("configs/sft_tiny.py")
  merged = config_lib.base_config()
  config_lib._merge(merged, cfg)
  config_lib.apply_overrides(merged, {"data.packing": "True", "train.max_steps": str(PACKED_STEPS),
                                      "eval.every_steps": "0", "eval.num_samples": "0",
                                      "checkpoint.every_steps": "100", "train.log_every": "1"})
  config_lib.validate(merged)
  wd = str(tmp_path / "packed")
  summary = train.run(merged, wd)
  assert summary["reason"] == "done"
  n_rows = int(re.search(r"-> (\d+) rows of", capsys.readouterr().out).group(1))
  assert n_rows <= 4000 // 2  # 4000 short conversations, two or more to a 64-token row
  rows = [json.loads(ln) for ln in open(os.path.join(wd, "metrics.jsonl"))]
  loss = np.array([r["loss"] for r in rows])
  assert len(loss) == PACKED_STEPS and np.isfinite(loss).all()
  assert loss[0] == pytest.approx(math.log(320), abs=0.3)  # a fresh model: about uniform over the vocabulary
  assert loss[-2:].mean() < loss[0] - 0.5, loss
  o = merged.optim
  for r in rows:
    want = expected_lr(r["step"] - 1, lr=o.lr, min_lr=o.min_lr, warmup=o.warmup_steps, max_steps=PACKED_STEPS,
                       schedule=o.schedule)
    assert r["lr"] == pytest.approx(want, rel=1e-5, abs=1e-12)
    assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
