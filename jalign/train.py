"""``python -m jalign.train --config configs/<x>.py --workdir DIR [--config.key=value ...]``

Parse and validate the config, build the mesh, the model, the data and the algorithm's step, then run the
shared loop. Re-running the same command resumes from the newest complete checkpoint in ``DIR/checkpoints``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import time

import numpy as np

# Bad input must print one line, not a wall of traceback: these are the errors we explain ourselves.
from jalign import config as config_lib

log = logging.getLogger("jalign")

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}
ARCH_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size",
             "rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
             "rope_original_max_position", "rms_norm_eps", "qkv_bias", "tie_embeddings", "sliding_window",
             "activation", "norm_offset", "scale_embeddings")


def peak_flops_per_device(cfg, device) -> float:
  if cfg.train.peak_tflops:
    return cfg.train.peak_tflops * 1e12
  kind = getattr(device, "device_kind", "")
  for name, tf in PEAK_TFLOPS.items():
    if name in kind:
      return tf * 1e12
  return 0.0


def model_config_for(cfg):
  """The model config; with ``model.checkpoint``, architecture keys come from the checkpoint."""
  from jalign import checkpoint
  from jalign.models import ModelConfig
  d = cfg.model.to_dict()
  if cfg.model.checkpoint:
    saved = checkpoint.read_model_config(checkpoint.resolve_model_dir(cfg.model.checkpoint))
    d.update({k: saved[k] for k in ARCH_KEYS if k in saved})
  return ModelConfig.from_config(d)


def _prompt_and_reference(ex):
  first = int(ex.loss_mask.argmax()) if ex.loss_mask.any() else len(ex.tokens)
  return list(ex.tokens[:first]), list(ex.tokens[first:])


def show_samples(title, params, model_cfg, tok, examples, cfg, progress):
  from jalign import generate
  import jax
  n = min(cfg.eval.num_samples, len(examples))
  if not n or jax.process_count() > 1:  # samples are a single-process convenience
    return []
  prompts, refs = zip(*[_prompt_and_reference(e) for e in examples[:n]])
  stop = {i for i in (tok.token_to_id("<extra_id_1>"), tok.eos_id) if i is not None}
  outs = generate.generate(params, model_cfg, list(prompts), max_new_tokens=cfg.eval.max_new_tokens,
                           stop_ids=stop, pad_id=tok.pad_id)
  progress.message(f"--- samples {title} ---")
  rows = []
  for p, r, o in zip(prompts, refs, outs):
    q = tok.decode(p).replace("\n", "\\n")[-60:]
    got, want = tok.decode(o).replace("\n", "\\n"), tok.decode(r).replace("\n", "\\n")
    progress.message(f"  ...{q} -> {got!r} (reference {want!r})")
    rows.append((got, want))
  exact = sum(g == w for g, w in rows)
  progress.message(f"  exact match with the reference: {exact}/{len(rows)}")
  return rows


class Run:
  """What the phases of a run share: config, process, tokenizer, model config, mesh, shardings and state
  builders. Each phase below fills in its part."""

  def __init__(self, cfg, workdir):
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)

  def policy(self, st):
    """The policy's params (trainable and frozen) from a train state: no reference copy, no critic."""
    from jalign.algorithms import common
    return common.policy_params({**st["frozen"], **st["params"]})


def run(cfg, workdir: str, on_step=None) -> dict:
  """Train; returns a summary dict (with the final ``state``). ``on_step(step, metrics)`` is called each step."""
  r = setup(cfg, workdir)
  load_data(r)  # a mistake in the data fails here, before any checkpoint manager (and its threads) exists
  open_checkpoints(r)
  try:
    build_state(r)
    build_steps(r)
    source, eval_fn = build_source(r)
    state = start_state(r, source)
    return loop_and_finish(r, state, source, eval_fn, on_step)
  finally:  # also on a user's mistake: the checkpoint manager's threads must not outlive the run
    r.ckpt.close()


