"""Chat templates: NeMo's chat template (``<extra_id_*>`` tokens by default, or any ``chat_prompt_tokens``),
NeMo's prompt/response template and Hugging Face Jinja templates.

All render a conversation into *segments*: ``(text, trainable)`` pairs whose concatenation is the full
prompt string; ``trainable`` marks what the loss sees under answer-only training.
"""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass

SYSTEM_TURN_START = "<extra_id_0>"
TURN_START = "<extra_id_1>"
LABEL_START = "<extra_id_2>"
END_OF_TURN = "\n"
END_OF_NAME = "\n"

Segments = list[tuple[str, bool]]


class Pieces(list):
  """Segments that are tokenised one by one and concatenated (NeMo's prompt/response template), not as one
  string."""


@dataclass(frozen=True)
class ChatTokens:
  """NeMo's ``chat_prompt_tokens``; the default is the ``<extra_id_*>`` set."""
  system_turn_start: str = SYSTEM_TURN_START
  turn_start: str = TURN_START
  label_start: str = LABEL_START
  end_of_turn: str = END_OF_TURN
  end_of_name: str = END_OF_NAME


DEFAULT_TOKENS = ChatTokens()


def nemo_chat_segments(system: str, turns: list[tuple[str, str, str | None]], mask_role: str,
                       label_type: str | None = None, tokens: ChatTokens = DEFAULT_TOKENS) -> Segments:
  """NeMo's chat rendering and loss mask.

  ``turns`` are (role, value, label) with roles spelt as in the data; ``mask_role`` is one role or several joined
  by commas. The system header, the first turn and a masked-role turn at index 1 are never trained on; for later
  masked-role turns only the leading ``turn_start`` (which closes the previous reply) is trained on; for the
  other roles the name and label (up to the first ``end_of_name`` after the name) are masked and the rest of the
  turn is trained on. A final ``turn_start`` is appended (and trained on) when the last turn's role is not masked.
  """
  t, masked = tokens, set(mask_role.split(","))
  segs: Segments = [(f"{t.system_turn_start}System{t.end_of_name}{system}{t.end_of_turn}", False)]
  for i, (role, value, label) in enumerate(turns):
    name = f"{t.turn_start}{role}{t.end_of_name}"
    rest = f"{value}{t.end_of_turn}"
    if label is not None and label_type == "VALUE_TO_TEXT":
      rest = label_text(label, t) + rest
      cut = rest.index(t.end_of_name) + len(t.end_of_name)
      name, rest = name + rest[:cut], rest[cut:]
    if i == 0 or (role in masked and i == 1):
      segs.append((name + rest, False))
    elif role in masked:
      segs += [(t.turn_start, True), (name[len(t.turn_start):] + rest, False)]
    else:
      segs += [(name, False), (rest, True)]
  if turns and turns[-1][0] not in masked:
    segs.append((t.turn_start, True))
  return segs


def nemo_generation_prompt(system: str, turns: list[tuple[str, str]], assistant_role="Assistant",
                           tokens: ChatTokens = DEFAULT_TOKENS, label: str | None = None) -> str:
  """The prompt string that asks the model for the next assistant reply; with ``label`` (SteerLM attributes), the
  reply's label as ``VALUE_TO_TEXT`` training renders it: ``label_start``, the label, ``end_of_name``."""
  t = tokens
  text = f"{t.system_turn_start}System{t.end_of_name}{system}{t.end_of_turn}"
  for role, value in turns:
    text += f"{t.turn_start}{role}{t.end_of_name}{value}{t.end_of_turn}"
  text += f"{t.turn_start}{assistant_role}{t.end_of_name}"
  return text if label is None else text + label_text(label, t)


def label_text(label: str, tokens: ChatTokens = DEFAULT_TOKENS) -> str:
  return f"{tokens.label_start}{label}{tokens.end_of_name}"


def nemo_prompt_pieces(template: str, values: dict[str, str], space_sensitive: bool) -> Pieces:
  """NeMo's prompt/response rendering: the template is cut before each ``{key}`` (spaces in front of a key stay
  with it), a piece's one leading space is dropped unless the tokenizer is space-sensitive, values are stripped
  of spaces, and pieces from ``{output}`` on are the trained answer. Each piece is tokenised on its own."""
  parts = [p for p in re.split(r"( *?\{.+?\})", template) if p]
  out, trained = Pieces(), False
  for p in parts:
    if not space_sensitive and p[0] == " ":
      p = p[1:]
    name = p.lstrip(" ")
    key = name[1:-1] if name[:1] == "{" and name[-1:] == "}" else None
    trained = trained or key == "output"
    out.append((p[:len(p) - len(name)] + (values[key].strip(" ") if key in values else name), trained))
  return out


class TemplateError(ValueError):
  pass


_ENV = None


def _env():
  global _ENV
  if _ENV is None:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
      raise TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    _ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    _ENV.filters["tojson"] = tojson
    _ENV.globals["raise_exception"] = raise_exception
    _ENV.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return _ENV


def render_hf(template: str, messages: list[dict], add_generation_prompt: bool = False, **special) -> str:
  """Render a Hugging Face Jinja chat template (sandboxed, as ``apply_chat_template`` does); a template that does
  not compile or fails on these messages raises TemplateError."""
  import jinja2
  try:
    return _env().from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **special)
  except TemplateError:
    raise
  except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
    raise TemplateError(f"{type(e).__name__}: {e}") from None


def hf_chat_segments(template: str, messages: list[dict], trainable_roles=("assistant",), **special) -> Segments:
  """Segments of an HF-templated conversation; each trainable message's span is what the template adds between
  the prompt-with-generation-prompt before it and the rendering that includes it."""
  full = render_hf(template, messages, **special)
  spans, pos = [], 0
  for i, m in enumerate(messages):
    if m["role"] not in trainable_roles:
      continue
    before = render_hf(template, messages[:i], add_generation_prompt=True, **special)
    upto = render_hf(template, messages[:i + 1], **special)
    if not upto.startswith(before) or not full.startswith(upto):
      raise TemplateError("chat template output is not prefix-stable, so the reply spans cannot be located")
    start, end = max(len(before), pos), len(upto)
    if end > start:
      spans.append((start, end))
      pos = end
  segs: Segments = []
  cur = 0
  for s, e in spans:
    if s > cur:
      segs.append((full[cur:s], False))
    segs.append((full[s:e], True))
    cur = e
  if cur < len(full):
    segs.append((full[cur:], False))
  return segs
