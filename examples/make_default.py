"""Regenerate the embedded default: data, tokenizer and tiny base model under examples/.

  python examples/make_default.py

Writes examples/data/{pretrain,sft_train,sft_eval}.jsonl, examples/tiny_model/tokenizer.model and a tiny
base model (examples/tiny_model/{model_config.json,params/}) pretrained for a few hundred steps on plain-text
renderings of the task ("12+34=46"), so that SFT has something to build on. Then the preference data
(dpo_*, rm_*, rm_regression_*, kto_*, rewardbench_toy.jsonl: chosen = the right answer, rejected = a plausible
wrong one; held-out files use the SFT eval questions), the SteerLM rows (steerlm_*: terse or worked answers labelled
with their exact attributes) and examples/tiny_sft_model, the quickstart's SFT result
that the DPO and RM quickstarts start from. Seeded: the data and tokenizer are identical on every run.

  python examples/make_default.py --only preference   # just the preference (and SteerLM) files
  python examples/make_default.py --only steerlm      # just the SteerLM files
  python examples/make_default.py --only rm_model     # just examples/tiny_rm_model (the RM quickstart's result)
  python examples/make_default.py --only steerlm_model  # just examples/tiny_steerlm_model (SteerLM's result)
  python examples/make_default.py --only denoiser     # just examples/tiny_denoiser (configs/ddpm_tiny.py)
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from jalign import toy  # noqa: E402

DATA = os.path.join(HERE, "data")
MODEL = os.path.join(HERE, "tiny_model")
SPECIAL = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "\n"]


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def plain(q, a):
  return toy.worked(q, a)


def make_data(seed=0):
  rng = random.Random(seed)
  qs = [toy.make_question(rng) for _ in range(40000)]
  seen, uniq = set(), []
  for q, a in qs:
    if q not in seen:
      seen.add(q)
      uniq.append((q, a))
  eval_qs, train_qs = uniq[:200], uniq[200:4200]
  pretrain_qs = uniq[200:]  # everything but the eval questions, as plain text
  os.makedirs(DATA, exist_ok=True)
  write_jsonl(os.path.join(DATA, "sft_train.jsonl"), [toy.nemo_chat_row(q, a) for q, a in train_qs])
  write_jsonl(os.path.join(DATA, "sft_eval.jsonl"), [toy.nemo_chat_row(q, a) for q, a in eval_qs])
  write_jsonl(os.path.join(DATA, "pretrain.jsonl"), [{"text": plain(q, a)} for q, a in pretrain_qs])
  return train_qs, eval_qs


def make_tokenizer(train_qs):
  import sentencepiece as spm
  os.makedirs(MODEL, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
      for q, a in train_qs:
        f.write(f"User {q} Assistant {a} System\n{plain(q, a)}\n")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(tmp, "tok"), vocab_size=320, model_type="bpe",
        user_defined_symbols=SPECIAL, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
        bos_id=1, eos_id=2, pad_id=3, unk_id=0, minloglevel=2, num_threads=1)
    shutil.copy(os.path.join(tmp, "tok.model"), os.path.join(MODEL, "tokenizer.model"))


def make_base_model():
  from jalign import train
  with tempfile.TemporaryDirectory() as work:
    rc = train.main(["--config", os.path.join(os.path.dirname(HERE), "configs", "pretrain_tiny.py"),
                     "--workdir", work])
    if rc:
      raise SystemExit(f"pretraining failed ({rc})")
    for name in ("params", "model_config.json"):
      dst = os.path.join(MODEL, name)
      if os.path.isdir(dst):
        shutil.rmtree(dst)
      src = os.path.join(work, "model", name)
      (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)


def make_preference_data(train_qs, eval_qs, seed=1, n_train=2000):
  """Pairs for DPO/RM/KTO on the toy task, in NeMo-Aligner's formats (TRL's are tested separately)."""
  from jalign.data import templates
  rng = random.Random(seed)

  def prompt(q):
    return templates.nemo_generation_prompt("", [("User", q)])

  def split(qs, name):
    triples = [(q, a, toy.wrong_answer(q, rng)) for q, a in qs]
    write_jsonl(os.path.join(DATA, f"dpo_{name}.jsonl"), [
        {"prompt": prompt(q), "chosen_response": f"{a}\n<extra_id_1>", "rejected_response": f"{w}\n<extra_id_1>",
         "chosen_reward": toy.attributes(q, a)["correctness"], "rejected_reward": toy.attributes(q, w)["correctness"]}
        for q, a, w in triples])
    write_jsonl(os.path.join(DATA, f"rm_{name}.jsonl"), [
        {"text": prompt(q) + f"{r}\n<extra_id_1>"} for q, a, w in triples for r in (a, w)])
    order = ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence",
             "complexity", "verbosity"]
    reg = []
    for q, a, w in triples:
      r = a if rng.random() < 0.5 else w
      att = toy.attributes(q, r)
      reg.append({"text": prompt(q) + f"{r}\n<extra_id_2>", "label": [att.get(k, -100) for k in order]})
    write_jsonl(os.path.join(DATA, f"rm_regression_{name}.jsonl"), reg)
    write_jsonl(os.path.join(DATA, f"kto_{name}.jsonl"), [
        {"prompt": prompt(q), "response": f"{a if good else w}\n<extra_id_1>",
         "preference": "chosen" if good else "rejected"} for (q, a, w), good in
        zip(triples, [rng.random() < 0.5 for _ in triples])])
    return triples

  split(train_qs[:n_train], "train")
  held = split(eval_qs, "eval")
  write_jsonl(os.path.join(DATA, "rewardbench_toy.jsonl"), [
      {"prompt": q, "chosen": a, "rejected": w, "subset": "toy-add" if q.startswith("What") else "toy-reverse",
       "id": i} for i, (q, a, w) in enumerate(held)])


def make_steerlm_data(train_qs, eval_qs, seed=2, n_train=2000):
  """SteerLM attribute-conditioned SFT rows (NeMo chat, ``type: VALUE_TO_TEXT``): each question answered tersely or
  with its working shown, rightly or wrongly, and labelled with its exact helpfulness, correctness and verbosity.
  The held-out file has every eval question twice, once terse and once worked, both right."""
  rng = random.Random(seed)

  def row(q, r):
    return toy.nemo_chat_row(q, r, toy.steer_label(q, r))

  train = []
  for q, a in train_qs[:n_train]:
    r = a if rng.random() < 0.9 else toy.wrong_answer(q, rng)
    train.append(row(q, toy.worked(q, r) if rng.random() < 0.5 else r))
  write_jsonl(os.path.join(DATA, "steerlm_train.jsonl"), train)
  write_jsonl(os.path.join(DATA, "steerlm_eval.jsonl"), [row(q, r) for q, a in eval_qs for r in (a, toy.worked(q, a))])


def keep_quickstart_model(config: str, name: str, with_run_config: bool = False):
  """Run a quickstart config and keep its exported model as examples/<name> (with the run's config.json, which
  holds its tokenisation settings, when ``with_run_config``)."""
  from jalign import train
  root = os.path.dirname(HERE)
  dst = os.path.join(HERE, name)
  with tempfile.TemporaryDirectory() as work:
    cwd = os.getcwd()
    os.chdir(root)
    try:
      rc = train.main(["--config", config, "--workdir", work])
    finally:
      os.chdir(cwd)
    if rc:
      raise SystemExit(f"{config} failed ({rc})")
    if os.path.isdir(dst):
      shutil.rmtree(dst)
    shutil.copytree(os.path.join(work, "model"), dst)
    if with_run_config:
      shutil.copy(os.path.join(work, "config.json"), os.path.join(dst, "config.json"))


def make_sft_model():
  """The SFT quickstart's model with its run's config.json (its tokenisation settings, which ``jalign.generate``,
  ``jalign.serve`` and ``jalign.score`` read): examples/tiny_sft_model."""
  keep_quickstart_model("configs/quickstart.py", "tiny_sft_model", with_run_config=True)


def make_rm_model():
  """The RM quickstart's model with its run's config.json: examples/tiny_rm_model, the reward model the
  PPO-with-a-reward-model example uses."""
  keep_quickstart_model("configs/rm_quickstart.py", "tiny_rm_model", with_run_config=True)


def make_steerlm_model():
  """The SteerLM quickstart's model with its run's config.json: examples/tiny_steerlm_model, Q'(y|a,x) of the
  SteerLM 2.0 quickstart."""
  keep_quickstart_model("configs/steerlm_quickstart.py", "tiny_steerlm_model", with_run_config=True)


def make_denoiser():
  """The toy image task's base denoiser (configs/ddpm_tiny.py): examples/tiny_denoiser, DRaFT+'s starting point;
  prints how often its DDIM samples match their prompts."""
  keep_quickstart_model("configs/ddpm_tiny.py", "tiny_denoiser")
  from jalign import diffusion
  params, dcfg = diffusion.load(os.path.join(HERE, "tiny_denoiser"))
  print("tiny_denoiser samples (50 DDIM steps, guidance 7.5):", diffusion.evaluate(params, dcfg, per_class=8)[0])


if __name__ == "__main__":
  only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
  train_qs, eval_qs = make_data() if only != "denoiser" else (None, None)
  if only in (None, "preference"):
    make_preference_data(train_qs, eval_qs)
  if only in (None, "preference", "steerlm"):
    make_steerlm_data(train_qs, eval_qs)
  if only is None:
    make_tokenizer(train_qs)
    make_base_model()
    make_sft_model()
  if only in (None, "rm_model"):
    make_rm_model()
  if only in (None, "steerlm_model"):
    make_steerlm_model()
  if only in (None, "denoiser"):
    make_denoiser()
  print("wrote", DATA, "and", MODEL)
