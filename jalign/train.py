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


def run(cfg, workdir: str, on_step=None) -> dict:
  """Train; returns a summary dict (with the final ``state``). ``on_step(step, metrics)`` is called each step."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jalign import algorithms, checkpoint, data, sharding, trainer
  from jalign.algorithms import common
  from jalign.metrics import MetricWriter, Progress
  from jalign.models import init_params, lora, param_axes, param_shapes, transformer

  sharding.maybe_initialize_distributed(cfg)
  pid, nproc = jax.process_index(), jax.process_count()
  main_proc = pid == 0
  workdir = os.path.abspath(workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.keep,
                                 cfg.checkpoint.async_save)
  start_step = ckpt.latest_step() or 0
  data_digest = file_digest(cfg.data.train_path) if cfg.data.train_path else ""
  resume_meta = ckpt.read_meta(start_step) if start_step else None
  if start_step:
    check_resume(resume_meta, cfg, data_digest, start_step)
  if main_proc:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))

  algo = algorithms.get(cfg.algorithm)
  model_cfg = model_config_for(cfg)
  if hasattr(algo, "model_overrides"):
    model_cfg = dataclasses.replace(model_cfg, **algo.model_overrides(cfg))
  tok_path = cfg.tokenizer.path or (checkpoint.resolve_model_dir(cfg.model.checkpoint) if cfg.model.checkpoint
                                    else "")
  tok = data.load_tokenizer(tok_path)
  if cfg.tokenizer.chat_template == "hf" and not tok.chat_template:
    raise config_lib.ConfigError(f"tokenizer.chat_template=hf but the tokenizer ({tok.path}) has no chat "
                                 "template in tokenizer_config.json; use tokenizer.chat_template=nemo")
  if tok.vocab_size > model_cfg.vocab_size:
    raise config_lib.ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size="
                                 f"{model_cfg.vocab_size}")

  # ---- data
  if not cfg.data.train_path:
    raise config_lib.ConfigError("data.train_path is empty")
  rows, n_train, skipped, _ = algo.load_data(cfg.data.train_path, tok, cfg)
  eval_rows, eval_ex, n_eval = None, [], 0
  if cfg.data.eval_path:
    eval_rows, n_eval, eval_skipped, eval_ex = algo.load_data(cfg.data.eval_path, tok, cfg)
    skipped += eval_skipped
  T = cfg.data.max_seq_len
  gb = cfg.train.global_batch_size

  # ---- mesh, shardings
  try:
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh.rules)
  except ValueError as e:
    raise config_lib.ConfigError(f"{e} (mesh.data, mesh.fsdp, mesh.tensor, mesh.rules)") from None
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  mbs = cfg.train.micro_batch_size or gb // dp
  if gb % (mbs * dp):
    raise config_lib.ConfigError(f"train.global_batch_size={gb} must be a multiple of train.micro_batch_size="
                                 f"{mbs} x data-parallel size {dp}")
  n_micro = gb // (mbs * dp)
  batch_axes = algo.batch_axes(cfg)
  ref_mode = reference_mode(cfg)
  row_shapes = {k: rows[k].shape[1:] for k in batch_axes if k != "ref_logps"}
  row_shapes.setdefault("ref_logps", (2,))
  batch_sh = {k: sharding.named_sharding(ax, rules, mesh, (gb,) + row_shapes[k]) for k, ax in batch_axes.items()}

  axes = param_axes(model_cfg)
  shapes = param_shapes(model_cfg)
  frozen_keys = getattr(algo, "FROZEN", ())
  trainable_keys = [k for k in lora.trainable_keys(shapes) if k not in frozen_keys]
  base_keys = [k for k in shapes if k != "lora"]
  if ref_mode == "copy":
    axes = {**axes, "reference": {k: axes[k] for k in base_keys}}
  optimizer, schedule = trainer.make_optimizer(cfg.optim, cfg.train.max_steps, cfg.train.grad_clip)

  def init_state(rng, base=None, ref_base=None):
    p_rng, s_rng = jax.random.split(rng)
    params = init_params(model_cfg, p_rng)
    if base is not None:
      params.update(base)
    tr = {k: v for k, v in params.items() if k in trainable_keys}
    fr = {k: v for k, v in params.items() if k not in trainable_keys}
    if ref_mode == "copy":  # a frozen copy of the starting (or given) weights, never updated
      fr["reference"] = jax.tree.map(jnp.copy, {k: params[k] for k in base_keys} if ref_base is None else ref_base)
    return {"step": jnp.zeros((), jnp.int32), "params": tr, "frozen": fr, "opt_state": optimizer.init(tr),
            "rng": s_rng}

  abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_sh = trainer.state_shardings(abstract, axes, mesh, rules, optimizer)
  param_sh = {**state_sh["frozen"], **state_sh["params"]}

  rng = jax.random.PRNGKey(cfg.seed)
  traced = functools.partial(sharding.bind, mesh=mesh, rules=rules)

  base_abs = {k: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              shapes[k], param_sh[k]) for k in base_keys}

  def initial_state(frozen_only=False):
    """The starting state; ``frozen_only``: just the frozen weights (what a checkpoint does not store)."""
    copies_start = ref_mode == "copy" and not cfg.model.reference_checkpoint  # the reference is the start
    keys = [k for k in base_keys if k in abstract["frozen"] or copies_start] if frozen_only else base_keys
    base = (checkpoint.load_params(cfg.model.checkpoint, {k: base_abs[k] for k in keys})
            if cfg.model.checkpoint and keys else None)
    ref = None
    if cfg.model.reference_checkpoint and ref_mode == "copy":
      ref = checkpoint.load_params(cfg.model.reference_checkpoint, base_abs, optional=("value_head", "lm_head"))
    if frozen_only:
      return jax.jit(lambda *a: init_state(*a)["frozen"], out_shardings=state_sh["frozen"])(rng, base, ref)
    return jax.jit(init_state, out_shardings=state_sh)(rng, base, ref)

  state = None
  if ref_mode == "precomputed":
    ref_fn = jax.jit(traced(lambda p, b: common.pair_logps(p, b, model_cfg)[0]),
                     in_shardings=({k: param_sh[k] for k in base_keys}, {k: batch_sh[k] for k in PAIR_KEYS}),
                     out_shardings=sharding.replicated(mesh))
    ref_params = {}

    def compute(r):  # the starting weights are built (or loaded) only when the cache misses
      nonlocal state
      if not ref_params:
        if state is None:
          state = initial_state()
        ref_params.update(lora.disabled(policy_params(state)))
        if cfg.model.reference_checkpoint:
          ref_params.update(checkpoint.load_params(cfg.model.reference_checkpoint, base_abs))
      return precompute_logps(ref_fn, ref_params, r, gb, batch_sh, tok.pad_id, pid, nproc)

    cache = os.path.join(workdir, "reference_logps.npz")
    named = {"train": rows, **({"eval": eval_rows} if eval_rows is not None else {})}
    source = weights_source(cfg, model_cfg)
    for name, r in reference_cache(cache, named, source, main_proc, compute).items():
      named[name]["ref_logps"] = r

  train_ds = data.train_dataset(rows, global_batch=gb, seed=cfg.seed, shuffle=cfg.data.shuffle,
                                process_index=pid, process_count=nproc)
  data_iter = iter(train_ds)
  if start_step:  # checkpoints hold what training changes; the frozen weights are rebuilt from their source
    saved_abs = trainer.abstract_with_shardings({k: v for k, v in abstract.items() if k != "frozen"},
                                                {k: v for k, v in state_sh.items() if k != "frozen"})
    state, data_state = ckpt.restore(start_step, saved_abs)
    state["frozen"] = initial_state(frozen_only=True)
    data_iter.set_state(data_state)
  elif state is None:
    state = initial_state()
  frozen_digest = checkpoint.tree_digest(state["frozen"])
  if start_step and frozen_digest != resume_meta["frozen_digest"]:
    raise checkpoint.CheckpointError(
        f"the frozen weights rebuilt from model.checkpoint={cfg.model.checkpoint!r} / model.reference_checkpoint="
        f"{cfg.model.reference_checkpoint!r} are not those checkpoint {start_step} was trained with (they changed "
        "since); restore them or start a new --workdir")
  if start_step:
    log.info("resumed from %s/checkpoints/%d", workdir, start_step)
  ckpt_meta = {"config": json.loads(config_lib.to_json(cfg)), "data_digest": data_digest,
               "frozen_digest": frozen_digest}

  # ---- steps
  loss_fn = algo.make_loss(cfg, model_cfg)
  finalize = getattr(algo, "finalize", None)
  train_step = jax.jit(traced(trainer.make_train_step(loss_fn, optimizer, schedule, n_micro, finalize)),
                       in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  eval_step = jax.jit(traced(trainer.make_eval_step(loss_fn)),
                      in_shardings=(state_sh["params"], state_sh["frozen"], batch_sh),
                      out_shardings=sharding.replicated(mesh))

  def eval_fn(st):
    tot_w, tot = 0.0, {}
    for b in data.eval_batches(eval_rows, global_batch=gb, pad_id=tok.pad_id, process_index=pid,
                               process_count=nproc, max_batches=cfg.eval.max_batches):
      w, m = jax.device_get(eval_step(st["params"], st["frozen"], trainer.to_global(b, batch_sh)))
      tot_w += float(w)
      for k, v in m.items():
        tot[k] = tot.get(k, 0.0) + float(v)
    avg = {k: v / max(tot_w, 1.0) for k, v in tot.items()}
    if finalize is not None:
      avg = {k: float(v) for k, v in finalize(avg).items()}
    return {f"val_{k}": v for k, v in avg.items()}

  writer = MetricWriter(workdir, enabled=main_proc, resume_step=start_step)
  progress = Progress(cfg.train.max_steps, start_step, enabled=main_proc, every=cfg.train.log_every)
  n_params = transformer.count_params(shapes)
  progress.message(f"jalign: {cfg.algorithm} | model {n_params / 1e6:.2f}M params | mesh "
                   f"{dict(mesh.shape)} | {jax.process_count()} process(es) | {n_train} train rows "
                   f"-> {len(rows['tokens'])} rows of {rows['tokens'].shape[1:]} | {n_eval} eval rows | "
                   f"skipped {skipped} invalid | steps {start_step}->{cfg.train.max_steps}")

  summary = {"workdir": workdir, "skipped_rows": skipped, "start_step": start_step}
  if eval_rows is not None and start_step == 0 and cfg.eval.every_steps:
    ev = eval_fn(state)
    writer.write(0, ev)
    progress.message("step 0: " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
    summary["initial_eval"] = ev
  if start_step == 0:
    summary["samples_before"] = show_samples("before training", policy_params(state), model_cfg, tok,
                                             eval_ex, cfg, progress)
  peak = peak_flops_per_device(cfg, jax.devices()[0]) * jax.device_count()
  t_start = time.time()
  reason, step = "done", start_step
  if start_step < cfg.train.max_steps:
    state, step, reason = trainer.run(
        state=state, train_step=train_step, eval_fn=eval_fn if eval_rows is not None else None,
        data_iter=data_iter, batch_shardings=batch_sh, max_steps=cfg.train.max_steps, start_step=start_step,
        checkpointer=ckpt, ckpt_meta=ckpt_meta, ckpt_every=cfg.checkpoint.every_steps, eval_every=cfg.eval.every_steps,
        writer=writer, progress=progress, global_batch=gb, seq_len=int(np.prod(rows["tokens"].shape[1:])),
        flops_per_token=transformer.flops_per_token(model_cfg, T), peak_flops=peak,
        on_step=on_step)
  progress.close()
  ckpt.close()
  summary.update(final_step=step, reason=reason, train_seconds=time.time() - t_start)
  if reason == "done":
    summary["samples_after"] = show_samples("after training", policy_params(state), model_cfg, tok,
                                            eval_ex, cfg, progress)
    export = lora.merge(policy_params(state), model_cfg)
    export_cfg = model_cfg.to_dict()
    export_cfg.update(lora_rank=0)
    checkpoint.save_model(os.path.join(workdir, "model"), export, export_cfg, tok.files())
  writer.close()
  if main_proc:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items() if not k.startswith("samples")}, f, indent=2)
    progress.message(f"{'finished' if reason == 'done' else 'stopped (' + reason + ')'} at step {step}.\n"
                     f"  checkpoints: {ckpt.directory}\n"
                     f"  metrics:     {writer.path}\n"
                     f"  tensorboard: {os.path.join(workdir, 'tensorboard')}"
                     + (f"\n  model:       {os.path.join(workdir, 'model')}" if reason == "done" else ""))
  summary["state"] = state
  return summary


def policy_params(st):
  """The model's params (trainable and frozen) from a train state, without a reference copy."""
  from jalign.algorithms import common
  return common.policy_params({**st["frozen"], **st["params"]})


