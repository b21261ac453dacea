"""``python -m jalign.bench generate``, ``rl``, ``sft`` and ``dpo``: the runners and data on a tiny model (tiny
settings; no timing assertions)."""
import importlib.util
import types

import pytest

from jalign import bench

TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128)
FIELDS = {"first_call_s", "gen_s", "tokens_per_sec", "ttft_s", "tokens", "peak_rss_mb"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return bench.make_gen_model(str(tmp_path_factory.mktemp("gen")), TINY)


def _check(res, batch=2, new=4):
  assert FIELDS <= set(res), res.keys()
  assert len(res["tokens"]) == batch and all(len(t) == new for t in res["tokens"])
  assert all(0 <= x < TINY["vocab_size"] for t in res["tokens"] for x in t)
  assert res["tokens_per_sec"] > 0 and res["ttft_s"] > 0 and res["peak_rss_mb"] > 0


def test_jalign_and_transformers_runners_agree_on_greedy(model):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  jdir, hdir = model
  kw = dict(model_dir=jdir, hf_dir=hdir, batch=2, new_tokens=4, prompt_len=32, reps=1)
  ours = bench.run_jalign_gen(mode="greedy", **kw)
  theirs = bench.run_transformers_gen(mode="greedy", **kw)
  _check(ours)
  _check(theirs)
  assert bench.greedy_agreement(ours["tokens"], theirs["tokens"]) == 1.0
  _check(bench.run_jalign_gen(mode="top_p", **kw))  # sampling runs the full length too (no stop ids)
  _check(bench.run_transformers_gen(mode="top_p", **kw))


def test_decode_bytes_per_step_by_hand():
  """Weights (all but the embedding table, of which one row per batch row; all of it when tied) plus the keys and
  values of the attended slots, counted by hand for a 2-layer model."""
  import dataclasses

  import jax

  from jalign.models import ModelConfig, init_params
  cfg = ModelConfig(**TINY)
  params = init_params(cfg, jax.random.PRNGKey(0))
  D, V, F, L, K, dh = 64, 512, 128, 2, 2, 16
  layer = D * (D + 2 * K * dh) + D * D + 3 * D * F + 2 * D  # q, k, v; o; gate, up, down; two norms
  untied = L * layer + D + D * V  # layers, final norm, output layer
  for batch, attended in ((1, 10), (3, 7.5)):
    kv = 2 * L * batch * K * dh * attended * 4
    assert bench.decode_bytes_per_step(params, cfg, batch, attended) == 4 * (untied + batch * D) + kv
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  tparams = init_params(tied, jax.random.PRNGKey(0))
  assert bench.decode_bytes_per_step(tparams, tied, 2, 10) == 4 * (L * layer + D + V * D) + 2 * L * 2 * K * dh * 10 * 4


def test_bound_runner_and_table(model, capsys):
  jdir, _ = model
  from jalign import convert
  res = bench.run_jalign_bound(jdir, batch=2, new_tokens=4, prompt_len=32, reps=1, large_gib=0.01)
  cfg, params, _ = convert.read_jalign_dir(jdir)
  # decode steps attend over 33, 34 and 35 slots (the prompt, the first token, the new ones so far): 34 on average
  assert res["bytes_per_step"] == bench.decode_bytes_per_step(params, cfg, 2, 34)
  assert res["bandwidth_gbps"] > 0 and res["sized_bandwidth_gbps"] > 0
  assert res["tokens_per_sec"] == pytest.approx(2 / res["step_s"])
  assert res["bound_tokens_per_sec"] == pytest.approx(2 * res["bandwidth_gbps"] * 1e9 / res["bytes_per_step"])
  assert res["of_bound"] == pytest.approx(res["tokens_per_sec"] / res["bound_tokens_per_sec"])
  bench.print_bound_table([res])
  assert f"| {res['device']} | 2 |" in capsys.readouterr().out


def test_tunix_runner_reports_not_installed(model):
  if importlib.util.find_spec("tunix") is not None:
    pytest.skip("tunix is installed")
  jdir, hdir = model
  res = bench.run_tunix_gen(jdir, hdir, 2, "greedy", 4, 32, reps=1)
  assert "not_installed" in res


def test_gen_table_prints_ratios(capsys):
  rows = [{"framework": fw, "batch": 1, "mode": "greedy", "tokens_per_sec": tps, "gen_s": 1.0, "ttft_ms": 1.0,
           "first_call_s": 1.0, "peak_rss_mb": 100.0} for fw, tps in (("jalign", 300.0), ("transformers", 100.0))]
  bench.print_gen_table(rows)
  out = capsys.readouterr().out
  assert "| jalign | 1 | greedy | 300 |" in out and "3.00x" in out and "vs tunix" not in out


RL_FIELDS = {"step_s", "gen_s", "score_s", "update_s", "first_step_s", "completion_len", "peak_rss_mb"}


def test_rl_runners_report_the_step_split(tmp_path, capsys):
  """``bench rl``: jalign's GRPO step through its own RL loop (and TRL's GRPOTrainer where installed) at a tiny
  size report the split of a step into generation / scoring / update; every sample runs the full length."""
  inp = bench.make_rl_inputs(str(tmp_path), TINY, n_prompts=8)
  kw = dict(inp, algorithm="grpo", prompts=4, samples=2, new_tokens=4, steps=1)  # 8 rows: one per test device
  results = {"jalign": bench.run_jalign_rl(**kw)}
  if importlib.util.find_spec("trl") is not None:
    results["trl"] = bench.run_trl_rl(**kw)
  for fw, res in results.items():
    assert RL_FIELDS <= set(res), (fw, res.keys())
    assert all(res[k] > 0 for k in RL_FIELDS), (fw, res)
    assert res["completion_len"] == 4.0, (fw, res)
  assert set(results["jalign"]["scoring_parts"]) == {"log-prob pass", "decode + reward", "advantages + batching"}
  rows = [{"framework": fw, "samples_per_sec": 8 / r["step_s"], **r} for fw, r in results.items()]
  bench.print_rl_table(rows)
  out = capsys.readouterr().out
  assert "| jalign |" in out and ("vs trl" in out) == ("trl" in results)


# ------------------------------------------------------------------------------------------ sft / dpo

def test_mixed_lengths_are_seeded_and_in_range():
  """``--lengths mixed``: the same pairs for every framework (every call with the same number of steps; the
  lengths seeded per step), within the documented ranges; ``fixed`` keeps 64 + 192 + 192 tokens per pair."""
  a, b = bench.dpo_pairs(5, "mixed"), bench.dpo_pairs(5, "mixed")
  for s, t in zip(a, b):
    assert all((x == y).all() for p, q in zip(s, t) for x, y in zip(p, q))
  L = bench.pair_lengths(5, "mixed")
  assert (bench.pair_lengths(3, "mixed") == L[:3]).all()
  assert L.shape == (5, bench.B, 3)
  assert L[..., 0].min() >= bench.MIXED_PROMPT[0] and L[..., 0].max() <= bench.MIXED_PROMPT[1]
  assert L[..., 1:].min() >= bench.MIXED_RESP[0] and L[..., 1:].max() <= bench.MIXED_RESP[1]
  assert len(set(L[..., 0].ravel())) > 1  # really mixed
  fixed = bench.dpo_pairs(2)
  assert bench.dpo_real_tokens(fixed[0]) == bench.B * 2 * (bench.PROMPT + bench.RESP)
  assert all(len(s) == bench.T for s in bench.sft_sequences(1)[0])
  step = bench.sft_sequences(2, "mixed")[1]
  assert bench.sft_real_tokens(step) == sum(len(p) + len(c) for p, c, _ in b[1])


@pytest.mark.parametrize("layout", bench.DPO_LAYOUTS)
def test_jalign_dpo_rows_hold_the_real_tokens(layout):
  """Every layout holds each pair's tokens (the shared prompt once) in one shape for all steps."""
  if bench.dpo_layout_missing(layout):
    pytest.skip(bench.dpo_layout_missing(layout))
  pairs = bench.dpo_pairs(3, "mixed")
  rows = bench.jalign_dpo_rows(pairs, layout, sum(bench.max_lengths("mixed")), pad_id=511)
  assert len({tuple(r["tokens"].shape) for r in rows}) == 1
  for r, step in zip(rows, pairs):
    real = int((r["segment_ids"] > 0).sum())
    if "shared" in layout:  # the prompt once, less its last token, which starts each branch
      assert real == sum(len(p) + len(c) + len(x) + 1 for p, c, x in step)
    else:
      assert real == bench.dpo_real_tokens(step)
  assert bench.dpo_layout_missing("nonsense")


def test_dpo_runners_count_real_tokens_and_padding():
  """At a tiny size: jalign pads every row to the longest prompt + response the data allows, the PyTorch loop to
  the batch's longest; both count the same real tokens."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  ours = bench.run_jalign_dpo("float32", 1, "mixed", arch=TINY)
  theirs = bench.run_torch_dpo("float32", 1, "mixed", arch=TINY)
  pairs = bench.dpo_pairs(2, "mixed")
  assert ours["real_tokens"] == theirs["real_tokens"] == sum(map(bench.dpo_real_tokens, pairs)) / 2
  assert ours["fed_tokens"] == bench.B * 2 * sum(bench.max_lengths("mixed"))
  longest = [max(len(p) + max(len(c), len(r)) for p, c, r in s) for s in pairs]
  assert theirs["fed_tokens"] == 2 * bench.B * sum(longest) / 2
  for res in (ours, theirs):
    assert res["tokens_per_sec"] > 0 and res["first_step_s"] > 0 and res["launch_to_first_step_s"] > 0
    assert res["loss_first"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step


def test_tunix_train_runners_report_not_installed():
  if importlib.util.find_spec("tunix") is not None:
    pytest.skip("tunix is installed")
  assert "not_installed" in bench.run_tunix_sft("float32", 1, hf_dir="unused")
  assert "not_installed" in bench.run_tunix_dpo("float32", 1, hf_dir="unused")


def test_train_tables_print_real_tokens_and_compile_study(capsys):
  row = lambda fw, tps: {"framework": fw, "dtype": "float32", "tokens_per_sec": tps, "step_ms": 100.0,
                         "steps_per_sec": 10.0, "real_tokens": 50.0, "fed_tokens": 100.0, "first_step_s": 5.0,
                         "launch_to_first_step_s": 9.0, "peak_rss_mb": 100.0, "mfu": 0.5, "ceiling_gflops": 100.0}
  rows = [row("jalign", 300.0), row("torch", 100.0), row("tunix", 150.0)]
  bench.print_dpo_table(rows)
  bench.print_table(rows)
  study = [{"framework": "jalign", "dtype": "float32", "empty_cache_first_step_s": 5.5, "warm_cache_first_step_s": 1.5,
            "empty_cache_launch_s": 9.0, "warm_cache_launch_s": 4.0, "cache_mb": 3.0}]
  bench._print_train_notes(rows, {"compile": study, "not_installed": {}, "not_available": {"jalign-packed": "why"}})
  out = capsys.readouterr().out
  assert "| jalign | 10.00 | 300 | 100 | 100 | 2.00x |" in out and "3.00x | 2.00x |" in out
  assert "| jalign | float32 | 300 | 100.0 | 2.00x |" in out
  assert "| jalign | float32 | 100 | 5.00 | 5.50 | 1.50 | 4.00 | 3.0 |" in out and "jalign-packed: why" in out


def test_bench_kernels_rows_and_tables(capsys):
  """``bench kernels`` pieces at tiny sizes (interpreted): every kernel and its references are timed and tabled
  (the memory comparison at full size is tests/test_kernels_logprob.py's)."""
  import jax.numpy as jnp

  from jalign import bench_kernels as bk
  blocks = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
  out = {"backend": "cpu", "device": "cpu",
         "attention": bk.attention_rows((24,), H=2, K=1, D=16, dtype=jnp.float32, interpret=True, **blocks),
         "decode": bk.decode_rows((32,), B=2, H=2, K=1, D=16, dtype=jnp.float32, interpret=True, block_s=16),
         "logprob": bk.logprob_rows(64, 32, 300, dtype=jnp.float32, interpret=True, chunk=16),
         "sampling": bk.sampling_rows(2, 300, interpret=True)}
  assert {r["kernel"] for r in out["attention"]} == {"pallas", "xla"} and all("fwd_bwd_ms" in r for r in out["attention"])
  assert len(out["decode"]) == 2 and len(out["sampling"]) == 3
  assert all(r["temp_mb"] > 0 and r["fwd_bwd_ms"] > 0 for r in out["logprob"])
  bk.print_tables(out)
  text = capsys.readouterr().out
  assert "| pallas (fused) |" in text and "not yet measured" in text


def test_reference_processes_keep_glibc_defaults_unless_asked(monkeypatch):
  seen = []

  def fake_run(cmd, env, **kw):
    seen.append((cmd[-1], env.get("JALIGN_HOST_MALLOC")))
    return types.SimpleNamespace(stdout='RESULT {"ok": 1}\n', stderr="")

  monkeypatch.delenv("JALIGN_HOST_MALLOC", raising=False)
  monkeypatch.setattr(bench.subprocess, "run", fake_run)
  for framework in ("jalign", "trl", "tunix"):
    assert bench._rl_child(framework, {"algorithm": "grpo"}, 1) == {"ok": 1}
  monkeypatch.setattr(bench, "REF_HOST_MALLOC", "jalign")
  bench._gen_child("transformers", {}, 1)
  assert [s[1] for s in seen] == [None, "0", "0", None]  # None: jalign.hostmem's own default
  assert "RL_RUNNERS['trl']" in seen[1][0]
