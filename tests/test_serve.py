"""The HTTP server (``python -m jalign.serve``) as a subprocess on a free loopback port: the official ``openai``
client, NeMo-style ``PUT /generate``, concurrent requests, malformed requests, the reward endpoint and a SIGTERM
drain."""
import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import portpicker  # noqa: E402

CK = "examples/tiny_sft_model"
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["What is 8+17?", "What is 12+30?", "Reverse abc.", "What is 41+7?"]


def _start(*flags):
  port = portpicker.pick_unused_port()
  env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device
  proc = subprocess.Popen([sys.executable, "-m", "jalign.serve", "--checkpoint", CK, "--port", str(port), *flags],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 240
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"server exited {proc.returncode}:\n{proc.stdout.read()}")
    try:
      if requests.get(url + "/health", timeout=1).status_code == 200:
        return proc, url
    except requests.ConnectionError:
      time.sleep(0.3)
  proc.kill()
  raise RuntimeError("server did not start")


def _stop(proc):
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
  """A two-attribute reward model: the tiny SFT model with a random value head."""
  import jalign
  from jalign import checkpoint
  m = jalign.load(CK)
  with open(os.path.join(CK, "model_config.json")) as f:
    meta = json.load(f)
  D = m.config.hidden_size
  params = dict(m.params, value_head={"w": np.random.default_rng(0).normal(0, 0.1, (D, 2)).astype(np.float32),
                                      "b": np.zeros(2, np.float32)})
  d = str(tmp_path_factory.mktemp("rm") / "tiny_rm")
  checkpoint.save_model(d, params, dict(meta, num_value_heads=2),
                        tokenizer_files=[os.path.join(CK, "tokenizer.model")])
  return d


@pytest.fixture(scope="module")
def server(rm_dir):
  proc, url = _start("--add-bos", "true", "--slots", "8", "--chunk", "4", "--max-prompt-tokens", "64",
                     "--max-new-tokens", "24", "--max-queue", "32", "--max-body-bytes", "4096", "--api-key", KEY,
                     "--reward-checkpoint", rm_dir)
  yield url
  _stop(proc)


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref():
  """The loaded model, chat prompt ids and the chat stop ids, as the server renders them (the shipped SFT model
  was trained with BOS)."""
  import jalign
  from jalign import generate as gen
  from jalign.score import data_settings
  m = jalign.load(CK)
  data_cfg, template = data_settings(argparse.Namespace(checkpoint=CK, add_bos=True, add_eos=None, max_seq_len=None,
                                                        truncation="error", chat_template=None))
  prompts = gen.Prompts(m.tokenizer, data_cfg, template)
  ids = lambda q: prompts.ids({"prompt": [{"role": "user", "content": q}]}, "q", 0)
  return m, ids, gen.stop_ids(m.tokenizer, template, prompts.b.chat_tokens)


def _chat(client, q, **kw):
  return client.chat.completions.create(model="tiny_sft_model", messages=[{"role": "user", "content": q}],
                                        temperature=0, max_tokens=16, **kw)


def test_chat_greedy_equals_generate(client, ref):
  from jalign.serve import token_texts
  m, ids, stops = ref
  for q in QUESTIONS[:3]:
    got = _chat(client, q, logprobs=True)
    want = m.generate([ids(q)], max_new_tokens=16, stop_ids=stops)[0]
    finished = want[-1] in stops
    texts = token_texts(m.tokenizer, want[:-1] if finished else want, ids(q))
    text = "".join(texts)
    if finished and text.endswith("\n"):  # the NeMo end of turn closes the reply
      text = text[:-1]
    c = got.choices[0]
    assert c.message.content == text and c.message.role == "assistant"
    assert c.finish_reason == ("stop" if finished else "length")
    assert got.usage.completion_tokens == len(want) and got.usage.prompt_tokens == len(ids(q))
    toks = [t.token for t in c.logprobs.content]
    assert toks == texts[:len(toks)] and "".join(toks).startswith(text)
    assert all(t.logprob <= 0 and bytes(t.bytes).decode() == t.token for t in c.logprobs.content)


