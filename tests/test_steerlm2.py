"""SteerLM 2.0: NeMo-Aligner's row format and attribute strings (round trip, rejections with file:line:field), the
importance weights, loss and distance against a numpy transcription of the formula, the generator's log-probs
against training's, and two seeded iterations of generate -> train in which ``distance`` falls."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import config as config_lib
from jalign import steerlm2 as driver
from jalign.algorithms import steerlm2 as algo
from jalign.data import DataError, attributes, load_tokenizer

# The spec's example line (§2), its "…" list continuation dropped so that it is JSON.
SPEC_LINE = ('{"system": "…", "prompt_turns": [{"from": "User", "value": "x1"}, {"from": "Assistant", "value": "a1"}, '
             '{"from": "User", "value": "x2"}], "label": "helpfulness:4,correctness:4", "responses": [{"from": '
             '"Assistant", "value": "y1", "log(P(a|x,y))": -1.2, "log(P(y|x))": -85.0, "log(Q(y|a,x))": -80.1}]}')
SPEC_ATTRIBUTES = ("quality:4,toxicity:0,humor:0,creativity:0,helpfulness:4,correctness:4,coherence:4,complexity:4,"
                   "verbosity:4")


def make_cfg(**over):
  cfg = config_lib.load_config_file("configs/steerlm2_quickstart.py")
  merged = config_lib.base_config()
  config_lib._merge(merged, cfg)
  config_lib.apply_overrides(merged, {k: str(v) for k, v in over.items()})
  config_lib.validate(merged)
  return merged


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("examples/tiny_sft_model")


def test_spec_example_round_trips():
  g = algo.parse_row(json.loads(SPEC_LINE), "f.jsonl", 1)
  assert algo.format_row(g) == SPEC_LINE
  assert g.prompt_turns[-1] == ("User", "x2") and g.responses[0].log_q == -80.1
  assert attributes.label(attributes.parse(SPEC_ATTRIBUTES)) == SPEC_ATTRIBUTES


def test_rendering_follows_nemo_aligner(tok):
  g = algo.parse_row(json.loads(SPEC_LINE), "f.jsonl", 1)
  chat = make_cfg().data.chat_prompt_tokens
  from jalign.data import templates
  t = templates.ChatTokens(**chat)
  assert algo.prompt_text(g, t) == ("<extra_id_0>System\n…\n<extra_id_1>User\nx1\n<extra_id_1>Assistant\na1\n"
                                    "<extra_id_1>User\nx2\n<extra_id_1>Assistant\n<extra_id_2>helpfulness:4,"
                                    "correctness:4\n")
  assert algo.response_text("y1", t) == "y1\n<extra_id_1>"


def _bad(resp=None, **row):
  obj = json.loads(SPEC_LINE)
  obj.update(row)
  if resp is not None:
    obj["responses"] = resp
  return json.dumps(obj)


R = {"from": "Assistant", "value": "y", "log(P(a|x,y))": -1.0, "log(P(y|x))": -2.0, "log(Q(y|a,x))": -3.0}
BAD_ROWS = [
    (_bad(prompt_turns=[{"from": "User", "value": "x"}, {"from": "Assistant", "value": "a"}]), "prompt_turns", "odd"),
    (_bad(label="helpfulness:4,humour:3"), "label", "unknown attribute 'humour'"),
    (_bad(label="helpfulness:5"), "label", "out of range 0-4"),
    (_bad(label="helpfulness:-1"), "label", "out of range 0-4"),
    (_bad(label="helpfulness=4"), "label", "not name:value"),
    (_bad(label="helpfulness:4,helpfulness:3"), "label", "twice"),
    (_bad(resp=[R, {**R, "from": "User"}]), "responses[1].from", "same role"),
    (_bad(resp=[{**R, "log(P(y|x))": "-2.0"}]), "responses[0].log(P(y|x))", "expected a number"),
    (_bad(resp=[{k: v for k, v in R.items() if k != "log(Q(y|a,x))"}]), "responses[0].log(Q(y|a,x))", "missing"),
    (_bad(resp=[{**R, "log(P(a|x,y))": True}]), "responses[0].log(P(a|x,y))", "expected a number"),
    (_bad(resp=[]), "responses", "non-empty"),
    (_bad(system=None), "system", "expected a string"),
]


@pytest.mark.parametrize("line,field,msg", BAD_ROWS, ids=[f"{f}-{m}" for _, f, m in BAD_ROWS])
def test_rejects_bad_rows_with_file_line_field(tmp_path, tok, line, field, msg):
  path = tmp_path / "d.jsonl"
  path.write_text(SPEC_LINE + "\n" + line + "\n")
  with pytest.raises(DataError) as e:
    algo.load_data(str(path), tok, make_cfg())
  assert str(e.value).startswith(f"{path}:2: field {field!r}:") and msg in str(e.value), str(e.value)
  rows, n, skipped, _ = algo.load_data(str(path), tok, make_cfg(**{"data.skip_invalid": True}))
  assert (n, skipped, rows["tokens"].shape[:2]) == (1, 1, (1, 1))


def test_loader_rows(tmp_path, tok):
  two = json.loads(SPEC_LINE)
  two["responses"].append({**R, "value": "longer reply"})
  path = tmp_path / "d.jsonl"
  path.write_text(SPEC_LINE + "\n" + json.dumps(two) + "\n")
  rows, n, _, _ = algo.load_data(str(path), tok, make_cfg())
  assert rows["tokens"].shape == (2, 2, 80) and rows["valid"].tolist() == [[True, False], [True, True]]
  np.testing.assert_allclose(rows["logw"][1], [-1.2 - 85.0 + 80.1, -1.0 - 2.0 + 3.0], rtol=1e-6)
  np.testing.assert_allclose(rows["logq"][1], [-80.1, -3.0], rtol=1e-6)
  # trained tokens: the response, end_of_turn and the next turn_start
  trained = rows["tokens"][1, 1][rows["loss_mask"][1, 1]]
  assert tok.decode(trained.tolist()) == "longer reply\n<extra_id_1>"


# ------------------------------------------------------------------------------------------ the math

def numpy_reference(logq_theta, ntok, logw, logq_prime, valid):
  """The spec's formula per group, written out directly."""
  loss, kl, grad = [], [], []
  for g in range(len(valid)):
    v = valid[g]
    lw = logw[g][v]
    w = np.exp(lw - lw.max()) / np.exp(lw - lw.max()).sum()
    lb = logq_theta[g][v] - logq_prime[g][v]
    b = np.exp(lb - lb.max()) / np.exp(lb - lb.max()).sum()
    avg = ntok[g][v].mean()
    loss.append(np.sum((w - b) * -logq_theta[g][v]) / avg)
    kl.append(np.sum(w * np.log(w / b)))
    full = np.zeros(len(v))
    full[v] = -(w - b) / avg  # d loss / d log Q_theta(y_i), b held constant
    grad.append(full)
  return np.array(loss), np.array(kl), np.array(grad)


