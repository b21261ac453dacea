"""jalign: JAX-native alignment of language models."""
__version__ = "0.1.0"
