"""Device mesh, logical-axis rules and multi-process start-up.

Parameters and activations carry logical axis names (``("embed", "mlp")``); the rules in ``config.mesh.rules``
map each logical name to zero or more mesh axes (``data``, ``fsdp``, ``tensor``). Model code never names a mesh
axis.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
    ("value_out", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_CTX = contextvars.ContextVar("jalign_sharding", default=None)
log = logging.getLogger(__name__)


def maybe_initialize_distributed(cfg) -> None:
  """Start jax.distributed when the config or the environment asks for several processes.

  In order: explicit ``distributed.coordinator_address`` / ``num_processes`` / ``process_id``; the environment
  variables ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (GKE JobSet); JAX's own
  cluster detection under Slurm (several tasks). Must run before any other JAX call.
  """
  d = cfg.distributed
  env = os.environ
  if d.coordinator_address:
    jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                               process_id=d.process_id, initialization_timeout=d.timeout_s)
  elif env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env.get("JAX_PROCESS_ID", "0")), initialization_timeout=d.timeout_s)
  elif int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize(initialization_timeout=d.timeout_s)


def resolve_mesh_shape(sizes: dict, num_devices: int) -> tuple[int, ...]:
  """Mesh sizes with one ``-1`` meaning 'the rest of the devices'."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices do not divide by {known} "
                       f"({dict(zip(MESH_AXES, shape))})")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"{num_devices} are available")
  return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape({a: mesh_cfg[a] for a in MESH_AXES}, len(devices))
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # CPU and odd topologies: plain process-major order
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def rules_from_config(rules) -> dict:
  out = {}
  for name, target in rules:
    if target is None or target == "":
      out[name] = ()
    elif isinstance(target, str):
      out[name] = (target,)
    else:
      out[name] = tuple(target)
    for t in out[name]:
      if t not in MESH_AXES:
        raise ValueError(f"mesh.rules: logical axis {name!r} maps to unknown mesh axis {t!r}")
  return out


def logical_to_spec(axes, rules: dict, mesh: Mesh, shape=None) -> P:
  """PartitionSpec for logical ``axes``; a mesh axis is used once and only where it divides the dimension."""
  used, spec = set(), []
  for i, name in enumerate(axes):
    if name is not None and name not in rules:
      raise KeyError(f"no sharding rule for logical axis {name!r}; add it to config.mesh.rules")
    targets = [t for t in rules.get(name, ()) if t not in used and mesh.shape[t] > 1]
    if shape is not None:
      keep, size = [], 1
      for t in targets:
        if shape[i] % (size * mesh.shape[t]) == 0:
          keep.append(t)
          size *= mesh.shape[t]
      targets = keep
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else tuple(targets))
  return P(*spec)


def named_sharding(axes, rules, mesh, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def tree_shardings(axes_tree, shapes_tree, rules, mesh):
  """NamedShardings for a pytree given matching trees of logical axes and shapes (ShapeDtypeStructs ok)."""
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  return jax.tree.map(lambda ax, s: named_sharding(ax, rules, mesh, getattr(s, "shape", s)),
                      axes_tree, shapes_tree, is_leaf=is_axes)


@contextlib.contextmanager
def use(mesh: Mesh, rules: dict):
  """Make ``constrain`` active: activations inside get sharding constraints from ``rules`` on ``mesh``."""
  token = _CTX.set((mesh, rules))
  try:
    yield
  finally:
    _CTX.reset(token)


def bind(fn, mesh: Mesh, rules: dict):
  """``fn`` traced with ``use(mesh, rules)`` active (wrap before ``jax.jit``)."""
  def wrapped(*args):
    with use(mesh, rules):
      return fn(*args)
  return wrapped


def constrain(x, axes):
  """Sharding constraint by logical axis names; a no-op outside ``use(...)``."""
  ctx = _CTX.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, named_sharding(axes, rules, mesh, x.shape))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
