"""Benchmarks that compare jalign with a reference in the same run.

  python -m jalign.bench sft [--steps 10] [--rounds 3] [--dtypes float32,bfloat16] [--lengths fixed|mixed]
                             [--frameworks jalign,jalign-scan,jalign-packed,torch,trl,tunix] [--tunix-path DIR]
                             [--no-compile-cache]
  python -m jalign.bench dpo [--steps 10] [--rounds 3] [--lengths fixed|mixed] [--tunix-path DIR] [--no-compile-cache]
                             [--frameworks jalign,jalign-scan,jalign-packed,jalign-shared,jalign-packed+shared,
                                           torch,trl,tunix]
  python -m jalign.bench generate [--rounds 2] [--batches 1,32] [--new-tokens 128] [--prompt-len 32]
                                  [--frameworks jalign,transformers,tunix] [--threads N] [--tunix-path DIR]
  python -m jalign.bench serve [--requests 64] [--new-tokens 128] [--slots 64]
  python -m jalign.bench rl [--rounds 2] [--steps 5] [--frameworks jalign,trl,tunix] [--tunix-path DIR] [--threads N]
  python -m jalign.bench ppo [--rounds 2] [--steps 5] [--threads N]
  python -m jalign.bench kernels [--json F]

``sft`` trains one tiny Llama architecture (vocab 8192, hidden 256, 4 layers, 8 heads / 4 KV heads, ffn 768) on
the same token batches (B=8) with jalign (layers unrolled, and ``jalign-scan``: one scanned layer), with a plain
PyTorch loop (forward, loss, backward, AdamW), with TRL's SFTTrainer and, where importable (``--tunix-path``), with
Tunix's PeftTrainer in full fine-tuning mode (fp32 only). ``--lengths fixed``: T=256-token rows of the embedded SFT
data, no padding; ``mixed``: prompt + chosen response of the ``dpo`` mixed pairs (32..448 tokens), each framework
padding as it does by default (jalign and Tunix to the 448-token maximum, PyTorch and TRL to the batch's longest).
Frameworks alternate round by round, each in a fresh subprocess (so peak RSS is its own) with the same thread count.
Each run reports its median step time, first step (compile) time, the time from the process's launch to the end of
its first step, peak RSS, the tokens its forward was fed and the dense-matmul ceiling (2048^3) it measures itself
for that framework and dtype; the table shows the best round per framework, real tokens/s (non-pad tokens of the
batch over the step time, median over the timed steps) and MFU = model FLOPs/s on real tokens over that ceiling.

``dpo`` runs one DPO step (policy and a frozen reference copy, beta 0.1, AdamW) on 8 pairs, same architecture, fp32:
jalign (padded to ``data.max_seq_len``; ``jalign-scan``; and the ``data.packing`` / ``data.shared_prompt`` layouts
as ``jalign-packed``, ``jalign-shared``, ``jalign-packed+shared``, built with ``preference.pair_rows``), a plain
PyTorch loop (one concatenated [chosen; rejected] forward for the policy and one under no_grad for the reference),
TRL's DPOTrainer and Tunix's DPOTrainer (``--tunix-path``) on the same token ids, alternating in fresh subprocesses.
``--lengths fixed``: 64-token prompts with 192-token chosen and rejected responses; ``mixed``: prompts of 16..192
and responses of 16..256 tokens, drawn uniformly (seeded per step), the same pairs for every framework. tokens/s
counts the real tokens of the policy rows: prompt + chosen and prompt + rejected of every pair. It also prints the
temporary memory XLA reports (``compiled.memory_analysis()``) for the log-prob computation at vocabulary 128256.

For both, ``--compile-cache`` (default on) times jalign's first step again with JAX's persistent compilation cache:
one process with an empty cache directory (``JAX_COMPILATION_CACHE_DIR``), then a second one with the same shapes
reading it back. Where Tunix cannot be imported (no ``--tunix-path``, not installed) its row is left out with a
note; so is a jalign layout whose helpers are missing ("not available").

``kernels``: the Pallas kernels against their references (``jalign/bench_kernels.py``): on a GPU at full size
against cuDNN, the XLA reference, a measured matmul ceiling and HBM bandwidth; on CPU interpreted at small sizes,
plus XLA's memory analysis of the log-prob paths at N = 8 x 4096, V = 128256.

``generate`` saves one random-init model of the same architecture (fp32) as a jalign model directory, exports it
with ``jalign-to-hf``, and times jalign's ``Engine``, transformers' ``generate`` (torch CPU) and, where it is
importable, Tunix's ``Sampler`` on those weights: 32-token prompts from the embedded data, 128 new tokens (every
row runs the full length: no stop), batch 1 and 32, greedy and top-p (temperature 1.0, top-p 0.9). Each (framework,
batch, sampling) cell is a fresh subprocess with the same thread count, cells alternating round by round: one
warm-up call (the "first call" column, compilation included), the median of ``--reps`` timed calls (new tokens/s
= B * new tokens / time), time to first token (a one-new-token call after its own warm-up) and peak RSS; best
round per cell, ratios against transformers (and Tunix), and the fraction of greedy rows identical to
transformers'. ``--tunix-path`` puts a directory holding Tunix (installed aside with ``pip install --target``)
on the Tunix process's path only; without Tunix its rows are left out. Then, at ``--bound-batches`` (1 and 64),
jalign's greedy decode step against the memory bound: the step's time (full calls less one-token calls), the bytes
a step must read (weights, and the keys and values held at the mean step) and the read bandwidth measured in the
same process on a large array (on a GPU, the HBM bound) and on an array of the step's size.

``rl`` times one GRPO step (one rollout, one optimizer step) on the ``generate`` model (same weights for every
framework): 8 prompts x 4 samples, the 32-token ``gen_prompts`` written as text for a word-level tokenizer
(``"<id> <id> ..."``, so every framework sees the same token ids), 32 new tokens per sample with no stop token (every
sample runs the full length), temperature 1.0 (no top-k/top-p), beta 0 (no KL, no reference), one iteration per
rollout, token-mean loss, group-scaled advantages, clip 0.2, AdamW lr 1e-6 (b2 0.98, no weight decay, constant) with
global-norm clipping at 1.0, and the same reward in every framework (``even_fraction``: the fraction of even token
ids in the decoded completion). jalign runs its own RL loop (``jalign.train``'s phases and ``jalign.trainer.run``:
engine sampling, the jitted scoring pass, reward, advantages, the train step); TRL runs ``GRPOTrainer`` (transformers
``generate``, torch CPU); Tunix (with ``--tunix-path``) runs ``GRPOLearner`` on a 1-device CPU mesh. Frameworks
alternate round by round in fresh subprocesses with the same thread count; each run does one untimed first step
(compilation) and ``--steps`` timed steps. The table gives per framework the median step time and its split
(generation / scoring: log-probs where the framework computes them, rewards, advantages / update: loss, backward,
optimizer), samples/s, the mean completion length, the first step's time, peak RSS and the speed-up over TRL (best
round); jalign's scoring is split further below it. Not the same work: with one iteration per rollout TRL and
Tunix skip the old-policy log-prob pass (their loss takes the current log-probs, detached, as the old ones), while
jalign's experience source always runs it (the surrogate's old log-probs, the sampler-vs-trainer drift metrics); TRL
generates with the transformers default dynamic KV cache, Tunix repeats each prompt G times (G prefills) where jalign
prefills it once. Without ``--tunix-path`` Tunix is left out with a note.

``ppo`` times one jalign PPO step at the same sizes with 32 prompts x 1 sample: a critic (a copy of the model with a
zero value head, lr 1e-6), KL 0.01 to a frozen reference copy in the reward, GAE; scoring includes the reference
log-probs and the critic's values, the update trains the critic too.

``serve`` starts ``python -m jalign.serve`` on the shipped SFT model and sends ``--requests`` chat requests of
exactly ``--new-tokens`` tokens, first one at a time, then all at once from as many threads: aggregate new
tokens/s of each, and their ratio (what continuous batching buys).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ARCH = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_size=768)
B, T = 8, 256
PROMPT, RESP = 64, 192  # dpo, --lengths fixed: tokens per prompt / per response (rows of PROMPT + RESP = T)
MIXED_PROMPT, MIXED_RESP = (16, 192), (16, 256)  # --lengths mixed: inclusive ranges, uniform draws per step
LENGTHS = ("fixed", "mixed")
DPO_LAYOUTS = ("padded", "packed", "shared", "packed+shared")
# framework names: the jalign variants are one runner with options
JALIGN_VARIANTS = {"jalign": {}, "jalign-scan": {"scan_unroll": 1}, "jalign-packed": {"layout": "packed"},
                   "jalign-shared": {"layout": "shared"}, "jalign-packed+shared": {"layout": "packed+shared"}}
SFT_FRAMEWORKS = "jalign,jalign-scan,jalign-packed,torch,trl,tunix"
DPO_FRAMEWORKS = "jalign,jalign-scan,jalign-packed,jalign-shared,jalign-packed+shared,torch,trl,tunix"
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.98), 1e-8, 0.01, 1.0  # jalign's base optim config
_T_IMPORT = time.time()


@functools.lru_cache(maxsize=1)
def _data_ids() -> np.ndarray:
  """The embedded SFT data (prompt and answer of each conversation), tokenized and concatenated: about 58k ids,
  all below 320 (the tiny tokenizer's vocabulary)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  from jalign.data import load_tokenizer
  tok = load_tokenizer(os.path.join(root, "examples", "tiny_model", "tokenizer.model"))
  ids = []
  with open(os.path.join(root, "examples", "data", "sft_train.jsonl")) as f:
    for line in f:
      conv = json.loads(line)["conversations"]
      ids += tok.encode(f"{conv[0]['value']}\n{conv[1]['value']}\n")
  return np.asarray(ids, np.int32)


def _batches(n: int) -> np.ndarray:
  """[n, B, T] token ids: the embedded SFT data cut into rows (repeated from the start past its end)."""
  return np.resize(_data_ids(), n * B * T).reshape(n, B, T)


def pair_lengths(n: int, lengths: str = "fixed") -> np.ndarray:
  """[n, B, 3] (prompt, chosen, rejected) lengths: fixed PROMPT / RESP / RESP, or mixed: drawn uniformly from
  MIXED_PROMPT / MIXED_RESP / MIXED_RESP, seeded per step (step i's lengths do not depend on n)."""
  if lengths not in LENGTHS:
    raise ValueError(f"lengths={lengths!r}: choose from {LENGTHS}")
  if lengths == "fixed":
    return np.tile(np.array([PROMPT, RESP, RESP], np.int64), (n, B, 1))
  out = np.zeros((n, B, 3), np.int64)
  for i in range(n):
    rng = np.random.default_rng([0, i])
    out[i, :, 0] = rng.integers(MIXED_PROMPT[0], MIXED_PROMPT[1] + 1, B)
    out[i, :, 1:] = rng.integers(MIXED_RESP[0], MIXED_RESP[1] + 1, (B, 2))
  return out


def max_lengths(lengths: str = "fixed") -> tuple[int, int]:
  """(longest prompt, longest response) a step can hold."""
  return (PROMPT, RESP) if lengths == "fixed" else (MIXED_PROMPT[1], MIXED_RESP[1])


def dpo_pairs(n: int, lengths: str = "fixed") -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
  """``n`` steps of B (prompt, chosen, rejected) id arrays, the same for every framework: all prompts are cut
  from the data in order, then all chosen, then all rejected responses (fixed: the ids the earlier ``_pairs``
  gave)."""
  L = pair_lengths(n, lengths).reshape(-1, 3)
  ids = np.resize(_data_ids(), int(L.sum()))
  pieces, at = [[None] * 3 for _ in L], 0
  for j in range(3):
    for k, m in enumerate(L[:, j]):
      pieces[k][j] = ids[at:at + m]
      at += m
  return [[tuple(pieces[i * B + b]) for b in range(B)] for i in range(n)]


def sft_sequences(n: int, lengths: str = "fixed") -> list[list[np.ndarray]]:
  """``n`` steps of B SFT sequences (loss on every token): fixed, T-token rows of the data (``_batches``); mixed,
  prompt + chosen response of ``dpo_pairs(n, "mixed")`` (32..448 tokens)."""
  if lengths == "fixed":
    return [list(x) for x in _batches(n)]
  return [[np.concatenate([p, c]) for p, c, _ in step] for step in dpo_pairs(n, lengths)]


def sft_max_len(lengths: str = "fixed") -> int:
  return T if lengths == "fixed" else sum(max_lengths(lengths))


def sft_real_tokens(step) -> int:
  """Real (non-pad) tokens of one SFT batch."""
  return int(sum(len(s) for s in step))


def dpo_real_tokens(step) -> int:
  """Real tokens of one DPO batch's policy rows: prompt + chosen and prompt + rejected of every pair."""
  return int(sum(2 * len(p) + len(c) + len(r) for p, c, r in step))


def flops_per_token(seq_len: int = T, arch=None) -> float:
  from jalign.models import ModelConfig
  from jalign.models.transformer import flops_per_token as f
  return f(ModelConfig(**dict(arch or ARCH)), seq_len)


def sft_flops_per_token(seqs) -> float:
  """Training FLOPs per real token, averaged over the sequences (the attention term grows with length)."""
  lens = [len(s) for step in seqs for s in step]
  return sum(n * flops_per_token(n) for n in lens) / sum(lens)


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _since_launch() -> float:
  """Seconds since the parent started this child process (``_in_child`` sets the time; else since import)."""
  return time.time() - float(os.environ.get("JALIGN_BENCH_T0", _T_IMPORT))


def _train_result(times, real, fed, launch_s, loss_first=float("nan"), **extra) -> dict:
  """Per-step wall times (the first one compiles), real and fed (padded policy-row) tokens per step ->
  the run's figures: median step over the timed steps, median of their real tokens/s."""
  n = len(times)
  assert len(real) == n and len(fed) == n, (len(times), len(real), len(fed))
  timed = slice(1, None) if n > 1 else slice(None)
  return {"first_step_s": times[0], "step_s": statistics.median(times[timed]),
          "tokens_per_sec": statistics.median(r / t for r, t in zip(real[timed], times[timed])),
          "real_tokens": float(np.mean(real)), "fed_tokens": float(np.mean(fed)), "launch_to_first_step_s": launch_s,
          "steps": n - 1, "loss_first": loss_first, "peak_rss_mb": _rss_mb(), **extra}


# ---------------------------------------------------------------------------------------------- sft runners

def _jax_ceiling(dtype) -> float:
  """Dense 2048^3 matmul FLOP/s that XLA reaches in this process (the MFU denominator for the JAX rows)."""
  import jax
  import jax.numpy as jnp
  n = 2048
  a = jnp.ones((n, n), dtype)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  t = []
  for _ in range(5):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    t.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(t)


def _jalign_state(cfg, frozen_copy: bool):
  import jax
  import jax.numpy as jnp

  from jalign import config as config_lib
  from jalign import trainer
  from jalign.models import init_params
  optimizer, schedule = trainer.make_optimizer(config_lib.base_config().optim, 1000, CLIP)
  params = init_params(cfg, jax.random.PRNGKey(0))
  frozen = {"reference": jax.tree.map(jnp.copy, params)} if frozen_copy else {}
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "frozen": frozen, "opt_state": optimizer.init(params),
           "rng": jax.random.PRNGKey(1)}
  return state, optimizer, schedule