def test_streaming_equals_non_streaming(client):
  for q in QUESTIONS[:2]:
    full = _chat(client, q)
    parts, reasons = [], []
    for chunk in _chat(client, q, stream=True):
      for c in chunk.choices:
        parts.append(c.delta.content or "")
        reasons.append(c.finish_reason)
    assert "".join(parts) == full.choices[0].message.content and reasons[-1] == full.choices[0].finish_reason
  kw = dict(model="tiny_sft_model", prompt="What is 3+4?", temperature=0, max_tokens=12)
  full = client.completions.create(**kw)
  stream = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
  assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text
  assert stream[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_n_seed_logprobs_and_stop(client):
  kw = dict(model="tiny_sft_model", prompt="Reverse hbg.", max_tokens=12, temperature=1.0, n=2, seed=3, logprobs=1)
  a, b = client.completions.create(**kw), client.completions.create(**kw)
  assert [c.index for c in a.choices] == [0, 1]
  assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible by seed
  for c in a.choices:
    lp = c.logprobs
    assert "".join(lp.tokens).startswith(c.text) and len(lp.tokens) == len(lp.token_logprobs)
    assert lp.text_offset == [sum(map(len, lp.tokens[:k])) for k in range(len(lp.tokens))]
  greedy = client.completions.create(model="tiny_sft_model", prompt="What is", max_tokens=12, temperature=0)
  text = greedy.choices[0].text
  stop = text[3:5]
  cut = client.completions.create(model="tiny_sft_model", prompt="What is", max_tokens=12, temperature=0, stop=[stop])
  assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
  assert [m.id for m in client.models.list().data] == ["tiny_sft_model"]


def test_nemo_generate(server, ref):
  from jalign.data.templates import nemo_generation_prompt
  m, _, _ = ref
  tok = m.tokenizer
  prompt = nemo_generation_prompt("", [("User", QUESTIONS[0])])
  body = {"sentences": [prompt], "tokens_to_generate": 16, "greedy": True, "end_strings": ["<extra_id_1>"],
          "compute_logprob": True, "add_BOS": True}
  r = requests.put(server + "/generate", json=body, headers=AUTH, timeout=60)
  assert r.status_code == 200, r.text
  out = r.json()
  ids = [tok.bos_id] + tok.encode(prompt)
  want = m.generate([ids], max_new_tokens=16, stop_ids=[tok.eos_id])[0]
  turn = tok.token_to_id("<extra_id_1>")
  want = want[:want.index(turn) + 1] if turn in want else want
  assert out["token_ids"][0] == ids + want
  assert out["sentences"][0] == prompt + tok.decode(want) and out["sentences"][0].endswith("<extra_id_1>")
  assert "".join(out["tokens"][0]) == out["sentences"][0]
  assert out["offsets"][0] == [sum(map(len, out["tokens"][0][:k])) for k in range(len(out["tokens"][0]))]
  lp = out["logprob"][0]
  assert len(lp) == len(ids + want) - 1 and all(x <= 0 for x in lp)
  no_lp = requests.put(server + "/generate", json={"sentences": [prompt], "tokens_to_generate": 2}, headers=AUTH)
  assert no_lp.status_code == 200 and no_lp.json()["logprob"] is None


def test_32_concurrent_requests(client):
  sequential = {q: _chat(client, q).choices[0].message.content for q in QUESTIONS}
  jobs = [QUESTIONS[i % 4] for i in range(32)]
  start = time.time()
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    answers = list(pool.map(lambda q: _chat(client, q).choices[0].message.content, jobs))
  elapsed = time.time() - start
  assert answers == [sequential[q] for q in jobs], elapsed


def test_chat_attributes_render_the_steerlm_label(client, server, ref):
  """SteerLM: desired attributes (openai's extra_body) go after <extra_id_2> in the prompt, in HelpSteer2's
  order; bad ones answer 400 naming the attributes."""
  m, ids, stops = ref
  q = QUESTIONS[0]
  prompt = ids(q) + m.tokenizer.encode("<extra_id_2>correctness:4,verbosity:4\n")
  got = _chat(client, q, extra_body={"attributes": {"verbosity": 4, "correctness": 4}})
  assert got.usage.prompt_tokens == len(prompt)
  want = m.generate([prompt], max_new_tokens=16, stop_ids=stops)[0]
  text = m.tokenizer.decode(want[:-1] if want[-1] in stops else want)
  assert got.choices[0].message.content == (text[:-1] if text.endswith("\n") else text)
  same = _chat(client, q, extra_body={"attributes": "correctness:4,verbosity:4"})
  assert same.choices[0].message.content == got.choices[0].message.content
  for bad in ("verbosity:9", {"verbosity": "high"}, "verbosity"):
    r = requests.post(server + "/v1/chat/completions", headers=AUTH, timeout=30,
                      json={"messages": [{"role": "user", "content": q}], "attributes": bad})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("attributes"), r.text


def test_malformed_requests_get_4xx_json(server):
  post = lambda path, **kw: requests.post(server + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=30, **kw)
  msg = [{"role": "user", "content": "hi"}]
  cases = [
      (400, post("/v1/completions", data=b'{"prompt": ', headers={"Content-Type": "application/json"})),
      (400, post("/v1/completions", data=b"[1, 2]", headers={"Content-Type": "application/json"})),
      (400, post("/v1/completions", json={"prompt": "x", "max_tokens": "5"})),
      (400, post("/v1/completions", json={"prompt": 5})),
      (400, post("/v1/chat/completions", json={"messages": "hi"})),
      (400, post("/v1/completions", json={"prompt": "x", "max_tokens": -1})),
      (400, post("/v1/completions", json={"prompt": "x", "n": 0})),
      (400, post("/v1/completions", json={"prompt": "x", "temperature": -1})),
      (400, post("/v1/completions", json={"prompt": "x", "max_tokens": 10 ** 9})),
      (400, post("/v1/completions", json={"prompt": "x", "n": 10 ** 6})),
      (400, post("/v1/completions", json={"prompt": "x", "n": 100})),  # over slots + queue
      (400, post("/v1/completions", json={"prompt": "x", "top_k": 1000})),
      (400, post("/v1/completions", json={"prompt": "a " * 200})),  # over --max-prompt-tokens
      (400, post("/v1/completions", json={"prompt": [99999]})),
      (400, post("/v1/completions", json={"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})),
      (400, post("/v1/completions", json={"prompt": "x", "bogus": 1})),
      (400, post("/v1/chat/completions", json={"messages": msg, "tools": []})),
      (400, post("/v1/completions", json={"prompt": []})),
      (400, post("/v1/chat/completions", json={"messages": []})),
      (400, post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})),
      (400, post("/v1/chat/completions", json={"messages": [{"role": "user"}]})),
      (400, post("/v1/score", json={"rows": []})),
      (400, post("/v1/score", json={"rows": [{"prompt": "x", "response": "y", "messages": msg}]})),
      (400, requests.put(server + "/generate", json={"sentences": []}, headers=AUTH)),
      (400, requests.put(server + "/generate", json={"sentences": ["x"], "tokens_to_generate": 10 ** 6},
                         headers=AUTH)),
      (400, requests.put(server + "/generate", json={"sentences": ["x"], "bogus": True}, headers=AUTH)),
      (400, requests.put(server + "/generate", json={"sentences": ["x"], "all_probs": True}, headers=AUTH)),
      (404, post("/v1/completions", json={"prompt": "x", "model": "nope"})),
      (404, requests.get(server + "/v1/nothing", headers=AUTH)),
      (405, requests.get(server + "/v1/completions", headers=AUTH)),
      (413, post("/v1/completions", json={"prompt": "x" * 10000})),
      (401, requests.post(server + "/v1/completions", json={"prompt": "x"})),
      (401, requests.post(server + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer no"})),
      (401, requests.put(server + "/generate", json={"sentences": ["x"]})),
  ]
  for i, (status, r) in enumerate(cases):
    assert r.status_code == status, (i, r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"], (i, err)
  assert requests.get(server + "/health", timeout=5).status_code == 200  # no key needed, still up
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_score(server, rm_dir):
  import jalign
  from jalign.data import preference
  from jalign.score import Scorer, data_settings
  rows = [{"prompt": "What is 2+2?", "response": "4"},
          {"messages": [{"role": "user", "content": "Reverse abc."}, {"role": "assistant", "content": "cba"}]}]
  r = requests.post(server + "/v1/score", json={"rows": rows}, headers=AUTH, timeout=60)
  assert r.status_code == 200, r.text
  got = r.json()["rewards"]
  rm = jalign.load(rm_dir)
  data_cfg, template = data_settings(argparse.Namespace(checkpoint=rm_dir, add_bos=None, add_eos=None,
                                                        max_seq_len=None, truncation="error", chat_template=None))
  pt = preference.PairTokenizer(rm.tokenizer, data_cfg, template)
  objs = [{"prompt": rows[0]["prompt"], "completion": rows[0]["response"]}, rows[1]]
  want = Scorer(rm)([pt.encode(*pt.builder.segments(o, "rows", i), "rows", i) for i, o in enumerate(objs)])
  assert np.shape(got) == (2, 2)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_queue_full_then_sigterm_drains():
  """One slot and a queue of one: a third concurrent request gets 503; SIGTERM lets the two streams finish and
  the process exits 0."""
  proc, url = _start("--slots", "1", "--max-queue", "1", "--chunk", "1", "--max-prompt-tokens", "16",
                     "--max-new-tokens", "96")
  try:
    body = {"prompt": "What is", "max_tokens": 96, "min_tokens": 96, "temperature": 0, "stream": True}
    streams = [requests.post(url + "/v1/completions", json=body, stream=True, timeout=60) for _ in range(2)]
    assert [s.status_code for s in streams] == [200, 200]
    busy = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
    proc.send_signal(signal.SIGTERM)
    for s in streams:
      lines = [ln for ln in s.iter_lines(decode_unicode=True) if ln]
      assert lines[-1] == "data: [DONE]"
      last = json.loads(lines[-2][len("data: "):])
      assert last["choices"][0]["finish_reason"] == "length"
    assert proc.wait(30) == 0
  finally:
    _stop(proc)
