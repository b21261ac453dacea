"""Experiment configs: ``configs/*.py`` files whose ``get_config()`` returns an ``ml_collections.ConfigDict``.

``base_config()`` holds every key with its default; a config file starts from it and changes what it needs.
Command-line overrides (``--config.optim.lr=3e-4``) are type-checked against the existing value; an unknown
key fails at start with the closest known keys suggested.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os

import ml_collections

from jalign import sharding


class ConfigError(ValueError):
  pass


COMPILE_CACHE = "~/.cache/jalign/xla"  # train.compile_cache and the --compile-cache of generate and serve


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "sft"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=0, ffn_size=128,
      rope_theta=10000.0, rope_scaling="none", rope_factor=1.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_position=8192, rms_norm_eps=1e-6, qkv_bias=False,
      tie_embeddings=False, sliding_window=0, activation="silu", norm_offset=0.0, scale_embeddings=False,
      param_dtype="float32", dtype="float32", remat="none", scan_unroll=1,
      attention="xla", num_value_heads=0,
      logprob_chunk=0,  # log-probs C positions at a time (large vocabularies: bounds the logits memory)
      logprob_impl="xla",  # xla | chunked | pallas (fused kernel)
      sampling_impl="xla",  # the sampler's token choice: xla | pallas (fused kernel)
      checkpoint="",  # initialise weights from a jalign model dir or a run's checkpoint dir
      reference_checkpoint="",  # DPO/KTO reference weights (reference=copy|precomputed); default: the start
  ))
  c.model.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=("q", "v")))

  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",           # a SentencePiece .model, an HF tokenizer.json, or a directory holding either
      chat_template="nemo",  # nemo | hf (the template in tokenizer_config.json)
  ))

  c.data = ml_collections.ConfigDict(dict(
      train_path="", eval_path="",
      max_seq_len=512,
      truncation="error",   # error | right | left: what to do with a prompt longer than the maximum
      answer_only_loss=True,
      packing=False,  # SFT: rows of max_seq_len; rm/dpo/kto: pairs in rows of 2 x max_seq_len (regression rm: 1 x)
      shared_prompt=False,  # rm pairs/dpo/kto: a pair's common prompt computed once (branch attention)
      skip_invalid=False,   # skip (and count) bad rows instead of stopping
      add_bos=False,
      add_eos=True,  # EOS after SFT string rows (input/output, prompt/completion, text), as NeMo's SFT and TRL
      append_eod=False,  # EOS after NeMo-format DPO/KTO/RM rows, NeMo-Aligner's key (TRL rows follow TRL)
      prompt_template="{input} {output}",  # NeMo prompt/response template
      chat_prompt_tokens=ml_collections.ConfigDict(dict(  # NeMo's chat tokens (tokenizer.chat_template=nemo)
          system_turn_start="<extra_id_0>", turn_start="<extra_id_1>", label_start="<extra_id_2>",
          end_of_turn="\n", end_of_name="\n")),
      shuffle=True,
  ))

  c.train = ml_collections.ConfigDict(dict(
      max_steps=100, global_batch_size=8, micro_batch_size=0,  # 0: no accumulation
      grad_clip=1.0, log_every=1, peak_tflops=0.0,  # 0: known accelerators only
      compile_cache=COMPILE_CACHE,  # JAX's persistent compilation cache ("": off)
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, min_lr=0.0, warmup_steps=0, schedule="cosine",  # cosine | linear | constant
      b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
  ))

  # Preference learning (algorithm=rm | dpo | kto); defaults follow NeMo-Aligner.
  c.reference = "auto"  # auto | copy | lora_off | precomputed: where the DPO/KTO reference log-probs come from
  c.dpo = ml_collections.ConfigDict(dict(
      loss="dpo",  # dpo | ipo | rpo_sq | rpo_bwd_kl | rpo_fwd_kl | hinge | simpo | orpo
      beta=0.2, label_smoothing=0.0, gt_reward_scale=1.0, simpo_gamma=0.5,
      preference_loss_weight=1.0, sft_loss_weight=0.0,
      preference_average_log_probs=False, sft_average_log_probs=False,
  ))
  c.kto = ml_collections.ConfigDict(dict(beta=0.2, desirable_weight=1.0, undesirable_weight=1.0))
  c.rm = ml_collections.ConfigDict(dict(
      loss="bradley_terry",  # bradley_terry | regression | regular_bt | margin_bt | scaled_bt
      num_attributes=1, reward_index=0, center_coef=0.0, label_range=(0.0, 4.0),
      attribute_names=(),  # names of the head's outputs (SteerLM annotation); () = HelpSteer2's nine for nine
  ))

  # Online RL (algorithm=ppo | grpo | rloo | rs | online_dpo); defaults follow NeMo-Aligner (PPO, RLOO, RS) and
  # TRL (GRPO). A rollout = rollout.num_prompts prompts x rollout.num_generations samples; the trainer takes
  # rollout rows / train.global_batch_size steps per pass over it (x rollout.epochs).
  c.rollout = ml_collections.ConfigDict(dict(
      num_prompts=8, num_generations=4, max_new_tokens=16, max_prompt_len=64,
      temperature=1.0, top_k=0, top_p=1.0, epochs=1,
      shared_prompt="auto",  # grpo/rloo: a group's prompt through the model once (auto | on | off)
      eval_prompts=64,  # greedy responses to the first N eval prompts at every eval
  ))
  c.reward = ml_collections.ConfigDict(dict(
      sources=("fn:jalign.toy:reward",),  # fn:package.module:function | rm:RUN_OR_MODEL_DIR[@attribute] | http(s)://...
      weights=(),  # one per source; default 1.0 each
      standardize=False, mean=0.0, std=1.0,  # r <- (r - mean) / std (NeMo-Aligner's reward_standardization)
      eval_sources=(),  # what evals score with (e.g. the task's grader while training on a reward model); default: sources
  ))
  c.ppo = ml_collections.ConfigDict(dict(
      kl_coef=0.01, use_absolute_kl=True, gamma=1.0, lam=0.95, normalize_advantages=True, ratio_eps=0.2,
      dual_clip=0.0,  # c > 1: dual-clip PPO
      value_clip=0.2, entropy_coef=0.0, critic_lr=9e-6,
      critic_checkpoint="",  # default: the first rm: reward source, else model.checkpoint (zero value head)
      unfinished="mask",  # mask | penalty | keep: samples not ended by a stop token
      unfinished_penalty=1.0,
      adaptive_kl_target=0.0, adaptive_kl_horizon=10000,  # target > 0: Ziegler et al.'s adaptive KL coefficient
  ))
  c.grpo = ml_collections.ConfigDict(dict(
      scale_rewards="group",  # group | batch | none
      loss_agg="token_mean",  # token_mean | sequence_mean | dr_grpo
      epsilon_low=0.2, epsilon_high=0.2, beta=0.0, kl_estimator="k2",  # k1 | abs | k2 | k3
      mask_truncated=False, overlong_buffer=0, overlong_penalty=1.0,
      tis_cap=0.0,  # > 0: truncated importance sampling against the sampler's log-probs, capped
      dynamic_sampling=False, max_sampling_rounds=4,  # refill groups whose rewards are all equal
  ))
  c.rloo = ml_collections.ConfigDict(dict(kl_coef=0.01, use_absolute_kl=True, unfinished="mask"))  # mask | keep
  c.rs = ml_collections.ConfigDict(dict(top_n=1))
  c.online_dpo = ml_collections.ConfigDict(dict(beta=0.1, loss="dpo"))  # dpo | ipo | hinge
  # Knowledge distillation (algorithm=kd); NeMo-Aligner's knowledge_distillation keys and defaults (docs/kd.md).
  c.kd = ml_collections.ConfigDict(dict(
      mode="offline",  # offline: stored top-K (kd.topk_path) | online: teacher forward in the step
      kd_loss="fwd_kl", kd_loss_weight=1.0, sft_loss_weight=0.0, logits_scale=1.0, target_logits_scale=1.0,
      k=32,  # top-K ids per position (offline: the first k of the stored ones)
      topk_path="", eval_topk_path="",  # jalign.distill dirs or NeMo KD JSONL for data.train_path / eval_path
      teacher_checkpoint="",  # mode=online: the teacher's jalign model dir (or finished run)
  ))
  c.spin = ml_collections.ConfigDict(dict(  # algorithm=spin (NeMo-Aligner's trainer.spin / model.spin)
      max_iterations=3, steps_per_iteration=0,  # 0: one pass over the training rows (NeMo's max_epochs=1)
      ref_policy_kl_penalty=(0.2,),  # beta: one value, or one per iteration
      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=0,  # sampling of the reference; 0: data.max_seq_len // 2
  ))
  # SteerLM 2.0 (algorithm=steerlm2 trains on its JSONL; python -m jalign.steerlm2 generate|iterate writes it)
  c.steerlm2 = ml_collections.ConfigDict(dict(
      attribute_names=("quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence",
                       "complexity", "verbosity"),  # allowed in labels; an rm: head's outputs in this order
      prompts_path="", num_prompts=0,  # generation prompts (0: all rows)
      labels=("helpfulness:4,correctness:4",),  # attribute strings a; one group per (prompt, label)
      num_responses=4, max_new_tokens=16, max_prompt_len=64, temperature=1.0, top_k=0, top_p=1.0,
      attribute_model="fn:jalign.steerlm2:toy_attributes",  # P(a|x,y): rm:REGRESSION_RM_DIR | fn:module:function
      attribute_sigma=1.0,  # width of the per-attribute distribution over 0..4 centred on the prediction
      unconditional_checkpoint="",  # P(y|x); default: model.checkpoint (iterate: the first iteration's)
      batch_size=16,  # prompts per generation batch and sequences per scoring forward
  ))
  # Diffusion (algorithm=ddpm | draftp): the class-conditional DiT denoiser and its DDIM sampler (docs/diffusion.md).
  # data.train_path / eval_path: "toy:N[:SEED]" (N toy images generated at load time) or an .npz (images, labels).
  c.diffusion = ml_collections.ConfigDict(dict(
      image_size=16, channels=3, num_classes=12, patch_size=2, width=64, depth=4, num_heads=4, mlp_ratio=4,
      num_train_timesteps=1000,  # scaled-linear betas 0.00085..0.012 (Stable Diffusion, NeMo's DRaFT+)
      lora_rank=0, lora_alpha=16.0, lora_targets=("q", "k", "v", "o"),
      dtype="float32", param_dtype="float32",
      steps=50, eta=0.0, guidance=7.5,  # DDIM sampler defaults (NeMo's DRaFT+)
      class_dropout=0.1,  # ddpm: fraction of labels replaced by the null class (trains the unconditional eps)
      checkpoint="",  # initialise the denoiser from a denoiser model dir or a finished run
  ))
  # DRaFT+ (algorithm=draftp; docs/draftp.md): NeMo-Aligner's model.kl_coeff, model.truncation_steps and the
  # model.infer sampler it trains with (inference_steps, eta, unconditional_guidance_scale); data: prompts.
  c.draftp = ml_collections.ConfigDict(dict(
      kl_coeff=1.0, truncation_steps=1,
      inference_steps=50, eta=0.0, unconditional_guidance_scale=7.5,
      reward_model="toy",  # toy | colour | purity | size | scorer:DIR | clip:DIR | fn:package.module:function
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=sharding.DEFAULT_RULES))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=100, keep=3, async_save=True,
      force_resume=False,  # resume even when the config or training data changed since the checkpoint
  ))
  c.eval = ml_collections.ConfigDict(dict(every_steps=50, max_batches=0, num_samples=0, max_new_tokens=32))
  c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0,
                                                 timeout_s=300))
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_jalign_user_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise ConfigError(f"{path}: defines no get_config()")
  cfg = mod.get_config()
  _check_against_base(cfg, base_config(), path)
  return cfg


def _all_keys(cfg, prefix="") -> list[str]:
  out = []
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    out.append(name)
    if isinstance(v, ml_collections.ConfigDict):
      out += _all_keys(v, name + ".")
  return out


def _unknown(key: str, known: list[str]) -> ConfigError:
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  return ConfigError(f"unknown config key {key!r}{hint}")


def _check_against_base(cfg, base, where):
  known = _all_keys(base)
  for k in _all_keys(cfg):
    if k not in known:
      raise ConfigError(f"{where}: " + str(_unknown(k, known)).strip("'"))


def _parse_value(key: str, text: str, current):
  def bad(expect):
    return ConfigError(f"--config.{key}={text!r}: expected {expect} (current value {current!r})")
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise bad("a boolean")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise bad("an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise bad("a number") from None
  if isinstance(current, (tuple, list)):
    try:
      val = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      val = tuple(s for s in text.split(",") if s)
    if isinstance(val, (str, int, float)):  # one value: a one-element list
      val = (val,)
    if not isinstance(val, (tuple, list)):
      raise bad("a list")
    return tuple(val)
  if isinstance(current, str):
    return text
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  raise bad(type(current).__name__)


def apply_overrides(cfg, overrides: dict[str, str]):
  known = _all_keys(cfg)
  for key, text in overrides.items():
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise _unknown(key, known)
      node = node[p]
    if parts[-1] not in node or isinstance(node[parts[-1]], ml_collections.ConfigDict):
      raise _unknown(key, known)
    with node.unlocked():
      node[parts[-1]] = _parse_value(key, text, node[parts[-1]])
  return cfg


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, dict]:
  """Parse ``--config PATH --config.x.y=V ... --workdir DIR`` into (config, other flags)."""
  path, overrides, flags = None, {}, {}
  i = 0
  while i < len(argv):
    a = argv[i]
    if not a.startswith("--"):
      raise ConfigError(f"unexpected argument {a!r}")
    name, eq, val = a[2:].partition("=")
    if not eq:
      if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise ConfigError(f"--{name} needs a value")
      val = argv[i + 1]
      i += 1
    if name == "config":
      path = val
    elif name.startswith("config."):
      overrides[name[len("config."):]] = val
    else:
      flags[name] = val
    i += 1
  if path is None:
    raise ConfigError("--config PATH is required (e.g. --config configs/quickstart.py)")
  cfg = load_config_file(path)
  merged = base_config()
  _merge(merged, cfg)
  apply_overrides(merged, overrides)
  validate(merged)
  merged.lock()
  return merged, flags


def _merge(dst, src):
  for k, v in src.items():
    if isinstance(v, ml_collections.ConfigDict):
      _merge(dst[k], v)
    else:
      with dst.unlocked():
        dst[k] = v


def validate(cfg):
  t, d, o = cfg.train, cfg.data, cfg.optim
  from jalign import algorithms
  if cfg.algorithm not in algorithms.REGISTRY:
    raise ConfigError(f"algorithm={cfg.algorithm!r}: available: {', '.join(algorithms.REGISTRY)}")
  if cfg.algorithm in algorithms.RL:
    _validate_rl(cfg)
  else:
    _validate_preference(cfg)
  _validate_pair_layout(cfg)
  if cfg.algorithm == "kd":
    from jalign.algorithms import kd
    kd.check_config(cfg)
  if cfg.algorithm == "draftp":
    from jalign.algorithms import draftp
    draftp.validate(cfg)
  if t.max_steps <= 0:
    raise ConfigError(f"train.max_steps must be > 0, got {t.max_steps}")
  if t.global_batch_size <= 0:
    raise ConfigError(f"train.global_batch_size must be > 0, got {t.global_batch_size}")
  if t.micro_batch_size and t.global_batch_size % t.micro_batch_size:
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                      f"train.micro_batch_size={t.micro_batch_size}")
  if d.truncation not in ("error", "left", "right"):
    raise ConfigError(f"data.truncation={d.truncation!r}: choose error, left or right")
  if o.schedule not in ("cosine", "linear", "constant"):
    raise ConfigError(f"optim.schedule={o.schedule!r}: choose cosine, linear or constant")
  if cfg.tokenizer.chat_template not in ("nemo", "hf"):
    raise ConfigError(f"tokenizer.chat_template={cfg.tokenizer.chat_template!r}: choose nemo or hf")
  if "{output}" not in d.prompt_template:
    raise ConfigError(f"data.prompt_template={d.prompt_template!r} has no {{output}} placeholder "
                      "(NeMo's default is '{input} {output}')")
  try:
    d.prompt_template.format(input="", output="")
  except (KeyError, IndexError, ValueError) as e:
    raise ConfigError(f"data.prompt_template={d.prompt_template!r}: only {{input}} and {{output}} may appear "
                      f"in braces ({type(e).__name__}: {e})") from None
  if d.max_seq_len < 2:
    raise ConfigError(f"data.max_seq_len must be >= 2, got {d.max_seq_len}")


def _validate_preference(cfg):
  from jalign.algorithms import common, dpo, rm
  if cfg.algorithm == "sft":
    return
  if cfg.algorithm == "spin":
    from jalign.algorithms import spin
    spin.validate(cfg)
  if cfg.data.packing and cfg.algorithm not in PACKED_ALGORITHMS:
    raise ConfigError(f"data.packing is for {', '.join(('sft',) + PACKED_ALGORITHMS)}; algorithm={cfg.algorithm} "
                      "pads each sequence")
  if cfg.reference not in common.REFERENCE_MODES:
    raise ConfigError(f"reference={cfg.reference!r}: choose from {', '.join(common.REFERENCE_MODES)}")
  if cfg.reference == "lora_off" and not cfg.model.lora.rank:
    raise ConfigError("reference='lora_off' needs LoRA (model.lora.rank > 0)")
  if cfg.model.reference_checkpoint and cfg.reference not in ("copy", "precomputed"):
    raise ConfigError("model.reference_checkpoint needs reference=copy or reference=precomputed")
  if cfg.algorithm == "dpo" and cfg.dpo.loss not in dpo.LOSS_TYPES:
    raise ConfigError(f"dpo.loss={cfg.dpo.loss!r}: choose from {', '.join(dpo.LOSS_TYPES)}")
  if cfg.algorithm in ("dpo", "kto") and (cfg.dpo.beta <= 0 or cfg.kto.beta <= 0):
    raise ConfigError("dpo.beta and kto.beta must be > 0")
  r = cfg.rm
  if cfg.algorithm == "rm":
    if r.loss not in rm.LOSSES:
      raise ConfigError(f"rm.loss={r.loss!r}: choose from {', '.join(rm.LOSSES)}")
    if r.num_attributes < 1 or not 0 <= r.reward_index < r.num_attributes:
      raise ConfigError(f"rm.reward_index={r.reward_index} must be in [0, rm.num_attributes={r.num_attributes})")
    if len(r.label_range) != 2 or r.label_range[0] > r.label_range[1]:
      raise ConfigError(f"rm.label_range={r.label_range!r}: expected (low, high)")
    if r.attribute_names and len(r.attribute_names) != r.num_attributes:
      raise ConfigError(f"rm.attribute_names has {len(r.attribute_names)} names for rm.num_attributes="
                        f"{r.num_attributes}")


PACKED_ALGORITHMS = ("rm", "dpo", "kto")  # besides sft


def _validate_pair_layout(cfg):
  """data.shared_prompt needs pairs; a NeMo-Aligner packed DPO file (.npy) holds preference pairs."""
  a, d = cfg.algorithm, cfg.data
  regression = a == "rm" and cfg.rm.loss == "regression"
  if d.shared_prompt and (a not in PACKED_ALGORITHMS or regression):
    what = "rm.loss=regression scores single sequences" if regression else f"algorithm={a} has no pair rows"
    raise ConfigError(f"data.shared_prompt shares a prompt within a pair (rm pair losses, dpo, kto); {what}")
  for key in ("train_path", "eval_path"):
    if d[key].endswith(".npy") and a in ("rm", "kto") and not (a == "rm" and cfg.rm.loss == "bradley_terry"):
      raise ConfigError(f"data.{key}={d[key]!r} is a NeMo-Aligner packed DPO file (.npy): algorithm=dpo or rm "
                        "with rm.loss=bradley_terry reads it")


def _choice(value, key, options):
  if value not in options:
    raise ConfigError(f"{key}={value!r}: choose from {', '.join(options)}")


def _validate_rl(cfg):
  from jalign.algorithms import grpo, pg
  from jalign.rl import rewards
  ro, a = cfg.rollout, cfg.algorithm
  if a == "online_dpo" and ro.num_generations != 2:
    raise ConfigError(f"online_dpo ranks two samples per prompt: set rollout.num_generations=2 (got "
                      f"{ro.num_generations})")
  if a in ("grpo", "rloo") and ro.num_generations < 2:
    raise ConfigError(f"{a} compares samples within a group: rollout.num_generations must be >= 2")
  for k in ("num_prompts", "num_generations", "max_new_tokens", "max_prompt_len", "epochs"):
    if ro[k] <= 0:
      raise ConfigError(f"rollout.{k} must be > 0, got {ro[k]}")
  _choice(ro.shared_prompt, "rollout.shared_prompt", pg.SHARED_PROMPT)
  if not 0 < ro.top_p <= 1 or ro.temperature < 0 or ro.top_k < 0:
    raise ConfigError("rollout.top_p must be in (0, 1], rollout.temperature and rollout.top_k >= 0")
  if a in ("ppo", "grpo", "rloo") and ro.temperature == 0:
    raise ConfigError(f"{a} samples its rollouts: rollout.temperature must be > 0")
  rows = {"rs": ro.num_prompts * cfg.rs.top_n, "online_dpo": ro.num_prompts}.get(a, ro.num_prompts * ro.num_generations)
  gb = cfg.train.global_batch_size
  if rows % gb:
    raise ConfigError(f"a rollout gives {rows} training rows, not a multiple of train.global_batch_size={gb} "
                      "(rollout.num_prompts x num_generations, or rs.top_n / pairs)")
  steps = rows // gb * ro.epochs
  if cfg.train.max_steps % steps or cfg.checkpoint.every_steps % steps:
    raise ConfigError(f"train.max_steps={cfg.train.max_steps} and checkpoint.every_steps="
                      f"{cfg.checkpoint.every_steps} must be multiples of the {steps} steps per rollout "
                      "(checkpoints are written between rollouts)")
  if cfg.reference not in ("auto", "copy", "lora_off"):
    raise ConfigError(f"reference={cfg.reference!r}: online RL takes auto, copy or lora_off")
  if cfg.reference == "lora_off" and not cfg.model.lora.rank:
    raise ConfigError("reference='lora_off' needs LoRA (model.lora.rank > 0)")
  if cfg.data.packing:
    raise ConfigError("data.packing is for SFT; RL rows are one prompt and response each")
  if not cfg.reward.sources:
    raise ConfigError("reward.sources is empty")
  if cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.sources):
    raise ConfigError(f"reward.weights has {len(cfg.reward.weights)} values for {len(cfg.reward.sources)} sources")
  if cfg.reward.standardize and cfg.reward.std <= 0:
    raise ConfigError("reward.std must be > 0")
  for s in tuple(cfg.reward.sources) + tuple(cfg.reward.eval_sources):
    try:
      rewards.check_spec(s)
    except ValueError as e:
      raise ConfigError(f"reward.sources: {e}") from None
  g, p = cfg.grpo, cfg.ppo
  _choice(g.scale_rewards, "grpo.scale_rewards", grpo.SCALES)
  _choice(g.loss_agg, "grpo.loss_agg", grpo.AGGREGATIONS)
  _choice(g.kl_estimator, "grpo.kl_estimator", pg.KL_ESTIMATORS)
  _choice(p.unfinished, "ppo.unfinished", ("mask", "penalty", "keep"))
  _choice(cfg.rloo.unfinished, "rloo.unfinished", ("mask", "keep"))
  _choice(cfg.online_dpo.loss, "online_dpo.loss", ("dpo", "ipo", "hinge"))
  if g.overlong_buffer < 0 or g.overlong_buffer >= ro.max_new_tokens:
    raise ConfigError(f"grpo.overlong_buffer={g.overlong_buffer} must be in [0, rollout.max_new_tokens)")
  if not 1 <= cfg.rs.top_n <= ro.num_generations:
    raise ConfigError(f"rs.top_n={cfg.rs.top_n} must be in [1, rollout.num_generations]")
  if p.dual_clip and p.dual_clip <= 1:
    raise ConfigError(f"ppo.dual_clip={p.dual_clip} must be > 1 (or 0: off)")
  if cfg.online_dpo.beta <= 0:
    raise ConfigError("online_dpo.beta must be > 0")


def to_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def enable_compile_cache(path: str) -> None:
  """JAX's persistent compilation cache in ``path`` (``train.compile_cache``, ``--compile-cache``), unless
  JAX_COMPILATION_CACHE_DIR names one already or ``path`` is empty: a process that compiles shapes compiled
  before (the same config again, a resume, a restarted server) loads them instead (the SFT benchmark's first
  step: 5 s -> 2 s)."""
  import jax
  if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
