"""``jalign.load(path)``: one call from a model on disk to logits."""
from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass
class LoadedModel:
  """``.config`` (ModelConfig), ``.params`` (jax arrays), ``.tokenizer`` (or None) and
  ``model(token_ids [B, T]) -> logits [B, T, V]`` (float32)."""
  config: Any
  params: Any
  tokenizer: Any = None
  _forward: Any = dataclasses.field(default=None, repr=False)

  def __call__(self, token_ids):
    import jax
    import jax.numpy as jnp

    from jalign.models import transformer
    if self._forward is None:
      self._forward = jax.jit(lambda p, t: transformer.forward(p, t, self.config))
    tokens = jnp.asarray(token_ids, jnp.int32)
    if tokens.ndim == 1:
      tokens = tokens[None]
    return self._forward(self.params, tokens)

  def generate(self, prompt_ids, max_new_tokens=32, stop_ids=()):
    """Greedy continuation of each prompt (lists of token ids)."""
    from jalign import generate
    pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
    return generate.generate(self.params, self.config, [list(p) for p in prompt_ids],
                             max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad)


def load(path: str) -> LoadedModel:
  """Load an HF model directory, a ``.nemo`` (file or extracted directory), a jalign model directory or a finished
  run directory."""
  import jax

  from jalign import convert
  is_hf = os.path.exists(os.path.join(path, "config.json")) and any(
      os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))
  if is_hf:
    cfg, params, _ = convert.read_hf_dir(path)
    tok = _tokenizer_or_none(path)
  elif path.endswith(".nemo") or os.path.exists(os.path.join(path, "model_config.yaml")):
    import tempfile
    cfg, params, tok_files = convert.read_nemo(path)
    with tempfile.TemporaryDirectory(prefix="jalign_tok_") as tok_dir:  # tokenizers load fully into memory
      convert.write_files(tok_dir, tok_files)
      tok = _tokenizer_or_none(tok_dir)
  else:
    from jalign import checkpoint
    cfg, params, _ = convert.read_jalign_dir(path)
    tok = _tokenizer_or_none(checkpoint.resolve_model_dir(path))
  return LoadedModel(cfg, jax.tree.map(jax.numpy.asarray, params), tok)


def _tokenizer_or_none(directory: str):
  """The tokenizer in ``directory``; None when it has none (weights are still usable with token ids)."""
  from jalign.data import TokenizerError, load_tokenizer
  try:
    return load_tokenizer(directory)
  except TokenizerError:
    return None
