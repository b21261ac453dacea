"""Knowledge distillation: the top-K KL losses against torch, the top-K files (jalign.distill and NeMo-Aligner's
chunked JSONL), one-line errors, online = offline, and a student closing the NLL gap to its teacher."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from jalign import config as config_lib
from jalign import distill, train
from jalign.algorithms import kd, sft
from jalign.data import DataError

TEACHER = "examples/tiny_sft_model"
N_TRAIN, N_EVAL, STEPS = 384, 48, 60


def kd_cfg(**kw):
  d = dict(kd_loss="fwd_kl", kd_loss_weight=1.0, sft_loss_weight=0.0, logits_scale=1.0, target_logits_scale=1.0)
  d.update(kw)
  return ml_collections.ConfigDict(d)


# ------------------------------------------------------------------------------------------- losses vs torch

def torch_kd(student_logits, teacher_topk, ids, bwd, s, s_t):
  """NeMo-Aligner's formulas, written out in torch: q over the teacher's K logits, p over the student's logits at
  the same ids, both renormalised over the K."""
  student = s * torch.gather(student_logits, -1, ids)
  logp = student - torch.logsumexp(student, -1, keepdim=True)
  logq = s_t * teacher_topk - torch.logsumexp(s_t * teacher_topk, -1, keepdim=True)
  if bwd:
    return (logp.exp() * (logp - logq)).sum(-1)
  return (logq.exp() * (logq - logp)).sum(-1)


def random_inputs(seed, B=3, T=7, V=50, K=6):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (B, T, V)).astype(np.float32)
  ids = np.stack([rng.permutation(V)[:K] for _ in range(B * T)]).reshape(B, T, K).astype(np.int32)
  topk = -np.sort(-rng.normal(0, 3, (B, T, K)), axis=-1).astype(np.float32)  # sorted descending
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  mask = rng.random((B, T - 1)) < 0.6
  return logits, topk, ids, tokens, mask


@pytest.mark.parametrize("loss", ["fwd_kl", "bwd_kl"])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.7, 1.6)])
def test_topk_kl_matches_torch_values_and_gradients(loss, scales):
  s, s_t = scales
  logits, topk, ids, _, _ = random_inputs(1)
  bwd = loss == "bwd_kl"
  f = lambda x: kd.topk_kl(x, jnp.asarray(topk), jnp.asarray(ids), bwd=bwd, logits_scale=s, target_logits_scale=s_t)
  got = np.asarray(f(jnp.asarray(logits)))
  w = np.random.default_rng(2).normal(size=got.shape).astype(np.float32)  # a random cotangent
  g = np.asarray(jax.grad(lambda x: jnp.sum(f(x) * w))(jnp.asarray(logits)))
  x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
  ref = torch_kd(x, torch.tensor(topk, dtype=torch.float64), torch.tensor(ids, dtype=torch.int64), bwd, s, s_t)
  (ref * torch.tensor(w, dtype=torch.float64)).sum().backward()
  np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g, x.grad.numpy(), rtol=1e-4, atol=1e-6)
  assert (got >= -1e-6).all()


def test_kl_is_zero_when_student_matches_teacher():
  logits, _, ids, _, _ = random_inputs(3)
  topk = np.take_along_axis(logits, ids, -1)
  for bwd in (False, True):
    np.testing.assert_allclose(kd.topk_kl(jnp.asarray(logits), jnp.asarray(topk) + 5.0, jnp.asarray(ids), bwd=bwd),
                               0.0, atol=1e-5)


@pytest.mark.parametrize("loss", ["fwd_kl", "bwd_kl"])
def test_total_loss_with_full_vocab_ce_and_mask_matches_torch(loss):
  """loss = masked token mean of kd_w * KL + sft_w * CE over the shifted positions; padding/untrained positions
  (mask 0) change nothing."""
  logits, topk, ids, tokens, mask = random_inputs(4)
  c = kd_cfg(kd_loss=loss, kd_loss_weight=0.6, sft_loss_weight=0.3, logits_scale=1.3, target_logits_scale=0.8)
  kl, ce = kd.kd_token_losses(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(topk), jnp.asarray(ids), c)
  loss_sum, n, m = kd.masked_sums(kl, ce, jnp.asarray(mask), c.kd_loss_weight, c.sft_loss_weight)

  x = torch.tensor(logits, dtype=torch.float64)
  ref_kl = torch_kd(x, torch.tensor(topk, dtype=torch.float64), torch.tensor(ids, dtype=torch.int64),
                    loss == "bwd_kl", 1.3, 0.8)[:, :-1]
  ref_ce = torch.nn.functional.cross_entropy((1.3 * x[:, :-1]).reshape(-1, x.shape[-1]),
                                             torch.tensor(tokens[:, 1:], dtype=torch.int64).reshape(-1),
                                             reduction="none").reshape(mask.shape)
  mt = torch.tensor(mask, dtype=torch.float64)
  ref = ((0.6 * ref_kl + 0.3 * ref_ce) * mt).sum() / mt.sum()
  np.testing.assert_allclose(float(loss_sum / n), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(float(m["kd_loss"] / n), ((ref_kl * mt).sum() / mt.sum()).item(), rtol=1e-5)
  np.testing.assert_allclose(float(m["sft_loss"] / n), ((ref_ce * mt).sum() / mt.sum()).item(), rtol=1e-5)
  # masked-out positions may hold anything
  junk = np.where(np.pad(mask, ((0, 0), (0, 1)))[..., None], topk, 100.0 * np.abs(topk))
  kl2, ce2 = kd.kd_token_losses(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(junk), jnp.asarray(ids), c)
  assert float(kd.masked_sums(kl2, ce2, jnp.asarray(mask), 0.6, 0.3)[0]) == pytest.approx(float(loss_sum), rel=1e-6)


def test_teacher_topk_is_sorted_shifted_and_exact():
  logits = np.random.default_rng(5).normal(size=(2, 3, 40)).astype(np.float32)
  vals, ids, lse = (np.asarray(a) for a in kd.teacher_topk(jnp.asarray(logits), 5))
  t = torch.tensor(logits)
  ref_vals, ref_ids = torch.topk(t - t.amax(-1, keepdim=True), 5)
  np.testing.assert_allclose(vals, ref_vals.numpy(), rtol=1e-6)
  np.testing.assert_array_equal(ids, ref_ids.numpy())
  np.testing.assert_allclose(lse, torch.logsumexp(t - t.amax(-1, keepdim=True), -1).numpy(), rtol=1e-6)


# -------------------------------------------------------------------------------------------------- files

def random_rows(n, K=4, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    L = int(rng.integers(3, 9))
    mask = np.zeros(L, bool)
    mask[L // 2:] = True
    out.append(distill.TopKRow(rng.integers(0, 30, L).astype(np.int32), mask,
                               -np.sort(-rng.normal(size=(L, K)), -1).astype(np.float32),
                               rng.integers(0, 30, (L, K)).astype(np.int32), rng.normal(size=L).astype(np.float32)))
  return out


def test_store_round_trip_over_shards(tmp_path):
  rows = random_rows(5)
  index = distill.write_store(str(tmp_path), rows, {"vocab_size": 30}, rows_per_shard=2, pad_id=7)
  assert [s["rows"] for s in index["shards"]] == [2, 2, 1]
  assert json.load(open(tmp_path / "index.json"))["k"] == 4
  back = [r for _, _, r in distill.read_store(str(tmp_path))]
  assert len(back) == 5
  for a, b in zip(rows, back):
    for f in ("tokens", "loss_mask", "topk_logits", "topk_token_ids", "log_sum_exp_logits"):
      np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  batch, examples = distill.load_topk_rows(str(tmp_path / "index.json"), 3, 10, 7, 30)
  assert batch["topk_logits"].shape == (5, 10, 3) and batch["tokens"][0, len(rows[0].tokens):].tolist() == \
      [7] * (10 - len(rows[0].tokens))
  np.testing.assert_array_equal(batch["topk_token_ids"][1, :len(rows[1].tokens)], rows[1].topk_token_ids[:, :3])
  np.testing.assert_array_equal(examples[2].tokens, rows[2].tokens)


def test_store_errors_name_the_file(tmp_path):
  distill.write_store(str(tmp_path), random_rows(3), {"vocab_size": 30})
  with pytest.raises(DataError, match=r"fewer than kd.k=8"):
    distill.load_topk_rows(str(tmp_path), 8, 10, 0, 30)
  with pytest.raises(DataError, match=r"tokens > data.max_seq_len=4"):
    distill.load_topk_rows(str(tmp_path), 2, 4, 0, 30)
  with pytest.raises(DataError, match=r"vocabulary size 20"):
    distill.load_topk_rows(str(tmp_path), 2, 10, 0, 20)
  np.save(tmp_path / "shard-00000.topk_logits.npy", np.zeros((3, 2), np.float32))
  with pytest.raises(DataError) as e:
    list(distill.read_store(str(tmp_path)))
  assert "shard-00000.topk_logits.npy" in str(e.value) and "'topk_logits'" in str(e.value)
  assert "\n" not in str(e.value)


def to_nemo_items(rows, L, pad_id):
  """NeMo-Aligner's layout: the SFT collated item padded to L (tokens = seq[:-1], labels = seq[1:], loss_mask per
  label) plus the teacher's top-K per token position; padding positions carry arbitrary (sorted) values."""
  items = []
  for i, r in enumerate(rows):
    n, K = len(r.tokens), r.topk_logits.shape[1]
    pad = L - (n - 1)
    items.append({
        "tokens": r.tokens[:-1].tolist() + [pad_id] * pad, "labels": r.tokens[1:].tolist() + [pad_id] * pad,
        "loss_mask": r.loss_mask[1:].astype(int).tolist() + [0] * pad,
        "topk_logits": np.concatenate([r.topk_logits[:-1], np.tile(np.arange(K, 0, -1.0), (pad, 1))]).tolist(),
        "topk_token_ids": np.concatenate([r.topk_token_ids[:-1], np.zeros((pad, K), int)]).tolist(),
        "log_sum_exp_logits": r.log_sum_exp_logits[:-1].tolist() + [0.0] * pad, "index": i,
        "position_ids": list(range(L)), "context_lengths": 3, "answers": [], "metadata": {}})
  return items