def setup(cfg, workdir) -> Run:
  """Processes, algorithm, model config, tokenizer, mesh."""
  import jax

  from jalign import algorithms, checkpoint, data, sharding
  config_lib.enable_compile_cache(cfg.train.compile_cache)
  sharding.maybe_initialize_distributed(cfg)
  r = Run(cfg, workdir)
  r.pid, r.nproc = jax.process_index(), jax.process_count()
  r.main_proc = r.pid == 0
  r.algo = algorithms.get(cfg.algorithm)
  r.rl = cfg.algorithm in algorithms.RL
  # an algorithm's own model family (jalign.algorithms: model_family), else the language model and its tokenizer
  r.family = r.algo.model_family(cfg) if hasattr(r.algo, "model_family") else None
  r.init_checkpoint = r.family.checkpoint if r.family else cfg.model.checkpoint
  if r.family:
    r.model_cfg, r.tok = r.family.config, None
  else:
    r.model_cfg = model_config_for(cfg)
    if hasattr(r.algo, "model_overrides"):
      r.model_cfg = dataclasses.replace(r.model_cfg, **r.algo.model_overrides(cfg))
    tok_path = cfg.tokenizer.path or (checkpoint.resolve_model_dir(cfg.model.checkpoint) if cfg.model.checkpoint
                                      else "")
    r.tok = data.load_tokenizer(tok_path)
    if cfg.tokenizer.chat_template == "hf" and not r.tok.chat_template:
      raise config_lib.ConfigError(f"tokenizer.chat_template=hf but the tokenizer ({r.tok.path}) has no chat "
                                   "template in tokenizer_config.json; use tokenizer.chat_template=nemo")
    if r.tok.vocab_size > r.model_cfg.vocab_size:
      raise config_lib.ConfigError(f"tokenizer has {r.tok.vocab_size} tokens but model.vocab_size="
                                   f"{r.model_cfg.vocab_size}")
  try:
    r.mesh = sharding.make_mesh(cfg.mesh)
    r.rules = sharding.rules_from_config(cfg.mesh.rules)
  except ValueError as e:
    raise config_lib.ConfigError(f"{e} (mesh.data, mesh.fsdp, mesh.tensor, mesh.rules)") from None
  r.gb = cfg.train.global_batch_size
  dp = r.mesh.shape["data"] * r.mesh.shape["fsdp"]
  mbs = cfg.train.micro_batch_size or r.gb // dp
  if r.gb % (mbs * dp):
    raise config_lib.ConfigError(f"train.global_batch_size={r.gb} must be a multiple of train.micro_batch_size="
                                 f"{mbs} x data-parallel size {dp}")
  r.n_micro = r.gb // (mbs * dp)
  r.ref_mode = reference_mode(cfg)
  return r


def open_checkpoints(r: Run):
  """The checkpoint directory, the resume check against its latest checkpoint, and the run's config.json."""
  from jalign import checkpoint
  cfg = r.cfg
  r.ckpt = checkpoint.Checkpointer(os.path.join(r.workdir, "checkpoints"), cfg.checkpoint.keep,
                                   cfg.checkpoint.async_save)
  try:
    r.start_step = r.ckpt.latest_step() or 0
    r.data_digest = file_digest(cfg.data.train_path) if cfg.data.train_path else ""
    r.resume_meta = r.ckpt.read_meta(r.start_step) if r.start_step else None
    if r.start_step:
      check_resume(r.resume_meta, cfg, r.data_digest, r.start_step)
  except BaseException:
    r.ckpt.close()
    raise
  if r.main_proc:
    os.makedirs(r.workdir, exist_ok=True)
    with open(os.path.join(r.workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))


def load_data(r: Run):
  """Training rows (offline algorithms) or prompts (RL), and the eval split."""
  cfg = r.cfg
  if not cfg.data.train_path:
    raise config_lib.ConfigError("data.train_path is empty")
  if r.rl:
    from jalign import generate
    prompts = generate.Prompts(r.tok, cfg.data, cfg.tokenizer.chat_template)
    r.prompts = generate.read_rows(cfg.data.train_path, prompts, cfg.rollout.max_prompt_len)
    r.eval_prompts = (generate.read_rows(cfg.data.eval_path, prompts, cfg.rollout.max_prompt_len)
                      [:cfg.rollout.eval_prompts] if cfg.data.eval_path else [])
    r.seq_len = cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens
    from jalign.rl import build
    r.row_shapes = build.row_shapes(r.algo.batch_axes(cfg), r.seq_len)
    r.describe = f"{len(r.prompts)} prompts | {len(r.eval_prompts)} eval prompts"
    return
  r.rows, n_train, r.skipped, _ = r.algo.load_data(cfg.data.train_path, r.tok, cfg)
  r.eval_rows, r.eval_ex, n_eval = None, [], 0
  if cfg.data.eval_path:
    r.eval_rows, n_eval, eval_skipped, r.eval_ex = r.algo.load_data(cfg.data.eval_path, r.tok, cfg)
    r.skipped += eval_skipped
  slots = ()
  if "pair_valid" in r.rows:  # pairs packed in rows: one number of pair slots P for train and eval
    from jalign.data import preference
    if r.eval_rows is not None:
      r.rows, r.eval_rows = preference.match_slots(r.rows, r.eval_rows)
    slots = r.rows["pair_valid"].shape[1:]
  r.window = 0  # padded pairs: the LM head only where trained tokens can be (common.response_window)
  if getattr(r.algo, "WINDOWED", False) and "pair_valid" not in r.rows and "loss_mask" in r.rows:
    from jalign.algorithms import common
    r.window = common.response_window(r.rows, r.eval_rows)
  r.row_shapes = {k: r.rows[k].shape[1:] for k in r.algo.batch_axes(cfg) if k != "ref_logps"}
  r.row_shapes.setdefault("ref_logps", slots + (2,))
  first = r.rows["tokens"] if "tokens" in r.rows else next(iter(r.rows.values()))
  r.seq_len = getattr(r.family, "seq_len", 0) or int(np.prod(first.shape[1:]))
  r.describe = (f"{n_train} train rows -> {len(first)} rows of {first.shape[1:]} | "
                f"{n_eval} eval rows | skipped {r.skipped} invalid")


