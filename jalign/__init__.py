"""jalign: JAX-native alignment of language models."""
__version__ = "0.1.0"

from jalign import hostmem as _hostmem  # noqa: E402,F401  (before JAX starts its CPU client)


def load(path: str):
  """Load an HF directory, a jalign model directory or a finished run: ``.config``, ``.params``,
  ``.tokenizer`` and ``model(token_ids) -> logits``."""
  from jalign.api import load as _load
  return _load(path)
