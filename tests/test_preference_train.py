"""End-to-end reward models, DPO and KTO on the embedded toy task: does it align, do the reference options agree,
does one DPO step match TRL's DPO computed in torch on the same weights and batch, and does scoring agree with
training's evaluation."""
import json
import os

import numpy as np
import pytest

from jalign import config as config_lib
from jalign import score, train
from jalign.algorithms import reference

SFT_MODEL = "examples/tiny_sft_model"


def make_cfg(path, **over):
  cfg = config_lib.load_config_file(path)
  merged = config_lib.base_config()
  config_lib._merge(merged, cfg)
  config_lib.apply_overrides(merged, {k: str(v) for k, v in over.items()})
  config_lib.validate(merged)
  return merged


def metrics(workdir):
  rows = [json.loads(ln) for ln in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = {r["step"]: r for r in rows if "loss" in r}
  evals = {r["step"]: r for r in rows if "val_loss" in r}
  return train_rows, evals


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("dpo"))
  summary = train.run(make_cfg("configs/dpo_quickstart.py", **{"eval.num_samples": 0}), wd)
  assert summary["reason"] == "done"
  return wd


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("rm"))
  summary = train.run(make_cfg("configs/rm_quickstart.py"), wd)
  assert summary["reason"] == "done"
  return wd


def test_dpo_aligns_on_held_out_pairs(dpo_run):
  tr, ev = metrics(dpo_run)
  first, last = ev[min(ev)], ev[max(ev)]
  # step 0: policy == reference, every implicit reward is 0 (ties: chance)
  assert first["val_acc"] == 0.0 and first["val_rewards_all_std"] == 0.0
  assert abs(first["val_loss"] - np.log(2)) < 1e-6
  assert last["val_acc"] >= 0.9, last
  assert last["val_rewards_chosen_mean"] > last["val_rewards_rejected_mean"]
  for key in ("loss", "sft_loss", "preference_loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean",
              "rewards_all_mean", "rewards_all_std", "grad_norm", "lr", "step_time", "consumed_samples"):
    assert key in tr[1], key


def test_score_implicit_reward_reproduces_val_acc(dpo_run, tmp_path, capsys):
  """The RewardBench-format toy file holds the DPO eval pairs (same order): scoring the policy by its implicit
  reward against the SFT model must give exactly the trainer's held-out accuracy."""
  report = tmp_path / "report.json"
  rc = score.main(["--checkpoint", dpo_run, "--reference", SFT_MODEL, "--input",
                   "examples/data/rewardbench_toy.jsonl", "--rewardbench", "--output", str(tmp_path / "o.jsonl"),
                   "--report", str(report)])
  assert rc == 0
  rep = json.load(open(report))
  _, ev = metrics(dpo_run)
  assert rep["accuracy"] == pytest.approx(ev[max(ev)]["val_acc"], abs=1e-9)
  assert set(rep["subsets"]) == {"toy-add", "toy-reverse"}
  assert "toy-add" in capsys.readouterr().out


def test_reward_model_aligns_and_scores(rm_run, tmp_path):
  _, ev = metrics(rm_run)
  assert ev[max(ev)]["val_acc"] >= 0.9, ev[max(ev)]
  out = tmp_path / "scored.jsonl"
  assert score.main(["--checkpoint", rm_run, "--input", "examples/data/rm_eval.jsonl", "--output", str(out),
                     "--batch-size", "32"]) == 0
  r = np.array([json.loads(ln)["reward"] for ln in open(out)])
  acc = np.mean(r[0::2] > r[1::2])  # alternating chosen / rejected lines
  assert acc == pytest.approx(ev[max(ev)]["val_acc"], abs=1e-9)
  # standardisation at inference: (r - mean) / std
  out2 = tmp_path / "std.jsonl"
  assert score.main(["--checkpoint", rm_run, "--input", "examples/data/rm_eval.jsonl", "--output", str(out2),
                     "--reward-mean", "1.5", "--reward-std", "2"]) == 0
  r2 = np.array([json.loads(ln)["reward"] for ln in open(out2)])
  np.testing.assert_allclose(r2, (r - 1.5) / 2, rtol=1e-5, atol=1e-6)