def reference_mode(cfg) -> str:
  """Where the reference log-probs come from, or "none" (SFT, RM, reference-free DPO losses)."""
  from jalign.algorithms import common, dpo
  if cfg.algorithm == "kto" or (cfg.algorithm == "dpo" and cfg.dpo.loss not in dpo.REFERENCE_FREE):
    return common.reference_mode(cfg)
  return "none"


PAIR_KEYS = ("tokens", "loss_mask", "segment_ids")


def precompute_logps(ref_fn, ref_params, rows, gb, batch_sh, pad_id, pid, nproc):
  """[N, 2] summed reference log-probs of every row, one global batch at a time."""
  import jax
  import numpy as np
  from jalign import data, trainer
  n = len(rows["tokens"])
  out = np.zeros((n, 2), np.float32)
  sub = {k: rows[k] for k in PAIR_KEYS}
  local = gb // nproc
  for b, batch in enumerate(data.eval_batches(sub, global_batch=gb, pad_id=pad_id, process_index=pid,
                                              process_count=nproc)):
    vals = np.asarray(jax.device_get(ref_fn(ref_params, trainer.to_global(batch, batch_sh))))
    idx = np.concatenate([b * gb + p + nproc * np.arange(local) for p in range(nproc)])
    keep = idx < n
    out[idx[keep]] = vals[keep]
  return out


