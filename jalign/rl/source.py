"""The experience source: what feeds the trainer's loop in online RL, one rollout at a time.

On an empty buffer: take this process's next prompts, sample ``rollout.num_generations`` responses each with the
generation engine (the policy's current weights), score them in one jitted pass with the trainer's own forward
(old log-probs, reference log-probs, critic values), compute rewards on the decoded text, let the algorithm turn
all that into training rows (advantages, returns, selections), and cut the rows into the trainer's global-batch
steps. Checkpoints happen only at rollout boundaries (``at_boundary``), and the data state is the prompt order plus
the rollout index, whose seeds make every rollout reproducible: a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import re
import time

import numpy as np

from jalign.rl.rewards import Samples


class PromptOrder:
  """Prompt indices shuffled per epoch by seed; each rollout takes the next ``k`` of the global order and process
  p keeps positions p, p+P, ... (its own prompts, so a group of samples never crosses processes)."""

  def __init__(self, n: int, seed: int, shuffle: bool = True):
    self.n, self.seed, self.shuffle = n, seed, shuffle
    self.epoch, self.index = 0, 0

  def _perm(self, epoch):
    if not self.shuffle:
      return np.arange(self.n)
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def take(self, k: int) -> list[int]:
    out = []
    while len(out) < k:
      if self.index >= self.n:
        self.epoch, self.index = self.epoch + 1, 0
      perm = self._perm(self.epoch)
      j = min(self.n - self.index, k - len(out))
      out += perm[self.index:self.index + j].tolist()
      self.index += j
    return out

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, s: dict):
    self.epoch, self.index = int(s["epoch"]), int(s["index"])


def arrange(n_rows: int, unit: int, local_batch: int, n_micro: int, rng) -> list[np.ndarray]:
  """Row order for each step of a rollout: units (groups of ``unit`` consecutive rows) shuffled, cut into steps of
  ``local_batch`` rows, and placed so that the trainer's interleaved micro-batch split (micro-batch m takes rows
  m, m + n_micro, ...) gives every micro-batch whole units."""
  units = rng.permutation(n_rows // unit)
  per_micro = local_batch // n_micro
  steps = []
  for s in range(0, len(units), local_batch // unit):
    rows = np.concatenate([np.arange(u * unit, (u + 1) * unit) for u in units[s:s + local_batch // unit]])
    order = np.empty(local_batch, np.int64)
    for m in range(n_micro):
      order[m::n_micro] = rows[m * per_micro:(m + 1) * per_micro]
    steps.append(order)
  return steps


def rollout_arrays(prompt_ids, samples, T: int, pad_id: int) -> dict:
  """Prompt + response rows [N, T] (right-padded, loss mask = the response with its stop token) and per-sample
  fields, from the engine's output (a list per prompt of sample dicts)."""
  N = sum(len(s) for s in samples)
  tokens = np.full((N, T), pad_id, np.int32)
  seg, mask = np.zeros((N, T), np.int32), np.zeros((N, T), bool)
  sampler = np.zeros((N, T - 1), np.float32)
  finished, lengths, plens = np.zeros(N, bool), np.zeros(N, np.int32), np.zeros(N, np.int32)
  r = 0
  for ids, group in zip(prompt_ids, samples):
    for s in group:
      toks = list(ids) + list(s["tokens"])
      n, p = len(toks), len(ids)
      tokens[r, :n], seg[r, :n], mask[r, p:n] = toks, 1, True
      sampler[r, p - 1:n - 1] = s["logprobs"]
      finished[r], lengths[r], plens[r] = s["finished"], n - p, p
      r += 1
  return {"tokens": tokens, "segment_ids": seg, "loss_mask": mask,
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (N, T)).copy(), "sampler_logps": sampler,
          "finished": finished, "lengths": lengths, "prompt_lengths": plens}