def _jalign_loop(step, state, batches, real) -> dict:
  """Runs the jitted ``step`` over the batches (numpy dicts, moved to the device before the clock starts)."""
  import jax.numpy as jnp
  times, fed, losses, launch_s = [], [], [], 0.0
  for i, rows in enumerate(batches):
    b = {k: jnp.asarray(v) for k, v in rows.items()}
    t0 = time.perf_counter()
    state, m = step(state, b)
    losses.append(float(m["loss"]))  # blocks
    times.append(time.perf_counter() - t0)
    fed.append(int(rows["tokens"].size))
    if i == 0:
      launch_s = _since_launch()
  return _train_result(times, real, fed, launch_s, losses[0])


def run_jalign(dtype: str = "float32", steps: int = 10, lengths: str = "fixed", scan_unroll: int = 0,
               arch=None, layout: str = "padded") -> dict:
  """jalign's SFT train step (``sft.loss_fn`` in ``trainer.make_train_step``, the base AdamW config), batches
  padded to ``data.max_seq_len`` as jalign's SFT pipeline pads them (``data.build_rows``, packing off), or with
  ``layout="packed"`` packed into rows of that length (``data.packing``; each step's sequences on their own, every
  step padded with empty rows to the most rows any step needs).
  ``scan_unroll``: layers unrolled per scan step (0: all of them, a straight-line program; 1: a scanned layer)."""
  import jax

  from jalign import trainer
  from jalign.algorithms import sft
  from jalign.data import Example, build_rows
  from jalign.models import ModelConfig
  arch = dict(arch or ARCH)
  cfg = ModelConfig(**arch, dtype=dtype, scan_unroll=scan_unroll or arch["num_layers"])
  state, optimizer, schedule = _jalign_state(cfg, frozen_copy=False)
  step = jax.jit(trainer.make_train_step(lambda p, b, r: sft.loss_fn(p, b, cfg, r), optimizer, schedule, 1),
                 donate_argnums=(0,))
  seqs = sft_sequences(steps + 1, lengths)
  batches = [build_rows([Example(s, np.ones(len(s), bool)) for s in st], sft_max_len(lengths), arch["vocab_size"] - 1,
                        packing=layout == "packed") for st in seqs]
  n = max(len(b["tokens"]) for b in batches)
  batches = [{k: np.pad(v, [(0, n - len(v))] + [(0, 0)] * (v.ndim - 1),
                        constant_values=arch["vocab_size"] - 1 if k == "tokens" else 0) for k, v in b.items()}
             for b in batches]
  res = _jalign_loop(step, state, batches, [sft_real_tokens(s) for s in seqs])
  return {**res, "ceiling": _jax_ceiling(dtype)}  # measured after the run: not in its launch time


def _torch_model(dtype, arch=None, max_len: int = T):
  import torch
  import transformers
  arch = dict(arch or ARCH)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
                                 intermediate_size=arch["ffn_size"], num_hidden_layers=arch["num_layers"],
                                 num_attention_heads=arch["num_heads"], num_key_value_heads=arch["num_kv_heads"],
                                 max_position_embeddings=max_len, rms_norm_eps=1e-6, tie_word_embeddings=False)
  cfg._attn_implementation = "sdpa"
  return transformers.LlamaForCausalLM(cfg)


def _torch_ceiling(dtype):
  import torch
  n = 2048
  a = torch.ones(n, n, dtype=getattr(torch, dtype))
  a @ a
  t = []
  for _ in range(5):
    t0 = time.perf_counter()
    a @ a
    t.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(t)


def _torch_update(model, opt, loss):
  """Backward, clip the global norm at 1.0, AdamW step: the same update for every PyTorch loop here."""
  import torch
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
  opt.step()
  opt.zero_grad(set_to_none=True)


def _torch_adamw(model):
  import torch
  return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def _right_pad(rows, pad: int):
  """Rows of ids right-padded to the longest: (ids [N, L] long, attention mask [N, L] or None without padding)."""
  import torch
  L = max(len(r) for r in rows)
  ids = torch.full((len(rows), L), pad, dtype=torch.long)
  mask = torch.zeros((len(rows), L), dtype=torch.long)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = torch.from_numpy(np.asarray(r, np.int64))
    mask[i, :len(r)] = 1
  return ids, (None if bool(mask.all()) else mask)


def run_torch(dtype: str = "float32", steps: int = 10, lengths: str = "fixed", arch=None) -> dict:
  """A plain PyTorch loop: each batch right-padded to its longest sequence (an attention mask only when it has
  padding), forward, token-mean cross-entropy over the real tokens, backward, clipping, AdamW."""
  import torch
  arch = dict(arch or ARCH)
  model = _torch_model(dtype, arch, sft_max_len(lengths)).train()
  opt = _torch_adamw(model)
  seqs = sft_sequences(steps + 1, lengths)
  pad = arch["vocab_size"] - 1
  times, fed, losses, launch_s = [], [], [], 0.0
  for i, st in enumerate(seqs):
    ids, mask = _right_pad(st, pad)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)
    _torch_update(model, opt, loss)
    losses.append(loss.item())
    times.append(time.perf_counter() - t0)
    fed.append(ids.numel())
    if i == 0:
      launch_s = _since_launch()
  res = _train_result(times, [sft_real_tokens(s) for s in seqs], fed, launch_s, losses[0])
  return {**res, "ceiling": _torch_ceiling(dtype)}


def _step_timer(times: list):
  """A transformers callback appending each optimizer step's wall time to ``times``."""
  import transformers

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t0)

  return StepTimer()


def _trl_probe(model, times: list, fed: list, launch: list):
  """A callback timing each optimizer step (``times``), the tokens of the policy forwards' padded inputs in it
  (``fed``, from a forward pre-hook on ``model``) and the time from launch to the end of the first step."""
  import transformers
  calls = []

  def hook(module, args, kwargs):
    x = kwargs.get("input_ids", args[0] if args else None)
    if x is not None:
      calls.append(int(x.numel()))

  model.register_forward_pre_hook(hook, with_kwargs=True)

  class Probe(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      calls.clear()
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t0)
      fed.append(sum(calls))
      if not launch:
        launch.append(_since_launch())

  return Probe()


def _word_tokenizer(vocab: int, eos: int | None = None):
  """A transformers tokenizer mapping the word ``"<i>"`` to id i (whitespace split; "<i>" is never a substring of
  another word), pad ``"<vocab-1>"`` (never in the data)."""
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  wl = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
  wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token=f"<{vocab - 1}>",
                                              eos_token=f"<{vocab - 1 if eos is None else eos}>")


def run_trl(dtype: str = "float32", steps: int = 10, lengths: str = "fixed", arch=None) -> dict:
  """TRL's SFTTrainer on the same token ids (an ``input_ids`` dataset, in order: sequential sampler), no packing,
  its collator padding each batch to its longest sequence, loss on every real token."""
  import datasets
  from trl import SFTConfig, SFTTrainer
  arch = dict(arch or ARCH)
  max_len = sft_max_len(lengths)
  model = _torch_model(dtype, arch, max_len)
  tok = _word_tokenizer(arch["vocab_size"], eos=arch["vocab_size"] - 2)  # never in the data
  seqs = sft_sequences(steps + 1, lengths)
  ds = datasets.Dataset.from_dict({"input_ids": [list(map(int, s)) for st in seqs for s in st]})
  times, fed, launch = [], [], []
  with tempfile.TemporaryDirectory() as out:
    args = SFTConfig(output_dir=out, per_device_train_batch_size=B, max_steps=steps + 1, learning_rate=LR,
                     adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
                     max_grad_norm=CLIP, lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=dtype == "bfloat16", max_length=max_len, packing=False,
                     gradient_checkpointing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     train_sampling_strategy="sequential")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[_trl_probe(model, times, fed, launch)])
    trainer.train()
  res = _train_result(times, [sft_real_tokens(s) for s in seqs], fed, launch[0])
  return {**res, "ceiling": _torch_ceiling(dtype)}


def _tunix_setup(hf_dir: str):
  """Tunix's Llama 3 model (fp32) from the exported safetensors on a 1-device ("fsdp", "tp") mesh, and the
  optimizer closest to the others': global-norm clipping then optax AdamW (decay on every parameter, as
  torch's AdamW; jalign exempts the norms)."""
  import jax
  import jax.numpy as jnp
  import optax
  from tunix.models.llama3 import params as tunix_params
  tcfg, _ = _tunix_config(hf_dir)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  load = lambda: tunix_params.create_model_from_safe_tensors(hf_dir, tcfg, mesh=mesh, dtype=jnp.float32)
  optimizer = optax.chain(optax.clip_by_global_norm(CLIP),
                          optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY))
  return mesh, load, optimizer


def _tunix_train(trainer, mesh, batches) -> tuple[list, float]:
  """``trainer.train(batches)`` timed with Tunix's own training hooks: step k ends when the trainer logs it
  (``on_train_step_end``: the trainer has waited for that step's loss), the first from ``on_train_start``.
  Returns the per-step times and the seconds from launch to the first logged step."""
  from tunix.sft import hooks

  stamps, start, launch = [], [], []

  class Hooks(hooks.TrainingHooks):
    def on_train_start(self, train_ctx):
      start.append(time.perf_counter())

    def on_train_end(self, train_ctx):
      pass

    def on_train_step_start(self, train_ctx):
      pass

    def on_train_step_end(self, train_ctx, train_step, train_loss):
      stamps.append(time.perf_counter())
      if not launch:
        launch.append(_since_launch())

    def on_eval_step_start(self, train_ctx):
      pass

    def on_eval_step_end(self, train_ctx, eval_loss):
      pass

  trainer.with_training_hooks(Hooks())
  with mesh:
    trainer.train(batches)
  assert len(stamps) == len(batches), (len(stamps), len(batches))
  return np.diff(start[:1] + stamps).tolist(), launch[0]


def _tunix_loss_first(trainer) -> float:
  try:
    return float(trainer.metrics_logger.get_metric_history(trainer.metrics_prefix, "loss", "train")[0])
  except Exception:  # noqa: BLE001 - only a cross-check
    return float("nan")