def reference_cache(path, named_rows, source, write, compute):
  """Reference log-probs per split, reused from ``path`` when the data and starting weights are unchanged."""
  import hashlib
  import numpy as np
  out, cached = {}, {}
  if os.path.exists(path):
    with np.load(path) as f:
      cached = {k: f[k] for k in f.files}
  for name, rows in named_rows.items():
    h = hashlib.sha256(source.encode())
    for k in PAIR_KEYS:
      h.update(np.ascontiguousarray(rows[k]).tobytes())
    digest = np.frombuffer(h.digest(), np.uint8)
    if name in cached and np.array_equal(cached.get(name + "_hash"), digest):
      out[name] = cached[name]
    else:
      out[name] = compute(rows)
      cached[name], cached[name + "_hash"] = out[name], digest
  if write:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **cached)
    os.replace(tmp, path)
  return out


# Keys that may change between a run and its resume: logging, evaluation, checkpoint cadence, layout and
# numerics-preserving implementation choices. ``train.max_steps`` is allowed too (the schedule is recomputed).
RESUME_SAFE = ("train.max_steps", "train.log_every", "train.peak_tflops", "train.micro_batch_size", "eval.",
               "checkpoint.", "distributed.", "mesh.", "model.remat", "model.scan_unroll", "model.attention",
               "model.logprob_chunk", "data.eval_path")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def check_resume(meta, cfg, data_digest, step):
  """Refuse to resume under a config (or training data) that differs from the checkpoint's in a key that changes
  what is trained, unless ``checkpoint.force_resume``; note the changes that are safe."""
  old, new = _flat(meta["config"]), _flat(json.loads(config_lib.to_json(cfg)))
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
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