class ExperienceSource:
  """``next(state) -> (local batch, host metrics)``, ``at_boundary()``, ``get_state()``, ``set_state()``.

  ``score(state, rows) -> {"logps", "ref_logps"?, "values"?}`` is the jitted scoring pass (numpy in and out, this
  process's rows); ``policy(state)`` the policy's params for the engine; ``moments(x, mask)`` the global masked
  (mean, std) across processes."""

  def __init__(self, *, cfg, algo, prompts, tok, engine, score, policy, rewards, responses, moments, local_batch,
               n_micro, process_index=0, process_count=1):
    self.cfg, self.algo, self.prompts, self.tok, self.engine = cfg, algo, prompts, tok, engine
    self.score, self.policy, self.rewards, self.responses, self.moments = score, policy, rewards, responses, moments
    self.local_batch, self.n_micro, self.pid, self.nproc = local_batch, n_micro, process_index, process_count
    self.order = PromptOrder(len(prompts), cfg.seed, cfg.data.shuffle)
    self.rollout = 0
    self.kl_coef = {"ppo": cfg.ppo.kl_coef, "rloo": cfg.rloo.kl_coef}.get(cfg.algorithm, 0.0)
    self.queue, self.metrics = [], {}

  # ---- the source protocol
  def next(self, state):
    if not self.queue:
      self._rollout(state)
    m, self.metrics = self.metrics, {}
    return self.queue.pop(0), m

  def at_boundary(self) -> bool:
    return not self.queue

  def get_state(self) -> dict:
    return {"prompts": self.order.get_state(), "rollout": self.rollout, "kl_coef": self.kl_coef}

  def set_state(self, s: dict):
    self.order.set_state(s["prompts"])
    self.rollout, self.kl_coef = int(s["rollout"]), float(s["kl_coef"])
    self.queue = []

  # ---- one rollout
  def _sample(self, state, idx, seeds):
    from jalign.generation import SamplingParams
    ro_cfg = self.cfg.rollout
    sp = SamplingParams(temperature=ro_cfg.temperature, top_k=ro_cfg.top_k, top_p=ro_cfg.top_p,
                        max_new_tokens=ro_cfg.max_new_tokens)
    self.engine.params = self.policy(state)
    ids = [self.prompts[i][1] for i in idx]
    out = self.engine.generate(ids, sp, n=ro_cfg.num_generations, stop_ids=sorted(self.responses.stops), seed=seeds)
    self.engine.params = None  # no reference to the state's buffers, which the train step donates
    return ids, out

  def _round(self, state, r: int):
    """Sample, score and reward this process's next prompts (round r of the rollout): (rollout arrays with
    ``rewards``, per-source rewards, timings)."""
    cfg = self.cfg
    t0 = time.perf_counter()
    k_local = cfg.rollout.num_prompts // self.nproc
    idx = self.order.take(cfg.rollout.num_prompts)[self.pid::self.nproc][:k_local]
    seeds = [int(np.random.default_rng([cfg.seed, self.rollout, self.pid, j, r]).integers(2 ** 31))
             for j in range(k_local)]
    ids, out = self._sample(state, idx, seeds)
    t_gen = time.perf_counter()
    T = cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens
    ro = rollout_arrays(ids, out, T, self.tok.pad_id)
    ro.update(self.score(state, {k: ro[k] for k in ("tokens", "segment_ids", "positions", "loss_mask")}))
    t_score = time.perf_counter()
    ro["rewards"], per_source = self.rewards(self._decode(idx, ids, out))
    t_reward = time.perf_counter()
    return ro, per_source, np.array([t_gen - t0, t_score - t_gen, t_reward - t_score])

  def _dynamic(self, state):
    """GRPO's dynamic sampling: keep groups whose rewards differ, sampling more rounds (at most
    ``grpo.max_sampling_rounds``) until a rollout's worth of them is found; short of that, the rest are filled
    with equal-reward groups (their advantages are 0). Shapes stay fixed: one score compile."""
    G, k = self.cfg.rollout.num_generations, self.cfg.rollout.num_prompts // self.nproc
    kept, spare, timers, sources, rounds = [], [], np.zeros(3), [], 0
    while len(kept) < k and rounds < self.cfg.grpo.max_sampling_rounds:
      ro, per_source, t = self._round(state, rounds)
      rounds, timers = rounds + 1, timers + t
      sources.append(per_source)
      spread = ro["rewards"].reshape(-1, G).std(axis=1) > 0
      for g in range(k):
        (kept if spread[g] else spare).append((ro, g, len(sources) - 1))
    chosen = (kept + spare)[:k]
    rows = lambda x, g: x[g * G:(g + 1) * G]
    ro = {key: np.concatenate([rows(r[key], g) for r, g, _ in chosen]) for key in chosen[0][0]}
    per_source = {n: np.concatenate([rows(sources[s][n], g) for _, g, s in chosen]) for n in sources[0]}
    return ro, per_source, timers, {"dynamic_sampling_rounds": rounds, "groups_with_signal": len(kept) / k}

  def _rollout(self, state):
    cfg, G = self.cfg, self.cfg.rollout.num_generations
    t0 = time.perf_counter()
    extra = {}
    if cfg.algorithm == "grpo" and cfg.grpo.dynamic_sampling:
      ro, per_source, timers, extra = self._dynamic(state)
    else:
      ro, per_source, timers = self._round(state, 0)
    ctl = {"kl_coef": self.kl_coef, "moments": self.moments}
    if cfg.algorithm == "grpo" and cfg.grpo.scale_rewards == "batch":
      ctl["batch_std"] = self.moments(ro["rewards"][:, None], np.ones((len(ro["rewards"]), 1), bool), ddof=1)[1]
    rows, algo_m = self.algo.prepare(ro, cfg, ctl)
    metrics = self._metrics(ro, per_source, {**algo_m, **extra})
    if cfg.algorithm == "ppo":
      from jalign.algorithms import ppo
      self.kl_coef = ppo.adapt_kl(self.kl_coef, metrics.get("train_rollouts/init_policy_kl", 0.0), cfg,
                                  len(ro["rewards"]) * self.nproc)
    unit = G if getattr(self.algo, "GROUPED", False) else 1
    n = len(next(iter(rows.values())))
    for e in range(cfg.rollout.epochs):
      rng = np.random.default_rng([cfg.seed, self.rollout, e, 7])
      for order in arrange(n, unit, self.local_batch, self.n_micro, rng):
        self.queue.append({k: v[order] for k, v in rows.items()})
    self.rollout += 1
    metrics.update({"timers/generate": timers[0], "timers/logprobs": timers[1], "timers/reward": timers[2],
                    "timers/rollout_time": time.perf_counter() - t0})
    self.metrics = metrics

  def _decode(self, idx, ids, out) -> Samples:
    prompts, responses, texts, rows, finished = [], [], [], [], []
    for i, p, group in zip(idx, ids, out):
      ptext = self.tok.decode(p)
      for s in group:
        text, _, fin = self.responses(s)
        prompts.append(ptext)
        responses.append(text)
        texts.append(self.tok.decode(list(p) + list(s["tokens"])))
        rows.append(self.prompts[i][0])
        finished.append(fin)
    return Samples(prompts, responses, texts, rows, finished)

  def _metrics(self, ro, per_source, algo_m) -> dict:
    mask = ro["loss_mask"][:, 1:]
    mean = lambda x: float(self.moments(np.asarray(x, np.float64)[:, None], np.ones((len(x), 1), bool))[0])
    m = {"rollout_size": len(ro["rewards"]) * self.nproc, "rewards": mean(ro["rewards"]),
         "response_lengths": mean(ro["lengths"]), "prompt_lengths": mean(ro["prompt_lengths"]),
         "fraction_of_samples_properly_ended": mean(ro["finished"])}
    if self.cfg.algorithm in ("ppo", "grpo", "rloo") and "logps" in ro:  # same temperature on both sides
      diff = np.abs(ro["logps"] - ro["sampler_logps"])[mask]
      m["logprob_diff_mean"] = float(diff.mean()) if diff.size else 0.0
      m["logprob_diff_max"] = float(diff.max()) if diff.size else 0.0
    if "ref_logps" in ro and "logps" in ro:
      from jalign.algorithms import pg
      import jax.numpy as jnp
      d = ro["logps"] - ro["ref_logps"]
      m["init_policy_kl"] = float(self.moments(d, mask)[0])
      m["init_policy_kl_k3"] = float(self.moments(np.asarray(pg.kl_penalty(jnp.asarray(ro["logps"]),
                                                                           jnp.asarray(ro["ref_logps"]), "k3")),
                                                  mask)[0])
    if self.kl_coef:
      m["kl_coef"] = self.kl_coef
    for name, v in per_source.items():  # TensorBoard takes [A-Za-z0-9_./-] in names
      m["rewards/" + re.sub(r"[^A-Za-z0-9_./-]", "_", name)] = mean(v)
    m.update(algo_m)
    return {f"train_rollouts/{k}" if not k.startswith("train_rollouts/") else k: v for k, v in m.items()}


