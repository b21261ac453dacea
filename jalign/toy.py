"""The embedded default task: short arithmetic and string questions whose answers a program can grade.

Shared by every quickstart: SFT data, and (in later recipes) preference pairs, reward labels and attributes,
all exact because ``answer`` and ``grade`` are programs.
"""
from __future__ import annotations

import random
import re
import string


def make_question(rng: random.Random) -> tuple[str, str]:
  kind = rng.choice(("add", "reverse"))
  if kind == "add":
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a}+{b}?", str(a + b)
  word = "".join(rng.choice(string.ascii_lowercase[:8]) for _ in range(rng.randint(3, 4)))
  return f"Reverse {word}.", word[::-1]


def answer(question: str) -> str:
  """The correct answer to a generated question."""
  if question.startswith("What is "):
    a, b = question[len("What is "):-1].split("+")
    return str(int(a) + int(b))
  if question.startswith("Reverse "):
    return question[len("Reverse "):-1][::-1]
  raise ValueError(f"not a toy question: {question!r}")


def grade(question: str, response: str) -> bool:
  return response.strip() == answer(question)


def worked(question: str, answer_text: str) -> str:
  """An answer with its working shown, the toy's verbose reply: "8+17=25", "hbg reversed is gbh"."""
  if question.startswith("What is "):
    return question[len("What is "):-1] + "=" + answer_text
  return question[len("Reverse "):-1] + " reversed is " + answer_text


def shows_working(response: str) -> bool:
  return "=" in response or " reversed is " in response


def final_answer(response: str) -> str:
  """The answer a reply gives: what follows its working ("8+17=25" -> "25"), else the whole reply."""
  r = response.strip()
  for sep in ("=", " reversed is "):
    if sep in r:
      return r.rsplit(sep, 1)[1].strip()
  return r


def nemo_chat_row(question: str, response: str, label: str | None = None) -> dict:
  """A NeMo chat row; with ``label`` (SteerLM attributes), ``type: VALUE_TO_TEXT`` and the reply labelled."""
  return {"system": "", "mask": "User", "type": None if label is None else "VALUE_TO_TEXT",
          "conversations": [{"from": "User", "value": question, "label": None},
                            {"from": "Assistant", "value": response, "label": label}]}


STEER_ATTRIBUTES = ("correctness", "verbosity")


def steer_label(question: str, response: str) -> str:
  """The SteerLM label of a reply: its exact toy attributes."""
  a = attributes(question, response)
  return ",".join(f"{k}:{a[k]}" for k in STEER_ATTRIBUTES)


def wrong_answer(question: str, rng: random.Random) -> str:
  """A wrong answer of the kind small models give: part of the question copied instead of answering (an operand
  instead of the sum, the word left unreversed; a palindrome gets shuffled or changed)."""
  right = answer(question)
  if question.startswith("What is "):
    a, b = (int(x) for x in question[len("What is "):-1].split("+"))
    return str(rng.choice([x for x in (a, b) if x != a + b] or [a + b + 1]))
  word = question[len("Reverse "):-1]
  if word != right:
    return word
  shuffles = {"".join(rng.sample(word, len(word))) for _ in range(20)} - {right}
  if shuffles:  # a palindrome: shuffle it
    return rng.choice(sorted(shuffles))
  return rng.choice([c for c in string.ascii_lowercase[:8] if c != right[0]]) + right[1:]  # e.g. "aaa"


def attributes(question: str, response: str) -> dict:
  """Exact toy attributes on NeMo's 0-4 scale: correctness of the final answer (4 right; partial credit for near
  misses), helpfulness (= correctness) and verbosity (response length: a shown working is 4)."""
  right, given = answer(question), final_answer(response)
  if given == right:
    correct = 4
  elif question.startswith("What is ") and given.isdigit():
    correct = max(0, 3 - abs(int(given) - int(right)))
  else:
    correct = sum(a == b for a, b in zip(given, right)) * 2 // max(len(right), 1)
  return {"helpfulness": correct, "correctness": correct, "verbosity": min(4, len(response.strip()) - 1)}


# a toy question inside a longer text (a rendered prompt, a user turn with more around it)
_QUESTION = re.compile(r"What is \d+\+\d+\?|Reverse [^\s.]+\.")


def _content(c) -> str | None:
  """A message's text: a string, or the text parts of a list of content parts."""
  if isinstance(c, list):
    return "".join(p.get("text", "") for p in c if isinstance(p, dict))
  return c if isinstance(c, str) else None


def _user_turn(row) -> str | None:
  """The last user turn of a NeMo chat row or a TRL messages/prompt row, or a string prompt/input."""
  if not isinstance(row, dict):
    return None
  if isinstance(row.get("conversations"), list):
    turns = [t.get("value") for t in row["conversations"] if isinstance(t, dict) and t.get("from") == "User"]
    return turns[-1] if turns else None
  for key in ("messages", "prompt"):
    if isinstance(row.get(key), list):
      turns = [_content(m.get("content")) for m in row[key] if isinstance(m, dict) and m.get("role") == "user"]
      if turns:
        return turns[-1]
  for key in ("prompt", "input"):
    if isinstance(row.get(key), str):
      return row[key]
  return None


def _question(prompt: str, row) -> str:
  for text in (_user_turn(row), prompt):
    found = _QUESTION.findall(text) if isinstance(text, str) else []
    if found:
      return found[-1]
  raise ValueError(f"no toy question ('What is a+b?' or 'Reverse word.') in the row or the prompt {prompt!r:.100}")


def reward(prompts, responses, rows) -> list[float]:
  """The toy grader as an online-RL reward (``fn:jalign.toy:reward``): ``attributes(question, response)
  ["correctness"] / 4``, 1.0 exactly when ``grade`` is true and partial credit below. The question is the last
  user turn of the row (NeMo chat or TRL), else the last toy question found in the prompt text."""
  return [attributes(_question(p, row), r)["correctness"] / 4
          for p, r, row in zip(prompts, responses, rows, strict=True)]