def weights_source(cfg, model_cfg) -> str:
  """What the reference log-probs depend on besides the data: the starting and reference weights' contents
  (random init: the seed), the architecture and dtypes."""
  from jalign import checkpoint
  start = checkpoint.fingerprint(cfg.model.checkpoint) if cfg.model.checkpoint else f"init seed={cfg.seed}"
  ref = checkpoint.fingerprint(cfg.model.reference_checkpoint) if cfg.model.reference_checkpoint else ""
  return json.dumps({"start": start, "reference": ref, "model": model_cfg.to_dict()}, sort_keys=True, default=str)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  argv = sys.argv[1:] if argv is None else argv
  from jalign.checkpoint import CheckpointError
  from jalign.data import DataError, TokenizerError
  from jalign.trainer import NonFiniteLoss
  try:
    cfg, flags = config_lib.parse_args(argv)
    workdir = flags.pop("workdir", None)
    if flags:
      raise config_lib.ConfigError(f"unknown flag(s): {', '.join('--' + k for k in flags)}")
    if not workdir:
      raise config_lib.ConfigError("--workdir DIR is required")
    summary = run(cfg, workdir)
  except (config_lib.ConfigError, DataError, TokenizerError, CheckpointError) as e:
    print(f"jalign: error: {e}", file=sys.stderr)
    return 2
  except NonFiniteLoss as e:
    print(f"jalign: error: {e}", file=sys.stderr)
    return 3
  return 143 if summary["reason"] == "preempted" else 0


if __name__ == "__main__":
  sys.exit(main())
