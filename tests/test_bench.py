"""``python -m jalign.bench generate`` and ``rl``: the runners on a tiny model (tiny settings; no timing assertions)."""
import importlib.util

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