def run_tunix_sft(dtype: str = "float32", steps: int = 10, lengths: str = "fixed", hf_dir: str = "",
                  arch=None) -> dict:
  """Tunix's ``PeftTrainer`` in full fine-tuning mode (no LoRA: every ``nnx.Param`` trained) with its default
  loss (token-mean NLL over ``input_mask``), fed pre-tokenised ``TrainingInput`` (ids right-padded to the fixed
  max length, as its data pipelines pad) and the ``gen_model_input_fn`` its PEFT CLI uses (positions and a
  causal attention mask built from the mask). Default ``TrainingConfig`` otherwise (up to 2 steps in flight)."""
  try:
    from tunix.sft import peft_trainer
    from tunix.sft import utils as tunix_utils
  except ImportError as e:
    return {"not_installed": f"{type(e).__name__}: {e}"}
  if dtype != "float32":
    return {"not_available": "fp32 only: Tunix's Llama 3 computes in its parameters' dtype (no fp32 parameters "
                             "with bf16 compute)"}
  arch = dict(arch or ARCH)
  mesh, load, optimizer = _tunix_setup(hf_dir)
  with mesh:
    model = load()
  config = peft_trainer.TrainingConfig(eval_every_n_steps=10 ** 9, max_steps=steps + 1)
  trainer = peft_trainer.PeftTrainer(model, optimizer, config)

  def gen_model_input_fn(x):
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": tunix_utils.build_positions_from_mask(x.input_mask),
            "attention_mask": tunix_utils.make_causal_attn_mask(x.input_mask)}

  trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
  seqs = sft_sequences(steps + 1, lengths)
  L, pad = sft_max_len(lengths), arch["vocab_size"] - 1
  batches = []
  for st in seqs:
    ids = np.full((B, L), pad, np.int32)
    mask = np.zeros((B, L), bool)
    for i, s in enumerate(st):
      ids[i, :len(s)], mask[i, :len(s)] = s, True
    batches.append(peft_trainer.TrainingInput(input_tokens=ids, input_mask=mask))
  times, launch_s = _tunix_train(trainer, mesh, batches)
  res = _train_result(times, [sft_real_tokens(s) for s in seqs], [B * L] * len(seqs), launch_s,
                      _tunix_loss_first(trainer))
  return {**res, "ceiling": _jax_ceiling(dtype)}


RUNNERS = {"jalign": run_jalign, "torch": run_torch, "trl": run_trl, "tunix": run_tunix_sft}


# ---------------------------------------------------------------------------------------------- dpo runners

def _jalign_dpo_setup(model_cfg, beta=0.1, window=0):
  from jalign import config as config_lib
  from jalign.algorithms import dpo
  c = config_lib.base_config()
  c.algorithm, c.reference = "dpo", "copy"
  c.dpo.update(loss="dpo", beta=beta)
  return dpo.make_loss(c, model_cfg, window=window)


def dpo_layout_missing(layout: str) -> str:
  """Why jalign cannot build ``layout`` batches here ('' when it can): the packed and shared-prompt layouts need
  ``preference.pair_rows`` (rows from ``pack_pairs``) and the row-aware losses in ``algorithms.common``."""
  if layout not in DPO_LAYOUTS:
    return f"layout={layout!r}: choose from {DPO_LAYOUTS}"
  if layout == "padded":
    return ""
  from jalign.algorithms import common
  from jalign.data import preference
  missing = [f"jalign.data.preference.{n}" for n in ("pair_rows", "pack_pairs") if not hasattr(preference, n)]
  missing += [f"jalign.algorithms.common.{n}" for n in ("row_logps",) if not hasattr(common, n)]
  return f"not available: {', '.join(missing)} missing" if missing else ""


def _pad_to(x: np.ndarray, shape, value) -> np.ndarray:
  return np.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)], constant_values=value)


def jalign_dpo_rows(steps_pairs, layout: str = "padded", max_len: int = T, pad_id: int = 0) -> list[dict]:
  """jalign DPO batches (numpy) for each step's pairs, built by jalign's own helpers: ``padded``, [B, 2, max_len]
  (``preference.stack_pairs``, what ``data.max_seq_len`` padding gives); ``packed`` / ``shared`` /
  ``packed+shared``, ``preference.pair_rows`` with ``data.packing`` / ``data.shared_prompt`` (rows of
  2 x max_len tokens; each step's pairs packed on their own). All steps are padded to the same shapes (rows, pair
  slots: empty rows and slots are padding) so that one compiled step runs them all."""
  from jalign.data import preference
  from jalign.data.formats import Example
  why = dpo_layout_missing(layout)
  if why:
    raise NotImplementedError(why)
  out = []
  for step in steps_pairs:
    seqs = []
    for p, c, r in step:
      mask = lambda resp: np.concatenate([np.zeros(len(p), bool), np.ones(len(resp), bool)])
      seqs.append((Example(np.concatenate([p, c]).astype(np.int32), mask(c)),
                   Example(np.concatenate([p, r]).astype(np.int32), mask(r))))
    values = {"chosen_reward": np.ones(len(seqs), np.float32), "rejected_reward": np.zeros(len(seqs), np.float32)}
    if layout == "padded":
      rows = {**preference.stack_pairs(seqs, max_len, pad_id), **values}
    else:
      cfg = argparse.Namespace(max_seq_len=max_len, packing="packed" in layout, shared_prompt="shared" in layout)
      rows = preference.pair_rows(seqs, values, cfg, pad_id)
    out.append(rows)
  shapes = {k: tuple(max(r[k].shape[d] for r in out) for d in range(out[0][k].ndim)) for k in out[0]}
  return [{k: _pad_to(v, shapes[k], pad_id if k == "tokens" else 0) for k, v in r.items()} for r in out]


def run_jalign_dpo(dtype: str = "float32", steps: int = 10, lengths: str = "fixed", layout: str = "padded",
                   scan_unroll: int = 0, arch=None) -> dict:
  """jalign's DPO train step (``dpo.make_loss``, reference = a frozen copy, beta 0.1, the base AdamW config) on
  ``jalign_dpo_rows`` batches in ``layout``; padded rows with the LM head over the data's response window, as
  ``jalign.train`` runs them."""
  import jax

  from jalign import trainer
  from jalign.models import ModelConfig
  why = dpo_layout_missing(layout)
  if why:
    return {"not_available": why}
  arch = dict(arch or ARCH)
  cfg = ModelConfig(**arch, dtype=dtype, scan_unroll=scan_unroll or arch["num_layers"])
  from jalign.algorithms import common
  state, optimizer, schedule = _jalign_state(cfg, frozen_copy=True)
  pairs = dpo_pairs(steps + 1, lengths)
  batches = jalign_dpo_rows(pairs, layout, sum(max_lengths(lengths)), arch["vocab_size"] - 1)
  window = common.response_window(*batches) if layout == "padded" else 0  # as jalign.train sets it from the data
  step = jax.jit(trainer.make_train_step(_jalign_dpo_setup(cfg, window=window), optimizer, schedule, 1),
                 donate_argnums=(0,))
  res = _jalign_loop(step, state, batches, [dpo_real_tokens(s) for s in pairs])
  return {**res, "rows_shape": list(batches[0]["tokens"].shape)}


def run_torch_dpo(dtype: str = "float32", steps: int = 10, lengths: str = "fixed", arch=None) -> dict:
  """A plain PyTorch DPO loop: [chosen; rejected] rows (prompt + response) right-padded to the longest in the
  batch, one forward for the policy and one under ``no_grad`` for a frozen copy, summed response log-probs (the
  log-softmax from the shortest prompt on), sigmoid loss at beta 0.1, clipping, AdamW."""
  import copy

  import torch
  import torch.nn.functional as F
  arch = dict(arch or ARCH)
  model = _torch_model(dtype, arch, sum(max_lengths(lengths))).train()
  ref = copy.deepcopy(model).eval().requires_grad_(False)
  opt = _torch_adamw(model)
  pairs = dpo_pairs(steps + 1, lengths)
  pad, beta = arch["vocab_size"] - 1, 0.1

  def logps(m, ids, mask, resp, start):
    logits = m(ids, attention_mask=mask).logits[:, start:-1].float()
    lp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, start + 1:, None])[..., 0]
    return (lp * resp[:, start + 1:]).sum(-1)

  times, fed, losses, launch_s = [], [], [], 0.0
  for i, step in enumerate(pairs):
    ids, mask = _right_pad([np.concatenate([p, c]) for p, c, _ in step] +
                           [np.concatenate([p, r]) for p, _, r in step], pad)  # [chosen; rejected]
    resp = torch.zeros(ids.shape, dtype=torch.float32)  # 1 on response tokens
    for k, (p, c, r) in enumerate(step):
      resp[k, len(p):len(p) + len(c)] = 1.0
      resp[len(step) + k, len(p):len(p) + len(r)] = 1.0
    start = min(len(p) for p, _, _ in step) - 1
    t0 = time.perf_counter()
    with torch.no_grad():
      ref_c, ref_r = logps(ref, ids, mask, resp, start).chunk(2)
    pol_c, pol_r = logps(model, ids, mask, resp, start).chunk(2)
    loss = -F.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
    _torch_update(model, opt, loss)
    losses.append(loss.item())
    times.append(time.perf_counter() - t0)
    fed.append(ids.numel())
    if i == 0:
      launch_s = _since_launch()
  return _train_result(times, [dpo_real_tokens(s) for s in pairs], fed, launch_s, losses[0])


def run_trl_dpo(dtype: str = "float32", steps: int = 10, lengths: str = "fixed", arch=None) -> dict:
  """TRL's DPOTrainer on the same token ids (a word-level tokenizer maps "<id>" to id; TRL appends its EOS to each
  response, so the response text holds its ids but the last), reference model given, in order (sequential
  sampler), its collator padding to the longest prompt + completion of the batch."""
  import copy

  import datasets
  from trl import DPOConfig, DPOTrainer
  arch = dict(arch or ARCH)
  model = _torch_model(dtype, arch, sum(max_lengths(lengths)))
  ref = copy.deepcopy(model)
  tok = _word_tokenizer(arch["vocab_size"], eos=arch["vocab_size"] - 2)  # never in the data
  pairs = dpo_pairs(steps + 1, lengths)
  words = lambda ids: " ".join(f"<{int(i)}>" for i in ids)
  flat = [x for step in pairs for x in step]
  ds = datasets.Dataset.from_dict({"prompt": [words(p) for p, _, _ in flat],
                                   "chosen": [" " + words(c[:-1]) for _, c, _ in flat],
                                   "rejected": [" " + words(r[:-1]) for _, _, r in flat]})
  times, fed, launch = [], [], []
  with tempfile.TemporaryDirectory() as out:
    args = DPOConfig(output_dir=out, beta=0.1, per_device_train_batch_size=B, max_steps=steps + 1, learning_rate=LR,
                     adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
                     max_grad_norm=CLIP, lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=dtype == "bfloat16", max_length=None,
                     gradient_checkpointing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     train_sampling_strategy="sequential")
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[_trl_probe(model, times, fed, launch)])
    trainer.train()
  return _train_result(times, [dpo_real_tokens(s) for s in pairs], fed, launch[0])


def run_tunix_dpo(dtype: str = "float32", steps: int = 10, lengths: str = "fixed", hf_dir: str = "",
                  arch=None) -> dict:
  """Tunix's ``DPOTrainer`` (``tunix.sft.dpo.dpo_trainer``, algorithm "dpo", beta 0.1, no label smoothing) with a
  reference model (a second copy loaded from the same safetensors), fed its pre-tokenised ``TrainingInput``:
  prompts left-padded to the longest prompt the data allows, responses right-padded to the longest response
  (what its own tokenising path, ``process_dpo_record`` with max_prompt_length / max_response_length, gives).
  Per step it computes the reference log-probs in ``_prepare_inputs`` (a jitted forward outside the train step),
  then the jitted policy step. Default ``TrainingConfig`` otherwise (up to 2 steps in flight)."""
  try:
    from tunix.sft.dpo import dpo_trainer
  except ImportError as e:
    return {"not_installed": f"{type(e).__name__}: {e}"}
  if dtype != "float32":
    return {"not_available": "fp32 only"}
  arch = dict(arch or ARCH)
  mesh, load, optimizer = _tunix_setup(hf_dir)
  with mesh:
    model, ref = load(), load()
  config = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10 ** 9, max_steps=steps + 1, algorithm="dpo", beta=0.1)
  trainer = dpo_trainer.DPOTrainer(model=model, ref_model=ref, optimizer=optimizer, training_config=config)
  pairs = dpo_pairs(steps + 1, lengths)
  P, R = max_lengths(lengths)
  pad = arch["vocab_size"] - 1
  batches = []
  for step in pairs:
    a = {k: np.full((B, R if k != "prompt" else P), pad, np.int32) for k in ("prompt", "chosen", "rejected")}
    m = {k: np.zeros(v.shape, np.int32) for k, v in a.items()}
    for i, (p, c, r) in enumerate(step):
      a["prompt"][i, P - len(p):], m["prompt"][i, P - len(p):] = p, 1  # left-padded
      for k, x in (("chosen", c), ("rejected", r)):
        a[k][i, :len(x)], m[k][i, :len(x)] = x, 1
    batches.append(dpo_trainer.TrainingInput(prompt_ids=a["prompt"], prompt_mask=m["prompt"], chosen_ids=a["chosen"],
                                             chosen_mask=m["chosen"], rejected_ids=a["rejected"],
                                             rejected_mask=m["rejected"]))
  times, launch_s = _tunix_train(trainer, mesh, batches)
  return _train_result(times, [dpo_real_tokens(s) for s in pairs], [2 * B * (P + R)] * len(pairs), launch_s,
                       _tunix_loss_first(trainer))


