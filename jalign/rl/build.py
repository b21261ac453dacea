"""Wiring of an RL run: the experience source and rollout eval on top of the phases of ``jalign.train``, and PPO's
critic (its architecture and starting weights)."""
from __future__ import annotations

import os

import numpy as np


def source_and_eval(r):
  """The experience source and the rollout eval of run ``r`` (``jalign.train.Run``)."""
  import jax

  from jalign import generate, sharding, trainer
  from jalign.algorithms import common
  from jalign.generation import Engine
  from jalign.models import lora
  from jalign.rl import rewards as rewards_lib
  from jalign.rl import source as source_lib
  from jalign import config as config_lib
  cfg, ro = r.cfg, r.cfg.rollout
  T = r.seq_len
  per_micro = r.gb // r.nproc // r.n_micro
  if getattr(r.algo, "GROUPED", False) and per_micro % ro.num_generations:
    raise config_lib.ConfigError(f"a micro-batch holds {per_micro} rows per process, not whole groups of "
                                 f"rollout.num_generations={ro.num_generations} (train.micro_batch_size)")
  if ro.num_prompts % r.nproc:
    raise config_lib.ConfigError(f"rollout.num_prompts={ro.num_prompts} must be a multiple of the {r.nproc} "
                                 "processes")
  rows_local = ro.num_prompts // r.nproc * ro.num_generations
  score_keys = ("tokens", "segment_ids", "positions", "loss_mask")
  score_sh = {k: sharding.named_sharding(("batch", "length"), r.rules, r.mesh, (rows_local * r.nproc, T))
              for k in score_keys}
  temperature = ro.temperature if cfg.algorithm in ("ppo", "grpo", "rloo") else 1.0
  old_logps = getattr(r.algo, "needs_old_logps", lambda _: True)(cfg)
  from jalign.algorithms import pg
  group = pg.prompt_group(cfg, r.model_cfg)

  def score_fn(params, batch):
    policy = common.policy_params(params)
    out = {}
    if old_logps:
      out["logps"] = pg.token_logps(policy, batch, r.model_cfg, temperature, window=ro.max_new_tokens, group=group)
    if r.ref_mode != "none":
      ref = params["reference"] if r.ref_mode == "copy" else lora.disabled(policy)
      out["ref_logps"] = pg.token_logps(ref, batch, r.model_cfg, temperature, window=ro.max_new_tokens,
                                        group=group)
    if r.critic_cfg is not None:
      out["values"] = pg.token_values(params["critic"], batch, r.critic_cfg)
    return out

  jitted = jax.jit(sharding.bind(score_fn, r.mesh, r.rules), in_shardings=(r.param_sh, score_sh),
                   out_shardings=sharding.replicated(r.mesh))

  def score(state, rows):
    out = jax.device_get(jitted({**state["frozen"], **state["params"]}, trainer.to_global(rows, score_sh)))
    n = len(rows["tokens"])
    return {k: np.asarray(v)[r.pid * n:(r.pid + 1) * n] for k, v in out.items()}

  template = cfg.tokenizer.chat_template
  stops = generate.stop_ids(r.tok, template, cfg.data.chat_prompt_tokens)
  end_of_turn = cfg.data.chat_prompt_tokens.end_of_turn if template == "nemo" else ""
  responses = generate.Responses(r.tok, stops, end_of_turn, ())
  rw = cfg.reward
  rewards = rewards_lib.Rewards(rw.sources, rw.weights, standardize=rw.standardize, mean=rw.mean, std=rw.std)
  engine = Engine(None, r.model_cfg, batch_size=ro.num_prompts // r.nproc, max_new_tokens=ro.max_new_tokens,
                  top_k_cap=ro.top_k, prompt_buckets=(ro.max_prompt_len,), pad_id=r.tok.pad_id, mesh=r.mesh,
                  rules=r.rules)
  src = source_lib.ExperienceSource(
      cfg=cfg, algo=r.algo, prompts=r.prompts, tok=r.tok, engine=engine, score=score, policy=r.policy,
      rewards=rewards, responses=responses, moments=source_lib.global_moments, local_batch=r.gb // r.nproc,
      n_micro=r.n_micro, process_index=r.pid, process_count=r.nproc)
  eval_fn = None
  if r.eval_prompts:
    eval_engine = Engine(None, r.model_cfg, batch_size=min(len(r.eval_prompts), 32),
                         max_new_tokens=ro.max_new_tokens, top_k_cap=0, prompt_buckets=(ro.max_prompt_len,),
                         pad_id=r.tok.pad_id, mesh=r.mesh, rules=r.rules)
    eval_rewards = rewards_lib.Rewards(rw.eval_sources) if rw.eval_sources else rewards
    eval_fn = source_lib.RolloutEval(cfg=cfg, prompts=r.eval_prompts, tok=r.tok, engine=eval_engine,
                                     policy=r.policy, rewards=eval_rewards, responses=responses,
                                     table_dir=os.path.join(r.workdir, "rollouts"), write=r.main_proc)
  return src, eval_fn


