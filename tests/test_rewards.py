"""Reward sources for online RL (``jalign.rl.rewards``): functions (weighted, standardised, checked), the toy
grader, an HTTP scorer on a loopback ``http.server`` and a tiny random reward model against a direct forward."""
import functools
import http.server
import json
import math
import os
import re
import shutil
import socket
import sys
import threading
import time

import numpy as np
import pytest

from jalign import toy
from jalign.rl.rewards import Rewards, RewardError, Samples, check_spec

CK = "examples/tiny_sft_model"
FN = f"fn:{__name__}"  # this module, importable by name (tests/ is on sys.path)


def nemo_prompt(q: str) -> str:
  return f"<extra_id_0>System\n\n<extra_id_1>User\n{q}\n<extra_id_1>Assistant\n"


def samples(questions, responses, rows=None) -> Samples:
  """Samples as a rollout makes them: NeMo-rendered prompts, texts ending in the end-of-turn token."""
  prompts = [nemo_prompt(q) for q in questions]
  rows = rows if rows is not None else [{"conversations": [{"from": "User", "value": q}]} for q in questions]
  return Samples(prompts=prompts, responses=list(responses),
                 texts=[p + r + "\n<extra_id_1>" for p, r in zip(prompts, responses)],
                 rows=rows, finished=[True] * len(prompts))


# ------------------------------------------------------------------------------------------ fn: helpers

def length_reward(prompts, responses, rows):
  return np.array([len(r) for r in responses])


def wrong_length(prompts, responses, rows):
  return [0.0] * (len(responses) - 1)


def nan_reward(prompts, responses, rows):
  return [0.0] * (len(responses) - 1) + [math.nan]


def raises(prompts, responses, rows):
  raise KeyError("boom")


def two_each(prompts, responses, rows):
  return [[1.0, 2.0] for _ in responses]


def not_a_list(prompts, responses, rows):
  return 3.0


# ------------------------------------------------------------------------------------------ fn sources

QS = ["What is 8+17?", "What is 8+17?", "Reverse abcd.", "Reverse abcd."]
RS = ["25", "24", "dcba", "dcbx"]
TOY = [1.0, 0.5, 1.0, 0.25]  # correctness 4, 3 - |24 - 25| = 2, 4, 2 * 3 // 4 = 1 (out of 4)


def test_weighted_sum_of_functions():
  s = samples(QS, RS)
  total, per = Rewards(["fn:jalign.toy:reward", f"{FN}:length_reward"], [2.0, 0.5])(s)
  assert list(per) == ["jalign.toy:reward", f"{__name__}:length_reward"]
  np.testing.assert_array_equal(per["jalign.toy:reward"], TOY)
  np.testing.assert_array_equal(per[f"{__name__}:length_reward"], [2, 2, 4, 4])
  np.testing.assert_allclose(total, [3.0, 2.0, 4.0, 2.5])
  assert total.dtype == np.float32 and total.shape == (4,)


def test_standardisation_and_default_weights():
  s = samples(QS, RS)
  total, _ = Rewards(["fn:jalign.toy:reward", f"{FN}:length_reward"], standardize=True, mean=1.0, std=2.0)(s)
  np.testing.assert_allclose(total, [(3.0 - 1) / 2, (2.5 - 1) / 2, (5.0 - 1) / 2, (4.25 - 1) / 2])
  unstandardised, _ = Rewards([f"{FN}:length_reward"], mean=1.0, std=2.0)(s)  # mean/std only with standardize
  np.testing.assert_array_equal(unstandardised, [2, 2, 4, 4])


def test_duplicate_names_are_numbered_and_empty_rollouts():
  r = Rewards([f"{FN}:length_reward", f"{FN}:length_reward", "fn:jalign.toy:reward"])
  assert r.names == [f"{__name__}:length_reward_1", f"{__name__}:length_reward_2", "jalign.toy:reward"]
  total, per = r(samples([], []))
  assert total.shape == (0,) and all(v.shape == (0,) for v in per.values())