# -------------------------------------------------------------------------------- runs on the toy task

def subset(src, dst, n):
  with open(src) as f, open(dst, "w") as g:
    g.writelines(f.readlines()[:n])
  return str(dst)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """The teacher's top-32 on toy subsets, written by the CLI, and the files they came from."""
  d = tmp_path_factory.mktemp("kd")
  out = {"dir": d, "train": subset("examples/data/sft_train.jsonl", d / "train.jsonl", N_TRAIN),
         "eval": subset("examples/data/sft_eval.jsonl", d / "eval.jsonl", N_EVAL)}
  for split in ("train", "eval"):
    rc = distill.main(["topk", "--teacher", TEACHER, "--config", "configs/kd_quickstart.py", "--input",
                       out[split], "--k", "32", "--output", str(d / f"topk_{split}"), "--rows-per-shard", "200"])
    assert rc == 0
    out[f"topk_{split}"] = str(d / f"topk_{split}")
  return out


def make_cfg(toy, **overrides):
  cfg = config_lib.base_config()
  config_lib._merge(cfg, config_lib.load_config_file("configs/kd_quickstart.py"))
  base = {"data.train_path": toy["train"], "data.eval_path": toy["eval"], "kd.topk_path": toy["topk_train"],
          "kd.eval_topk_path": toy["topk_eval"], "train.max_steps": str(STEPS), "train.log_every": "1",
          "eval.every_steps": str(STEPS), "eval.num_samples": "0", "checkpoint.every_steps": str(STEPS),
          "optim.schedule": "constant", "optim.warmup_steps": "10", "seed": "3"}
  config_lib.apply_overrides(cfg, {**base, **overrides})
  config_lib.validate(cfg)
  return cfg