def test_weights_loss_distance_match_numpy():
  rng = np.random.default_rng(0)
  G, N = 6, 5
  logq_theta = rng.normal(-30, 8, (G, N))
  logq_prime = logq_theta + rng.normal(0, 2, (G, N))
  logw = rng.normal(-40, 6, (G, N))
  ntok = rng.integers(1, 30, (G, N)).astype(np.float64)
  valid = rng.random((G, N)) < 0.8
  valid[:, 0] = True
  args = [jnp.asarray(x, jnp.float32) for x in (logq_theta, ntok, logw, logq_prime)]
  loss, kl = jax.jit(algo.group_terms)(*args[:4], jnp.asarray(valid))
  grad = jax.grad(lambda lq: jnp.sum(algo.group_terms(lq, *args[1:], jnp.asarray(valid))[0]))(args[0])
  ref_loss, ref_kl, ref_grad = numpy_reference(logq_theta, ntok, logw, logq_prime, valid)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(kl, ref_kl, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=2e-4, atol=1e-6)


def test_attribute_logprob_matches_formula():
  pred = {"helpfulness": 3.3, "correctness": 0.4, "verbosity": 9.0}
  got = driver.attribute_logprob({"helpfulness": 4, "correctness": 0}, pred, sigma=0.7)
  want = 0.0
  for name, a in (("helpfulness", 4), ("correctness", 0)):
    p = np.exp(-(np.arange(5) - pred[name]) ** 2 / (2 * 0.7 ** 2))
    want += np.log(p[a] / p.sum())
  assert got == pytest.approx(want, rel=1e-9)
  with pytest.raises(driver.SteerLM2Error, match="no 'quality'"):
    driver.attribute_logprob({"quality": 4}, pred, 1.0)