@pytest.mark.parametrize("name,expect", [
    ("wrong_length", "returned 3 values for 4 samples"),
    ("nan_reward", "reward 3 is nan, not a finite number"),
    ("raises", "raised KeyError: 'boom'"),
    ("two_each", "single-number reward"),
    ("not_a_list", "returned 3.0; expected a sequence of 4 numbers"),
])
def test_function_errors_name_the_source(name, expect):
  spec = f"{FN}:{name}"
  with pytest.raises(RewardError) as e:
    Rewards([spec])(samples(QS, RS))
  assert spec in str(e.value) and expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec,expect", [
    ("fn:no_such_module_for_jalign:f", "cannot import no_such_module_for_jalign: ModuleNotFoundError"),
    (f"{FN}:missing", f"module {__name__} has no function missing"),
])
def test_unimportable_function(spec, expect):
  with pytest.raises(RewardError, match=re.escape("reward source " + spec)) as e:
    Rewards([spec])
  assert expect in str(e.value)


def test_setup_errors():
  with pytest.raises(RewardError, match="2 reward weights for 1 reward sources"):
    Rewards([f"{FN}:length_reward"], [1.0, 2.0])
  with pytest.raises(RewardError, match="std > 0"):
    Rewards([f"{FN}:length_reward"], standardize=True, std=0.0)
  with pytest.raises(RewardError, match="no reward sources"):
    Rewards([])
  with pytest.raises(RewardError, match="list of spec strings"):
    Rewards("fn:jalign.toy:reward")


@pytest.mark.parametrize("spec,expect", [
    ("toy", "expected fn:MODULE:FUNCTION, rm:PATH"),
    ("fn:jalign.toy", "expected fn:package.module:function"),
    ("fn:jalign.toy:", "expected fn:package.module:function"),
    ("fn:jalign toy:reward", "expected fn:package.module:function"),
    ("rm:/no/such/reward_model@1", "/no/such/reward_model does not exist"),
    ("rm:", "expected rm:PATH"),
    ("http://", "no host"),
])
def test_check_spec_rejects(spec, expect):
  with pytest.raises(RewardError, match="reward source") as e:
    check_spec(spec)
  assert expect in str(e.value)


def test_check_spec_is_cheap():
  check_spec("fn:a_module_never_imported:f")  # well formed: not imported here
  assert "a_module_never_imported" not in sys.modules
  check_spec(f"rm:{CK}@3")
  check_spec("https://rm.example.com/v1/score")


# ------------------------------------------------------------------------------------------ toy.reward

def test_toy_reward_values():
  got = toy.reward([nemo_prompt(q) for q in QS], RS, [toy.nemo_chat_row(q, "") for q in QS])
  assert got == TOY
  for q, r, g in zip(QS, RS, got):
    assert g == toy.attributes(q, r)["correctness"] / 4 and (g == 1.0) == toy.grade(q, r)
  assert toy.reward(["What is 8+17?"], ["8"], [{}]) == [0.0]  # 3 - |8 - 25| < 0


def test_toy_reward_finds_the_question():
  q, old = "What is 2+3?", "Reverse abc."
  rows = [
      {"system": "", "mask": "User", "type": None,  # NeMo chat: the last User turn
       "conversations": [{"from": "User", "value": old}, {"from": "Assistant", "value": "cba"},
                         {"from": "User", "value": q}]},
      {"messages": [{"role": "user", "content": old}, {"role": "assistant", "content": "cba"},
                    {"role": "user", "content": q}]},
      {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]},
      {"prompt": [{"role": "user", "content": [{"type": "text", "text": q}]}]},
      {"prompt": f"Question: {q}\nAnswer:"},
      {"input": q, "output": ""},
      {},  # nothing in the row: the last question in the prompt text
  ]
  prompts = [nemo_prompt(old)] * 6 + [nemo_prompt(old) + "5\n" + nemo_prompt(q)]
  assert toy.reward(prompts, ["5"] * 7, rows) == [1.0] * 7
  with pytest.raises(ValueError, match="no toy question"):
    toy.reward(["Hello"], ["5"], [{"prompt": "Hi"}])


