"""SPIN's source: what feeds the trainer's loop for ``algorithm=spin``, one global batch of SFT rows at a time.

Step s belongs to iteration k = s // S (S steps per iteration, at most ``spin.max_iterations``). At the first step
of an iteration the current weights are copied as the reference (the train step donates its state, so a real copy)
and written to ``WORKDIR/spin/reference_<k>/``. Each step takes the iteration's next rows (shuffled per iteration
by seed), samples a response to every prompt from the reference, scores ground truth and sample under the
reference, and writes the samples to ``WORKDIR/spin/generations_iter<k>.jsonl``. Seeds come from (seed, iteration,
step, row), so every step is reproducible: every step is a checkpoint boundary, and a run resumed in the middle of
an iteration reloads that iteration's reference from disk (checked against the digest the checkpoint recorded).

The eval (``SpinEval``) is NeMo-Aligner's plain SFT loss on the eval rows (``val_loss``) plus how much more likely
the policy finds the ground truth than a sample of the starting model for the same held-out prompt
(``val_gt_minus_generated``, summed log-probs; the samples are drawn once, seeded).
"""
from __future__ import annotations

import json
import os

import numpy as np

from jalign.rl.source import global_moments

PAIR_KEYS = ("tokens", "loss_mask", "segment_ids")


def prompt_lengths(loss_mask_NT) -> np.ndarray:
  """[N]: tokens before the first trained one (the whole row when nothing is trained)."""
  m = np.asarray(loss_mask_NT, bool)
  return np.where(m.any(-1), m.argmax(-1), m.shape[-1])


def iteration_rows(n: int, global_batch: int, seed: int, iteration: int, t: int, shuffle: bool) -> np.ndarray:
  """Global row indices of step t of an iteration: a per-iteration permutation, read in order, wrapping."""
  perm = np.random.default_rng([seed, iteration]).permutation(n) if shuffle else np.arange(n)
  return perm[(t * global_batch + np.arange(global_batch)) % n]


def fill_generated(batch: dict, plen_B, samples, pad_id: int) -> np.ndarray:
  """Write prompt + sampled response into slot 1 of each pair (cut at the row length; the response is trained);
  returns the response lengths [B]."""
  T = batch["tokens"].shape[-1]
  lengths = np.zeros(len(samples), np.int32)
  for b, (p, s) in enumerate(zip(plen_B, samples)):
    toks = list(batch["tokens"][b, 0, :p]) + list(s["tokens"])
    n = min(len(toks), T)
    batch["tokens"][b, 1] = pad_id
    batch["loss_mask"][b, 1] = False
    batch["segment_ids"][b, 1] = 0
    batch["tokens"][b, 1, :n], batch["segment_ids"][b, 1, :n], batch["loss_mask"][b, 1, p:n] = toks[:n], 1, True
    lengths[b] = n - p
  return lengths