def build_state(r: Run):
  """Roles, optimizer, state shardings and the functions that build the starting state (``r.initial_state``)."""
  import jax
  import jax.numpy as jnp

  from jalign import checkpoint, sharding, trainer
  from jalign.models import init_params, lora, param_axes, param_shapes
  if r.family:
    init_params, param_axes, param_shapes = r.family.init_params, r.family.param_axes, r.family.param_shapes
  cfg, model_cfg = r.cfg, r.model_cfg
  r.batch_sh = {k: sharding.named_sharding(ax, r.rules, r.mesh, (r.gb,) + tuple(r.row_shapes[k]))
                for k, ax in r.algo.batch_axes(cfg).items()}
  axes, shapes = param_axes(model_cfg), param_shapes(model_cfg)
  r.shapes = shapes
  trainable_keys = [k for k in lora.trainable_keys(shapes) if k not in getattr(r.algo, "FROZEN", ())]
  r.base_keys = [k for k in shapes if k != "lora"]
  if r.ref_mode == "copy":
    axes = {**axes, "reference": {k: axes[k] for k in r.base_keys}}
  r.critic_cfg = None
  if cfg.algorithm == "ppo":
    from jalign.rl import build
    r.critic_cfg = build.critic_config(cfg)
  if r.critic_cfg is not None:
    axes = {**axes, "critic": param_axes(r.critic_cfg)}
  r.teacher_cfg = getattr(r.algo, "teacher_config", lambda _: None)(cfg)  # KD's online teacher, frozen
  if r.teacher_cfg is not None:
    axes = {**axes, "teacher": param_axes(r.teacher_cfg)}
  r.optimizer, r.schedule = trainer.make_optimizer(cfg.optim, cfg.train.max_steps, cfg.train.grad_clip,
                                                   critic_lr=cfg.ppo.critic_lr if r.critic_cfg else None,
                                                   keys=trainable_keys + ["critic"])

  def init_state(rng, base=None, ref_base=None, critic=None, teacher=None):
    p_rng, s_rng, c_rng = jax.random.split(rng, 3)
    params = init_params(model_cfg, p_rng)
    if base is not None:
      params.update(base)
    tr = {k: v for k, v in params.items() if k in trainable_keys}
    fr = {k: v for k, v in params.items() if k not in trainable_keys}
    if r.ref_mode == "copy":  # a frozen copy of the starting (or given) weights, never updated
      fr["reference"] = jax.tree.map(jnp.copy, {k: params[k] for k in r.base_keys} if ref_base is None else ref_base)
    if r.critic_cfg is not None:
      tr["critic"] = init_params(r.critic_cfg, c_rng) if critic is None else critic
    if teacher is not None:
      fr["teacher"] = teacher
    return {"step": jnp.zeros((), jnp.int32), "params": tr, "frozen": fr, "opt_state": r.optimizer.init(tr),
            "rng": s_rng}

  r.abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0),
                              teacher=None if r.teacher_cfg is None else param_shapes(r.teacher_cfg))
  r.state_sh = trainer.state_shardings(r.abstract, axes, r.mesh, r.rules, r.optimizer)
  r.param_sh = {**r.state_sh["frozen"], **r.state_sh["params"]}
  rng = jax.random.PRNGKey(cfg.seed)
  r.base_abs = {k: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes[k], r.param_sh[k]) for k in r.base_keys}

  def initial_state(frozen_only=False):
    """The starting state (built once); ``frozen_only``: just the frozen weights (what a checkpoint does not
    store)."""
    if not frozen_only and getattr(r, "_initial", None) is not None:
      return r._initial
    copies_start = r.ref_mode == "copy" and not cfg.model.reference_checkpoint  # the reference is the start
    keys = [k for k in r.base_keys if k in r.abstract["frozen"] or copies_start] if frozen_only else r.base_keys
    base = (checkpoint.load_params(r.init_checkpoint, {k: r.base_abs[k] for k in keys})
            if r.init_checkpoint and keys else None)
    ref = None
    if cfg.model.reference_checkpoint and r.ref_mode == "copy":
      ref = checkpoint.load_params(cfg.model.reference_checkpoint, r.base_abs, optional=("value_head", "lm_head"))
    teacher = None
    if r.teacher_cfg is not None:
      teacher = checkpoint.load_params(cfg.kd.teacher_checkpoint, trainer.abstract_with_shardings(
          param_shapes(r.teacher_cfg), r.param_sh["teacher"]))
    if frozen_only:
      return jax.jit(lambda *a: init_state(*a)["frozen"], out_shardings=r.state_sh["frozen"])(rng, base, ref, None,
                                                                                             teacher)
    critic = None
    if r.critic_cfg is not None:
      from jalign.rl import build
      critic = build.load_critic(cfg, r.critic_cfg, r.state_sh["params"]["critic"])
    r._initial = jax.jit(init_state, out_shardings=r.state_sh)(rng, base, ref, critic, teacher)
    return r._initial

  r.initial_state = initial_state
  if r.ref_mode == "precomputed":
    from jalign.algorithms import reference
    reference.attach(r, r.rows, r.eval_rows)


