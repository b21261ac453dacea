"""Packed and shared-prompt layouts for pairs (DPO family, reward models, KTO): the same log-probs, losses,
gradients and metrics as the padded [B, 2, T] layout on the same pairs; NeMo-Aligner's packed DPO .npy files;
end-to-end runs through ``python -m jalign.train``."""
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import config as config_lib
from jalign import train
from jalign.algorithms import common, dpo, kto, rm
from jalign.data import DataError, Example, load_tokenizer, preference
from jalign.models import ModelConfig, init_params

T = 16  # data.max_seq_len: packed and shared-prompt rows hold 2T tokens
MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64)
# (prompt, chosen response, rejected response) lengths: no prompt, equal lengths, long and short, and a pair
# whose responses start with the same tokens (the shared prefix stops at the first trained token)
SHAPES = [(4, 5, 3), (0, 6, 4), (7, 2, 5), (3, 9, 9), (5, 1, 1), (2, 3, 6), (6, 6, 2), (1, 7, 3)]
SAME_START = 5  # the pair whose responses begin alike


def make_pairs(seed=0):
  rng = np.random.RandomState(seed)
  pairs = []
  for i, (p, c, r) in enumerate(SHAPES):
    prompt, chosen, rejected = rng.randint(1, 64, p), rng.randint(1, 64, c), rng.randint(1, 64, r)
    if i == SAME_START:
      rejected[:2] = chosen[:2]
    ex = lambda resp: Example(np.concatenate([prompt, resp]).astype(np.int32), np.arange(p + len(resp)) >= p)
    pairs.append((ex(chosen), ex(rejected)))
  return pairs


PAIRS = make_pairs()
RNG = np.random.RandomState(1)
REWARDS = {"chosen_reward": RNG.randint(0, 5, len(PAIRS)).astype(np.float32),
           "rejected_reward": RNG.randint(0, 5, len(PAIRS)).astype(np.float32)}
LAYOUTS = {"packed": dict(packing=True), "shared": dict(shared_prompt=True),
           "shared_packed": dict(packing=True, shared_prompt=True)}


def data_cfg(**kw):
  c = config_lib.base_config().data
  c.update({"max_seq_len": T, **kw})
  return c


def with_empty_row(rows):
  """One more row holding no pair (as the eval batches' filler rows)."""
  return {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in rows.items()}


def layout_rows(seqs, values, layout):
  if layout == "padded":
    return preference.pair_rows(seqs, values, data_cfg(), 0)
  return with_empty_row(preference.pair_rows(seqs, values, data_cfg(**LAYOUTS[layout]), 0))


def perturbed(params, seed, scale=0.05):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: x + scale * rng.randn(*x.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def params():
  return init_params(MODEL, jax.random.PRNGKey(0))


def value_and_grads(loss_fns):
  """One jitted function: (params, frozen, rows) -> per loss function, ((loss_sum, weight, metric sums), the
  gradient of loss_sum w.r.t. params)."""
  def one(fn, params, frozen, batch):
    f = lambda p: (lambda out: (out[0], out[1:]))(fn({**frozen, **p}, batch, None))
    (loss, (w, m)), g = jax.value_and_grad(f, has_aux=True)(params)
    return {"loss_sum": loss, "weight": w, **m}, g
  return jax.jit(lambda params, frozen, rows: [one(fn, params, frozen, rows) for fn in loss_fns])


def assert_same(got, want):
  """Equal loss sums, weights and metric sums, and gradients within 1e-5 of the largest (max abs diff)."""
  for (vals, grads), (want_vals, want_grads) in zip(got, want, strict=True):
    assert set(vals) == set(want_vals)
    for k in want_vals:
      np.testing.assert_allclose(float(vals[k]), float(want_vals[k]), rtol=1e-5, atol=1e-5, err_msg=k)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want_grads))
    assert scale > 1e-3 and diff <= 1e-5 * max(scale, 1.0), (diff, scale)


# ------------------------------------------------------------------------------------------ row layouts

