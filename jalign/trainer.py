"""The one training loop, and the pure train step it runs.

State is a plain dict ``{step, params (trainable), frozen, opt_state, rng}``. ``make_train_step`` turns an
algorithm's ``loss_fn(params, batch, rng) -> (loss_sum, weight, metric_sums)`` into a step that accumulates
gradients over micro-batches and divides by the total weight of the global batch, so the result does not depend
on the micro-batch split. It is jitted with explicit in/out shardings and the state buffers donated.
"""
from __future__ import annotations

import logging
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jalign import sharding

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
  pass


# ---------------------------------------------------------------------------------------------- optimizer

def make_schedule(optim_cfg, max_steps: int):
  lr, warm, min_lr = optim_cfg.lr, optim_cfg.warmup_steps, optim_cfg.min_lr
  decay_steps = max(max_steps - warm, 1)
  if optim_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr / lr if lr else 0.0)
  elif optim_cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, min_lr, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warm:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])
  return decay


def _decay_mask(params):
  """No weight decay on norms and biases."""
  def keep(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name.endswith("norm") or name.endswith("bias") or name == "b" and "value_head" in str(path))
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg, max_steps: int, grad_clip: float, critic_lr: float | None = None, keys=()):
  """AdamW after global-norm clipping; with ``critic_lr``, ``params["critic"]`` (PPO) gets its own AdamW and clip
  (NeMo-Aligner trains actor and critic as separate jobs) on the same schedule shape scaled to ``critic_lr``;
  ``keys``: the top-level keys of the trainable params."""
  schedule = make_schedule(optim_cfg, max_steps)

  def adamw(sched):
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(sched, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)

  if critic_lr is None:
    return adamw(schedule), schedule
  scale = critic_lr / optim_cfg.lr if optim_cfg.lr else 0.0
  labels = {k: "critic" if k == "critic" else "policy" for k in keys}  # a prefix of the params tree
  return optax.multi_transform({"policy": adamw(schedule), "critic": adamw(lambda s: scale * schedule(s))},
                               labels), schedule


# ---------------------------------------------------------------------------------------------- step

def _split_micro(batch, n_micro):
  """[B, ...] -> [n_micro, B/n_micro, ...]; micro-batch i takes rows i, i+n, ... so every device keeps
  contributing to every micro-batch."""
  def f(x):
    x = x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(f, batch)


def make_train_step(loss_fn, optimizer, schedule, n_micro: int, finalize=None):
  """loss_fn(full_params, batch, rng) -> (loss_sum, weight, metric_sums); ``finalize`` turns the averaged metric
  sums into the logged metrics (e.g. a std from a mean of squares)."""

  def grads_of(params, frozen, batch, rng):
    def f(p):
      loss_sum, weight, msums = loss_fn({**frozen, **p}, batch, rng)
      return loss_sum, (weight, msums)
    (loss_sum, (weight, msums)), g = jax.value_and_grad(f, has_aux=True)(params)
    return g, weight, msums

  def step(state, batch):
    rng, step_rng = jax.random.split(state["rng"])
    params, frozen = state["params"], state["frozen"]
    if n_micro == 1:
      grads, weight, msums = grads_of(params, frozen, batch, step_rng)
    else:
      micro = _split_micro(batch, n_micro)

      def body(carry, xs):
        i, mb = xs
        g, w, m = grads_of(params, frozen, mb, jax.random.fold_in(step_rng, i))
        return jax.tree.map(jnp.add, carry, (g, w, m)), None

      g0, w0, m0 = jax.eval_shape(lambda: grads_of(params, frozen, jax.tree.map(lambda x: x[0], micro), step_rng))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, w0, m0))
      (grads, weight, msums), _ = jax.lax.scan(body, zeros, (jnp.arange(n_micro), micro))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {k: v / denom for k, v in msums.items()}
    if finalize is not None:
      metrics = finalize(metrics)
    # A step whose loss, gradient or updated weights are not finite leaves the state as it was, so a non-finite
    # state is never saved; the loop stops on ``finite=False``.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    for x in jax.tree.leaves(new_params):
      finite &= jnp.all(jnp.isfinite(x))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"step": jnp.where(finite, state["step"] + 1, state["step"]),
                 "params": keep(new_params, params), "frozen": frozen,
                 "opt_state": keep(opt_state, state["opt_state"]), "rng": keep(rng, state["rng"])}
    metrics.update(grad_norm=grad_norm, lr=schedule(state["step"]), weight=weight, finite=finite)
    return new_state, metrics

  return step


def make_eval_step(loss_fn):
  def step(params, frozen, batch):
    _, weight, msums = loss_fn({**frozen, **params}, batch, None)
    return weight, msums
  return step