DPO_RUNNERS = {"jalign": run_jalign_dpo, "torch": run_torch_dpo, "trl": run_trl_dpo, "tunix": run_tunix_dpo}


def logprob_memory(vocab: int = 128256, hidden: int = 2048, rows: int = 16, length: int = PROMPT + RESP) -> dict:
  """Temporary memory XLA reports for the summed response log-probs of ``rows`` sequences (forward, and gradient
  w.r.t. the hidden states and the output matrix), at a Llama-3-size vocabulary: full logits (chunk 0) and
  ``model.logprob_chunk`` 64 and 16."""
  import jax
  import jax.numpy as jnp

  from jalign.models import ModelConfig, transformer

  args = (jax.ShapeDtypeStruct((rows, length, hidden), jnp.float32),
          jax.ShapeDtypeStruct((hidden, vocab), jnp.float32),
          jax.ShapeDtypeStruct((rows, length), jnp.int32), jax.ShapeDtypeStruct((rows, length), bool))
  out = {"logits_mb": rows * length * vocab * 4 / 2**20}
  for chunk in (0, 64, 16):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, logprob_chunk=chunk)

    def f(h, w, tokens, mask):
      lp = transformer.logprobs_from_hidden({"lm_head": w}, h, tokens, cfg)
      return jnp.sum(jnp.where(mask[:, 1:], lp, 0.0))

    for name, fn in (("forward", f), ("forward+backward", jax.grad(f, argnums=(0, 1)))):
      ma = jax.jit(fn).lower(*args).compile().memory_analysis()
      out[f"chunk={chunk} {name}"] = {"temp_mb": ma.temp_size_in_bytes / 2**20,
                                      "argument_mb": ma.argument_size_in_bytes / 2**20,
                                      "output_mb": ma.output_size_in_bytes / 2**20}
  return out


# ---------------------------------------------------------------------------------------------- convert

CONVERT_ARCH = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8)  # Llama-3.2-1B shapes, untied: 1.50B params


def make_synthetic_hf(directory: str, shard_bytes: int = 1 << 30) -> int:
  """A random HF Llama checkpoint (fp16 safetensors in ~1 GiB shards); returns its parameter count."""
  from jalign.convert import hf
  a = CONVERT_ARCH
  D, F, V, H, K = (a["hidden_size"], a["intermediate_size"], a["vocab_size"], a["num_attention_heads"],
                   a["num_key_value_heads"])
  dh = D // H
  rng = np.random.default_rng(0)
  shapes = [("model.embed_tokens.weight", (V, D))]
  for i in range(a["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes += [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,)),
               (p + "self_attn.q_proj.weight", (H * dh, D)), (p + "self_attn.k_proj.weight", (K * dh, D)),
               (p + "self_attn.v_proj.weight", (K * dh, D)), (p + "self_attn.o_proj.weight", (D, H * dh)),
               (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
               (p + "mlp.down_proj.weight", (D, F))]
  shapes += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
  gen = ((n, (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)) for n, s in shapes)
  hf.write_safetensors(gen, directory, max_shard_bytes=shard_bytes)
  cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0,
             tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=8192, **a)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  return int(sum(np.prod(s) for _, s in shapes))


def _peak_rss_of(cmd) -> tuple[float, float]:
  """(seconds, peak RSS in MB) of a child process."""
  t0 = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode:
    raise RuntimeError(r.stderr[-3000:])
  return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def bench_convert(workdir: str) -> list[dict]:
  src, dst, back = (os.path.join(workdir, n) for n in ("hf", "jalign", "hf_back"))
  n = make_synthetic_hf(src)
  hf_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
  largest_fp32 = max(CONVERT_ARCH["vocab_size"] * CONVERT_ARCH["hidden_size"],
                     CONVERT_ARCH["num_hidden_layers"] * CONVERT_ARCH["hidden_size"] * CONVERT_ARCH["intermediate_size"]) * 4
  rows = []
  for name, cmd in (("hf-to-jalign", [sys.executable, "-m", "jalign.convert", "hf-to-jalign", src, dst]),
                    ("jalign-to-hf", [sys.executable, "-m", "jalign.convert", "jalign-to-hf", dst, back])):
    secs, rss = _peak_rss_of(cmd)  # RUSAGE_CHILDREN: the largest child so far, so run in this order
    rows.append({"step": name, "params": n, "seconds": secs, "peak_rss_mb": rss,
                 "model_fp32_mb": n * 4 / 2**20, "source_mb": hf_bytes / 2**20,
                 "largest_jalign_tensor_mb": largest_fp32 / 2**20})
  return rows


# ---------------------------------------------------------------------------------------------- generate

GEN_PROMPT, GEN_NEW = 32, 128  # prompt tokens, new tokens per row
GEN_MODES = {"greedy": dict(temperature=0.0, top_p=1.0), "top_p": dict(temperature=1.0, top_p=0.9)}


def gen_prompts(batch: int, prompt_len: int) -> np.ndarray:
  """[batch, prompt_len] token ids: consecutive pieces of the embedded SFT data (ids < 320, the tiny tokenizer's
  vocabulary, so a pad id of vocab - 1 never occurs in a prompt)."""
  n = -(-batch * prompt_len // (B * T))
  return _batches(n).reshape(-1)[:batch * prompt_len].reshape(batch, prompt_len)


def make_gen_model(directory: str, arch=None, seed: int = 0) -> tuple[str, str]:
  """A random-init jalign model (``ARCH``, fp32, PRNGKey(seed)) saved as a jalign model directory and exported
  with ``jalign-to-hf`` (LlamaForCausalLM), so every framework loads the same weights. Returns (jalign dir, HF
  dir)."""
  import jax

  from jalign import checkpoint, convert
  from jalign.models import ModelConfig, init_params
  arch = dict(arch or ARCH)
  cfg = ModelConfig(**arch, scan_unroll=arch["num_layers"])
  jdir, hdir = os.path.join(directory, "jalign"), os.path.join(directory, "hf")
  checkpoint.save_model(jdir, jax.device_get(init_params(cfg, jax.random.PRNGKey(seed))), cfg.to_dict())
  convert.jalign_to_hf(jdir, hdir)
  return jdir, hdir


def _timed(fn, reps: int) -> tuple[float, object]:
  """(median seconds over ``reps`` calls, the last call's output)."""
  times, out = [], None
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def _gen_result(batch, new_tokens, first_s, gen_s, ttft_s, tokens) -> dict:
  return {"first_call_s": first_s, "gen_s": gen_s, "tokens_per_sec": batch * new_tokens / gen_s, "ttft_s": ttft_s,
          "tokens": [list(map(int, r)) for r in tokens], "peak_rss_mb": _rss_mb()}


def run_jalign_gen(model_dir: str, hf_dir: str, batch: int, mode: str, new_tokens: int, prompt_len: int,
                   reps: int = 3) -> dict:
  """jalign's Engine: one warm-up (compiling) call, then ``reps`` timed calls of ``new_tokens`` tokens per row
  (no stop ids: every row runs the full length) and ``reps`` calls of one new token (time to first token)."""
  import jax

  from jalign import convert
  from jalign.generation.engine import Engine, SamplingParams
  cfg, params, _ = convert.read_jalign_dir(model_dir)
  params = jax.device_put(params)
  prompts = gen_prompts(batch, prompt_len).tolist()
  # top_k_cap=0: no top-k in this benchmark (neither reference runs one), so no lax.top_k per step
  eng = Engine(params, cfg, batch_size=batch, max_new_tokens=new_tokens, top_k_cap=0, pad_id=cfg.vocab_size - 1,
               prompt_buckets=(prompt_len,))
  sp = SamplingParams(**GEN_MODES[mode])
  sp1 = dataclasses.replace(sp, max_new_tokens=1)
  run = lambda s: eng.generate(prompts, s, seed=0)
  first_s, _ = _timed(lambda: run(sp), 1)
  gen_s, out = _timed(lambda: run(sp), reps)
  run(sp1)  # same executables (max_new_tokens is a per-row value); one untimed call anyway
  ttft_s, _ = _timed(lambda: run(sp1), reps)
  tokens = [r[0]["tokens"] for r in out]
  assert all(len(t) == new_tokens for t in tokens), [len(t) for t in tokens]
  return _gen_result(batch, new_tokens, first_s, gen_s, ttft_s, tokens)


def run_transformers_gen(model_dir: str, hf_dir: str, batch: int, mode: str, new_tokens: int, prompt_len: int,
                         reps: int = 3) -> dict:
  """transformers' ``generate`` (torch CPU, fp32, sdpa attention, its default dynamic KV cache) on the exported
  weights; ``min_new_tokens`` = ``max_new_tokens`` and no EOS so every row runs the full length; top-k off."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
  ids = torch.from_numpy(gen_prompts(batch, prompt_len)).long()
  mask = torch.ones_like(ids)
  m = GEN_MODES[mode]
  kw = dict(do_sample=False) if m["temperature"] <= 0 else dict(do_sample=True, temperature=m["temperature"],
                                                                 top_p=m["top_p"], top_k=0)
  pad = model.config.vocab_size - 1

  def run(n):
    torch.manual_seed(0)
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            eos_token_id=None, pad_token_id=pad, **kw)

  first_s, _ = _timed(lambda: run(new_tokens), 1)
  gen_s, out = _timed(lambda: run(new_tokens), reps)
  run(1)
  ttft_s, _ = _timed(lambda: run(1), reps)
  tokens = out[:, prompt_len:].numpy()
  assert tokens.shape == (batch, new_tokens), tokens.shape
  return _gen_result(batch, new_tokens, first_s, gen_s, ttft_s, tokens)


class _IdTokenizer:
  """Token ids written as space-separated numbers: feeds Tunix's string-based Sampler the same ids."""

  def __init__(self, pad):
    self.pad = pad

  def encode(self, text, **kw):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kw):
    return " ".join(map(str, ids))

  def bos_id(self):
    return None  # no BOS added

  def eos_id(self):
    return -1  # never produced: every row runs the full length

  def pad_id(self):
    return self.pad


def _tunix_config(hf_dir: str):
  """Tunix's Llama 3 config for the exported HF directory, and the head dim."""
  from tunix.models.llama3 import model as tunix_llama
  with open(os.path.join(hf_dir, "config.json")) as f:
    hc = json.load(f)
  dh = hc.get("head_dim") or hc["hidden_size"] // hc["num_attention_heads"]
  return tunix_llama.ModelConfig(
      num_layers=hc["num_hidden_layers"], vocab_size=hc["vocab_size"], embed_dim=hc["hidden_size"],
      hidden_dim=hc["intermediate_size"], num_heads=hc["num_attention_heads"], head_dim=dh,
      num_kv_heads=hc["num_key_value_heads"], rope_theta=hc.get("rope_theta", 10000.0), norm_eps=hc["rms_norm_eps"],
      weight_tying=hc.get("tie_word_embeddings", False)), dh


def run_tunix_gen(model_dir: str, hf_dir: str, batch: int, mode: str, new_tokens: int, prompt_len: int,
                  reps: int = 3) -> dict:
  """Tunix's ``Sampler`` with its Llama 3 model loaded from the exported safetensors (fp32). Greedy is its
  default mode; top-p passes ``temperature``/``top_p`` (no top-k: it sorts the whole vocabulary)."""
  try:
    import jax.numpy as jnp
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.llama3 import params as tunix_params
  except ImportError as e:
    return {"not_installed": f"{type(e).__name__}: {e}"}
  tcfg, dh = _tunix_config(hf_dir)
  model = tunix_params.create_model_from_safe_tensors(hf_dir, tcfg, mesh=None, dtype=jnp.float32)
  cache = tunix_sampler.CacheConfig(cache_size=prompt_len + new_tokens, num_layers=tcfg.num_layers,
                                    num_kv_heads=tcfg.num_kv_heads, head_dim=dh)
  s = tunix_sampler.Sampler(model, _IdTokenizer(tcfg.vocab_size - 1), cache)
  strings = [" ".join(map(str, r)) for r in gen_prompts(batch, prompt_len)]
  m = GEN_MODES[mode]
  kw = dict(temperature=0.0) if m["temperature"] <= 0 else dict(temperature=m["temperature"], top_p=m["top_p"])

  def run(n):
    out = s(strings, max_generation_steps=n, max_prompt_length=prompt_len, eos_tokens=[-1], seed=0, **kw)
    return [np.asarray(t) for t in out.tokens]  # device_get'ed: the work is done

  first_s, _ = _timed(lambda: run(new_tokens), 1)
  gen_s, out = _timed(lambda: run(new_tokens), reps)
  run(1)  # a new shape for Tunix (cache and buffers sized for 1 step): compiles
  ttft_s, _ = _timed(lambda: run(1), reps)
  assert all(len(t) == new_tokens for t in out), [len(t) for t in out]
  return _gen_result(batch, new_tokens, first_s, gen_s, ttft_s, out)


def decode_bytes_per_step(params, cfg, batch: int, attended: float) -> float:
  """Bytes one decode step must read: every weight but the embedding table, of which it reads ``batch`` rows (all
  of it when tied: it is the output layer too), and no value head, in the dtype the weights are held in, and the
  keys and values of ``attended`` cache slots per row in the compute dtype."""
  import jax
  weights = sum(x.nbytes for k, v in params.items() if k != "value_head" for x in jax.tree.leaves(v))
  embed = params["embed"]
  if not cfg.tie_embeddings:
    weights += batch * embed.nbytes // embed.shape[0] - embed.nbytes
  kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.dh * attended * np.dtype(cfg.dtype).itemsize
  return float(weights + kv)


def read_bandwidth(nbytes: float) -> float:
  """GB/s of reading an fp32 array of about ``nbytes`` once (a jitted sum, best of 10 calls after a warm-up): a
  decode step's weights and cache are read, not written; on CPU a copy would mostly time the new output's pages."""
  import jax
  import jax.numpy as jnp
  n = max(1024, int(nbytes) // 4 // 1024 * 1024)
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda x: x.sum())
  f(x).block_until_ready()
  return 4 * n / min(_timed(lambda: f(x).block_until_ready(), 1)[0] for _ in range(10)) / 1e9


def run_jalign_bound(model_dir: str, batch: int, new_tokens: int, prompt_len: int, reps: int = 3,
                     large_gib: float = 0.0) -> dict:
  """jalign's greedy decode against the memory bound: the decode step's time (``new_tokens`` minus one-token
  calls, per step), the bytes a step must read (``decode_bytes_per_step`` at the mean attended length) and the read
  bandwidth measured in the same process (``read_bandwidth``) on a large array (``large_gib``; default 2 GiB on a
  GPU, 1 GiB elsewhere: the memory's bound, HBM on a GPU) and on one of the step's size (which a cache may hold)."""
  import jax

  from jalign import convert
  from jalign.generation.engine import Engine, SamplingParams
  if new_tokens < 2:
    raise ValueError(f"the decode step's time needs --new-tokens of 2 or more, got {new_tokens}")
  cfg, params, _ = convert.read_jalign_dir(model_dir)
  params = jax.device_put(params)
  prompts = gen_prompts(batch, prompt_len).tolist()
  eng = Engine(params, cfg, batch_size=batch, max_new_tokens=new_tokens, top_k_cap=0, pad_id=cfg.vocab_size - 1,
               prompt_buckets=(prompt_len,))
  full, one = SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, max_new_tokens=1)
  eng.generate(prompts, full)
  eng.generate(prompts, one)
  full_s, _ = _timed(lambda: eng.generate(prompts, full), reps)
  one_s, _ = _timed(lambda: eng.generate(prompts, one), reps)
  step_s = (full_s - one_s) / (new_tokens - 1)
  # decode step i (0-based) attends over the prompt, the first token and i new ones
  nbytes = decode_bytes_per_step(params, cfg, batch, prompt_len + 1 + (new_tokens - 2) / 2)
  large = read_bandwidth((large_gib or (2.0 if jax.default_backend() == "gpu" else 1.0)) * 2 ** 30)
  sized = read_bandwidth(nbytes)
  return {"batch": batch, "device": jax.devices()[0].device_kind, "step_s": step_s,
          "tokens_per_sec": batch / step_s, "bytes_per_step": nbytes, "bandwidth_gbps": large,
          "bound_tokens_per_sec": batch * large * 1e9 / nbytes, "of_bound": nbytes / (large * 1e9) / step_s,
          "sized_bandwidth_gbps": sized, "of_sized_bound": nbytes / (sized * 1e9) / step_s}


