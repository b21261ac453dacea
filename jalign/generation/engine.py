"""KV-cache generation: a prefill and a ``while_loop`` decode, jitted as one per (batch, prompt bucket, n).

Prompts are right-padded into ``tokens_BS`` (S = prompt bucket + max new tokens) with a length per row; a row
writes its next token at slot ``len_b``, positions equal slots (as in training rows), so the causal mask on
positions alone hides pad and not-yet-written slots. Prefill writes the whole prompt block into the cache and
computes logits only at each row's last prompt token; decode steps one token per row until every row is done.
All sampling values are per-row traced arrays: new values never recompile. The state is a dict of arrays, so the
server can run ``decode_chunk`` between admissions.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jalign import kernels, sharding
from jalign.generation import sampling
from jalign.models import transformer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 0.0       # 0: greedy
  top_k: int = 0                 # 0: off; at most the engine's top_k_cap
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  min_tokens: int = 0            # stop tokens are banned before this many new tokens
  max_new_tokens: int = 0        # 0: the engine's max_new_tokens (also the most a request may ask)


ROW_FIELDS = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32,
              "repetition_penalty": np.float32, "min_tokens": np.int32, "max_new_tokens": np.int32}


def row_arrays(params_per_row) -> dict:
  """Per-row sampling arrays [B] from a list of SamplingParams."""
  return {k: np.asarray([getattr(p, k) for p in params_per_row], dt) for k, dt in ROW_FIELDS.items()}


def _round_up(n, m):
  return max(m, -(-n // m) * m)


def stop_table(stop_ids, stop_sequences, width=8):
  """(stop_ids [n] int32, stop_seqs [m, width] int32 right-aligned), -1 padded to multiples of 8 and 4 entries
  so that a few more stops do not change the compiled shapes."""
  ids = np.full(_round_up(len(stop_ids), 8), -1, np.int32)
  ids[:len(stop_ids)] = list(stop_ids)
  seqs = np.full((_round_up(len(stop_sequences), 4), width), -1, np.int32)
  for i, s in enumerate(stop_sequences):
    if not 0 < len(s) <= width:
      raise ValueError(f"stop sequence {list(s)} must have 1..{width} tokens")
    seqs[i, width - len(s):] = list(s)
  return ids, seqs


def _base_keys(seed_B, sample_B):
  """Row b's stream [B, 2] (uint32): from its request seed and its sample index (n samples of a prompt differ);
  computed once at prefill."""
  return jax.vmap(lambda s, j: jax.random.fold_in(jax.random.PRNGKey(s), j))(seed_B, sample_B)


def _row_keys(st):
  """Each row's key for its n-th token."""
  return jax.vmap(jax.random.fold_in)(st["key_B"], st["n_B"])


def _sampler(cfg):
  """The engine's token choice by ``cfg.sampling_impl``: the XLA path, or the fused Pallas kernel (same
  results; where it cannot run, the XLA path and one warning)."""
  if cfg.sampling_impl == "pallas":
    interpret = kernels.interpret_mode()
    if interpret or jax.default_backend() == "gpu":
      from jalign.kernels import sampling as fused
      return functools.partial(fused.sample, interpret=interpret)
    kernels.fallback("fused sampling", f"the kernel compiles for GPU (Triton); on {jax.default_backend()!r} it "
                     "runs only interpreted (JALIGN_PALLAS_INTERPRET=1)")
  return sampling.sample


def _sample(logits_BV, st, k_cap, cfg):
  B, V = logits_BV.shape
  ids_BN = st["stop_ids"]
  ban_BN = (st["n_B"] < st["min_tokens"])[:, None] & (ids_BN >= 0)  # stop tokens before min_tokens
  banned_BV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], jnp.where(ban_BN, ids_BN, V)].set(True, mode="drop")
  sampler = _sampler(cfg)
  kw = dict(temperature_B=st["temperature"], top_k_B=st["top_k"], top_p_B=st["top_p"], min_p_B=st["min_p"],
            k_cap=k_cap, penalty_B=st["repetition_penalty"], seen_BV=st["seen_BV"], banned_BV=banned_BV)
  if sampler is sampling.sample:  # keys derived only when some row samples: a greedy step draws no random bits
    return sampler(logits_BV, lambda: _row_keys(st), **kw)
  return sampler(logits_BV, _row_keys(st), **kw)


