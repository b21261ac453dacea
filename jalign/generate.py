"""Generation from a list of token-id prompts with the KV-cache engine (``jalign.generation``): used for the
samples printed during training and by ``jalign.load(...).generate``."""
from __future__ import annotations

from jalign.generation import Engine, SamplingParams


def generate(params, cfg, prompts: list[list[int]], *, max_new_tokens: int, stop_ids=(), pad_id: int = 0,
             temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
  """Continue each prompt; a row stops at any of ``stop_ids`` (kept in the output) or after max_new_tokens."""
  engine = Engine(params, cfg, batch_size=min(len(prompts), 32), max_new_tokens=max_new_tokens, pad_id=pad_id)
  out = engine.generate(prompts, SamplingParams(temperature=temperature), stop_ids=sorted(stop_ids), seed=seed)
  return [samples[0]["tokens"] for samples in out]
