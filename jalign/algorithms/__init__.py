"""One module per algorithm: its batch layout, its pure loss and what the trainer needs to step it.

Each module offers ``batch_axes(cfg)``, ``load_data(path, tokenizer, cfg) -> (rows, n_rows, n_skipped,
sample_examples)`` and ``make_loss(cfg, model_cfg) -> loss_fn(params, batch, rng) -> (loss_sum, weight,
metric_sums)``; optionally ``finalize(metrics)``, ``model_overrides(cfg)`` and ``FROZEN`` (param keys not trained).
Online RL algorithms (``RL``) offer ``batch_axes``, ``make_loss`` and ``finalize`` the same way, plus
``needs_reference(cfg)`` and ``prepare(rollout, cfg, ctl) -> (training rows, rollout metrics)`` (advantages,
selections) instead of ``load_data``: the experience source in ``jalign.rl`` calls it once per rollout.
"""
from jalign.algorithms import dpo, grpo, kto, online_dpo, ppo, rloo, rm, rs, sft

REGISTRY = {"sft": sft, "rm": rm, "dpo": dpo, "kto": kto, "ppo": ppo, "grpo": grpo, "rloo": rloo, "rs": rs,
            "online_dpo": online_dpo}
RL = ("ppo", "grpo", "rloo", "rs", "online_dpo")  # fed by an experience source (jalign.rl)


def get(name: str):
  if name not in REGISTRY:
    raise ValueError(f"algorithm={name!r}: available: {sorted(REGISTRY)}")
  return REGISTRY[name]