def build_steps(r: Run):
  """The jitted train step (state donated) and, for offline algorithms, the eval step."""
  import jax

  from jalign import sharding, trainer
  traced = functools.partial(sharding.bind, mesh=r.mesh, rules=r.rules)
  args = (r.cfg, r.model_cfg) + ((r.critic_cfg,) if r.critic_cfg else ())
  loss_fn = r.algo.make_loss(*args, **({"window": r.window} if getattr(r, "window", 0) else {}))
  r.finalize = getattr(r.algo, "finalize", None)
  r.train_step = jax.jit(traced(trainer.make_train_step(loss_fn, r.optimizer, r.schedule, r.n_micro, r.finalize)),
                         in_shardings=(r.state_sh, r.batch_sh),
                         out_shardings=(r.state_sh, sharding.replicated(r.mesh)), donate_argnums=(0,))
  r.eval_step = jax.jit(traced(trainer.make_eval_step(loss_fn)),
                        in_shardings=(r.state_sh["params"], r.state_sh["frozen"], r.batch_sh),
                        out_shardings=sharding.replicated(r.mesh))


def build_source(r: Run):
  """(source, eval_fn): the shuffled data iterator and the eval loss, or the RL experience source and the
  rollout eval."""
  from jalign import data, trainer
  if r.rl:
    from jalign.rl import build
    return build.source_and_eval(r)
  if r.cfg.algorithm == "spin":
    from jalign.rl import spin_source
    return spin_source.source_and_eval(r)
  it = data.train_dataset(r.rows, global_batch=r.gb, seed=r.cfg.seed, shuffle=r.cfg.data.shuffle,
                          process_index=r.pid, process_count=r.nproc)
  eval_fn = functools.partial(offline_eval, r) if r.eval_rows is not None else None
  return trainer.StaticSource(iter(it)), eval_fn


def offline_eval(r: Run, st) -> dict:
  import jax

  from jalign import data, trainer
  tot_w, tot = 0.0, {}
  pad = r.tok.pad_id if r.tok else 0
  for b in data.eval_batches(r.eval_rows, global_batch=r.gb, pad_id=pad, process_index=r.pid,
                             process_count=r.nproc, max_batches=r.cfg.eval.max_batches):
    w, m = jax.device_get(r.eval_step(st["params"], st["frozen"], trainer.to_global(b, r.batch_sh)))
    tot_w += float(w)
    for k, v in m.items():
      tot[k] = tot.get(k, 0.0) + float(v)
  avg = {k: v / max(tot_w, 1.0) for k, v in tot.items()}
  if r.finalize is not None:
    avg = {k: float(v) for k, v in r.finalize(avg).items()}
  return {f"val_{k}": v for k, v in avg.items()}