def _accept(st, token_B, logp_B):
  """Write the sampled tokens of rows still running at slot len_b, then update lengths and stop flags."""
  B, S = st["tokens_BS"].shape
  live_B = ~st["done_B"]
  rows = jnp.arange(B)
  slot_B = jnp.where(live_B, st["len_B"], S)  # out of range: dropped
  tokens_BS = st["tokens_BS"].at[rows, slot_B].set(token_B, mode="drop")
  logp_BN = st["logp_BN"].at[rows, jnp.where(live_B, st["n_B"], st["logp_BN"].shape[1])].set(logp_B, mode="drop")
  seen_BV = st["seen_BV"].at[rows, jnp.where(live_B, token_B, st["seen_BV"].shape[1])].set(True, mode="drop")
  n_B = st["n_B"] + live_B
  len_B = st["len_B"] + live_B
  # stop sequences: the last W generated tokens (right-aligned) against each -1-padded table row
  seqs_BMW = st["stop_seqs"]
  W = seqs_BMW.shape[-1]
  back_W = jnp.arange(W - 1, -1, -1)
  idx_BW = jnp.clip(len_B[:, None] - 1 - back_W[None], 0, S - 1)
  last_BW = jnp.take_along_axis(tokens_BS, idx_BW, axis=1)
  valid_BW = back_W[None] < n_B[:, None]
  match_BMW = (seqs_BMW < 0) | (valid_BW[:, None] & (last_BW[:, None] == seqs_BMW))
  seq_hit_B = jnp.any(jnp.all(match_BMW, -1) & jnp.any(seqs_BMW >= 0, -1), -1)
  hit_B = live_B & (jnp.any(token_B[:, None] == st["stop_ids"], -1) | seq_hit_B)
  finished_B = st["finished_B"] | hit_B
  done_B = st["done_B"] | finished_B | (n_B >= st["max_new_tokens"])
  return {**st, "tokens_BS": tokens_BS, "logp_BN": logp_BN, "seen_BV": seen_BV, "n_B": n_B, "len_B": len_B,
          "finished_B": finished_B, "done_B": done_B}


def prefill(params, tokens_BP, len_B, rows, *, cfg, n: int, max_new: int, k_cap: int, cache_len: int = 0,
            block: int = transformer.CACHE_BLOCK):
  """Cache the prompts, then sample the first token of ``n`` samples per prompt (rows b*n .. b*n+n-1 share
  prompt b's cache). ``rows`` holds the per-sample arrays [B*n, ...]: sampling values, ``seed_B``, ``sample_B``,
  ``stop_ids`` [B*n, n_ids] and ``stop_seqs`` [B*n, m, W] (-1 padded). Cache length: ``cache_len`` or P +
  max_new, in ``transformer.cache_blocks`` of ``block``."""
  B, P = tokens_BP.shape
  S = cache_len or P + max_new
  cache = transformer.init_cache(cfg, B, S, block)
  h_BPD, cache = transformer.cached_hidden_states(params, tokens_BP, cfg, cache, jnp.zeros(B, jnp.int32))
  h_BD = jnp.take_along_axis(h_BPD, (len_B - 1)[:, None, None], axis=1)[:, 0]
  logits_BV = transformer.logits_from_hidden(params, h_BD[:, None], cfg)[:, 0]
  V = logits_BV.shape[-1]
  rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis)
  valid_BP = jnp.arange(P)[None] < len_B[:, None]
  seen_BV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], jnp.where(valid_BP, tokens_BP, V)].set(
      True, mode="drop")
  tokens_BS = jnp.where(valid_BP, tokens_BP, 0)
  st = {"cache": jax.tree.map(lambda c: sharding.constrain(rep(c), transformer.CACHE_AXES), cache),
        "tokens_BS": rep(jnp.pad(tokens_BS, ((0, 0), (0, S - P)))), "len_B": rep(len_B.astype(jnp.int32)),
        "n_B": jnp.zeros(B * n, jnp.int32), "done_B": jnp.zeros(B * n, bool), "finished_B": jnp.zeros(B * n, bool),
        "logp_BN": jnp.zeros((B * n, max_new), jnp.float32), "seen_BV": rep(seen_BV), **rows,
        "key_B": _base_keys(rows["seed_B"], rows["sample_B"])}
  token_B, logp_B = _sample(rep(logits_BV), st, k_cap, cfg)
  return _accept(st, token_B, logp_B)


