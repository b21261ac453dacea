"""One module per algorithm: its batch layout, its pure loss and what the trainer needs to step it.

Each module offers ``batch_axes(cfg)``, ``load_data(path, tokenizer, cfg) -> (rows, n_rows, n_skipped,
sample_examples)`` and ``make_loss(cfg, model_cfg) -> loss_fn(params, batch, rng) -> (loss_sum, weight,
metric_sums)``; optionally ``finalize(metrics)``, ``model_overrides(cfg)``, ``FROZEN`` (param keys not trained)
and ``teacher_config(cfg)`` (the ModelConfig of a frozen second model in ``params["teacher"]``, or None: KD online).
Online RL algorithms (``RL``) offer ``batch_axes``, ``make_loss`` and ``finalize`` the same way, plus
``needs_reference(cfg)`` and ``prepare(rollout, cfg, ctl) -> (training rows, rollout metrics)`` (advantages,
selections) instead of ``load_data``: the experience source in ``jalign.rl`` calls it once per rollout.

An algorithm may bring its own model family instead of the language model with ``model_family(cfg)``, returning
an object with ``config`` (the model config ``make_loss`` receives), ``init_params(config, rng)``,
``param_shapes(config)``, ``param_axes(config)`` (logical names from ``jalign.sharding`` rules), ``checkpoint``
(a model dir to start from, or ""), ``export(params) -> (params, model_config dict)`` (what ``WORKDIR/model``
holds) and optionally ``flops_per_token(config, seq_len)`` and ``seq_len``; no tokenizer is loaded then and
``load_data`` gets ``None`` for it. Diffusion algorithms use ``jalign.diffusion.model_family``.
"""
from jalign.algorithms import ddpm, dpo, draftp, grpo, kd, kto, online_dpo, ppo, rloo, rm, rs, sft, spin, steerlm2

REGISTRY = {"sft": sft, "rm": rm, "dpo": dpo, "kto": kto, "ppo": ppo, "grpo": grpo, "rloo": rloo, "rs": rs,
            "online_dpo": online_dpo, "spin": spin, "steerlm2": steerlm2, "kd": kd, "ddpm": ddpm,
            "draftp": draftp}
RL = ("ppo", "grpo", "rloo", "rs", "online_dpo")  # fed by an experience source (jalign.rl)


def get(name: str):
  if name not in REGISTRY:
    raise ValueError(f"algorithm={name!r}: available: {sorted(REGISTRY)}")
  return REGISTRY[name]
