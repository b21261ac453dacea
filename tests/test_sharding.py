"""Losses, gradients and updates on (data, fsdp, tensor) meshes equal the single-device run."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jalign import sharding, trainer
from jalign.algorithms import sft
from jalign.config import base_config
from jalign.models import ModelConfig, init_params, param_axes

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