def print_bound_table(rows):
  print("| device | batch | decode tokens/s | step (ms) | bytes read per step (MB) | read bandwidth, large array "
        "(GB/s) | bound tokens/s | of bound | read bandwidth, array of the step's size (GB/s) | of that bound |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['device']} | {r['batch']} | {r['tokens_per_sec']:.0f} | {r['step_s'] * 1e3:.3f} | "
          f"{r['bytes_per_step'] / 1e6:.1f} | {r['bandwidth_gbps']:.0f} | {r['bound_tokens_per_sec']:.0f} | "
          f"{r['of_bound']:.0%} | {r['sized_bandwidth_gbps']:.0f} | {r['of_sized_bound']:.0%} |")


GEN_RUNNERS = {"jalign": run_jalign_gen, "transformers": run_transformers_gen, "tunix": run_tunix_gen,
               "jalign-bound": run_jalign_bound}


def _gen_child(framework: str, kwargs: dict, threads: int, tunix_path: str = "") -> dict:
  # Tunix installed aside (see docs/benchmarks.md) goes on its process's path only
  return _in_child(f"GEN_RUNNERS[{framework!r}](**json.loads({json.dumps(kwargs)!r}))", threads,
                   framework == "transformers", f"{framework} ({kwargs})", tunix_path if framework == "tunix" else "",
                   reference=not framework.startswith("jalign"), any_platform=framework == "jalign-bound")


def greedy_agreement(a, b) -> float:
  """Fraction of rows whose token lists are identical."""
  return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def bench_generate(rounds: int, batches, frameworks, threads: int, new_tokens: int = GEN_NEW,
                   prompt_len: int = GEN_PROMPT, reps: int = 3, tunix_path: str = "", arch=None,
                   workdir: str = "") -> tuple[list[dict], dict]:
  """Rows (framework, batch, mode) with the best round's tokens/s, and notes (frameworks not installed, greedy
  agreement with transformers)."""
  results, notes = {}, {"not_installed": {}, "greedy_match": {}}
  frameworks = list(frameworks)
  with tempfile.TemporaryDirectory(dir=workdir or None) as wd:
    jdir, hdir = make_gen_model(wd, arch)
    for r in range(rounds):
      for batch in batches:
        for mode in GEN_MODES:
          for fw in list(frameworks):
            kw = dict(model_dir=jdir, hf_dir=hdir, batch=batch, mode=mode, new_tokens=new_tokens,
                      prompt_len=prompt_len, reps=reps)
            res = _gen_child(fw, kw, threads, tunix_path)
            if "not_installed" in res:
              notes["not_installed"][fw] = res["not_installed"]
              frameworks.remove(fw)
              print(f"  {fw}: not installed ({res['not_installed']})", file=sys.stderr, flush=True)
              continue
            results.setdefault((fw, batch, mode), []).append(res)
            print(f"  round {r + 1}: {fw:12s} batch {batch:3d} {mode:6s} {res['tokens_per_sec']:8.0f} tokens/s  "
                  f"first token {res['ttft_s'] * 1e3:7.1f} ms  first call {res['first_call_s']:.2f} s",
                  file=sys.stderr, flush=True)
  rows = []
  for (fw, batch, mode), rs in results.items():
    best = min(rs, key=lambda x: x["gen_s"])  # best round: other load only ever slows a round down
    rows.append({"framework": fw, "batch": batch, "mode": mode, "tokens_per_sec": best["tokens_per_sec"],
                 "gen_s": best["gen_s"], "ttft_ms": min(x["ttft_s"] for x in rs) * 1e3,
                 "first_call_s": min(x["first_call_s"] for x in rs),
                 "peak_rss_mb": max(x["peak_rss_mb"] for x in rs)})
    ref = results.get(("transformers", batch, "greedy"))
    if mode == "greedy" and fw != "transformers" and ref:
      notes["greedy_match"][f"{fw} batch {batch}"] = greedy_agreement(rs[0]["tokens"], ref[0]["tokens"])
  return rows, notes


def print_gen_table(rows, anchor="transformers", second="tunix"):
  has2 = any(r["framework"] == second for r in rows)
  find = lambda fw, r: next((x for x in rows if x["framework"] == fw and x["batch"] == r["batch"]
                             and x["mode"] == r["mode"]), None)
  ratio = lambda r, ref: f"{r['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x" if ref else "-"
  print(f"| framework | batch | sampling | new tokens/s | time to first token (ms) | first call (s) | peak RSS (MB) "
        f"| vs {anchor} |" + (f" vs {second} |" if has2 else ""))
  print("|---|---|---|---|---|---|---|---|" + ("---|" if has2 else ""))
  for r in sorted(rows, key=lambda x: (x["batch"], list(GEN_MODES).index(x["mode"]))):
    print(f"| {r['framework']} | {r['batch']} | {r['mode'].replace('_', '-')} | {r['tokens_per_sec']:.0f} | "
          f"{r['ttft_ms']:.1f} | {r['first_call_s']:.2f} | {r['peak_rss_mb']:.0f} | {ratio(r, find(anchor, r))} |"
          + (f" {ratio(r, find(second, r))} |" if has2 else ""))


# ---------------------------------------------------------------------------------------------- rl

RL_SHAPES = {"grpo": dict(prompts=8, samples=4), "ppo": dict(prompts=32, samples=1)}  # prompts per step x samples
RL_NEW, RL_LR = 32, 1e-6  # new tokens per sample (every sample runs the full length: no stop token), learning rate


def even_fraction(text: str) -> float:
  """The benchmark's reward: the fraction of even token ids in a completion decoded by the word-level tokenizer
  (``"<17> <4> ..."``); the same function on the same decoded text in every framework."""
  ids = [int(x) for x in re.findall(r"<(\d+)>", text)]
  return sum(i % 2 == 0 for i in ids) / max(len(ids), 1)


def rl_reward(prompts, responses, rows):
  """jalign's reward source for the benchmark (``fn:jalign.bench:rl_reward``)."""
  return [even_fraction(r) for r in responses]


def _trl_reward(completions, **kw):
  return [even_fraction(c) for c in completions]


def _rl_tokenizer(directory: str, vocab: int) -> str:
  """A word-level HF tokenizer over ``"<i>"`` for every id (whitespace split, so "<5> <7>" is [5, 7]), pad
  ``"<vocab-1>"`` (never in a prompt) and no EOS: jalign gets no stop token, so every sample runs the full length."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  wl = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
  wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  os.makedirs(directory, exist_ok=True)
  wl.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"pad_token": f"<{vocab - 1}>"}, f)
  return directory


def make_rl_inputs(directory: str, arch=None, n_prompts: int = 64, prompt_len: int = GEN_PROMPT) -> dict:
  """The model (``make_gen_model``: jalign dir and its HF export), the word-level tokenizer and a JSONL of
  ``n_prompts`` text prompts (``gen_prompts`` ids written as ``"<id> <id> ..."``) that all frameworks share."""
  arch = dict(arch or ARCH)
  jdir, hdir = make_gen_model(directory, arch)
  tok_dir = _rl_tokenizer(os.path.join(directory, "tokenizer"), arch["vocab_size"])
  data = os.path.join(directory, "prompts.jsonl")
  with open(data, "w") as f:
    for row in gen_prompts(n_prompts, prompt_len):
      f.write(json.dumps({"prompt": " ".join(f"<{int(i)}>" for i in row)}) + "\n")
  return {"model_dir": jdir, "hf_dir": hdir, "tok_dir": tok_dir, "data_path": data, "prompt_len": prompt_len}


def _rl_result(total, gen, score, update, comp_len, rewards) -> dict:
  """Medians over the timed steps (all but the first) and the first step's total."""
  med = lambda x: statistics.median(x[1:]) if len(x) > 1 else x[0]
  return {"step_s": med(total), "gen_s": med(gen), "score_s": med(score), "update_s": med(update),
          "first_step_s": total[0], "steps": len(total) - 1, "completion_len": float(np.mean(comp_len)),
          "reward_first": float(rewards[0]), "peak_rss_mb": _rss_mb()}