def test_score_errors(rm_run, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n')
  assert score.main(["--checkpoint", rm_run, "--input", str(bad), "--rewardbench"]) == 2
  assert "bad.jsonl:1: field 'subset'" in capsys.readouterr().err
  assert score.main(["--checkpoint", SFT_MODEL, "--input", str(bad)]) == 2
  assert "no reward (value) head" in capsys.readouterr().err


LORA = {"model.lora.rank": 4, "model.lora.targets": "q,v,o", "train.max_steps": 3, "eval.every_steps": 0,
        "eval.num_samples": 0, "optim.lr": 2e-3, "optim.warmup_steps": 0, "train.global_batch_size": 8,
        "checkpoint.every_steps": 3, "data.eval_path": ""}


def test_reference_modes_agree(tmp_path):
  """A frozen copy, the LoRA-off view and the precomputed cache are the same reference: same losses."""
  losses = {}
  for mode in ("copy", "lora_off", "precomputed"):
    wd = str(tmp_path / mode)
    train.run(make_cfg("configs/dpo_quickstart.py", reference=mode, **LORA), wd)
    tr, _ = metrics(wd)
    losses[mode] = [tr[s]["loss"] for s in sorted(tr)]
  assert losses["copy"][0] == pytest.approx(np.log(2), abs=1e-6)
  assert losses["copy"][-1] < losses["copy"][0] - 1e-3  # it trains
  np.testing.assert_allclose(losses["lora_off"], losses["copy"], rtol=1e-5)
  np.testing.assert_allclose(losses["precomputed"], losses["copy"], rtol=1e-5)
  assert os.path.exists(tmp_path / "precomputed" / "reference_logps.npz")


def test_reference_cache_reused_only_for_same_data(tmp_path):
  calls = []

  def compute(rows):
    calls.append(1)
    return np.full((len(rows["tokens"]), 2), float(len(calls)), np.float32)

  rows = {k: np.zeros((3, 2, 4), np.int32) for k in ("tokens", "loss_mask", "segment_ids")}
  path = str(tmp_path / "ref.npz")
  a = reference.reference_cache(path, {"train": rows}, "m", True, compute)["train"]
  b = reference.reference_cache(path, {"train": rows}, "m", True, compute)["train"]
  assert len(calls) == 1 and (a == b).all()
  reference.reference_cache(path, {"train": rows}, "other-model", True, compute)
  rows2 = dict(rows, tokens=np.ones((3, 2, 4), np.int32))
  reference.reference_cache(path, {"train": rows2}, "other-model", True, compute)
  assert len(calls) == 3


def test_dpo_step_matches_trl(dpo_run, tmp_path):
  """One step at lr=0 with a trained policy and the SFT model as reference logs TRL's DPO loss (TRL's
  DPOTrainer.compute_loss in torch on the same weights, converted with jalign-to-hf, and the same token ids)."""
  torch = pytest.importorskip("torch")
  import datasets
  import transformers
  from tokenizers import Tokenizer, models, pre_tokenizers
  from trl import DPOConfig, DPOTrainer

  from jalign.convert import jalign_to_hf
  from jalign.data import load_tokenizer, preference

  n = 8
  small = tmp_path / "pairs.jsonl"
  small.write_text("".join(open("examples/data/dpo_eval.jsonl").readlines()[:n]))
  wd = str(tmp_path / "jalign")
  cfg = make_cfg("configs/dpo_quickstart.py", **{
      "model.checkpoint": os.path.join(dpo_run, "model"), "model.reference_checkpoint": SFT_MODEL,
      "reference": "copy", "optim.lr": 0.0, "optim.min_lr": 0.0, "optim.warmup_steps": 0, "train.max_steps": 1,
      "train.global_batch_size": n, "data.train_path": str(small), "data.eval_path": "", "data.shuffle": False,
      "eval.every_steps": 0, "eval.num_samples": 0})
  train.run(cfg, wd)
  tr, _ = metrics(wd)
  ours = tr[1]

  tok = load_tokenizer(os.path.join(SFT_MODEL, "tokenizer.model"))
  pairs, _ = preference.load_pairs(str(small), tok, cfg.data)
  words = lambda ids: " ".join(f"<{int(i)}>" for i in ids)  # "<i>" is never a substring of another token
  rows = {"prompt": [], "chosen": [], "rejected": []}
  for p in pairs:
    start = int(np.argmax(p.chosen.loss_mask))
    assert (p.chosen.tokens[:start] == p.rejected.tokens[:start]).all()
    rows["prompt"].append(words(p.chosen.tokens[:start]))
    rows["chosen"].append(" " + words(p.chosen.tokens[start:]))
    rows["rejected"].append(" " + words(p.rejected.tokens[start:]))
  end = f"<{tok.token_to_id('<extra_id_1>')}>"
  vocab = {f"<{i}>": i for i in range(tok.vocab_size)}
  wl = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
  wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wl, pad_token=f"<{tok.pad_id}>", eos_token=end)

  policy = transformers.AutoModelForCausalLM.from_pretrained(
      jalign_to_hf(os.path.join(dpo_run, "model"), str(tmp_path / "hf_policy")), torch_dtype=torch.float32)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      jalign_to_hf(SFT_MODEL, str(tmp_path / "hf_ref")), torch_dtype=torch.float32)
  args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=cfg.dpo.beta, loss_type=["sigmoid"], learning_rate=0.0,
                   per_device_train_batch_size=n, max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                   bf16=False, gradient_checkpointing=False, max_length=None, dataloader_num_workers=0,
                   disable_tqdm=True)
  trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_dict(rows),
                       processing_class=hf_tok)
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
  for i, p in enumerate(pairs):  # TRL saw exactly our token ids
    got = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
    assert got == p.chosen.tokens.tolist()
  with torch.no_grad():
    trl_loss = float(trainer.compute_loss(trainer.model, batch))
  assert ours["loss"] == pytest.approx(trl_loss, rel=1e-4)
  assert ours["loss"] < np.log(2) - 0.05  # a trained policy vs its reference: not the trivial log 2


