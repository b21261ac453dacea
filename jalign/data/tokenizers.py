"""Tokenizers behind one interface: SentencePiece ``.model`` files and Hugging Face ``tokenizer.json``.

``encode`` never adds BOS/EOS: the data pipeline adds them explicitly (``data.add_bos``, ``data.add_eos``).
Special tokens written in text (``<extra_id_1>``, ``<|eot_id|>``) encode to their single ids.
Padding policy: the tokenizer's pad token if it has one, else EOS (Llama 3 has none); padded positions are
always masked out of losses and attention, so the pad id never influences training.
"""
from __future__ import annotations

import json
import os


class TokenizerError(ValueError):
  pass


class Tokenizer:
  kind = "base"
  path = ""
  chat_template: str | None = None
  bos_token: str | None = None
  eos_token: str | None = None

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def token_to_id(self, token: str) -> int | None:
    raise NotImplementedError

  vocab_size: int = 0
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int = 0

  def files(self) -> list[str]:
    """Files that reproduce this tokenizer (copied next to exported models)."""
    return [self.path]


class SentencePieceTokenizer(Tokenizer):
  kind = "sentencepiece"

  def __init__(self, path: str):
    import sentencepiece as spm
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.sp.get_piece_size()
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
    self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
    self.eos_token = self.sp.id_to_piece(self.eos_id) if self.eos_id is not None else None
    pad = self.sp.pad_id()
    self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        self.chat_template = json.load(f).get("chat_template")

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_to_id(self, token: str):
    i = self.sp.piece_to_id(token)
    return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


def _token_str(t):
  return t.get("content") if isinstance(t, dict) else t


class HFTokenizer(Tokenizer):
  kind = "hf"

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _T
    self.path = path
    self.tok = _T.from_file(path)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    cfg = {}
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        cfg = json.load(f)
    self.config_path = cfg_path if cfg else None
    self.chat_template = cfg.get("chat_template")
    if isinstance(self.chat_template, list):  # named templates: take "default"
      self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
    self.bos_token, self.eos_token = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
    self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
    self.eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
    pad = _token_str(cfg.get("pad_token"))
    pad_id = self.token_to_id(pad) if pad else None
    self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str):
    return self.tok.token_to_id(token)

  def files(self):
    return [self.path] + ([self.config_path] if self.config_path else [])


def load_tokenizer(path: str) -> Tokenizer:
  """A SentencePiece ``.model``, an HF ``tokenizer.json``, or a directory holding one of them."""
  if not path:
    raise TokenizerError("tokenizer.path is empty: point it at a .model, a tokenizer.json or a model directory")
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.exists(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
  if not os.path.exists(path):
    raise TokenizerError(f"tokenizer not found: {path}")
  if path.endswith(".json"):
    return HFTokenizer(path)
  return SentencePieceTokenizer(path)
