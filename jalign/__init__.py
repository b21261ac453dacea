"""jalign: JAX-native alignment of language models."""
__version__ = "0.1.0"


def load(path: str):
  """Load an HF directory, a jalign model directory or a finished run: ``.config``, ``.params``,
  ``.tokenizer`` and ``model(token_ids) -> logits``."""
  from jalign.api import load as _load
  return _load(path)
