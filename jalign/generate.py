"""Greedy/temperature sampling for evaluation and samples (a recompute-the-prefix sampler: simple and exact;
the KV-cache sampler used by RL comes with the generation issue)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jalign.models import transformer


@functools.partial(jax.jit, static_argnames=("cfg",))
def _next_logits(params, tokens_BT, cur_B, cfg):
  logits = transformer.forward(params, tokens_BT, cfg)
  return jnp.take_along_axis(logits, (cur_B - 1)[:, None, None], axis=1)[:, 0]


def generate(params, cfg, prompts: list[list[int]], *, max_new_tokens: int, stop_ids=(), pad_id: int = 0,
             temperature: float = 0.0, rng=None) -> list[list[int]]:
  """Continue each prompt; stops a row at any of ``stop_ids`` (kept in the output) or after max_new_tokens."""
  B = len(prompts)
  T = max(len(p) for p in prompts) + max_new_tokens
  T = -(-T // 16) * 16  # fewer distinct shapes to compile
  buf = np.full((B, T), pad_id, np.int32)
  cur = np.array([len(p) for p in prompts], np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  done = np.zeros(B, bool)
  out = [[] for _ in range(B)]
  rng = jax.random.PRNGKey(0) if rng is None else rng
  for t in range(max_new_tokens):
    logits = _next_logits(params, jnp.asarray(buf), jnp.asarray(cur), cfg)
    if temperature > 0:
      rng, k = jax.random.split(rng)
      nxt = np.asarray(jax.random.categorical(k, logits / temperature))
    else:
      nxt = np.asarray(jnp.argmax(logits, -1))
    for i in range(B):
      if done[i]:
        continue
      out[i].append(int(nxt[i]))
      buf[i, cur[i]] = nxt[i]
      cur[i] += 1
      if int(nxt[i]) in stop_ids:
        done[i] = True
    if done.all():
      break
  return out