def test_pack_pairs_layout():
  rows = preference.pack_pairs(PAIRS, 2 * T, 0)
  idx = rows["pair_index"]
  assert sorted(idx[idx >= 0].tolist()) == list(range(len(PAIRS)))  # nothing dropped, nothing twice
  assert (rows["segment_ids"].max(1) <= 2 * idx.shape[1]).all()
  r, k = np.argwhere(idx == 1)[0]  # pair 1 has no prompt: chosen is segment 2k+1 from position 0
  seg = rows["segment_ids"][r] == 2 * k + 1
  np.testing.assert_array_equal(rows["tokens"][r][seg], PAIRS[1][0].tokens)
  np.testing.assert_array_equal(rows["positions"][r][seg], np.arange(len(PAIRS[1][0].tokens)))
  np.testing.assert_array_equal(preference.pack_pairs(PAIRS, 2 * T, 0)["tokens"], rows["tokens"])  # deterministic
  assert preference.pack_pairs(PAIRS, 2 * T, 0, max_pairs=2)["pair_index"].shape[1] == 2
  # shared prompt: [prompt[:-1] (branch 0), prompt[-1] + chosen (1), prompt[-1] + rejected (2)]
  sh = preference.pack_pairs(PAIRS[:1], 2 * T, 0, shared_prompt=True, max_pairs=1)
  (c, rj), n = PAIRS[0], 3 + 6 + 4  # prompt 4, chosen 5, rejected 3
  np.testing.assert_array_equal(sh["tokens"][0, :n], np.concatenate([c.tokens[:3], c.tokens[3:], rj.tokens[3:]]))
  np.testing.assert_array_equal(sh["branch_ids"][0, :n], [0] * 3 + [1] * 6 + [2] * 4)
  np.testing.assert_array_equal(sh["positions"][0, :n], [0, 1, 2, *range(3, 9), *range(3, 7)])
  assert not sh["loss_mask"][0, :3].any() and (sh["segment_ids"][0, :n] == 1).all()
  assert preference.shared_prefix(PAIRS[SAME_START]) == SHAPES[SAME_START][0]
  assert preference.shared_prefix(PAIRS[SAME_START], share_trained=True) == SHAPES[SAME_START][0] + 2
  with pytest.raises(ValueError, match="row_len=8"):
    preference.pack_pairs(PAIRS, 8, 0)