def row_shapes(batch_axes: dict, T: int) -> dict:
  """Row shapes of an RL batch from its axes: token rows [T], shifted per-token values [T-1], pairs [2, T]."""
  full = ("tokens", "segment_ids", "positions", "loss_mask")
  out = {}
  for k, ax in batch_axes.items():
    if ax == ("batch",):
      out[k] = ()
    elif ax == ("batch", None):
      out[k] = (2,)
    elif ax == ("batch", None, "length"):
      out[k] = (2, T)
    else:
      out[k] = (T,) if k in full else (T - 1,)
  return out


def critic_config(cfg):
  """PPO's critic: the architecture of ``ppo.critic_checkpoint`` (default: the first ``rm:`` reward source, else
  the policy's starting checkpoint) with one value head."""
  from jalign import checkpoint
  from jalign.models import ModelConfig
  path = critic_path(cfg)
  d = dict(checkpoint.read_model_config(checkpoint.resolve_model_dir(path))) if path else cfg.model.to_dict()
  d.update(num_value_heads=1, lora_rank=0)
  return ModelConfig.from_config(d)


def critic_path(cfg) -> str:
  if cfg.ppo.critic_checkpoint:
    return cfg.ppo.critic_checkpoint
  rms = [s[3:].split("@")[0] for s in cfg.reward.sources if s.startswith("rm:")]
  return rms[0] if rms else cfg.model.checkpoint


def load_critic(cfg, critic_cfg, shardings):
  """The critic's starting weights: the checkpoint's, its value head column ``@K`` (or 0) of a reward model;
  a checkpoint without a value head gets a zero one."""
  import jax
  import jax.numpy as jnp

  from jalign import checkpoint
  from jalign.models import init_params, param_shapes
  path = critic_path(cfg)
  init = jax.jit(lambda: init_params(critic_cfg, jax.random.PRNGKey(cfg.seed + 1)), out_shardings=shardings)()
  if not path:
    return init
  saved = checkpoint.read_model_config(checkpoint.resolve_model_dir(path))
  heads = saved.get("num_value_heads", 0)
  shapes = param_shapes(critic_cfg)
  if heads:
    shapes = {**shapes, "value_head": {"w": jax.ShapeDtypeStruct((critic_cfg.hidden_size, heads), jnp.float32),
                                       "b": jax.ShapeDtypeStruct((heads,), jnp.float32)}}
  keys = [k for k in shapes if k != "lora" and (k != "value_head" or heads)]
  loaded = checkpoint.load_params(path, {k: shapes[k] for k in keys}, optional=("lm_head",))
  col = next((int(s.split("@")[1]) for s in cfg.reward.sources if s.startswith("rm:" + path) and "@" in s), 0)
  if heads:
    vh = loaded["value_head"]
    loaded["value_head"] = {"w": vh["w"][:, col:col + 1], "b": vh["b"][col:col + 1]}
  out = {**init, **{k: v for k, v in loaded.items() if k in init}}
  return jax.device_put(out, shardings)