def trim_table(path: str, step: int):
  """Drop the lines of steps after ``step`` (a resumed run writes them again)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if json.loads(line)["step"] <= step]
  with open(path, "w") as f:
    f.writelines(keep)


class SpinSource:
  """``next(state) -> (local batch, host metrics)``, ``at_boundary()``, ``get_state()``, ``set_state()``.

  ``generate(params, prompts, seeds) -> engine samples``; ``score(params, pair batch) -> (logps, lengths)`` [B, 2]
  for this process's rows; ``copy(params)`` a fresh copy; ``policy(state)`` the policy's params; ``save(dir,
  params)`` / ``load(dir)`` a reference's weights; ``digest(params)`` their content digest."""

  def __init__(self, *, cfg, rows, tok, generate, score, copy, policy, save, load, digest, steps_per_iteration,
               betas, local_batch, workdir, write, process_index=0, process_count=1):
    self.cfg, self.rows, self.tok, self.generate, self.score = cfg, rows, tok, generate, score
    self.copy, self.policy, self.save, self.load, self.digest = copy, policy, save, load, digest
    self.spi, self.betas, self.local_batch = steps_per_iteration, betas, local_batch
    self.dir, self.write, self.pid, self.nproc = os.path.join(workdir, "spin"), write, process_index, process_count
    self.plen = prompt_lengths(rows["loss_mask"][:, 0])
    self.step, self.ref, self.ref_iteration, self.ref_digest = 0, None, -1, ""

  def reference_dir(self, k: int) -> str:
    return os.path.join(self.dir, f"reference_{k}")

  # ---- the source protocol
  def next(self, state):
    k, t = divmod(self.step, self.spi)
    if self.ref_iteration != k:
      self._set_reference(state, k, t)
    gb = self.local_batch * self.nproc
    idx = iteration_rows(len(self.plen), gb, self.cfg.seed, k, t, self.cfg.data.shuffle)[self.pid::self.nproc]
    batch = {key: self.rows[key][idx].copy() for key in PAIR_KEYS}
    prompts = [batch["tokens"][b, 0, :p].tolist() for b, p in enumerate(self.plen[idx])]
    seeds = [int(np.random.default_rng([self.cfg.seed, k, t, self.pid, j]).integers(2 ** 31))
             for j in range(len(idx))]
    samples = [s[0] for s in self.generate(self.ref, prompts, seeds)]
    lengths = fill_generated(batch, self.plen[idx], samples, self.tok.pad_id)
    batch["ref_logps"] = self.score(self.ref, batch)[0].astype(np.float32)
    batch["beta"] = np.full(len(idx), self.betas[k], np.float32)
    if self.write:
      self._table(k, batch, self.plen[idx], samples)
    self.step += 1
    avg_len = global_moments(lengths[:, None].astype(np.float64), np.ones((len(idx), 1), bool))[0]
    return batch, {"iteration": k, "avg_generated_lengths": avg_len}

  def at_boundary(self) -> bool:
    return True

  def get_state(self) -> dict:
    return {"step": self.step, "reference_iteration": self.ref_iteration, "reference_digest": self.ref_digest}

  def set_state(self, s: dict):
    self.step = int(s["step"])
    self.ref, self.ref_iteration = None, -1
    self.ref_digest = s["reference_digest"] if int(s["reference_iteration"]) == self.step // self.spi else ""
    if self.write and os.path.isdir(self.dir):
      for name in os.listdir(self.dir):
        if name.endswith(".jsonl"):
          trim_table(os.path.join(self.dir, name), self.step)

  # ---- the reference
  def _set_reference(self, state, k: int, t: int):
    """At an iteration's first step: the current weights (copied, and written to disk); later (a resumed run):
    the weights written at its first step."""
    self.ref = None
    if t == 0:
      self.ref = self.copy(self.policy(state))
      self.save(self.reference_dir(k), self.ref)
      self.ref_digest = self.digest(self.ref)
    else:
      from jalign.checkpoint import CheckpointError
      path = self.reference_dir(k)
      if not os.path.exists(os.path.join(path, "params", "index.json")):
        raise CheckpointError(f"resuming in iteration {k} of SPIN needs its reference, {path}, which is missing; "
                              "restore it or start a new --workdir")
      self.ref = self.load(path)
      if self.ref_digest and self.digest(self.ref) != self.ref_digest:
        raise CheckpointError(f"{path} is not the reference the checkpoint was trained with (it changed since); "
                              "restore it or start a new --workdir")
    self.ref_iteration = k

  def start_params(self, state):
    """The starting weights: the state's before the first step, else iteration 0's saved reference."""
    if self.step == 0:
      return self.policy(state)
    return self.ref if self.ref_iteration == 0 else self.load(self.reference_dir(0))

  # ---- the generation table
  def _table(self, k, batch, plen_B, samples):
    os.makedirs(self.dir, exist_ok=True)
    with open(os.path.join(self.dir, f"generations_iter{k}.jsonl"), "a") as f:
      for b, (p, s) in enumerate(zip(plen_B, samples)):
        gt = batch["tokens"][b, 0][batch["loss_mask"][b, 0]].tolist()
        f.write(json.dumps({"iteration": k, "step": self.step + 1, "prompt": self.tok.decode(batch["tokens"][b, 0,
                            :p].tolist()), "response": self.tok.decode(s["tokens"]),
                            "ground_truth": self.tok.decode(gt), "finished": s["finished"]}) + "\n")


class SpinEval:
  """``val_loss`` (token-mean NLL of the eval answers), ``val_gt_logp``, ``val_generated_logp`` (summed log-probs
  per row of the answer and of the starting model's sample) and ``val_gt_minus_generated``."""

  def __init__(self, *, source, rows, generate, score, global_batch, max_batches, pad_id, seed, process_index=0,
               process_count=1):
    self.source, self.rows, self.generate, self.score = source, rows, generate, score
    self.gb, self.max_batches, self.pad_id, self.seed = global_batch, max_batches, pad_id, seed
    self.pid, self.nproc = process_index, process_count
    self.batches = None

  def _batches(self, state) -> list[dict]:
    """This process's eval batches with slot 1 sampled from the starting model (once per run, seeded)."""
    from jalign import data
    params, out = self.source.start_params(state), []
    for i, b in enumerate(data.eval_batches(self.rows, global_batch=self.gb, pad_id=self.pad_id,
                                            process_index=self.pid, process_count=self.nproc,
                                            max_batches=self.max_batches)):
      plen = prompt_lengths(b["loss_mask"][:, 0])
      real = b["segment_ids"][:, 0].any(-1)
      prompts = [b["tokens"][j, 0, :p].tolist() if r else [self.pad_id] for j, (p, r) in enumerate(zip(plen, real))]
      seeds = [int(np.random.default_rng([self.seed, 1 << 20, i, self.pid, j]).integers(2 ** 31))
               for j in range(len(prompts))]
      samples = [s[0] for s in self.generate(params, prompts, seeds)]
      fill_generated(b, plen, samples, self.pad_id)
      b["segment_ids"][~real, 1] = 0
      b["loss_mask"][~real, 1] = False
      out.append(b)
    return out

  def __call__(self, state) -> dict:
    if self.batches is None:
      self.batches = self._batches(state)
    policy = self.source.policy(state)
    logp_gt, logp_gen, n_gt, rows = [], [], [], []
    for b in self.batches:
      logp, n = self.score(policy, b)
      real = b["segment_ids"][:, 0].any(-1)
      logp_gt.append(logp[real, 0])
      logp_gen.append(logp[real, 1])
      n_gt.append(n[real, 0])
    cat = lambda xs: np.concatenate(xs).astype(np.float64)
    gt, gen, n = cat(logp_gt), cat(logp_gen), cat(n_gt)
    ones = np.ones((len(gt), 1), bool)
    mean = lambda x: global_moments(x[:, None], ones)[0]
    nll = -mean(gt) / max(mean(n), 1e-9)
    return {"val_loss": nll, "val_gt_logp": mean(gt), "val_generated_logp": mean(gen),
            "val_gt_minus_generated": mean(gt - gen)}


