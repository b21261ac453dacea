"""One module per algorithm: its batch layout, its pure loss and what the trainer needs to step it."""
from jalign.algorithms import sft

REGISTRY = {"sft": sft}


def get(name: str):
  if name not in REGISTRY:
    raise ValueError(f"algorithm={name!r}: available: {sorted(REGISTRY)}")
  return REGISTRY[name]
