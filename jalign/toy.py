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