def metrics(wd, key="loss"):
  """The rows of metrics.jsonl that hold ``key`` (train steps: loss; evals: val_loss)."""
  return [m for m in map(json.loads, open(os.path.join(wd, "metrics.jsonl"))) if key in m]


@pytest.fixture(scope="module")
def offline_run(toy):
  wd = str(toy["dir"] / "offline")
  summary = train.run(make_cfg(toy), wd)
  assert summary["reason"] == "done"
  return wd, summary


def test_store_written_by_the_cli(toy):
  index = json.load(open(os.path.join(toy["topk_train"], "index.json")))
  assert index["k"] == 32 and index["num_rows"] == N_TRAIN and len(index["shards"]) == 2
  assert index["data"]["add_bos"] is True and index["input_sha256"] == distill.sha256(toy["train"])
  rows = [r for _, _, r in distill.read_store(toy["topk_eval"])]
  assert len(rows) == N_EVAL
  r = rows[0]
  assert (np.diff(r.topk_logits, axis=-1) <= 0).all() and np.allclose(r.topk_logits[:, 0], 0.0)
  assert (r.log_sum_exp_logits >= 0).all()


def test_nemo_chunked_jsonl_reads_like_the_store(toy, tmp_path):
  rows = [r for _, _, r in distill.read_store(toy["topk_eval"])][:6]
  items = to_nemo_items(rows, L=40, pad_id=0)
  for c, part in enumerate((items[:4], items[4:])):
    with open(tmp_path / f"val_with_logits_{c}.jsonl", "w") as f:
      f.writelines(json.dumps(x) + "\n" for x in part)
  got = [r for _, _, r in distill.read_nemo(str(tmp_path / "val_with_logits_CHUNK_ID.jsonl"))]
  assert len(got) == 6
  for a, b in zip(rows, got):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    for f in ("topk_logits", "topk_token_ids", "log_sum_exp_logits"):  # the last position predicts nothing
      np.testing.assert_array_equal(getattr(a, f)[:-1], getattr(b, f)[:-1])
  # also as the training rows of a run (data.train_path naming the NeMo file itself)
  batch, _ = distill.load_topk_rows(str(tmp_path / "val_with_logits_0.jsonl"), 16, 64, 0, 320)
  assert batch["tokens"].shape == (4, 64) and batch["topk_logits"].shape == (4, 64, 16)