def run_jalign_rl(model_dir: str, hf_dir: str, tok_dir: str, data_path: str, prompt_len: int = GEN_PROMPT,
                  algorithm: str = "grpo", prompts: int = 8, samples: int = 4, new_tokens: int = RL_NEW,
                  steps: int = 3, workdir: str = "") -> dict:
  """jalign's own RL path: the phases of ``jalign.train`` (config validated, model and tokenizer loaded, the
  train step and the experience source built as ``python -m jalign.train`` builds them) and its loop,
  ``jalign.trainer.run`` (no checkpoints, no eval, metrics kept in memory). One rollout = one train step. The
  split comes from the source's ``timers/*`` metrics and the loop's ``step_time``: generation = engine sampling;
  scoring = the jitted log-prob pass (plus reference log-probs and critic values for PPO), decoding, the reward on
  host, advantages and batching; update = the train step (device_get'ed)."""
  import jax

  from jalign import checkpoint
  from jalign import config as config_lib
  from jalign import train, trainer
  from jalign.metrics import Progress
  c = config_lib.base_config()
  c.algorithm = algorithm
  c.model.checkpoint = model_dir
  c.model.scan_unroll = checkpoint.read_model_config(model_dir)["num_layers"]  # as the other benchmarks
  c.train.compile_cache = ""  # the first step compiles, as the other frameworks' do
  c.tokenizer.path = tok_dir
  c.data.update(train_path=data_path, add_bos=False)
  c.rollout.update(num_prompts=prompts, num_generations=samples, max_new_tokens=new_tokens,
                   max_prompt_len=prompt_len, temperature=1.0, top_k=0, top_p=1.0, eval_prompts=0)
  c.reward.sources = ("fn:jalign.bench:rl_reward",)
  c.grpo.update(beta=0.0, scale_rewards="group", loss_agg="token_mean")
  c.ppo.update(critic_lr=RL_LR)
  c.train.update(max_steps=steps + 1, global_batch_size=prompts * samples)
  c.optim.update(lr=RL_LR, warmup_steps=0, schedule="constant", weight_decay=0.0)
  c.eval.update(every_steps=0)
  config_lib.validate(c)

  class Writer:
    def __init__(self):
      self.rows = []

    def write(self, step, metrics):
      self.rows.append(metrics)

  ticks = []
  with tempfile.TemporaryDirectory(dir=workdir or None) as wd:
    r = train.setup(c, wd)
    train.load_data(r)
    train.open_checkpoints(r)
    train.build_state(r)
    train.build_steps(r)
    source, _ = train.build_source(r)
    state = train.start_state(r, source)
    jax.block_until_ready(state)
    writer = Writer()
    t0 = time.perf_counter()
    trainer.run(state=state, train_step=r.train_step, eval_fn=None, source=source, batch_shardings=r.batch_sh,
                max_steps=c.train.max_steps, start_step=0, checkpointer=None, ckpt_every=c.train.max_steps,
                eval_every=0, writer=writer, progress=Progress(c.train.max_steps, 0, enabled=False),
                global_batch=r.gb, seq_len=r.seq_len, on_step=lambda s, m: ticks.append(time.perf_counter()),
                prefix="train_optim/")
  total = np.diff([t0] + ticks).tolist()
  m = writer.rows
  gen = [x["timers/generate"] for x in m]
  score = [x["timers/rollout_time"] - x["timers/generate"] for x in m]
  update = [x["train_optim/step_time"] for x in m]
  res = _rl_result(total, gen, score, update, [x["train_rollouts/response_lengths"] for x in m],
                   [x["train_rollouts/rewards"] for x in m])
  med = lambda x: statistics.median(x[1:]) if len(x) > 1 else x[0]
  logprobs, reward = [x["timers/logprobs"] for x in m], [x["timers/reward"] for x in m]
  res["scoring_parts"] = {"log-prob pass": med(logprobs), "decode + reward": med(reward),
                          "advantages + batching": med([s - a - b for s, a, b in zip(score, logprobs, reward)])}
  return res


def run_trl_rl(model_dir: str, hf_dir: str, tok_dir: str, data_path: str, prompt_len: int = GEN_PROMPT,
               algorithm: str = "grpo", prompts: int = 8, samples: int = 4, new_tokens: int = RL_NEW, steps: int = 3,
               workdir: str = "") -> dict:
  """TRL's GRPOTrainer (transformers ``generate`` sampling, torch CPU, fp32, sdpa) on the exported weights, the
  same text prompts and tokenizer, the same reward function. Its EOS is the pad id with ``min_new_tokens`` = the
  cap, so every completion runs the full length as in jalign. Timers wrap ``_generate`` (generation, prompt
  tokenisation and decoding included) and ``_generate_and_score_completions`` (the rest of it is scoring: rewards,
  advantages, and log-prob passes when TRL runs them); update = the rest of the optimizer step (loss forward,
  backward, clipping, AdamW)."""
  if algorithm != "grpo":
    raise ValueError("the TRL runner runs GRPO only")
  import datasets
  import torch
  import transformers
  from trl import GRPOConfig, GRPOTrainer
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
  pad = f"<{model.config.vocab_size - 1}>"
  tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(tok_dir, "tokenizer.json"), pad_token=pad,
                                             eos_token=pad)
  with open(data_path) as f:
    ds = datasets.Dataset.from_dict({"prompt": [json.loads(line)["prompt"] for line in f]})
  total, gen, gen_score, comp_len, rewards = [], [], [], [], []

  def reward(completions, **kw):
    out = _trl_reward(completions, **kw)
    rewards.append(float(np.mean(out)))
    return out

  with tempfile.TemporaryDirectory(dir=workdir or None) as out:
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=prompts * samples, num_generations=samples,
                      gradient_accumulation_steps=1, max_completion_length=new_tokens, temperature=1.0, top_p=1.0,
                      top_k=0, generation_kwargs={"min_new_tokens": new_tokens}, beta=0.0, loss_type="dapo",
                      scale_rewards="group", epsilon=0.2, num_iterations=1, learning_rate=RL_LR,
                      lr_scheduler_type="constant", weight_decay=0.0, adam_beta2=0.98, max_grad_norm=1.0,
                      max_steps=steps + 1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                      bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[_step_timer(total)])

    def timed(fn, into, on_out=None):
      def wrapper(*a, **kw):
        t0 = time.perf_counter()
        res = fn(*a, **kw)
        into.append(time.perf_counter() - t0)
        if on_out is not None:
          on_out(res)
        return res
      return wrapper

    trainer._generate = timed(trainer._generate, gen,
                              lambda res: comp_len.append(float(np.mean([len(c) for c in res[1]]))))
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, gen_score)
    trainer.train()
  assert len(total) == len(gen) == len(gen_score) == steps + 1, (len(total), len(gen), len(gen_score))
  return _rl_result(total, gen, [b - a for a, b in zip(gen, gen_score)],
                    [t - b for b, t in zip(gen_score, total)], comp_len, rewards)


class _WordTokenizer(_IdTokenizer):
  """The benchmark's word-level tokenizer for Tunix (``"<5> <7>"`` <-> [5, 7]): the same text, so the same reward
  input, as jalign and TRL; no BOS, and an EOS id that never occurs (every row runs the full length)."""

  def encode(self, text, **kw):
    text = text.decode() if isinstance(text, bytes) else str(text)
    return [int(t) for t in re.findall(r"<(\d+)>", text)]

  def decode(self, ids, **kw):
    return " ".join(f"<{int(i)}>" for i in ids)


def run_tunix_rl(model_dir: str, hf_dir: str, tok_dir: str, data_path: str, prompt_len: int = GEN_PROMPT,
                 algorithm: str = "grpo", prompts: int = 8, samples: int = 4, new_tokens: int = RL_NEW,
                 steps: int = 3, workdir: str = "") -> dict:
  """Tunix's GRPOLearner (its RLCluster with the vanilla rollout, its Sampler, on one 1-device mesh shared by the
  actor and the rollout, so no weight sync) with its Llama 3 model loaded from the exported safetensors (fp32).
  Timers wrap ``_generate_and_compute_advantage`` and ``RLCluster.generate`` (generation) and the global step
  (update = the rest: the actor's train step)."""
  if algorithm != "grpo":
    raise ValueError("the Tunix runner runs GRPO only")
  try:
    import jax
    import jax.numpy as jnp
    import optax
    from tunix.models.llama3 import params as tunix_params
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
  except ImportError as e:
    return {"not_installed": f"{type(e).__name__}: {e}"}
  tcfg, dh = _tunix_config(hf_dir)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with mesh:
    model = tunix_params.create_model_from_safe_tensors(hf_dir, tcfg, mesh=mesh, dtype=jnp.float32)
  with open(data_path) as f:
    texts = [json.loads(line)["prompt"] for line in f]
  batches = [{"prompts": np.array([texts[(s * prompts + i) % len(texts)] for i in range(prompts)])}
             for s in range(steps + 1)]  # arrays, as its Grain pipeline gives (it np.repeat's each leaf)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(RL_LR, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0))
  training = rl_cluster_lib.RLTrainingConfig(actor_optimizer=optimizer, eval_every_n_steps=10 ** 9,
                                             max_steps=steps + 1, mini_batch_size=None, train_micro_batch_size=None,
                                             rollout_micro_batch_size=None, compute_logps_micro_batch_size=None)
  rollout = base_rollout.RolloutConfig(max_tokens_to_generate=new_tokens, max_prompt_length=prompt_len,
                                       kv_cache_size=prompt_len + new_tokens, temperature=1.0, top_p=1.0, top_k=None,
                                       eos_tokens=[-1])
  cluster = rl_cluster_lib.ClusterConfig(
      role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                    rl_cluster_lib.Role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout)
  rl = rl_cluster_lib.RLCluster(actor=model, reference=None, tokenizer=_WordTokenizer(tcfg.vocab_size - 1),
                                cluster_config=cluster)
  comp_len, rewards = [], []

  def reward(prompts, completions, **kw):
    out = [even_fraction(c) for c in completions]
    rewards.append(float(np.mean(out)))
    comp_len.append(float(np.mean([len(re.findall(r"<\d+>", c)) for c in completions])))
    return out

  learner = grpo_learner.GRPOLearner(
      rl_cluster=rl, reward_fns=reward,
      algo_config=grpo_learner.GRPOConfig(num_generations=samples, num_iterations=1, beta=0.0, epsilon=0.2,
                                          loss_agg_mode="token-mean"))
  total, gen, gen_score = [], [], []

  def timed(fn, into):
    def wrapper(*a, **kw):
      t0 = time.perf_counter()
      res = fn(*a, **kw)
      jax.block_until_ready(jax.tree.leaves(res))
      into.append(time.perf_counter() - t0)
      return res
    return wrapper

  rl.generate = timed(rl.generate, gen)
  learner._generate_and_compute_advantage = timed(learner._generate_and_compute_advantage, gen_score)
  learner._run_global_step = timed(learner._run_global_step, total)
  learner.train(batches)
  assert len(total) == len(gen) == len(gen_score) == steps + 1, (len(total), len(gen), len(gen_score))
  return _rl_result(total, gen, [b - a for a, b in zip(gen, gen_score)],
                    [t - b for b, t in zip(gen_score, total)], comp_len, rewards)


RL_RUNNERS = {"jalign": run_jalign_rl, "trl": run_trl_rl, "tunix": run_tunix_rl}


def _rl_child(framework: str, kwargs: dict, threads: int, tunix_path: str = "") -> dict:
  return _in_child(f"RL_RUNNERS[{framework!r}](**json.loads({json.dumps(kwargs)!r}))", threads,
                   framework == "trl", f"{framework} ({kwargs['algorithm']})",
                   tunix_path if framework == "tunix" else "", reference=framework != "jalign")


def bench_rl(algorithm: str, rounds: int, frameworks, threads: int, steps: int = 3, new_tokens: int = RL_NEW,
             prompt_len: int = GEN_PROMPT, tunix_path: str = "", arch=None, workdir: str = "", prompts: int = 0,
             samples: int = 0) -> tuple[list[dict], dict]:
  """One row per framework: the best round (by median step time) with its split, the smallest first step and the
  largest peak RSS over rounds; notes name the frameworks that are not installed."""
  shape = dict(RL_SHAPES[algorithm])
  shape.update({k: v for k, v in (("prompts", prompts), ("samples", samples)) if v})
  results, notes = {}, {"not_installed": {}}
  frameworks = list(frameworks)
  with tempfile.TemporaryDirectory(dir=workdir or None) as wd:
    inp = make_rl_inputs(wd, arch, n_prompts=max(64, shape["prompts"] * (steps + 1)), prompt_len=prompt_len)
    for r in range(rounds):
      for fw in list(frameworks):
        res = _rl_child(fw, dict(inp, algorithm=algorithm, new_tokens=new_tokens, steps=steps, **shape), threads,
                        tunix_path)
        if "not_installed" in res:
          notes["not_installed"][fw] = res["not_installed"]
          frameworks.remove(fw)
          print(f"  {fw}: not installed ({res['not_installed']})", file=sys.stderr, flush=True)
          continue
        results.setdefault(fw, []).append(res)
        print(f"  round {r + 1}: {fw:7s} step {res['step_s']:.3f} s (generation {res['gen_s']:.3f}, scoring "
              f"{res['score_s']:.3f}, update {res['update_s']:.3f})  first step {res['first_step_s']:.2f} s",
              file=sys.stderr, flush=True)
  rows = []
  for fw, rs in results.items():
    best = min(rs, key=lambda x: x["step_s"])  # best round: other load only ever slows a round down
    rows.append({"framework": fw, "algorithm": algorithm, **shape, "new_tokens": new_tokens,
                 **{k: best[k] for k in ("step_s", "gen_s", "score_s", "update_s", "completion_len")},
                 **({"scoring_parts": best["scoring_parts"]} if "scoring_parts" in best else {}),
                 "samples_per_sec": shape["prompts"] * shape["samples"] / best["step_s"],
                 "first_step_s": min(x["first_step_s"] for x in rs),
                 "peak_rss_mb": max(x["peak_rss_mb"] for x in rs)})
  return rows, notes


def print_rl_table(rows, anchor="trl"):
  ref = next((x for x in rows if x["framework"] == anchor), None)
  print("| framework | step (s) | generation (s) | scoring (s) | update (s) | samples/s | mean completion tokens "
        "| first step (s) | peak RSS (MB) |" + (f" vs {anchor} |" if ref else ""))
  print("|---|---|---|---|---|---|---|---|---|" + ("---|" if ref else ""))
  for r in rows:
    print(f"| {r['framework']} | {r['step_s']:.3f} | {r['gen_s']:.3f} | {r['score_s']:.3f} | {r['update_s']:.3f} | "
          f"{r['samples_per_sec']:.1f} | {r['completion_len']:.1f} | {r['first_step_s']:.2f} | "
          f"{r['peak_rss_mb']:.0f} |" + (f" {ref['step_s'] / r['step_s']:.2f}x |" if ref else ""))