# ------------------------------------------------------------------------------------------ http sources

class Handler(http.server.BaseHTTPRequestHandler):
  """Scores len(response); the path picks the answer's shape or failure."""

  def do_POST(self):
    rows = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["rows"]
    self.server.requests.append(rows)
    scores = [float(len(r["response"])) for r in rows]
    mode = self.path.strip("/")
    if mode == "slow":
      time.sleep(1.0)
    body = {"rewards": {"rewards": scores}, "scores": {"scores": scores}, "list": scores, "slow": scores,
            "bad_json": "{rewards: 1", "short": scores[:-1], "multi": [[s, 0.0] for s in scores],
            "text": ["a"] * len(scores), "other": {"values": scores}}.get(mode)
    status, data = (500, b'{"error": "model crashed"}') if mode == "fail" else (200, json.dumps(body).encode())
    if mode == "bad_json":
      data = body.encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


@pytest.fixture(scope="module")
def server():
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  srv.requests = []
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
  srv.shutdown()
  srv.server_close()


@pytest.mark.parametrize("mode", ["rewards", "scores", "list"])
def test_http_scores_in_batches(server, mode):
  srv, url = server
  srv.requests.clear()
  qs = [f"What is {i}+1?" for i in range(7)]
  rs = ["x" * i for i in range(7)]
  total, per = Rewards([f"{url}/{mode}", f"{FN}:length_reward"], [1.0, -1.0], batch_size=3)(samples(qs, rs))
  np.testing.assert_array_equal(per[f"{url}/{mode}"], range(7))
  np.testing.assert_array_equal(total, np.zeros(7))
  assert [len(b) for b in srv.requests] == [3, 3, 1]
  assert [r["prompt"] for b in srv.requests for r in b] == [nemo_prompt(q) for q in qs]
  assert [r["response"] for b in srv.requests for r in b] == rs


@pytest.mark.parametrize("mode,expect", [
    ("fail", "HTTP 500 Internal Server Error: {\"error\": \"model crashed\"}"),
    ("bad_json", "the answer is not JSON"),
    ("short", "returned 2 values for 3 samples"),
    ("multi", "single-number reward"),
    ("text", "reward 0 is 'a', not a finite number"),
    ("other", "got an object with keys ['values']"),
])
def test_http_errors(server, mode, expect):
  _, url = server
  with pytest.raises(RewardError) as e:
    Rewards([f"{url}/{mode}"], batch_size=4)(samples(QS[:3], RS[:3]))
  assert str(e.value).startswith(f"reward source {url}/{mode}") and expect in str(e.value)
  assert "\n" not in str(e.value)


def test_http_timeout_and_refused(server):
  _, url = server
  with pytest.raises(RewardError, match="no answer within timeout_s=0.2"):
    Rewards([f"{url}/slow"], timeout_s=0.2)(samples(QS, RS))
  with socket.socket() as s:  # a port with nothing listening
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  with pytest.raises(RewardError, match=f"reward source http://127.0.0.1:{port}/score: request failed"):
    Rewards([f"http://127.0.0.1:{port}/score"])(samples(QS, RS))


# ------------------------------------------------------------------------------------------ rm sources