def test_sequence_logps_equal_separate_forwards(params):
  """Each padded row is one sequence's own forward; packed and shared-prompt rows must give the same sums."""
  logps = jax.jit(lambda p, b: common.pair_logps(p, b, MODEL))
  want, want_n = (np.asarray(x) for x in logps(params, preference.stack_pairs(PAIRS, T, 0)))
  for shared in (False, True):
    for max_pairs in (0, 1):
      rows = preference.pack_pairs(PAIRS, 2 * T, 0, shared_prompt=shared, max_pairs=max_pairs)
      idx = rows.pop("pair_index")
      got, n = (np.asarray(x) for x in logps(params, {**rows, "pair_valid": idx >= 0}))
      used = idx >= 0
      np.testing.assert_allclose(got[used], want[idx[used]], rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(n[used], want_n[idx[used]])


def test_reference_logps_shared_prompt_with_lora():
  """Policy and reference (copy, lora_off, precomputed) in the shared-prompt layout equal the padded layout's."""
  cfg = ModelConfig(**{**MODEL.__dict__, "lora_rank": 4, "lora_targets": ("q", "v", "o")})
  p = init_params(cfg, jax.random.PRNGKey(0))
  p["lora"] = perturbed(p["lora"], 3, 0.3)  # adapters on: policy != base
  p["reference"] = perturbed({k: v for k, v in p.items() if k != "lora"}, 4)
  padded, shared = (layout_rows(PAIRS, REWARDS, layout) for layout in ("padded", "shared"))
  fn = jax.jit(lambda b: [common.pair_logps(common.policy_params(p), b, cfg)[0]]
                + [common.reference_logps(p, b, cfg, mode) for mode in ("copy", "lora_off")])
  want, got = fn(padded), fn(shared)
  for w, g in zip(want, got):  # policy, copy, lora_off
    np.testing.assert_allclose(np.asarray(g)[:-1, 0], w, rtol=1e-5, atol=1e-5)  # one pair a row, an empty row
  assert np.abs(np.asarray(want[0]) - want[1]).max() > 1e-2 and np.abs(np.asarray(want[1]) - want[2]).max() > 1e-2
  pre = {**shared, "ref_logps": np.asarray(got[2])}
  np.testing.assert_array_equal(common.reference_logps(p, pre, cfg, "precomputed"), pre["ref_logps"])


# ------------------------------------------------------------------------------------------ losses

def dpo_cfg(loss, average):
  c = config_lib.base_config()
  c.algorithm, c.reference = "dpo", "copy"
  c.dpo.update(loss=loss, preference_average_log_probs=average, sft_loss_weight=0.3)
  return c


DPO_LOSSES = [("dpo", False), ("dpo", True), ("ipo", True), ("rpo_sq", False)]


@functools.cache
def dpo_step():
  return value_and_grads([dpo.make_loss(dpo_cfg(*c), MODEL) for c in DPO_LOSSES])


def test_dpo_losses_grads_metrics_equal_padded(params):
  """dpo and ipo, summed and token-averaged log-probs, and rpo_sq (per-pair rewards): packed and shared-prompt
  rows give the padded layout's losses, metrics and gradients."""
  frozen = {"reference": perturbed(params, 5)}
  want = dpo_step()(params, frozen, layout_rows(PAIRS, REWARDS, "padded"))
  assert float(want[0][0]["weight"]) == len(PAIRS)
  for layout in ("packed", "shared_packed"):
    assert_same(dpo_step()(params, frozen, layout_rows(PAIRS, REWARDS, layout)), want)


def test_kto_losses_grads_metrics_equal_padded(params):
  c = config_lib.base_config()
  c.algorithm, c.reference = "kto", "copy"
  frozen = {"reference": perturbed(params, 6)}
  step = value_and_grads([kto.make_loss(c, MODEL)])
  prompts = [chosen.tokens[:n] for (chosen, _), (n, _, _) in zip(PAIRS, SHAPES)]
  replies = [chosen.tokens[n:] for (chosen, _), (n, _, _) in zip(PAIRS, SHAPES)]
  ex = lambda p, r: Example(np.concatenate([p, r]), np.arange(len(p) + len(r)) >= len(p))
  # (sample, KL sample): prompt i with reply i, and with reply i+1 (NeMo-Aligner's mismatched pairs)
  seqs = [(ex(p, replies[i]), ex(p, replies[(i + 1) % len(prompts)])) for i, p in enumerate(prompts)]
  values = {"desirable": np.arange(len(seqs)) % 3 > 0}
  want = step(params, frozen, layout_rows(seqs, values, "padded"))
  assert_same(step(params, frozen, layout_rows(seqs, values, "shared_packed")), want)


def test_response_window_gives_the_full_rows_losses(params):
  """The LM head only over the window of trained tokens (padded pairs) gives the full rows' DPO and KTO losses,
  metrics and gradients; the window is the widest trained span of the data, and a narrower one would differ."""
  rows = layout_rows(PAIRS, REWARDS, "padded")
  spans = [len(e.tokens) - n for (n, _, _), pair in zip(SHAPES, PAIRS) for e in pair]  # responses: contiguous
  assert common.response_window(rows, None, multiple=1) == max(spans) == 9
  assert common.response_window(rows, multiple=4) == 12 and common.response_window(rows) == 0  # 16 >= T - 1
  cut = {**rows, "loss_mask": rows["loss_mask"].copy()}
  cut["loss_mask"][..., 8:] = False  # trained tokens within positions 0..7: the span shrinks
  assert common.response_window(cut, multiple=1) < 9
  frozen = {"reference": perturbed(params, 5)}
  cfgs = [dpo_cfg(*c) for c in DPO_LOSSES[:2]]
  c = config_lib.base_config()
  c.algorithm, c.reference = "kto", "copy"
  want = value_and_grads([dpo.make_loss(k, MODEL) for k in cfgs] + [kto.make_loss(c, MODEL)])(
      params, frozen, {**rows, "desirable": np.arange(len(PAIRS)) % 3 > 0})
  for window, check in ((9, True), (6, False)):
    got = value_and_grads([dpo.make_loss(k, MODEL, window=window) for k in cfgs]
                          + [kto.make_loss(c, MODEL, window=window)])(
        params, frozen, {**rows, "desirable": np.arange(len(PAIRS)) % 3 > 0})
    if check:
      assert_same(got, want)
    else:  # a window narrower than a response drops its tail: the test can tell
      assert abs(float(got[0][0]["loss_sum"]) - float(want[0][0]["loss_sum"])) > 1e-3


def rm_setup(params, heads):
  cfg = ModelConfig(**{**MODEL.__dict__, "num_value_heads": heads})
  p = {**params, "value_head": perturbed(init_params(cfg, jax.random.PRNGKey(0))["value_head"], 7, 0.3)}
  return cfg, {k: v for k, v in p.items() if k != "lm_head"}, {"lm_head": p["lm_head"]}


def test_bradley_terry_rm_equal_padded(params):
  cfg, p, frozen = rm_setup(params, 1)
  c = config_lib.base_config()
  c.algorithm = "rm"
  c.rm.center_coef = 0.01
  step = value_and_grads([rm.make_loss(c, cfg)])
  values = {"margin": RNG.rand(len(PAIRS)).astype(np.float32)}
  want = step(p, frozen, layout_rows(PAIRS, values, "padded"))
  assert_same(step(p, frozen, layout_rows(PAIRS, values, "shared_packed")), want)


def test_regression_rm_packed_equal_padded(params):
  cfg, p, frozen = rm_setup(params, 3)
  c = config_lib.base_config()
  c.algorithm, c.rm.loss, c.rm.num_attributes = "rm", "regression", 3
  step = value_and_grads([rm.make_loss(c, cfg)])
  seqs = [(e,) for pair in PAIRS for e in pair]
  labels = RNG.randint(0, 5, (len(seqs), 3)).astype(np.float32)
  labels[::3, 1] = rm.MISSING
  rows = preference.pair_rows(seqs, {"labels": labels}, data_cfg(packing=True), 0)
  assert rows["tokens"].shape[1] == T and rows["pair_valid"].shape[1] > 1
  want = step(p, frozen, preference.pair_rows(seqs, {"labels": labels}, data_cfg(), 0))
  assert_same(step(p, frozen, with_empty_row(rows)), want)


# ------------------------------------------------------------------------------------------ NeMo-Aligner .npy

def write_nemo_packed(path, pairs, chosen_reward, rejected_reward, per_row):
  """NeMo-Aligner's packed DPO file, written from its description (prepare_packed_dpo_dataset.py): one dict per
  packed row; the chosen and rejected token ids of each pair back to back in ``input_ids``; ``labels`` the same
  ids, unshifted, with -100 on prompt tokens; ``reward`` and ``lengths`` one value per sequence;
  ``seq_boundaries`` 0 then the end of every sequence."""
  rows = []
  for s in range(0, len(pairs), per_row):
    row = {"input_ids": [], "labels": [], "reward": [], "lengths": [], "seq_boundaries": [0]}
    for i in range(s, min(s + per_row, len(pairs))):
      for ex, reward in zip(pairs[i], (chosen_reward[i], rejected_reward[i])):
        ids = [int(t) for t in ex.tokens]
        row["input_ids"] += ids
        row["labels"] += [t if m else -100 for t, m in zip(ids, ex.loss_mask)]
        row["reward"].append(float(reward))
        row["lengths"].append(len(ids))
        row["seq_boundaries"].append(len(row["input_ids"]))
    rows.append(row)
  np.save(path, np.array(rows, dtype=object), allow_pickle=True)
  return rows


TOY_TOK = types.SimpleNamespace(vocab_size=64, pad_id=0)


def test_nemo_packed_file_losses_equal_padded(params, tmp_path):
  path = str(tmp_path / "packed_64_seed1234.npy")
  write_nemo_packed(path, PAIRS, REWARDS["chosen_reward"], REWARDS["rejected_reward"], per_row=3)
  pairs, skipped = preference.load_pairs(path, TOY_TOK, data_cfg())
  assert skipped == 0 and len(pairs) == len(PAIRS)
  for got, want in zip(pairs, PAIRS):
    for g, w in zip((got.chosen, got.rejected), want):
      np.testing.assert_array_equal(g.tokens, w.tokens)
      np.testing.assert_array_equal(g.loss_mask, w.loss_mask)
  np.testing.assert_array_equal([p.rejected_reward for p in pairs], REWARDS["rejected_reward"])
  cfg = dpo_cfg("rpo_sq", False)
  cfg.data.update(max_seq_len=T, packing=True)
  rows, n, _, _ = dpo.load_data(path, TOY_TOK, cfg)
  assert n == len(PAIRS) and rows["tokens"].shape[1] == 2 * T
  frozen = {"reference": perturbed(params, 5)}
  assert_same(dpo_step()(params, frozen, with_empty_row(rows)),
              dpo_step()(params, frozen, layout_rows(PAIRS, REWARDS, "padded")))


def test_nemo_packed_file_errors(tmp_path):
  good = write_nemo_packed(str(tmp_path / "ok.npy"), PAIRS[:4], np.ones(4), np.zeros(4), per_row=2)

  def error(rows):
    path = str(tmp_path / "bad.npy")
    np.save(path, np.array(rows, dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as e:
      preference.load_pairs(path, TOY_TOK, data_cfg())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path)
    return msg[len(path):]

  drop = lambda row, key: {k: v for k, v in row.items() if k != key}
  assert error([good[0], drop(good[1], "reward")]) == ":row 1: field 'reward': missing"
  assert error([{**good[0], "lengths": good[0]["lengths"][::-1]}]).startswith(":row 0: field 'lengths': ")
  assert error([{**good[0], "seq_boundaries": good[0]["seq_boundaries"][:-1]}]).startswith(
      ":row 0: field 'seq_boundaries': ")
  assert error([{**good[0], "labels": good[0]["labels"][:-1]}]).startswith(":row 0: field 'labels': ")
  assert error([{**good[0], "reward": good[0]["reward"][:2]}]).startswith(":row 0: field 'reward': ")
  bad_label = list(good[0]["labels"])
  bad_label[-1] += 1
  assert "is neither -100 nor input_ids" in error([{**good[0], "labels": bad_label}])
  assert error([good[0], "text"]).startswith(":row 1: expected a dict")
  assert error([{**good[0], "input_ids": [70] * len(good[0]["input_ids"])}]).startswith(
      ":row 0: field 'input_ids': token id 70")
  with pytest.raises(DataError, match=r"ok.npy:row 0 pair 0: 9 tokens > data.max_seq_len=8"):
    preference.load_pairs(str(tmp_path / "ok.npy"), TOY_TOK, data_cfg(max_seq_len=8))
  (tmp_path / "junk.npy").write_text("not numpy")
  with pytest.raises(DataError, match="junk.npy: not a NeMo-Aligner packed DPO file"):
    preference.load_pairs(str(tmp_path / "junk.npy"), TOY_TOK, data_cfg())


# ------------------------------------------------------------------------------------------ config and runs

def test_config_refuses_incompatible_layouts():
  def check(**over):
    c = config_lib.base_config()
    config_lib.apply_overrides(c, {k: str(v) for k, v in over.items()})
    with pytest.raises(config_lib.ConfigError) as e:
      config_lib.validate(c)
    assert "\n" not in str(e.value)
    return str(e.value)

  assert "rm.loss=regression" in check(algorithm="rm", **{"rm.loss": "regression", "data.shared_prompt": True})
  assert "algorithm=sft" in check(**{"data.shared_prompt": True})
  assert "algorithm=spin" in check(algorithm="spin", **{"data.packing": True})
  assert "NeMo-Aligner packed DPO file" in check(algorithm="kto", **{"data.train_path": "p.npy"})


def subset(tmp_path, src, n):
  path = tmp_path / os.path.basename(src)
  path.write_text("".join(open(src).readlines()[:n]))
  return str(path)


RUN = ["--config", "configs/dpo_quickstart.py", "--config.train.max_steps=2", "--config.train.global_batch_size=8",
       "--config.eval.num_samples=0", "--config.checkpoint.every_steps=2"]


def test_quickstart_runs_packed_nemo_file_and_shared_prompt(tmp_path):
  """``python -m jalign.train`` on the DPO quickstart's pairs: packed rows read from a NeMo-Aligner packed file
  (made from the pairs) with precomputed reference log-probs and a JSONL eval set, then the shared-prompt layout;
  the first step's loss is log 2 (policy == reference)."""
  train_path = subset(tmp_path, "examples/data/dpo_train.jsonl", 24)
  eval_path = subset(tmp_path, "examples/data/dpo_eval.jsonl", 6)
  data = config_lib.base_config().data
  data.update(max_seq_len=32, add_bos=True)
  pairs, _ = preference.load_pairs(train_path, load_tokenizer("examples/tiny_sft_model"), data)
  npy = str(tmp_path / "packed_64_seed1234.npy")
  write_nemo_packed(npy, [(p.chosen, p.rejected) for p in pairs], [p.chosen_reward for p in pairs],
                    [p.rejected_reward for p in pairs], per_row=3)
  runs = {"nemo_packed": [f"--config.data.train_path={npy}", f"--config.data.eval_path={eval_path}",
                          "--config.data.packing=True", "--config.reference=precomputed",
                          "--config.eval.every_steps=2"],
          "shared": [f"--config.data.train_path={train_path}", "--config.data.eval_path=",
                     "--config.data.shared_prompt=True", "--config.eval.every_steps=0"]}
  for name, extra in runs.items():
    wd = str(tmp_path / name)
    assert train.main(RUN + extra + ["--workdir", wd]) == 0, name
    losses = [r["loss"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl"))) if "loss" in r]
    assert len(losses) == 2 and losses[0] == pytest.approx(np.log(2), abs=1e-5) and np.isfinite(losses[1]), name
  assert os.path.exists(tmp_path / "nemo_packed" / "reference_logps.npz")
  assert train.main(RUN + [f"--config.data.train_path={npy}", "--config.algorithm=kto", "--workdir",
                           str(tmp_path / "bad")]) == 2