def source_and_eval(r):
  """The SPIN source and eval of run ``r`` (``jalign.train.Run``)."""
  import jax
  import jax.numpy as jnp

  from jalign import checkpoint, generate, sharding, trainer
  from jalign import config as config_lib
  from jalign.algorithms import common, spin
  from jalign.generation import Engine, SamplingParams
  cfg, s = r.cfg, r.cfg.spin
  n_rows = len(r.rows["tokens"])
  spi = s.steps_per_iteration or n_rows // r.gb
  if spi < 1:
    raise config_lib.ConfigError(f"{n_rows} training rows make no step of train.global_batch_size={r.gb}")
  if cfg.train.max_steps != s.max_iterations * spi:
    raise config_lib.ConfigError(
        f"train.max_steps={cfg.train.max_steps} must be spin.max_iterations={s.max_iterations} x {spi} steps per "
        f"iteration = {s.max_iterations * spi} (spin.steps_per_iteration; 0 = one pass over the {n_rows} rows)")
  pol_sh = common.policy_params(r.param_sh)
  pol_abs = trainer.abstract_with_shardings(common.policy_params({**r.abstract["frozen"], **r.abstract["params"]}),
                                            pol_sh)
  pair_sh = {k: r.batch_sh[k] for k in PAIR_KEYS}
  jitted = jax.jit(sharding.bind(lambda p, b: common.pair_logps(p, b, r.model_cfg), r.mesh, r.rules),
                   in_shardings=(pol_sh, pair_sh), out_shardings=sharding.replicated(r.mesh))
  local = r.gb // r.nproc

  def score(params, batch):
    out = jax.device_get(jitted(params, trainer.to_global({k: batch[k] for k in PAIR_KEYS}, pair_sh)))
    return tuple(np.asarray(x)[r.pid * local:(r.pid + 1) * local] for x in out)

  copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=pol_sh)
  rows = [r.rows] + ([r.eval_rows] if r.eval_rows is not None else [])
  longest = max(int(prompt_lengths(x["loss_mask"][:, 0]).max()) for x in rows)
  new = spin.max_new_tokens(cfg)
  engine = Engine(None, r.model_cfg, batch_size=local, max_new_tokens=new, top_k_cap=s.top_k,
                  prompt_buckets=(longest,), pad_id=r.tok.pad_id, mesh=r.mesh, rules=r.rules)
  stops = generate.stop_ids(r.tok, cfg.tokenizer.chat_template, cfg.data.chat_prompt_tokens)
  sp = SamplingParams(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_new_tokens=new)

  def gen(params, prompts, seeds):
    engine.params = params
    try:
      return engine.generate(prompts, sp, stop_ids=stops, seed=seeds)
    finally:
      engine.params = None  # hold no reference to a state's buffers

  src = SpinSource(cfg=cfg, rows=r.rows, tok=r.tok, generate=gen, score=score, copy=copy, policy=r.policy,
                   save=lambda d, p: checkpoint.save_model(d, p, r.model_cfg.to_dict()),
                   load=lambda d: checkpoint.load_params(d, pol_abs), digest=checkpoint.tree_digest,
                   steps_per_iteration=spi, betas=spin.betas(cfg), local_batch=local, workdir=r.workdir,
                   write=r.main_proc, process_index=r.pid, process_count=r.nproc)
  r.describe += f" | SPIN: {s.max_iterations} iterations x {spi} steps"
  ev = None
  if r.eval_rows is not None:
    ev = SpinEval(source=src, rows=r.eval_rows, generate=gen, score=score, global_batch=r.gb,
                  max_batches=cfg.eval.max_batches, pad_id=r.tok.pad_id, seed=cfg.seed, process_index=r.pid,
                  process_count=r.nproc)
  return src, ev