RUN_DATA = {"add_bos": True, "append_eod": True, "max_seq_len": 64}


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
  """A tiny random two-attribute reward model: a model directory, and a run directory holding a copy with the
  run's config.json (BOS and EOD added, 64 tokens at most, pairs compared on attribute 1)."""
  import jax

  from jalign import checkpoint
  from jalign.models import ModelConfig, init_params
  with open(os.path.join(CK, "model_config.json")) as f:
    meta = json.load(f)
  meta.update(hidden_size=32, ffn_size=64, num_layers=1, num_heads=2, num_kv_heads=1, num_value_heads=2)
  cfg = ModelConfig.from_config(meta)
  params = init_params(cfg, jax.random.PRNGKey(0))
  params["value_head"] = {"w": np.random.default_rng(0).normal(0, 1.0, (32, 2)).astype(np.float32),
                          "b": np.array([0.5, -0.5], np.float32)}  # big enough to tell samples apart
  root = tmp_path_factory.mktemp("rm")
  model = str(root / "tiny_rm")
  checkpoint.save_model(model, params, meta, tokenizer_files=[os.path.join(CK, "tokenizer.model")])
  run = root / "run"
  shutil.copytree(model, run / "model")
  (run / "config.json").write_text(json.dumps({"algorithm": "rm", "data": RUN_DATA,
                                               "tokenizer": {"chat_template": "nemo"},
                                               "rm": {"loss": "bradley_terry", "reward_index": 1}}))
  return model, str(run), cfg, params


@functools.cache
def tokenizer():
  from jalign.data import load_tokenizer
  return load_tokenizer(CK)


def direct_values(text, cfg, params, bos=False, eod=False):
  """The head's values at the last token of one unpadded sequence."""
  from jalign.algorithms import rm
  tok = tokenizer()
  ids = [tok.bos_id] * bos + tok.encode(text) + [tok.eos_id] * eod
  tokens = np.asarray([ids], np.int32)
  return np.asarray(rm.last_token_values(params, tokens, np.ones_like(tokens), cfg))[0]


RM_QS = ["What is 8+17?", "Reverse hbg.", "What is 11+46?", "Reverse gbed.", "What is 7+39?"]
RM_RS = ["25", "hbg", "4", "debg", "46 and that is the answer"]


def test_rm_values_match_a_direct_forward(rm_dirs):
  model, run, cfg, params = rm_dirs
  s = samples(RM_QS, RM_RS)
  with open("examples/data/rm_train.jsonl") as f:
    assert s.texts[0] in [json.loads(line)["text"] for line in f]  # the text format the toy RM trains on
  total, per = Rewards([f"rm:{model}@0", f"rm:{model}@1"], batch_size=2)(s)  # 3 batches, two lengths
  for name, k in (("rm@0", 0), ("rm@1", 1)):
    want = [direct_values(t, cfg, params)[k] for t in s.texts]
    np.testing.assert_allclose(per[name], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(total, per["rm@0"] + per["rm@1"], rtol=1e-6)
  assert len(set(np.round(per["rm@0"], 4))) == 5


def test_rm_run_reads_its_data_settings(rm_dirs):
  _, run, cfg, params = rm_dirs
  s = samples(RM_QS, RM_RS)
  _, per = Rewards([f"rm:{run}@1"], batch_size=4)(s)
  want = [direct_values(t, cfg, params, bos=True, eod=True)[1] for t in s.texts]
  np.testing.assert_allclose(per["rm@1"], want, rtol=1e-5, atol=1e-5)
  plain = [direct_values(t, cfg, params)[1] for t in s.texts]
  assert not np.allclose(per["rm@1"], plain, rtol=1e-3, atol=1e-3)  # BOS/EOD change the scores
  long = samples(["What is 1+2?"], ["3" * 60])  # longer than the RM was trained on: scored, with one warning
  r, _ = Rewards([f"rm:{run}@1"])(long)
  np.testing.assert_allclose(r, [direct_values(long.texts[0], cfg, params, bos=True, eod=True)[1]], rtol=1e-5,
                             atol=1e-5)


def test_rm_attribute_errors(rm_dirs):
  model, run, _, _ = rm_dirs
  msg = f"reward source rm:{model}: the reward head has 2 attributes; add @K"
  with pytest.raises(RewardError, match=re.escape(msg)):
    Rewards([f"rm:{model}"])
  with pytest.raises(RewardError, match="compared pairs on attribute 1"):
    Rewards([f"rm:{run}"])
  with pytest.raises(RewardError, match="@2 is out of range; the reward head has 2 attributes"):
    Rewards([f"rm:{model}@2"])
  with pytest.raises(RewardError, match="has no reward \\(value\\) head"):
    Rewards([f"rm:{CK}"])
