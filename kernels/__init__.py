"""Kernels for jalign (imported as ``jalign.kernels``).

Each kernel lives beside a pure-JAX reference with the same signature. This package imports nothing else
from jalign.
"""
from .attention_ops import IMPLEMENTATIONS, attention, attention_reference

__all__ = ["IMPLEMENTATIONS", "attention", "attention_reference"]