def decode_step(params, cfg, st, *, k_cap: int, blocks_read=None):
  """Feed each row's last token (slot len_b - 1) and sample the next. ``blocks_read``: attention reads the
  cache's first ``blocks_read + 1`` blocks, which must hold every live row's slots up to len_b - 1."""
  B, S = st["tokens_BS"].shape
  pos_B = st["len_B"] - 1
  last_B1 = jnp.take_along_axis(st["tokens_BS"], pos_B[:, None], axis=1)
  h_B1D, cache = transformer.cached_hidden_states(params, last_B1, cfg, st["cache"], pos_B, blocks_read=blocks_read)
  logits_BV = transformer.logits_from_hidden(params, h_B1D, cfg)[:, 0]
  token_B, logp_B = _sample(logits_BV, st, k_cap, cfg)
  return _accept({**st, "cache": cache}, token_B, logp_B)


def decode(params, cfg, st, *, k_cap: int, max_steps: int):
  """Decode until every row is done (or ``max_steps`` steps): one while_loop, no host sync per token. Each step's
  attention reads the fewest cache blocks that hold every live row's slots, so attention reads what the rows
  hold (rounded up to a block), not the whole cache."""
  params = transformer.unstack_layers(params)
  ends = np.cumsum([b.shape[2] for b in st["cache"][0]["v"]])  # the slots held by blocks 0..i

  def cond(c):
    i, s = c
    return (i < max_steps) & ~jnp.all(s["done_B"])

  def body(c):
    i, s = c
    longest = jnp.max(jnp.where(s["done_B"], 0, s["len_B"]))  # the step reads slots < len_b of live rows
    blocks_read = jnp.searchsorted(jnp.asarray(ends), longest)
    return i + 1, decode_step(params, cfg, s, k_cap=k_cap, blocks_read=blocks_read)

  return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), st))[1]


