"""Losses, gradients and updates on (data, fsdp, tensor) meshes equal the single-device run."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jalign import algorithms, sharding, trainer
from jalign.algorithms import sft
from jalign.config import base_config
from jalign.models import ModelConfig, init_params, param_axes, transformer

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64)
B, T = 8, 16


def _batch():
  rng = np.random.RandomState(0)
  seg = np.ones((B, T), np.int32)
  seg[:, 10:] = 2                      # two packed sequences per row
  seg[0, 14:] = 0                      # and some padding
  pos = np.where(np.arange(T) < 10, np.arange(T), np.arange(T) - 10)
  return {"tokens": rng.randint(0, 64, (B, T)).astype(np.int32), "loss_mask": rng.rand(B, T) > 0.3,
          "segment_ids": seg, "positions": np.tile(pos, (B, 1)).astype(np.int32)}


def _run(mesh_shape, n_micro=1):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh_cfg = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  mesh = sharding.make_mesh(mesh_cfg, devices=devices)
  rules = sharding.rules_from_config(base_config().mesh.rules)
  optimizer, schedule = trainer.make_optimizer(base_config().optim, 10, 1.0)

  def init(rng):
    params = init_params(CFG, rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": {}, "opt_state": optimizer.init(params),
            "rng": jax.random.PRNGKey(1)}

  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  state_sh = trainer.state_shardings(abstract, param_axes(CFG), mesh, rules, optimizer)
  batch_sh = {k: sharding.named_sharding(ax, rules, mesh, (B, T)) for k, ax in sft.BATCH_AXES.items()}
  loss_fn = lambda p, b, r: sft.loss_fn(p, b, CFG, r)

  traced = functools.partial(sharding.bind, mesh=mesh, rules=rules)
  step = jax.jit(traced(trainer.make_train_step(loss_fn, optimizer, schedule, n_micro)),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,))
  grad_fn = jax.jit(traced(jax.grad(lambda p, b: sft.loss_fn(p, b, CFG)[0])),
                    in_shardings=(state_sh["params"], batch_sh), out_shardings=state_sh["params"])
  state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(0))
  batch = trainer.to_global(_batch(), batch_sh)
  grads = grad_fn(state["params"], batch)
  # the params really are laid out on the mesh as the rules say
  if mesh_shape[2] > 1:
    assert state["params"]["layers"]["q"].sharding.spec[2] == "tensor"
  if mesh_shape[1] > 1:
    assert state["params"]["layers"]["q"].sharding.spec[1] == "fsdp"
    assert state["opt_state"][1][0].mu["layers"]["q"].sharding.spec[1] == "fsdp"
  new_state, metrics = step(state, batch)
  new_state, metrics2 = step(new_state, batch)
  return jax.device_get((grads, new_state["params"], metrics, metrics2))


@pytest.fixture(scope="module")
def single():
  return _run((1, 1, 1))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_matches_single_device(single, shape):
  grads, params, m1, m2 = _run(shape)
  g0, p0, s1, s2 = single
  for a, b in ((m1, s1), (m2, s2)):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads, g0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, p0)


def test_grad_accumulation_matches(single):
  grads, params, m1, m2 = _run((2, 1, 1), n_micro=4)
  _, p0, s1, s2 = single
  np.testing.assert_allclose(m1["loss"], s1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["loss"], s2["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, p0)


# ---------------------------------------------------------------------------------------------- [B, 2, T] pairs

PAIR_B = 8


def _pair_batch():
  """8 (chosen, rejected) pairs of random lengths 8..16: a 5-token prompt, then the response."""
  rng = np.random.RandomState(2)
  lengths = rng.randint(8, T + 1, (PAIR_B, 2))
  seg = (np.arange(T) < lengths[..., None]).astype(np.int32)
  batch = {"tokens": rng.randint(1, 64, (PAIR_B, 2, T)).astype(np.int32),
           "loss_mask": (np.arange(T) >= 5) & (seg > 0), "segment_ids": seg, "margin": rng.uniform(-1, 1, PAIR_B).astype(np.float32),
           "chosen_reward": np.zeros(PAIR_B, np.float32), "rejected_reward": np.zeros(PAIR_B, np.float32)}
  return batch, lengths


def _pair_setup(name):
  """(config, model config, trainable params, frozen params) of a DPO policy with its own reference copy, or of
  a Bradley-Terry reward model (LM head frozen)."""
  cfg = base_config()
  cfg.algorithm = name
  if name == "dpo":
    cfg.reference, cfg.dpo.beta = "copy", 0.5
    return cfg, CFG, init_params(CFG, jax.random.PRNGKey(0)), {"reference": init_params(CFG, jax.random.PRNGKey(7))}
  model_cfg = dataclasses.replace(CFG, num_value_heads=1)
  params = init_params(model_cfg, jax.random.PRNGKey(0))
  return cfg, model_cfg, {k: v for k, v in params.items() if k != "lm_head"}, {"lm_head": params["lm_head"]}


def _pair_reference(name):
  """The documented mean loss and its gradient on one device, without the code's pair layout or masks: every
  sequence alone in its own row (trailing padding, never attended to by a causal model)."""
  cfg, model_cfg, params, frozen = _pair_setup(name)
  batch, lengths = _pair_batch()
  tokens_NT = jnp.asarray(batch["tokens"].reshape(2 * PAIR_B, T))
  n_N = lengths.reshape(-1)
  target_NT = batch["loss_mask"].reshape(2 * PAIR_B, T)[:, 1:].astype(np.float32)

  def seq_logps(p):
    logp_NTV = jax.nn.log_softmax(transformer.forward(p, tokens_NT, model_cfg)[:, :-1])
    picked_NT = jnp.take_along_axis(logp_NTV, tokens_NT[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(picked_NT * target_NT, axis=-1).reshape(PAIR_B, 2)

  def loss(p):
    if name == "dpo":
      rho = seq_logps(p) - seq_logps(frozen["reference"])
      return jnp.mean(-jax.nn.log_sigmoid(cfg.dpo.beta * (rho[:, 0] - rho[:, 1])))
    h_ND = transformer.hidden_states({**frozen, **p}, tokens_NT, model_cfg)[np.arange(2 * PAIR_B), n_N - 1]
    r = (h_ND @ p["value_head"]["w"][:, 0] + p["value_head"]["b"][0]).reshape(PAIR_B, 2)
    return jnp.mean(-jax.nn.log_sigmoid(r[:, 0] - r[:, 1] - batch["margin"]))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return jax.device_get((params, value, grads))


def _pair_run(name, mesh_shape):
  """One train step (SGD, lr 1: the update is the gradient itself) on a (data, fsdp, tensor) mesh."""
  cfg, model_cfg, params, frozen = _pair_setup(name)
  algo = algorithms.get(name)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_shape))),
                            devices=jax.devices()[:int(np.prod(mesh_shape))])
  rules = sharding.rules_from_config(cfg.mesh.rules)
  optimizer = optax.sgd(1.0)
  axes = param_axes(model_cfg)
  if "reference" in frozen:
    axes = {**axes, "reference": param_axes(model_cfg)}
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "opt_state": optimizer.init(params),
           "rng": jax.random.PRNGKey(1)}
  state_sh = trainer.state_shardings(jax.eval_shape(lambda: state), axes, mesh, rules, optimizer)
  batch, _ = _pair_batch()
  batch_sh = {k: sharding.named_sharding(ax, rules, mesh, batch[k].shape)
              for k, ax in algo.batch_axes(cfg).items()}
  traced = functools.partial(sharding.bind, mesh=mesh, rules=rules)
  step = jax.jit(traced(trainer.make_train_step(algo.make_loss(cfg, model_cfg), optimizer,
                                                optax.constant_schedule(1.0), 1, algo.finalize)),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)))
  state = jax.device_put(state, state_sh)
  if mesh_shape[1] > 1 and mesh_shape[2] > 1:
    assert state["params"]["layers"]["q"].sharding.spec[1:3] == ("fsdp", "tensor")
    assert batch_sh["tokens"].spec[0] == ("data", "fsdp")
  new_state, m = step(state, trainer.to_global({k: batch[k] for k in batch_sh}, batch_sh))
  return jax.device_get((new_state["params"], m))


@pytest.mark.parametrize("name", ["dpo", "rm"])
def test_pair_layout_on_meshes_matches_independent_gradient(name):
  """DPO and a Bradley-Terry reward model on data=8 and on data=2, fsdp=2, tensor=2: the same loss and updated
  params, equal to the loss and params - gradient of the documented mean loss computed on one device."""
  p0, want_loss, want_grads = _pair_reference(name)
  want_params = jax.tree.map(lambda p, g: p - g, p0, want_grads)
  want_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(want_grads)))
  for shape in ((8, 1, 1), (2, 2, 2)):
    params, m = _pair_run(name, shape)
    np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], want_norm, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, want_params)
  if name == "dpo":
    assert abs(float(want_loss) - np.log(2)) > 0.01  # the policy differs from its reference


def test_mesh_shape_resolution_and_errors():
  assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.resolve_mesh_shape({"data": 4, "fsdp": 4, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_indivisible_dims_stay_replicated():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=8)))
  rules = sharding.rules_from_config(sharding.DEFAULT_RULES)
  # 2 kv heads cannot split 8 ways: replicated rather than an error
  assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), rules, mesh, (32, 2, 8)) == \
      jax.sharding.PartitionSpec(None, None, None)
  assert sharding.logical_to_spec(("embed", "q_heads"), rules, mesh, (32, 8)) == \
      jax.sharding.PartitionSpec(None, "tensor")