def test_regression_rm_attributes_match_a_direct_forward(tmp_path):
  """``rm:DIR``: each response is read as the RM's regression rows (conversation, reply, end of turn,
  <extra_id_2>) and its outputs are named by the RM run's rm.attribute_names."""
  import jalign
  from jalign import checkpoint
  from jalign.algorithms import rm
  from jalign.data import templates
  CK = "examples/tiny_sft_model"
  m = jalign.load(CK)
  with open(os.path.join(CK, "model_config.json")) as f:
    meta = json.load(f)
  head = {"w": np.random.default_rng(1).normal(0, 1.0, (m.config.hidden_size, 2)).astype(np.float32),
          "b": np.array([2.0, 1.0], np.float32)}
  d = str(tmp_path / "rm")
  checkpoint.save_model(d, dict(m.params, value_head=head), dict(meta, num_value_heads=2),
                        tokenizer_files=[os.path.join(CK, "tokenizer.model")])
  with open(os.path.join(tmp_path, "config.json"), "w") as f:  # the run that trained it names its outputs
    json.dump({"data": {"add_bos": True}, "rm": {"attribute_names": ["correctness", "verbosity"]}}, f)
  g = algo.Group("", [("User", "What is 1+2?")], "correctness:4", [
      algo.Response("Assistant", r, 0.0, 0.0, 0.0) for r in ("3", "1+2=3")])
  got = driver.RegressionAttributes("rm:" + d, ("unused",), 4)([g], templates.DEFAULT_TOKENS)[0]
  for resp, pred in zip(("3", "1+2=3"), got):
    text = f"<extra_id_0>System\n\n<extra_id_1>User\nWhat is 1+2?\n<extra_id_1>Assistant\n{resp}\n<extra_id_2>"
    ids = jnp.asarray([[m.tokenizer.bos_id] + m.tokenizer.encode(text)], jnp.int32)
    want = np.asarray(rm.last_token_values(m.params | {"value_head": head}, ids, jnp.ones_like(ids), m.config))[0]
    assert sorted(pred) == ["correctness", "verbosity"]
    np.testing.assert_allclose([pred["correctness"], pred["verbosity"]], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ generate -> train

TINY = {"steerlm2.num_prompts": 4, "steerlm2.num_responses": 4, "steerlm2.max_new_tokens": 6,
        "train.max_steps": 4, "train.global_batch_size": 8, "train.log_every": 4, "checkpoint.every_steps": 4,
        "optim.lr": 2e-4}


@pytest.fixture(scope="module")
def iterations(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("steerlm2"))
  cfg = make_cfg(**TINY)
  return cfg, wd, driver.iterate(cfg, 2, wd)


def _distance(model_dir, data, cfg):
  """Mean KL(w || b) over all groups of ``data`` with Q_theta = the model in ``model_dir``."""
  import jalign
  model = jalign.load(model_dir)
  rows, n, _, _ = algo.load_data(data, model.tokenizer, cfg)
  _, w, m = jax.jit(algo.make_loss(cfg, model.config))(model.params, {k: jnp.asarray(v) for k, v in rows.items()},
                                                        None)
  return float(m["distance"] / w)


def _kl_from_uniform(data):
  out = []
  for line in open(data):
    r = json.loads(line)["responses"]
    lw = np.array([x["log(P(a|x,y))"] + x["log(P(y|x))"] - x["log(Q(y|a,x))"] for x in r])
    w = np.exp(lw - lw.max()) / np.exp(lw - lw.max()).sum()
    out.append(np.sum(w * np.log(np.maximum(w, 1e-300) * len(w))))
  return float(np.mean(out))


def test_iterations_write_data_and_models(iterations):
  cfg, wd, summaries = iterations
  assert [s["iteration"] for s in summaries] == [0, 1]
  for i in range(2):
    d = os.path.join(wd, f"iter_{i}")
    groups, _ = algo.read_groups(os.path.join(d, "steerlm2.jsonl"), cfg.data)
    assert len(groups) == 8 and all(len(g.responses) == 4 for g in groups)
    assert {g.label for g in groups} == set(cfg.steerlm2.labels)
    assert os.path.exists(os.path.join(d, "model", "model_config.json"))
    assert json.load(open(os.path.join(d, "config.json")))["model"]["checkpoint"] == (
        cfg.model.checkpoint if i == 0 else os.path.join(wd, "iter_0", "model"))
  # the toy grader's attributes: log P(a|x,y) is the formula at the exact attribute values
  g = groups[0]
  pred = driver.toy_attributes(None, [r.value for r in g.responses], [algo.row_dict(g)] * 4)
  label = attributes.parse(g.label)
  for r, p in zip(g.responses, pred):
    assert r.log_p_a == pytest.approx(driver.attribute_logprob(label, p, cfg.steerlm2.attribute_sigma))


def test_generator_logq_is_trainings_and_distance_falls(iterations):
  """At the sampling model b is uniform (log Q' written by the generator = training's log Q_theta), so distance
  = KL(w || uniform); after the iteration's training it is lower (seeded efficacy)."""
  cfg, wd, _ = iterations
  data = os.path.join(wd, "iter_0", "steerlm2.jsonl")
  before = _distance(cfg.model.checkpoint, data, cfg)
  assert before == pytest.approx(_kl_from_uniform(data), rel=1e-3, abs=1e-4)
  after = _distance(os.path.join(wd, "iter_0", "model"), data, cfg)
  print(f"iteration 0 distance: {before:.4f} -> {after:.4f}")
  assert after < 0.7 * before
  for i in range(2):  # the logged distance (each step's batch is all 8 groups) falls within each iteration
    logged = [json.loads(ln)["distance"] for ln in open(os.path.join(wd, f"iter_{i}", "metrics.jsonl"))]
    print(f"iteration {i} logged distance: {logged}")
    assert len(logged) == 4 and logged[-1] < 0.7 * logged[0]


def test_cli_errors_are_one_line(tmp_path, capsys):
  rc = driver.main(["generate", "--config", "configs/steerlm2_quickstart.py", "--output", str(tmp_path / "o.jsonl"),
                    "--config.steerlm2.labels=helpfulness:9"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.count("\n") == 0 and "steerlm2.labels: attribute 'helpfulness': value 9" in err, err
  rc = driver.main(["iterate", "--config", "configs/steerlm2_quickstart.py", "--workdir", str(tmp_path)])
  assert rc == 2 and "--iterations K" in capsys.readouterr().err
