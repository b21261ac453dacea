"""Kernels for jalign (imported as ``jalign.kernels``).

Each kernel lives beside a pure-JAX reference with the same signature. This package imports nothing else
from jalign. ``attention`` dispatches by name (``xla``, ``pallas``, ``cudnn``); the fused log-prob and sampling
kernels are ``kernels.logprob`` and ``kernels.sampling`` (imported on use: they pull in Pallas).
"""
from .attention_ops import IMPLEMENTATIONS, attention, attention_reference, fallback, interpret_mode

__all__ = ["IMPLEMENTATIONS", "attention", "attention_reference", "fallback", "interpret_mode"]