class Engine:
  """Compiled prefill/decode for one model. ``generate`` pads the batch to ``batch_size`` and prompts to the next
  bucket, so each (bucket, n) compiles once; sampling values, seeds and stops are arrays. ``attend_block``: the
  first block of the cache (``transformer.cache_blocks``): the fewest slots a decode step attends over."""

  def __init__(self, params, cfg, *, batch_size: int = 8, max_new_tokens: int = 64, top_k_cap: int = 64,
               prompt_buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096), pad_id: int = 0, mesh=None,
               rules=None, attend_block: int = transformer.CACHE_BLOCK):
    self.params, self.cfg, self.batch_size, self.max_new = params, cfg, batch_size, max_new_tokens
    self.k_cap, self.buckets, self.pad_id = top_k_cap, tuple(sorted(prompt_buckets)), pad_id
    self._wrap = (lambda f: sharding.bind(f, mesh, rules)) if mesh is not None else (lambda f: f)
    self.attend_block = attend_block
    self._runs = {}  # one per n

  def _prefill_decode(self, *args, n):
    """Prefill then decode in one executable: the layers' weights are sliced out of their stack (and the fused
    projections' concatenated) once per call, not once for each."""
    if n not in self._runs:
      cfg, k_cap, max_new = self.cfg, self.k_cap, self.max_new
      f = functools.partial(prefill, cfg=cfg, n=n, max_new=max_new, k_cap=k_cap, block=self.attend_block)
      self._runs[n] = jax.jit(self._wrap(lambda p, *a: decode(p, cfg, f(p, *a), k_cap=k_cap, max_steps=max_new)))
    return self._runs[n](*args)

  def bucket(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest bucket ({self.buckets[-1]})")

  def compiled_count(self) -> int:
    """How many executables prefill and decode hold (for tests: repeated calls must not add any)."""
    return sum(f._cache_size() for f in self._runs.values())

  def generate(self, prompts, sampling_params=None, *, n: int = 1, stop_ids=(), stop_sequences=(), seed: int = 0):
    """Continue each prompt (token ids) ``n`` times. ``sampling_params``: one SamplingParams or one per prompt.
    ``seed``: prompt i uses seed + i, or one seed per prompt (a list). Returns a list (per prompt) of n dicts:
    ``tokens`` (new tokens, a final stop token included), ``logprobs`` (fp32, of the temperature-scaled
    distribution before truncation), ``finished`` (ended by a stop)."""
    sp = sampling_params or SamplingParams()
    sps = list(sp) if isinstance(sp, (list, tuple)) else [sp] * len(prompts)
    if len(sps) != len(prompts):
      raise ValueError(f"{len(sps)} sampling params for {len(prompts)} prompts")
    for p in sps:
      if p.max_new_tokens > self.max_new or p.top_k > self.k_cap:
        raise ValueError(f"max_new_tokens={p.max_new_tokens} / top_k={p.top_k} exceed the engine's "
                         f"{self.max_new} / {self.k_cap}")
    if any(len(p) == 0 for p in prompts):
      raise ValueError("empty prompt")
    ids, seqs = stop_table(stop_ids, stop_sequences)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]
    out = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a bucket
    for c in range(0, len(order), self.batch_size):
      chunk = order[c:c + self.batch_size]
      res = self._run([prompts[i] for i in chunk], [sps[i] for i in chunk], [seeds[i] for i in chunk], n, ids, seqs)
      out += list(zip(chunk, res))
    return [r for _, r in sorted(out, key=lambda x: x[0])]

  def inputs(self, prompts, sps, seeds, batch: int):
    """Prompt tokens right-padded to [batch, bucket], their lengths, and the per-row sampling arrays (with
    ``seed_B``); rows past the prompts are one-token fillers that stop at once."""
    tokens = np.full((batch, self.bucket(max(len(p) for p in prompts))), self.pad_id, np.int32)
    lens = np.ones(batch, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      lens[i] = len(p)
    fill = batch - len(prompts)
    rows = row_arrays(list(sps) + [SamplingParams(max_new_tokens=1)] * fill)
    rows["max_new_tokens"] = np.where(rows["max_new_tokens"] > 0, rows["max_new_tokens"], self.max_new)
    rows["seed_B"] = np.asarray(list(seeds) + [0] * fill, np.uint32)
    return tokens, lens, rows

  def _run(self, prompts, sps, seeds, n, ids, seqs):
    B = self.batch_size
    tokens, lens, rows = self.inputs(prompts, sps, seeds, B)
    # sample j of prompt i draws from seed i, stream j (row seeds are what make a request reproducible)
    rows = {k: np.repeat(v, n) for k, v in rows.items()}
    rows["sample_B"] = np.tile(np.arange(n, dtype=np.int32), B)
    rows["stop_ids"] = np.broadcast_to(ids, (B * n,) + ids.shape)
    rows["stop_seqs"] = np.broadcast_to(seqs, (B * n,) + seqs.shape)
    st = self._prefill_decode(self.params, jnp.asarray(tokens), jnp.asarray(lens), rows, n=n)
    got = jax.device_get({k: st[k] for k in ("tokens_BS", "len_B", "n_B", "logp_BN", "finished_B")})
    res = []
    for i, p in enumerate(prompts):
      samples = []
      for j in range(i * n, i * n + n):
        k = int(got["n_B"][j])
        start = len(p)
        samples.append({"tokens": got["tokens_BS"][j, start:start + k].tolist(),
                        "logprobs": got["logp_BN"][j, :k].tolist(), "finished": bool(got["finished_B"][j])})
      res.append(samples)
    return res


def decode_chunk(params, cfg, st, *, k_cap: int, steps: int):
  """``steps`` decode steps (rows already done stay as they are; the chunk ends early when all are): what a server
  runs between admissions."""
  return decode(params, cfg, st, k_cap=k_cap, max_steps=steps)


def insert(st, row, slot):
  """Put the one-row state ``row`` (from ``prefill`` with B = 1) into row ``slot`` of the batch state ``st``."""
  def put(big, small, axis):
    return jax.lax.dynamic_update_index_in_dim(big, small, slot, axis)
  return jax.tree.map(lambda big, small: put(big, small, 0), st, row)


class Slots:
  """A fixed batch of decode slots that requests join and leave between chunks of decode steps (continuous
  batching). Each slot's cache holds ``max_prompt`` + ``max_new_tokens`` positions; one prefill compile per
  prompt bucket, one chunk compile; sampling values, seeds and stops are per-slot arrays.

    slots = Slots(engine, size=16, max_prompt=512)
    slots.admit(slot, prompt_ids, SamplingParams(...), seed=..., stop_ids=..., stop_sequences=...)
    for slot, tokens, logprobs, finished, done in slots.step(16): ...
  """

  def __init__(self, engine: Engine, size: int, max_prompt: int, n_stop_ids: int = 8, n_stop_seqs: int = 4):
    self.engine, self.size = engine, size
    self.max_prompt = engine.bucket(max_prompt)
    self.cache_len = self.max_prompt + engine.max_new
    self.n_ids, self.n_seqs = n_stop_ids, n_stop_seqs
    self.active = [False] * size
    self.emitted = [0] * size  # tokens already handed out per slot
    eng, cfg = engine, engine.cfg
    self._prefill = jax.jit(eng._wrap(lambda p, t, l, r: prefill(
        p, t, l, r, cfg=cfg, n=1, max_new=eng.max_new, k_cap=eng.k_cap, cache_len=self.cache_len,
        block=eng.attend_block)))
    self._insert = jax.jit(eng._wrap(insert), donate_argnums=(0,))
    self._chunk = jax.jit(eng._wrap(lambda p, st, steps: decode_chunk(p, cfg, st, k_cap=eng.k_cap, steps=steps)),
                          static_argnums=(2,), donate_argnums=(1,))
    # all slots start done: a one-token prompt with max_new_tokens=1, never read
    self.state = self._prefill_rows([[0]] * size, [SamplingParams(max_new_tokens=1)] * size, [0] * size,
                                    [()] * size, [()] * size, batch=size)

  def _prefill_rows(self, prompts, sps, seeds, stop_ids, stop_seqs, batch, samples=None):
    tokens, lens, rows = self.engine.inputs(prompts, sps, seeds, batch)
    rows["sample_B"] = np.asarray(samples or [0] * batch, np.int32)
    tables = [stop_table(i, s) for i, s in zip(stop_ids, stop_seqs)]
    rows["stop_ids"] = np.stack([np.pad(t[0], (0, self.n_ids - len(t[0])), constant_values=-1) for t in tables])
    rows["stop_seqs"] = np.stack([np.pad(t[1], ((0, self.n_seqs - len(t[1])), (0, 0)), constant_values=-1)
                                  for t in tables])
    return self._prefill(self.engine.params, jnp.asarray(tokens), jnp.asarray(lens), rows)

  def free(self) -> list[int]:
    return [i for i, a in enumerate(self.active) if not a]

  def admit(self, slot: int, prompt, sampling_params: SamplingParams, *, seed: int = 0, sample: int = 0,
            stop_ids=(), stop_sequences=()):
    """Prefill ``prompt`` into a free slot; its first token is sampled now and handed out by the next step.
    ``sample``: the stream index under ``seed`` (the n choices of one request share its seed)."""
    if self.active[slot]:
      raise ValueError(f"slot {slot} is busy")
    sp = sampling_params
    if len(prompt) > self.max_prompt or not prompt:
      raise ValueError(f"prompt of {len(prompt)} tokens: must be 1..{self.max_prompt}")
    if sp.max_new_tokens > self.engine.max_new or sp.top_k > self.engine.k_cap:
      raise ValueError(f"max_new_tokens={sp.max_new_tokens} / top_k={sp.top_k} exceed the engine's "
                       f"{self.engine.max_new} / {self.engine.k_cap}")
    if len(stop_ids) > self.n_ids or len(stop_sequences) > self.n_seqs:
      raise ValueError(f"at most {self.n_ids} stop ids and {self.n_seqs} stop sequences")
    row = self._prefill_rows([list(prompt)], [sp], [seed], [list(stop_ids)], [list(stop_sequences)], batch=1,
                             samples=[sample])
    self.state = self._insert(self.state, row, jnp.int32(slot))
    self.active[slot], self.emitted[slot] = True, 0

  def step(self, steps: int = 16):
    """Run ``steps`` decode steps; returns (slot, new tokens, their logprobs, finished, done) for every active
    slot, and frees the slots that are done."""
    if any(self.active):
      self.state = self._chunk(self.engine.params, self.state, steps)
    got = jax.device_get({k: self.state[k] for k in ("tokens_BS", "len_B", "n_B", "logp_BN", "finished_B",
                                                      "done_B")})
    out = []
    for s in range(self.size):
      if not self.active[s]:
        continue
      n, start = int(got["n_B"][s]), int(got["len_B"][s]) - int(got["n_B"][s])
      new = got["tokens_BS"][s, start + self.emitted[s]:start + n].tolist()
      lps = got["logp_BN"][s, self.emitted[s]:n].tolist()
      done = bool(got["done_B"][s])
      out.append((s, new, lps, bool(got["finished_B"][s]), done))
      self.emitted[s] = n
      if done:
        self.active[s] = False
    return out

  def release(self, slot: int):
    """End a slot early (a client went away, a stop string matched): it stops decoding and is free again."""
    self.active[slot] = False
    self.state = {**self.state, "done_B": self.state["done_B"].at[slot].set(True)}
