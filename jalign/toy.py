"""The embedded default task: short arithmetic and string questions whose answers a program can grade.

Shared by every quickstart: SFT data, and (in later recipes) preference pairs, reward labels and attributes,
all exact because ``answer`` and ``grade`` are programs.
"""
from __future__ import annotations

import random
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


def nemo_chat_row(question: str, response: str) -> dict:
  return {"system": "", "mask": "User", "type": None,
          "conversations": [{"from": "User", "value": question, "label": None},
                            {"from": "Assistant", "value": response, "label": None}]}


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
  """Exact toy attributes on NeMo's 0-4 scale: correctness (4 right; partial credit for near misses),
  helpfulness (= correctness) and verbosity (response length)."""
  right = answer(question)
  if response.strip() == right:
    correct = 4
  elif question.startswith("What is ") and response.strip().isdigit():
    correct = max(0, 3 - abs(int(response) - int(right)))
  else:
    correct = sum(a == b for a, b in zip(response.strip(), right)) * 2 // max(len(right), 1)
  return {"helpfulness": correct, "correctness": correct, "verbosity": min(4, len(response.strip()) - 1)}