def start_state(r: Run, source):
  """The starting state, or the newest checkpoint's (with the frozen weights rebuilt from their source and
  checked against the digest the checkpoint recorded)."""
  from jalign import checkpoint, trainer
  if r.start_step:
    saved_abs = trainer.abstract_with_shardings({k: v for k, v in r.abstract.items() if k != "frozen"},
                                                {k: v for k, v in r.state_sh.items() if k != "frozen"})
    state, data_state = r.ckpt.restore(r.start_step, saved_abs)
    state["frozen"] = r.initial_state(frozen_only=True)
    source.set_state(data_state)
  else:
    state = r.initial_state()
  frozen_digest = checkpoint.tree_digest(state["frozen"])
  if r.start_step and frozen_digest != r.resume_meta["frozen_digest"]:
    raise checkpoint.CheckpointError(
        f"the frozen weights rebuilt from model.checkpoint={r.cfg.model.checkpoint!r} / model.reference_checkpoint="
        f"{r.cfg.model.reference_checkpoint!r} are not those checkpoint {r.start_step} was trained with (they "
        "changed since); restore them or start a new --workdir")
  if r.start_step:
    log.info("resumed from %s/checkpoints/%d", r.workdir, r.start_step)
  r.ckpt_meta = {"config": json.loads(config_lib.to_json(r.cfg)), "data_digest": r.data_digest,
                 "frozen_digest": frozen_digest}
  return state


