"""``python -m jalign.bench generate``: the runners on a tiny model (tiny settings; no timing assertions)."""
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