# ---------------------------------------------------------------------------------------------- driver

REF_HOST_MALLOC = "default"  # --ref-host-malloc


def _in_child(call: str, threads: int, with_torch: bool, label: str, pythonpath: str = "", env=None,
              reference: bool = True, any_platform: bool = False) -> dict:
  """``bench.<call>`` in a fresh Python process limited to ``threads`` threads; returns the dict it prints.
  ``env`` (sft/dpo): no inherited JAX persistent compilation cache, then these variables. A ``reference``
  framework's process keeps glibc's malloc defaults and XLA's default compile level (``jalign.hostmem`` off), as its
  users run it, unless ``--ref-host-malloc jalign``."""
  # PYTHONSAFEPATH: the working directory (often the repository root) stays off sys.path, so its kernels/ does not
  # shadow Hugging Face's `kernels` package that transformers imports
  child_env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore",
                   TOKENIZERS_PARALLELISM="false", JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                   PYTHONSAFEPATH="1")
  if any_platform and "JAX_PLATFORMS" not in os.environ:
    child_env.pop("JAX_PLATFORMS")
  child_env.pop("XLA_FLAGS", None)
  if reference and REF_HOST_MALLOC == "default":
    child_env["JALIGN_HOST_MALLOC"] = "0"
  if env is not None:
    for k in [k for k in child_env if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))]:
      child_env.pop(k)
    child_env.update(env)
  if pythonpath:
    child_env["PYTHONPATH"] = os.pathsep.join(x for x in (pythonpath, child_env.get("PYTHONPATH", "")) if x)
  pre = f"import torch; torch.set_num_threads({threads}); " if with_torch else ""
  code = f"import json; {pre}from jalign import bench; print('RESULT', json.dumps(bench.{call}))"
  child_env["JALIGN_BENCH_T0"] = repr(time.time())  # the runners' "launch to first step" starts here
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env)
  for line in r.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"{label} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _train_child(table: str, framework: str, kwargs: dict, threads: int, tunix_path: str = "", env=None) -> dict:
  """One sft/dpo run of ``framework`` (a jalign variant = the jalign runner with its options) in a fresh process."""
  base = framework.split("-")[0]
  kw = {**JALIGN_VARIANTS.get(framework, {}), **kwargs}
  if base != "tunix":
    kw.pop("hf_dir", None)
  return _in_child(f"{table}[{base!r}](**json.loads({json.dumps(kw)!r}))", threads, base in ("torch", "trl"),
                   f"{framework} ({kw})", tunix_path if base == "tunix" else "", env={} if env is None else env,
                   reference=base != "jalign")


def _check_frameworks(frameworks, allowed) -> list:
  frameworks = [f for f in frameworks if f]
  bad = [f for f in frameworks if f not in allowed]
  if bad:
    raise ValueError(f"unknown framework(s) {bad}: choose from {sorted(allowed)}")
  return frameworks


def _bench_train(table: str, cells, rounds: int, threads: int, steps: int, lengths: str, tunix_path: str = "",
                 workdir: str = "") -> tuple[dict, dict]:
  """Every (framework, dtype) cell once per round, alternating, each in a fresh process. Returns the results per
  cell and notes: frameworks not installed, rows not available (and why)."""
  results, notes = {}, {"not_installed": {}, "not_available": {}}
  cells = list(cells)
  with tempfile.TemporaryDirectory(dir=workdir or None) as wd:
    hf_dir = make_gen_model(wd)[1] if any(fw == "tunix" for fw, _ in cells) else ""
    for r in range(rounds):
      for fw, dtype in list(cells):
        res = _train_child(table, fw, dict(dtype=dtype, steps=steps, lengths=lengths, hf_dir=hf_dir), threads,
                           tunix_path)
        if "not_installed" in res:  # none of its cells can run
          notes["not_installed"][fw] = res["not_installed"]
          cells = [c for c in cells if c[0] != fw]
        elif "not_available" in res:  # this cell cannot
          notes["not_available"][f"{fw} ({dtype})"] = res["not_available"]
          cells.remove((fw, dtype))
        if "not_installed" in res or "not_available" in res:
          print(f"  {fw} ({dtype}): {res.get('not_installed') or res['not_available']}", file=sys.stderr, flush=True)
          continue
        results.setdefault((fw, dtype), []).append(res)
        print(f"  round {r + 1}: {fw:20s} {dtype:9s} step {res['step_s'] * 1e3:7.1f} ms  "
              f"{res['tokens_per_sec']:6.0f} real tokens/s  first step {res['first_step_s']:.2f} s", file=sys.stderr,
              flush=True)
  return results, notes


def _best_row(fw, dtype, rs) -> dict:
  """The best round (other load only ever slows a round down) by median step; the smallest first step and launch
  time, the largest peak RSS over rounds."""
  best = min(rs, key=lambda x: x["step_s"])
  return {"framework": fw, "dtype": dtype, "tokens_per_sec": best["tokens_per_sec"], "step_ms": best["step_s"] * 1e3,
          "steps_per_sec": 1 / best["step_s"], "real_tokens": best["real_tokens"], "fed_tokens": best["fed_tokens"],
          "first_step_s": min(x["first_step_s"] for x in rs),
          "launch_to_first_step_s": min(x["launch_to_first_step_s"] for x in rs),
          "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
          **({"rows_shape": best["rows_shape"]} if "rows_shape" in best else {})}


def compile_study(table: str, cells, rounds: int, threads: int, lengths: str) -> list[dict]:
  """jalign's first step with JAX's persistent compilation cache: per (variant, dtype) and round, one process with
  an empty cache directory (it compiles and writes the cache), then a second process with the same shapes and
  that directory (it reads the executables back). ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`` and
  ``..._MIN_ENTRY_SIZE_BYTES=0``: every executable is cached, not only those that took over a second."""
  out = []
  for fw, dtype in cells:
    cold, warm = [], []
    for r in range(rounds):
      with tempfile.TemporaryDirectory() as cache:
        env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        kw = dict(dtype=dtype, steps=1, lengths=lengths)
        cold.append(_train_child(table, fw, kw, threads, env=env))
        warm.append(_train_child(table, fw, kw, threads, env=env))
        cache_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs) / 2**20
      print(f"  compile cache, round {r + 1}: {fw:12s} {dtype:9s} first step {cold[-1]['first_step_s']:.2f} s "
            f"(empty cache) -> {warm[-1]['first_step_s']:.2f} s (warm)", file=sys.stderr, flush=True)
    out.append({"framework": fw, "dtype": dtype, "empty_cache_first_step_s": min(x["first_step_s"] for x in cold),
                "warm_cache_first_step_s": min(x["first_step_s"] for x in warm),
                "empty_cache_launch_s": min(x["launch_to_first_step_s"] for x in cold),
                "warm_cache_launch_s": min(x["launch_to_first_step_s"] for x in warm), "cache_mb": cache_mb})
  return out


def bench_sft(steps: int, rounds: int, dtypes, frameworks, threads: int, lengths: str = "fixed", tunix_path: str = "",
              workdir: str = "", compile_cache: bool = True) -> tuple[list[dict], dict]:
  """Rows per (framework, dtype) and notes (not installed / not available, ``compile``: the cache study)."""
  frameworks = _check_frameworks(frameworks, {"jalign", "jalign-scan", "jalign-packed", "torch", "trl", "tunix"})
  results, notes = _bench_train("RUNNERS", [(fw, d) for d in dtypes for fw in frameworks], rounds, threads, steps,
                                lengths, tunix_path, workdir)
  fpt = sft_flops_per_token(sft_sequences(steps + 1, lengths))
  rows = []
  for (fw, dtype), rs in results.items():
    row = _best_row(fw, dtype, rs)
    ceiling = statistics.median(x["ceiling"] for x in rs)
    rows.append({**row, "mfu": fpt * row["tokens_per_sec"] / ceiling, "ceiling_gflops": ceiling / 1e9})
  jalign_cells = [(fw, d) for d in dtypes for fw in frameworks if fw in ("jalign", "jalign-scan")]
  notes["compile"] = compile_study("RUNNERS", jalign_cells, rounds, threads, lengths) if compile_cache else []
  return rows, notes


def bench_dpo(steps: int, rounds: int, frameworks, threads: int, lengths: str = "fixed", tunix_path: str = "",
              workdir: str = "", compile_cache: bool = True) -> tuple[list[dict], dict]:
  """Rows per framework (fp32) and notes, as ``bench_sft``; layouts jalign cannot build yet are left out with a
  note before anything runs."""
  frameworks = _check_frameworks(frameworks, set(DPO_RUNNERS) | set(JALIGN_VARIANTS))
  notes_pre = {}
  for fw in list(frameworks):
    why = dpo_layout_missing(JALIGN_VARIANTS.get(fw, {}).get("layout", "padded"))
    if why:
      notes_pre[f"{fw} (float32)"] = why
      frameworks.remove(fw)
  results, notes = _bench_train("DPO_RUNNERS", [(fw, "float32") for fw in frameworks], rounds, threads, steps,
                                lengths, tunix_path, workdir)
  notes["not_available"].update(notes_pre)
  rows = [_best_row(fw, dtype, rs) for (fw, dtype), rs in results.items()]
  jalign_cells = [(fw, "float32") for fw in frameworks if fw in ("jalign", "jalign-scan")]
  notes["compile"] = compile_study("DPO_RUNNERS", jalign_cells, rounds, threads, lengths) if compile_cache else []
  return rows, notes


def _ratio(r, ref) -> str:
  return f"{r['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x" if ref else "-"


def print_dpo_table(rows, anchor="torch", second="tunix"):
  has2 = any(r["framework"] == second for r in rows)
  ref = next((x for x in rows if x["framework"] == anchor), None)
  ref2 = next((x for x in rows if x["framework"] == second), None)
  print(f"| framework | steps/s | real tokens/s | step (ms) | fed tokens / step | fed / real | first step (s) "
        f"| launch to first step (s) | peak RSS (MB) | vs {anchor} |" + (f" vs {second} |" if has2 else ""))
  print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has2 else ""))
  for r in rows:
    print(f"| {r['framework']} | {r['steps_per_sec']:.2f} | {r['tokens_per_sec']:.0f} | {r['step_ms']:.0f} | "
          f"{r['fed_tokens']:.0f} | {r['fed_tokens'] / r['real_tokens']:.2f}x | {r['first_step_s']:.2f} | "
          f"{r['launch_to_first_step_s']:.2f} | {r['peak_rss_mb']:.0f} | {_ratio(r, ref)} |"
          + (f" {_ratio(r, ref2)} |" if has2 else ""))


