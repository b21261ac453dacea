"""Chat templates: NeMo-Aligner's ``<extra_id_*>`` template and Hugging Face Jinja templates.

Both render a conversation into *segments*: ``(text, trainable)`` pairs whose concatenation is the full
prompt string; ``trainable`` marks what the loss sees under answer-only training.
"""
from __future__ import annotations

import datetime
import json

SYSTEM_TURN_START = "<extra_id_0>"
TURN_START = "<extra_id_1>"
LABEL_START = "<extra_id_2>"
END_OF_TURN = "\n"
END_OF_NAME = "\n"

Segments = list[tuple[str, bool]]


def nemo_chat_segments(system: str, turns: list[tuple[str, str, str | None]], mask_role: str,
                       label_type: str | None = None) -> Segments:
  """NeMo-Aligner chat rendering and loss mask.

  ``turns`` are (role, value, label) with roles spelt as in the data ("User", "Assistant"). The system header
  and the first turn are never trained on; for other turns of ``mask_role`` only the leading ``<extra_id_1>``
  (which closes the previous reply) is trained on; for the other roles the name and label are masked and the
  value plus end-of-turn are trained on. A final ``<extra_id_1>`` is appended (and trained on) when the last
  turn's role is not ``mask_role``.
  """
  segs: Segments = [(f"{SYSTEM_TURN_START}System{END_OF_NAME}{system}{END_OF_TURN}", False)]
  for i, (role, value, label) in enumerate(turns):
    label_part = f"{LABEL_START}{label}{END_OF_TURN}" if (label and label_type == "VALUE_TO_TEXT") else ""
    name = f"{role}{END_OF_NAME}"
    body = f"{value}{END_OF_TURN}"
    if i == 0:
      segs.append((TURN_START + name + label_part + body, False))
    elif role == mask_role:
      segs += [(TURN_START, True), (name + label_part + body, False)]
    else:
      segs += [(TURN_START + name + label_part, False), (body, True)]
  if turns and turns[-1][0] != mask_role:
    segs.append((TURN_START, True))
  return segs


def nemo_generation_prompt(system: str, turns: list[tuple[str, str]], assistant_role="Assistant") -> str:
  """The prompt string that asks the model for the next assistant reply."""
  text = f"{SYSTEM_TURN_START}System{END_OF_NAME}{system}{END_OF_TURN}"
  for role, value in turns:
    text += f"{TURN_START}{role}{END_OF_NAME}{value}{END_OF_TURN}"
  return text + f"{TURN_START}{assistant_role}{END_OF_NAME}"


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
  """Render a Hugging Face Jinja chat template (sandboxed, as ``apply_chat_template`` does)."""
  return _env().from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             **special)


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
