"""SteerLM attribute strings: ``quality:4,toxicity:0,...``, integers 0-4, comma-joined, in a fixed order.

The order is the reward model's (HelpSteer2's nine attributes by default): a model trained on labels in one order
is asked in the same order, so a dict of desired values is written in that order, not the dict's.
"""
from __future__ import annotations

import math
import re

HELPSTEER2 = ("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence",
              "complexity", "verbosity")
LOW, HIGH = 0, 4
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")


class AttributeStringError(ValueError):
  """A malformed attribute string or value; the message names the attribute."""


def _order(names, known=HELPSTEER2):
  return sorted(names, key=lambda n: (known.index(n) if n in known else len(known)))


def parse(text: str, names=None) -> dict[str, int]:
  """``"a:4,b:0"`` -> ``{"a": 4, "b": 0}``; integers 0-4 only; with ``names``, any other attribute is refused."""
  if not isinstance(text, str) or not text.strip():
    raise AttributeStringError(f"attribute string {text!r} is empty or not a string (expected e.g. 'quality:4,toxicity:0')")
  out = {}
  for item in text.strip().split(","):
    name, sep, value = item.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _NAME.match(name):
      raise AttributeStringError(f"attribute {item!r} is not name:value (expected e.g. 'quality:4,toxicity:0')")
    if name in out:
      raise AttributeStringError(f"attribute {name!r} is given twice")
    out[name] = check_value(name, value)
  if names is not None:
    check_names(out, names)
  return out


def check_value(name, value) -> int:
  """A desired value: an integer LOW..HIGH (a string of one, or an int; a float only when it is whole)."""
  v = value
  if isinstance(v, str):
    v = int(v) if re.fullmatch(r"-?\d+", v) else v
  if isinstance(v, float) and v.is_integer():
    v = int(v)
  if isinstance(v, bool) or not isinstance(v, int):
    raise AttributeStringError(f"attribute {name!r}: value {value!r} is not an integer {LOW}-{HIGH}")
  if not LOW <= v <= HIGH:
    raise AttributeStringError(f"attribute {name!r}: value {v} is out of range {LOW}-{HIGH}")
  return v


def check_names(values, names):
  unknown = [n for n in values if n not in names]
  if unknown:
    raise AttributeStringError(f"unknown attribute {unknown[0]!r}; known: {','.join(names)}")


def label(spec, names=None) -> str:
  """The attribute string for desired attributes given as a dict or a string, validated and in order (``names``'
  order when given, else HelpSteer2's for its attributes and the given order after them)."""
  if isinstance(spec, str):
    values = parse(spec, names)
  elif isinstance(spec, dict) and spec:
    values = {str(k): check_value(k, v) for k, v in spec.items()}
    for k in values:
      if not _NAME.match(k):
        raise AttributeStringError(f"attribute name {k!r} is not a name")
    if names is not None:
      check_names(values, names)
  else:
    raise AttributeStringError(f"attributes {spec!r}: expected a non-empty dict or a string like 'quality:4,toxicity:0'")
  order = [n for n in names if n in values] if names is not None else _order(values)
  return ",".join(f"{n}:{values[n]}" for n in order)


def from_scores(names, scores) -> str:
  """A reward model's predictions -> the attribute string: each value rounded (half up) and clipped to 0-4."""
  if len(names) != len(scores):
    raise AttributeStringError(f"{len(names)} attribute names for {len(scores)} scores")
  if not all(math.isfinite(float(s)) for s in scores):
    raise AttributeStringError(f"non-finite attribute scores {list(scores)}")
  vals = [min(HIGH, max(LOW, math.floor(float(s) + 0.5))) for s in scores]
  return ",".join(f"{n}:{v}" for n, v in zip(names, vals))
