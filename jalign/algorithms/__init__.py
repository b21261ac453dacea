"""One module per algorithm: its batch layout, its pure loss and what the trainer needs to step it.

Each module offers ``batch_axes(cfg)``, ``load_data(path, tokenizer, cfg) -> (rows, n_rows, n_skipped,
sample_examples)`` and ``make_loss(cfg, model_cfg) -> loss_fn(params, batch, rng) -> (loss_sum, weight,
metric_sums)``; optionally ``finalize(metrics)``, ``model_overrides(cfg)`` and ``FROZEN`` (param keys not trained).
"""
from jalign.algorithms import dpo, kto, rm, sft

REGISTRY = {"sft": sft, "rm": rm, "dpo": dpo, "kto": kto}


def get(name: str):
  if name not in REGISTRY:
    raise ValueError(f"algorithm={name!r}: available: {sorted(REGISTRY)}")
  return REGISTRY[name]
