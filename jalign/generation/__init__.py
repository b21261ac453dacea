"""Generation: a jitted KV-cache sampler (``engine``) and its token choice (``sampling``)."""
from jalign.generation.engine import Engine, SamplingParams, Slots

__all__ = ["Engine", "SamplingParams", "Slots"]