# ---------------------------------------------------------------------------------------------- state

def state_shardings(abstract_state, param_axes_tree, mesh, rules, optimizer):
  """Params (trainable and frozen) by their logical axes; optimizer state like the params; scalars replicated."""
  psh = sharding.tree_shardings({k: param_axes_tree[k] for k in abstract_state["params"]},
                                abstract_state["params"], rules, mesh)
  fsh = sharding.tree_shardings({k: param_axes_tree[k] for k in abstract_state["frozen"]},
                                abstract_state["frozen"], rules, mesh)
  rep = sharding.replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # parts of the params another optimizer (PPO's critic) owns
  osh = optax.tree_map_params(optimizer, lambda x, s: x if masked(x) else s, abstract_state["opt_state"], psh,
                              transform_non_params=lambda _: rep, is_leaf=masked)
  return {"step": rep, "params": psh, "frozen": fsh, "opt_state": osh, "rng": rep}


def abstract_with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ---------------------------------------------------------------------------------------------- loop

class Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and stops at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _any_process(flag: bool) -> bool:
  """True on every process if it is true on any: all processes must stop (and save) at the same step."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def to_global(local_batch: dict, batch_shardings: dict) -> dict:
  return {k: jax.make_array_from_process_local_data(batch_shardings[k], np.asarray(v))
          for k, v in local_batch.items()}


class StaticSource:
  """A data iterator as a source: every step is a boundary, no host metrics."""

  def __init__(self, it):
    self.it = it

  def next(self, state):
    return next(self.it), {}

  def at_boundary(self) -> bool:
    return True

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


def run(*, state, train_step, eval_fn, source, batch_shardings, max_steps: int, start_step: int,
        checkpointer, ckpt_every: int, ckpt_meta: dict | None = None, eval_every: int, writer, progress,
        global_batch: int, seq_len: int, flops_per_token: float = 0.0, peak_flops: float = 0.0, on_step=None,
        prefix: str = ""):
  """Run steps start_step+1 .. max_steps. Returns (state, final step, stop reason).

  ``source``: ``next(state) -> (local batch, host metrics)``, ``at_boundary()``, ``get_state()``. Checkpoints
  (every ``ckpt_every`` steps, at the end, and on SIGTERM) are written at the first boundary at or after they are
  due, so an RL run saves between rollouts. ``prefix`` names the step's metrics (``train_optim/`` for RL)."""
  consumed = start_step * global_batch
  reason = "done"
  last_saved = start_step
  due = False
  with Preemption() as pre:
    for step in range(start_step + 1, max_steps + 1):
      local, host_metrics = source.next(state)
      batch = to_global(local, batch_shardings)
      t0 = time.perf_counter()
      state, m = train_step(state, batch)
      m = jax.device_get(m)
      dt = time.perf_counter() - t0
      loss = float(m["loss"])
      if not bool(m["finite"]):
        if checkpointer is not None:
          checkpointer.wait()
        where = (f"the last good checkpoint (step {last_saved}) is intact" if last_saved else
                 "no checkpoint was written yet")
        raise NonFiniteLoss(f"non-finite step {step} (loss={loss}, grad_norm={float(m['grad_norm'])}); stopping "
                            f"with the weights of step {step - 1}: {where}.")
      consumed += global_batch
      tokens_per_sec = global_batch * seq_len / dt
      metrics = {"loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]), "step_time": dt,
                 "consumed_samples": consumed, "tokens_per_sec": tokens_per_sec,
                 **{k: float(v) for k, v in m.items() if k not in ("loss", "lr", "grad_norm", "weight", "finite")}}
      if flops_per_token and peak_flops:
        metrics["mfu"] = flops_per_token * tokens_per_sec / peak_flops
      writer.write(step, {**{prefix + k: v for k, v in metrics.items()}, **host_metrics})
      progress.update(step, metrics)
      if eval_fn is not None and eval_every and (step % eval_every == 0 or step == max_steps):
        ev = eval_fn(state)
        writer.write(step, ev)
        progress.message(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
      if on_step is not None:
        on_step(step, metrics)
      boundary = source.at_boundary()
      stop = _any_process(pre.requested) and boundary
      due = due or step % ckpt_every == 0 or step == max_steps
      if checkpointer is not None and boundary and (due or stop):
        # frozen weights are not saved: resume rebuilds them from their source
        saved = {k: v for k, v in state.items() if k != "frozen"}
        checkpointer.save(step, saved, source.get_state(), ckpt_meta or {}, force=True)
        last_saved, due = step, False
      if stop:
        reason = "preempted"
        break
  if checkpointer is not None:
    checkpointer.wait()
  return state, step, reason