def print_table(rows, anchor="torch"):
  print(f"| framework | dtype | real tokens/s | step (ms) | fed / real | first step (s) | launch to first step (s) "
        f"| peak RSS (MB) | matmul ceiling (GFLOP/s) | MFU | vs {anchor} |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ref = next((x for x in rows if x["framework"] == anchor and x["dtype"] == r["dtype"]), None)
    print(f"| {r['framework']} | {r['dtype']} | {r['tokens_per_sec']:.0f} | {r['step_ms']:.1f} | "
          f"{r['fed_tokens'] / r['real_tokens']:.2f}x | {r['first_step_s']:.2f} | {r['launch_to_first_step_s']:.2f} | "
          f"{r['peak_rss_mb']:.0f} | {r['ceiling_gflops']:.0f} | {r['mfu']:.1%} | {_ratio(r, ref)} |")


def print_compile_table(rows, study):
  """jalign's variants: step time and first step without a cache (from ``rows``), with an empty and with a warm
  persistent compilation cache (``study``)."""
  print("| jalign variant | dtype | step (ms) | first step (s) | first step, empty cache (s) | first step, warm cache "
        "(s) | launch to first step, warm cache (s) | cache (MB) |")
  print("|---|---|---|---|---|---|---|---|")
  for s in study:
    r = next((x for x in rows if x["framework"] == s["framework"] and x["dtype"] == s["dtype"]), None)
    step, first = (f"{r['step_ms']:.0f}", f"{r['first_step_s']:.2f}") if r else ("-", "-")
    print(f"| {s['framework']} | {s['dtype']} | {step} | {first} | {s['empty_cache_first_step_s']:.2f} | "
          f"{s['warm_cache_first_step_s']:.2f} | {s['warm_cache_launch_s']:.2f} | {s['cache_mb']:.1f} |")


TRAIN_OPTIONS = {
    "jalign": "jax.jit(trainer.make_train_step(...)), donated state, base AdamW config (lr 3e-4, b2 0.98, wd 0.01 "
              "except norms, clip 1.0); layers unrolled (model.scan_unroll = num_layers); batches padded to "
              "data.max_seq_len",
    "jalign-scan": "as jalign with model.scan_unroll=1 (one scanned layer body)",
    "jalign-packed": "as jalign, data.packing: each step's sequences (dpo: pairs, in rows of 2 x max_seq_len) "
                     "packed first-fit-decreasing",
    "jalign-shared": "as jalign, data.shared_prompt: [prompt, chosen, rejected] in one row (branch ids)",
    "jalign-packed+shared": "as jalign, data.packing and data.shared_prompt",
    "torch": "plain loop, sdpa attention, AdamW(lr 3e-4, betas (0.9, 0.98), wd 0.01), clip 1.0; batches padded to "
             "their longest row",
    "trl": "SFTTrainer / DPOTrainer, use_cpu, sequential sampler, constant lr 3e-4, b2 0.98, wd 0.01, clip 1.0, no "
           "gradient checkpointing; its collator pads to the batch's longest",
    "tunix": "PeftTrainer (full fine-tuning) / DPOTrainer, 1-device CPU mesh, fp32, optax clip 1.0 + adamw(3e-4, "
             "b2 0.98, wd 0.01), default TrainingConfig; pre-tokenised inputs padded to the fixed max lengths",
}


def _print_train_notes(rows, notes):
  if notes.get("compile"):
    print("\njalign compile time (persistent compilation cache: a second process with the same shapes):")
    print_compile_table(rows, notes["compile"])
  for fw, why in notes["not_installed"].items():
    print(f"\n{fw}: not installed ({why})")
  for fw, why in notes["not_available"].items():
    print(f"\n{fw}: {why}")
  shown = {r["framework"] for r in rows}
  print("\noptions:")
  for fw in TRAIN_OPTIONS:
    if fw in shown:
      print(f"- {fw}: {TRAIN_OPTIONS[fw]}")


def bench_serve(requests: int, new_tokens: int, slots: int, checkpoint: str = "") -> list[dict]:
  """``python -m jalign.serve`` on a free loopback port: ``requests`` chat requests of exactly ``new_tokens``
  tokens each (``min_tokens`` = ``max_tokens``), sent one at a time and then all at once from threads."""
  import concurrent.futures
  import portpicker
  import requests as http
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ckpt = checkpoint or os.path.join(root, "examples", "tiny_sft_model")
  port = portpicker.pick_unused_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([sys.executable, "-m", "jalign.serve", "--checkpoint", ckpt, "--port", str(port),
                           "--slots", str(slots), "--max-queue", str(requests), "--max-new-tokens", str(new_tokens),
                           "--max-prompt-tokens", "64", "--add-bos", "true"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 600
    while True:
      try:
        if http.get(url + "/health", timeout=1).ok:
          break
      except http.ConnectionError:
        pass
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(f"server did not start: {proc.stderr.read()[-2000:]}")
      time.sleep(0.5)
    name = http.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    body = lambda i: {"model": name, "messages": [{"role": "user", "content": f"What is {10 + i}+{20 + i}?"}],
                      "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0.0}

    def one(i):
      r = http.post(url + "/v1/chat/completions", json=body(i), timeout=600)
      r.raise_for_status()
      return r.json()["usage"]["completion_tokens"]

    one(0)  # warm-up
    rows = []
    for mode in ("one at a time", "concurrent"):
      t0 = time.perf_counter()
      if mode == "concurrent":
        with concurrent.futures.ThreadPoolExecutor(requests) as pool:
          toks = sum(pool.map(one, range(requests)))
      else:
        toks = sum(one(i) for i in range(requests))
      dt = time.perf_counter() - t0
      rows.append({"mode": mode, "requests": requests, "tokens": toks, "seconds": dt, "tokens_per_sec": toks / dt})
    return rows
  finally:
    proc.terminate()
    proc.wait(timeout=120)


def bench_rl_main(a):
  """``rl`` (GRPO: jalign, TRL, Tunix with --tunix-path) and ``ppo`` (jalign only)."""
  steps = 5 if a.steps is None else a.steps
  frameworks = ["jalign"] if a.which == "ppo" else (a.frameworks or "jalign,trl,tunix").split(",")
  skipped = {}
  if "tunix" in frameworks and not a.tunix_path:
    frameworks.remove("tunix")
    skipped["tunix"] = "not run: no --tunix-path"
  algorithm = "grpo" if a.which == "rl" else "ppo"
  shape = RL_SHAPES[algorithm]
  new_tokens = a.new_tokens or RL_NEW
  print(f"jalign.bench {a.which}: {algorithm}, {shape['prompts']} prompts x {shape['samples']} samples, "
        f"{a.prompt_len}-token prompts, {new_tokens} new tokens, arch={ARCH}, fp32, threads={a.threads} "
        f"steps={steps} rounds={a.rounds}", file=sys.stderr)
  rows, notes = bench_rl(algorithm, a.rounds, frameworks, a.threads, steps, new_tokens, a.prompt_len, a.tunix_path,
                         workdir=a.workdir)
  notes["not_installed"].update(skipped)
  print_rl_table(rows)
  for r in rows:
    if "scoring_parts" in r:
      print(f"\n{r['framework']} scoring: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["scoring_parts"].items()))
  for fw, why in notes["not_installed"].items():
    print(f"\n{fw}: {why}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"rows": rows, "notes": notes}, f, indent=2)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jalign.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("which", choices=["sft", "dpo", "generate", "serve", "convert", "rl", "ppo", "kernels"])
  p.add_argument("--steps", type=int, default=None, help="timed steps per run (after one compile step; default 10, "
                 "rl/ppo: 5)")
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds per framework; the best is reported")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--frameworks", default="", help=f"sft: {SFT_FRAMEWORKS} (default); dpo: {DPO_FRAMEWORKS} "
                 "(default); generate: jalign,transformers,tunix (default); rl: jalign,trl,tunix (default; tunix only "
                 "with --tunix-path)")
  p.add_argument("--lengths", choices=LENGTHS, default="fixed", help="sft/dpo: fixed (dpo: 64-token prompts, 192-token "
                 f"responses; sft: {T}-token rows) or mixed (prompt {MIXED_PROMPT[0]}..{MIXED_PROMPT[1]}, responses "
                 f"{MIXED_RESP[0]}..{MIXED_RESP[1]} tokens, seeded; sft: prompt + chosen)")
  p.add_argument("--compile-cache", action=argparse.BooleanOptionalAction, default=True,
                 help="sft/dpo: also time jalign's first step with a warm persistent compilation cache")
  p.add_argument("--batches", default="1,32", help="generate: batch sizes")
  p.add_argument("--bound-batches", default="1,64", help="generate: batch sizes of the table of jalign's decode "
                 "step against the memory bound (empty: none)")
  p.add_argument("--new-tokens", type=int, default=None, help=f"generate/serve: new tokens per row (default "
                 f"{GEN_NEW}); rl/ppo: new tokens per sample (default {RL_NEW})")
  p.add_argument("--prompt-len", type=int, default=GEN_PROMPT, help="generate, rl/ppo: prompt tokens per row")
  p.add_argument("--reps", type=int, default=3, help="generate: timed calls per cell (median) after a warm-up")
  p.add_argument("--tunix-path", default=os.environ.get("JALIGN_BENCH_TUNIX_PATH", ""),
                 help="sft, dpo, generate, rl: a directory holding Tunix installed aside (pip install --target), "
                 "put on PYTHONPATH of the Tunix process only")
  p.add_argument("--requests", type=int, default=64, help="serve: chat requests per mode")
  p.add_argument("--slots", type=int, default=64, help="serve: the server's decode slots")
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--ref-host-malloc", choices=("default", "jalign"), default="default",
                 help="the reference frameworks' processes: glibc's malloc defaults, as their users run them, or "
                 "jalign's host-memory and compile settings (jalign.hostmem)")
  p.add_argument("--json", default="", help="also write the rows to this file")
  p.add_argument("--workdir", default="", help="convert/generate/rl/ppo/sft/dpo: where to write the synthetic "
                 "checkpoints (temp dir)")
  a = p.parse_args(argv)
  global REF_HOST_MALLOC
  REF_HOST_MALLOC = a.ref_host_malloc
  if a.which == "kernels":
    from jalign import bench_kernels
    out = bench_kernels.run()
    bench_kernels.print_tables(out)
    if a.json:
      with open(a.json, "w") as f:
        json.dump(out, f, indent=2)
    return
  if a.which in ("rl", "ppo"):
    bench_rl_main(a)
    return
  a.steps = 10 if a.steps is None else a.steps
  a.new_tokens = a.new_tokens or GEN_NEW
  if a.which == "convert":
    with tempfile.TemporaryDirectory(dir=a.workdir or None) as wd:
      rows = bench_convert(wd)
    print("| step | params | seconds | peak RSS (MB) | model in fp32 (MB) | HF source, fp16 (MB) | largest jalign "
          "tensor (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['step']} | {r['params'] / 1e9:.2f}B | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['model_fp32_mb']:.0f} | {r['source_mb']:.0f} | {r['largest_jalign_tensor_mb']:.0f} |")
    return
  if a.which == "serve":
    rows = bench_serve(a.requests, a.new_tokens, a.slots)
    print("| mode | requests | new tokens | seconds | tokens/s | vs one at a time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['mode']} | {r['requests']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_sec']:.0f} | "
            f"{r['tokens_per_sec'] / rows[0]['tokens_per_sec']:.2f}x |")
    return
  if a.which == "generate":
    frameworks = (a.frameworks or "jalign,transformers,tunix").split(",")
    batches = [int(b) for b in a.batches.split(",")]
    print(f"jalign.bench generate: {a.prompt_len}-token prompts, {a.new_tokens} new tokens, batches {batches}, "
          f"arch={ARCH}, fp32, threads={a.threads} rounds={a.rounds} reps={a.reps}", file=sys.stderr)
    rows, notes = bench_generate(a.rounds, batches, frameworks, a.threads, a.new_tokens, a.prompt_len, a.reps,
                                 a.tunix_path, workdir=a.workdir)
    print_gen_table(rows)
    for fw, why in notes["not_installed"].items():
      print(f"\n{fw}: not installed ({why})")
    if notes["greedy_match"]:
      print("\ngreedy rows identical to transformers' (fp32): " +
            ", ".join(f"{k} {v:.0%}" for k, v in notes["greedy_match"].items()))
    bound = []
    if a.bound_batches:
      with tempfile.TemporaryDirectory(dir=a.workdir or None) as wd:
        jdir, _ = make_gen_model(wd)
        bound = [_gen_child("jalign-bound", dict(model_dir=jdir, batch=int(b), new_tokens=a.new_tokens,
                                                 prompt_len=a.prompt_len, reps=a.reps), a.threads)
                 for b in a.bound_batches.split(",")]
      print(f"\njalign's greedy decode step against the memory bound (bytes a step reads / measured read bandwidth):")
      print_bound_table(bound)
    if a.json:
      with open(a.json, "w") as f:
        json.dump({"rows": rows, "notes": notes, "bound": bound}, f, indent=2)
    return
  if a.which == "dpo":
    frameworks = (a.frameworks or DPO_FRAMEWORKS).split(",")
    P, R = max_lengths(a.lengths)
    print(f"jalign.bench dpo: {B} pairs, --lengths {a.lengths} (prompts up to {P}, responses up to {R} tokens), "
          f"arch={ARCH}, fp32, threads={a.threads} steps={a.steps} rounds={a.rounds}", file=sys.stderr)
    rows, notes = bench_dpo(a.steps, a.rounds, frameworks, a.threads, a.lengths, a.tunix_path, a.workdir,
                            a.compile_cache)
    print_dpo_table(rows)
    _print_train_notes(rows, notes)
    mem = logprob_memory()
    print(f"\nlog-prob computation at vocab 128256, hidden 2048, 16 rows x {PROMPT + RESP} tokens (fp32 logits "
          f"{mem['logits_mb']:.0f} MB), XLA memory_analysis:")
    print("| model.logprob_chunk | pass | temp (MB) | arguments (MB) | outputs (MB) |")
    print("|---|---|---|---|---|")
    for k, v in mem.items():
      if k != "logits_mb":
        chunk, what = k.split(" ")
        print(f"| {chunk.split('=')[1]} | {what} | {v['temp_mb']:.0f} | {v['argument_mb']:.0f} | "
              f"{v['output_mb']:.0f} |")
    if a.json:
      with open(a.json, "w") as f:
        json.dump({"lengths": a.lengths, "rows": rows, "notes": notes, "logprob_memory": mem}, f, indent=2)
    return
  frameworks = (a.frameworks or SFT_FRAMEWORKS).split(",")
  print(f"jalign.bench sft: B={B}, --lengths {a.lengths} (rows up to {sft_max_len(a.lengths)} tokens), arch={ARCH}, "
        f"threads={a.threads} steps={a.steps} rounds={a.rounds}", file=sys.stderr)
  rows, notes = bench_sft(a.steps, a.rounds, a.dtypes.split(","), frameworks, a.threads, a.lengths, a.tunix_path,
                          a.workdir, a.compile_cache)
  print_table(rows)
  _print_train_notes(rows, notes)
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"lengths": a.lengths, "rows": rows, "notes": notes}, f, indent=2)


if __name__ == "__main__":
  main()