@pytest.mark.parametrize("change, message", [
    (lambda o: o.pop("topk_logits"), "field 'topk_logits': missing"),
    (lambda o: o.update(topk_token_ids=o["topk_token_ids"][:-1]), "field 'topk_token_ids': has shape"),
    (lambda o: o.update(labels=[o["tokens"][1] + 1] + o["labels"][1:]),
     "field 'labels': labels[0] must equal tokens[1]"),
    (lambda o: o.update(topk_logits=[r[::-1] for r in o["topk_logits"]]), "field 'topk_logits': not sorted"),
    (lambda o: o.update(loss_mask="all"), "field 'loss_mask': expected a list"),
    (lambda o: o.update(loss_mask=[0] * len(o["loss_mask"])), "field 'loss_mask': no trainable tokens"),
])
def test_nemo_rows_bad_fields_give_one_line(tmp_path, change, message):
  items = to_nemo_items(random_rows(2), L=10, pad_id=0)
  change(items[1])
  p = tmp_path / "kd.jsonl"
  p.write_text("".join(json.dumps(x) + "\n" for x in items))
  with pytest.raises(DataError) as e:
    list(distill.read_nemo(str(p)))
  assert str(e.value).startswith(f"{p}:2: {message}") and "\n" not in str(e.value)


def test_cli_and_train_errors_are_one_line(toy, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(open(toy["eval"]).readline() + '{"system": "", "conversations": 3}\n')
  assert distill.main(["topk", "--teacher", TEACHER, "--input", str(bad), "--output", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jalign.distill: error: ") and f"{bad}:2: field 'conversations'" in err and "\n" not in err
  assert distill.main(["topk", "--teacher", str(tmp_path / "nope"), "--input", toy["eval"], "--output", "o"]) == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1
  with pytest.raises(SystemExit) as e:
    distill.main(["topk", "--input", toy["eval"]])
  assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
  # training on a bad NeMo file, and on a store computed from another file
  nemo = tmp_path / "kd.jsonl"
  nemo.write_text(json.dumps({"tokens": [1, 2]}) + "\n")
  args = ["--config", "configs/kd_quickstart.py", "--workdir", str(tmp_path / "w")]
  assert train.main(args + [f"--config.kd.topk_path={nemo}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"jalign: error: {nemo}:1: field 'labels': missing"
  mismatched = [f"--config.data.train_path={toy['eval']}", f"--config.kd.topk_path={toy['topk_train']}"]
  assert train.main(args + mismatched) == 2
  assert "computed from a different file" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ({"kd.kd_loss": "kl"}, "kd.kd_loss='kl'"), ({"kd.mode": "online"}, "needs kd.teacher_checkpoint"),
    ({"kd.kd_loss_weight": "0"}, "cannot both be 0"), ({"kd.teacher_checkpoint": TEACHER}, "for kd.mode=online")])
def test_config_errors(override, message):
  cfg = config_lib.base_config()
  config_lib._merge(cfg, config_lib.load_config_file("configs/kd_quickstart.py"))
  config_lib.apply_overrides(cfg, override)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg)


def teacher_nll(rows):
  """The teacher's token-mean NLL of the trained tokens of ``rows``."""
  import jalign
  m = jalign.load(TEACHER)
  batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
  nll, n, _ = sft.loss_fn(m.params, batch, m.config)
  return float(nll / n)


def test_student_closes_half_the_nll_gap(toy, offline_run):
  """A 2-layer, hidden-64 student (the teacher: 4 layers, hidden 128) trained 60 steps on the teacher's top-32
  closes at least half of the held-out NLL gap between its untrained self and the teacher."""
  wd, summary = offline_run
  before = summary["initial_eval"]["val_sft_loss"]
  after = metrics(wd, "val_loss")[-1]["val_sft_loss"]
  eval_rows, _ = distill.load_topk_rows(toy["topk_eval"], 32, 32, 0, 320)
  teacher = teacher_nll(eval_rows)
  print(f"held-out NLL: student {before:.3f} -> {after:.3f}, teacher {teacher:.3f}")
  assert teacher < after < before
  assert (before - after) >= 0.5 * (before - teacher)
  logged = metrics(wd)[0]
  assert {"loss", "kd_loss", "sft_loss"} <= set(logged)
  assert logged["loss"] == pytest.approx(logged["kd_loss"], rel=1e-5)  # sft_loss_weight=0
  model_params = os.listdir(os.path.join(wd, "model", "params"))
  assert "embed" in model_params and not any(p.startswith("teacher") for p in model_params)


def test_online_teacher_gives_the_offline_losses(toy, offline_run):
  """kd.mode=online (the teacher's forward in the step, no files) logs the losses of the offline run over the same
  rows, seed and schedule."""
  wd = str(toy["dir"] / "online")
  cfg = make_cfg(toy, **{"kd.mode": "online", "kd.teacher_checkpoint": TEACHER, "kd.topk_path": "",
                         "kd.eval_topk_path": "", "train.max_steps": "3", "eval.every_steps": "0"})
  summary = train.run(cfg, wd)
  assert summary["reason"] == "done"
  assert "teacher" in summary["state"]["frozen"] and "teacher" not in summary["state"]["params"]
  online, offline = metrics(wd), metrics(offline_run[0])[:3]
  for a, b in zip(online, offline):
    for k in ("loss", "kd_loss", "sft_loss"):
      assert a[k] == pytest.approx(b[k], rel=2e-4, abs=1e-5), (a["step"], k)
  assert not any(p.startswith("teacher") for p in os.listdir(os.path.join(wd, "model", "params")))