def test_kto_trains_with_nemo_metrics(tmp_path):
  wd = str(tmp_path / "kto")
  train.run(make_cfg("configs/kto_quickstart.py", **{"train.max_steps": 25, "eval.every_steps": 25,
                                                      "eval.num_samples": 0}), wd)
  tr, ev = metrics(wd)
  for key in ("loss", "kl", "rewards_chosen_mean", "rewards_rejected_mean", "rewards_all_mean",
              "rewards_all_std", "rewards_margin"):
    assert key in tr[1] and np.isfinite(tr[1][key]), key
  assert tr[1]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) at the start
  assert ev[25]["val_rewards_margin"] > 1.0  # desirable responses gained on undesirable ones


def test_rm_regression_and_helpsteer_variants(tmp_path):
  wd = str(tmp_path / "reg")
  train.run(make_cfg("configs/rm_regression.py", **{"train.max_steps": 30, "eval.every_steps": 30,
                                                     "train.global_batch_size": 16, "optim.lr": 5e-4,
                                                     "optim.min_lr": 5e-5}), wd)
  _, ev = metrics(wd)
  assert ev[0]["val_loss"] > 2 * ev[30]["val_loss"]  # masked MSE falls (a fitted bias alone does that)
  # ... and the head ranks held-out rows: a bias-only predictor has no correlation with the labels. In this short
  # run only verbosity (response length) is learned; helpfulness/correctness are not yet ranked (r ~ 0).
  scored = tmp_path / "reg_scored.jsonl"
  assert score.main(["--checkpoint", wd, "--input", "examples/data/rm_regression_eval.jsonl", "--output",
                     str(scored), "--batch-size", "200"]) == 0
  out = [json.loads(ln) for ln in open(scored)]
  pred, labels = np.array([r["reward"] for r in out]), np.array([r["label"] for r in out])
  verbosity = 8
  assert np.std(pred[:, verbosity]) > 0.1
  assert np.corrcoef(pred[:, verbosity], labels[:, verbosity])[0, 1] > 0.6
  # HelpSteer2-Preference pairs from the regression file: strength -2 (first better) or 2 (second better)
  rows = [json.loads(ln) for ln in open("examples/data/rm_regression_eval.jsonl")][:64]
  pair_rows = []
  for a, b in zip(rows[::2], rows[1::2]):
    sa, sb = a["label"][5], b["label"][5]
    strength = -2 if sa > sb else 2
    pair_rows += [{"text": a["text"], "label": [strength] + [-100] * 8}, {"text": b["text"], "label": [-100] * 9}]
  path = tmp_path / "helpsteer.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows))
  wd = str(tmp_path / "scaled_bt")  # the variants' formulas are checked in test_rm_losses
  train.run(make_cfg("configs/rm_regression.py", **{
      "rm.loss": "scaled_bt", "data.train_path": str(path), "data.eval_path": "", "train.max_steps": 2,
      "eval.every_steps": 0}), wd)
  tr, _ = metrics(wd)
  assert np.isfinite(tr[2]["loss"]) and "acc" in tr[2]


def test_reward_model_exports_to_hf_sequence_classification(rm_run, tmp_path):
  """jalign-to-hf writes the reward head as LlamaForSequenceClassification's score: same rewards."""
  torch = pytest.importorskip("torch")
  import transformers

  from jalign.convert import jalign_to_hf
  from jalign.data import load_tokenizer
  out = tmp_path / "scored.jsonl"
  assert score.main(["--checkpoint", rm_run, "--input", "examples/data/rm_eval.jsonl", "--output", str(out)]) == 0
  rows = [json.loads(ln) for ln in open(out)][:4]
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      jalign_to_hf(os.path.join(rm_run, "model"), str(tmp_path / "hf")), dtype=torch.float32)
  assert type(model).__name__ == "LlamaForSequenceClassification"
  tok = load_tokenizer(os.path.join(rm_run, "model"))
  for r in rows:
    with torch.no_grad():
      got = model(torch.tensor([[tok.bos_id] + tok.encode(r["text"])])).logits[0, 0].item()
    assert got == pytest.approx(r["reward"], abs=1e-4)