def global_moments(x, mask, ddof: int = 0) -> tuple[float, float]:
  """(mean, std) of the masked entries of ``x`` over every process (``ddof=1``: Bessel-corrected std)."""
  import jax
  m = np.asarray(mask, bool)
  v = np.where(m, np.asarray(x, np.float64), 0.0)
  sums = np.array([v.sum(), (v * v).sum(), m.sum()], np.float64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    sums = np.asarray(multihost_utils.process_allgather(sums)).reshape(-1, 3).sum(axis=0)
  s, s2, n = sums
  if n == 0:
    return 0.0, 0.0
  mean = s / n
  var = max(s2 / n - mean * mean, 0.0) * (n / max(n - ddof, 1))
  return float(mean), float(np.sqrt(var))


class RolloutEval:
  """Greedy responses to the eval prompts, scored by the rewards: ``val_rollouts/*`` metrics, and a JSONL table
  (prompt, response, reward) per evaluation under ``WORKDIR/rollouts/``."""

  def __init__(self, *, cfg, prompts, tok, engine, policy, rewards, responses, table_dir, write):
    self.cfg, self.prompts, self.tok, self.engine, self.policy = cfg, prompts, tok, engine, policy
    self.rewards, self.responses, self.table_dir, self.write = rewards, responses, table_dir, write

  def __call__(self, state) -> dict:
    import json
    import os

    from jalign.generation import SamplingParams
    self.engine.params = self.policy(state)
    ids = [p[1] for p in self.prompts]
    out = self.engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=self.cfg.rollout.max_new_tokens),
                               stop_ids=sorted(self.responses.stops), seed=0)
    self.engine.params = None
    prompts, responses, texts, finished = [], [], [], []
    for p, (s,) in zip(ids, out):
      text, _, fin = self.responses(s)
      prompts.append(self.tok.decode(p))
      responses.append(text)
      texts.append(self.tok.decode(list(p) + list(s["tokens"])))
      finished.append(fin)
    r, _ = self.rewards(Samples(prompts, responses, texts, [p[0] for p in self.prompts], finished))
    step = int(state["step"])
    if self.write:
      os.makedirs(self.table_dir, exist_ok=True)
      with open(os.path.join(self.table_dir, f"val_step{step}.jsonl"), "w") as f:
        for p, resp, rew in zip(prompts, responses, r):
          f.write(json.dumps({"step": step, "prompt": p, "response": resp, "reward": float(rew)}) + "\n")
    lengths = [len(s["tokens"]) for (s,) in out]
    return {"val_rollouts/rewards": float(np.mean(r)), "val_rollouts/response_lengths": float(np.mean(lengths)),
            "val_rollouts/fraction_of_samples_properly_ended": float(np.mean(finished))}