def loop_and_finish(r: Run, state, source, eval_fn, on_step) -> dict:
  """The shared loop, then the exported model and summary."""
  import jax

  from jalign import checkpoint, trainer
  from jalign.metrics import MetricWriter, Progress
  from jalign.models import lora, transformer
  cfg = r.cfg
  writer = MetricWriter(r.workdir, enabled=r.main_proc, resume_step=r.start_step)
  progress = Progress(cfg.train.max_steps, r.start_step, enabled=r.main_proc, every=cfg.train.log_every)
  progress.message(f"jalign: {cfg.algorithm} | model {transformer.count_params(r.shapes) / 1e6:.2f}M params | "
                   f"mesh {dict(r.mesh.shape)} | {r.nproc} process(es) | {r.describe} | "
                   f"steps {r.start_step}->{cfg.train.max_steps}")
  summary = {"workdir": r.workdir, "skipped_rows": getattr(r, "skipped", 0), "start_step": r.start_step}
  if eval_fn is not None and r.start_step == 0 and cfg.eval.every_steps:
    ev = eval_fn(state)
    writer.write(0, ev)
    progress.message("step 0: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
    summary["initial_eval"] = ev
  if r.start_step == 0 and not r.rl and r.tok is not None:
    summary["samples_before"] = show_samples("before training", r.policy(state), r.model_cfg, r.tok, r.eval_ex,
                                             cfg, progress)
  peak = peak_flops_per_device(cfg, jax.devices()[0]) * jax.device_count()
  t_start = time.time()
  reason, step = "done", r.start_step
  if r.start_step < cfg.train.max_steps:
    state, step, reason = trainer.run(
        state=state, train_step=r.train_step, eval_fn=eval_fn, source=source, batch_shardings=r.batch_sh,
        max_steps=cfg.train.max_steps, start_step=r.start_step, checkpointer=r.ckpt, ckpt_meta=r.ckpt_meta,
        ckpt_every=cfg.checkpoint.every_steps, eval_every=cfg.eval.every_steps, writer=writer, progress=progress,
        global_batch=r.gb, seq_len=r.seq_len,
        flops_per_token=getattr(r.family, "flops_per_token", transformer.flops_per_token)(r.model_cfg, r.seq_len),
        peak_flops=peak, on_step=on_step, prefix="train_optim/" if r.rl else "")
  progress.close()
  r.ckpt.close()
  summary.update(final_step=step, reason=reason, train_seconds=time.time() - t_start)
  if reason == "done":
    if not r.rl and r.tok is not None:
      summary["samples_after"] = show_samples("after training", r.policy(state), r.model_cfg, r.tok, r.eval_ex,
                                              cfg, progress)
    if r.family:
      checkpoint.save_model(os.path.join(r.workdir, "model"), *r.family.export(r.policy(state)))
    else:
      export_cfg = r.model_cfg.to_dict()
      export_cfg.update(lora_rank=0)
      checkpoint.save_model(os.path.join(r.workdir, "model"), lora.merge(r.policy(state), r.model_cfg), export_cfg,
                            r.tok.files())
  writer.close()
  if r.main_proc:
    with open(os.path.join(r.workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items() if not k.startswith("samples")}, f, indent=2)
    progress.message(f"{'finished' if reason == 'done' else 'stopped (' + reason + ')'} at step {step}.\n"
                     f"  checkpoints: {r.ckpt.directory}\n"
                     f"  metrics:     {writer.path}\n"
                     f"  tensorboard: {os.path.join(r.workdir, 'tensorboard')}"
                     + (f"\n  model:       {os.path.join(r.workdir, 'model')}" if reason == "done" else ""))
  summary["state"] = state
  return summary


def reference_mode(cfg) -> str:
  """Where the reference log-probs come from, or "none" (SFT, RM, reference-free DPO losses, RL without KL)."""
  from jalign import algorithms
  from jalign.algorithms import common, dpo
  if cfg.algorithm == "kto" or (cfg.algorithm == "dpo" and cfg.dpo.loss not in dpo.REFERENCE_FREE):
    return common.reference_mode(cfg)
  if cfg.algorithm in algorithms.RL and algorithms.get(cfg.algorithm).needs_reference(cfg):
    return common.reference_mode(cfg)
  return "none"


# Keys that may change between a run and its resume: logging, evaluation, checkpoint cadence, layout and
# numerics-preserving implementation choices. ``train.max_steps`` is allowed too (the schedule is recomputed).
RESUME_SAFE = ("train.max_steps", "train.log_every", "train.peak_tflops", "train.micro_batch_size",
               "train.compile_cache", "eval.", "checkpoint.", "distributed.", "mesh.", "model.remat",
               "model.scan_unroll", "model.attention",
               "model.logprob_chunk", "model.logprob_impl", "model.sampling_impl", "data.eval_path",
               "rollout.shared_prompt")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def check_resume(meta, cfg, data_digest, step):
  """Refuse to resume under a config (or training data) that differs from the checkpoint's in a key that changes
  what is trained, unless ``checkpoint.force_resume``; note the changes that are safe."""
  old, new = _flat(meta["config"]), _flat(json.loads(config_lib.to_json(cfg)))
  default = _flat(json.loads(config_lib.to_json(config_lib.base_config())))
  # a key that a newer jalign added, at its default, changes nothing the checkpoint's run did
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
                   and not (k not in old and k in default and new.get(k) == default[k]))
  unsafe = [k for k in changed if not any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_SAFE)]
  desc = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in unsafe]
  if meta.get("data_digest") != data_digest:
    desc.append(f"the contents of data.train_path ({cfg.data.train_path})")
  if desc and not cfg.checkpoint.force_resume:
    raise config_lib.ConfigError(
        f"checkpoint {step} was written with a different config: {', '.join(desc)}; resume with the original "
        "values, use a new --workdir, or pass --config.checkpoint.force_resume=True to continue anyway")
  if desc:
    log.warning("resuming from step %d despite changes (checkpoint.force_resume): %s", step, ", ".join(desc))
  if "train.max_steps" in changed:
    log.warning("train.max_steps changed %s -> %s: the learning-rate schedule is recomputed for the new length",
                old.get("train.max_steps"), new.get("train.max_steps"))


def file_digest(path: str) -> str:
  import hashlib
  if not os.path.exists(path):
    return ""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()[:32]


def setup_logging():
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv=None) -> int:
  setup_logging()
  argv = sys.argv[1:] if argv is None else argv
  from jalign.checkpoint import CheckpointError
  from jalign.data import DataError, TokenizerError
  from jalign.rl.rewards import RewardError
  from jalign.trainer import NonFiniteLoss
  try:
    cfg, flags = config_lib.parse_args(argv)
    workdir = flags.pop("workdir", None)
    if flags:
      raise config_lib.ConfigError(f"unknown flag(s): {', '.join('--' + k for k in flags)}")
    if not workdir:
      raise config_lib.ConfigError("--workdir DIR is required")
    summary = run(cfg, workdir)
  except (config_lib.ConfigError, DataError, TokenizerError, CheckpointError, RewardError) as e:
    print(f"jalign: error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLoss as e:
    print(f"jalign: error: {e}", file=sys.stderr)
    return 3
  return 143 if summary["reason"] == "preempted" else 0


if __name__ == "__main__":
  sys.exit(main())
