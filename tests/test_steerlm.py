"""SteerLM: attribute strings, attribute-conditioned SFT rows, steerable prompts (rendered as training rendered
the label), annotation with a regression RM (``jalign.score --annotate``) and the toy steering task end to end."""
import json
import os

import numpy as np
import pytest

from jalign import config as config_lib
from jalign import generate, score, toy
from jalign.data import DataError, attributes, load_tokenizer
from jalign.data.formats import SegmentBuilder

CK = "examples/tiny_sft_model"
# the spec's chat row and the prompt NeMo renders for its reply (label after <extra_id_2>, then a newline)
SPEC_ROW = {"system": "A chat between a curious user and an artificial intelligence assistant.",
            "conversations": [{"from": "User", "value": "What is 6*10?", "label": None},
                              {"from": "Assistant", "value": "60", "label": "quality:4,toxicity:0,humor:0,creativity:0"}],
            "mask": "User", "type": "VALUE_TO_TEXT"}
SPEC_PROMPT = ("<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant.\n"
               "<extra_id_1>User\nWhat is 6*10?\n<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0,humor:0,"
               "creativity:0\n")


def _data_cfg(**kw):
  d = config_lib.base_config().data
  d.update(kw)
  return d


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def test_attribute_strings():
  assert attributes.parse("quality:4,toxicity:0") == {"quality": 4, "toxicity": 0}
  assert attributes.parse(" quality: 4 , verbosity:0 ") == {"quality": 4, "verbosity": 0}
  # a dict is written in HelpSteer2's order whatever its own order; other names follow in their given order
  assert attributes.label({"verbosity": 0, "zeal": 3, "quality": 4}) == "quality:4,verbosity:0,zeal:3"
  assert attributes.label({"verbosity": 1.0}) == "verbosity:1"
  assert attributes.label("verbosity:2,quality:3", names=("quality", "verbosity")) == "quality:3,verbosity:2"
  # RM predictions: rounded half up, clipped to 0-4
  assert attributes.from_scores(("a", "b", "c", "d"), [3.5, -0.7, 9.2, 2.49]) == "a:4,b:0,c:4,d:2"
  for bad, msg in [("quality:5", "out of range 0-4"), ("quality:-1", "out of range"), ("quality:2.5", "not an integer"),
                   ("quality", "not name:value"), ("quality:4,quality:3", "given twice"), ("", "empty"),
                   (":4", "not name:value")]:
    with pytest.raises(attributes.AttributeStringError, match=msg):
      attributes.parse(bad)
  with pytest.raises(attributes.AttributeStringError, match="unknown attribute 'humour'; known: quality,humor"):
    attributes.label({"humour": 1}, names=("quality", "humor"))
  with pytest.raises(attributes.AttributeStringError, match="expected a non-empty dict"):
    attributes.label({})
  with pytest.raises(attributes.AttributeStringError, match="non-finite"):
    attributes.from_scores(("a",), [float("nan")])


def test_value_to_text_rows_render_and_validate_labels(tmp_path):
  tok = load_tokenizer(CK)
  b = SegmentBuilder(tok, _data_cfg(), "nemo")
  segs = b.segments(SPEC_ROW, "f.jsonl", 1)[0]
  text = "".join(t for t, _ in segs)
  assert text == SPEC_PROMPT + "60\n<extra_id_1>"
  assert "".join(t for t, trained in segs if trained) == "60\n<extra_id_1>"  # the label is not trained on
  bad = json.loads(json.dumps(SPEC_ROW))
  bad["conversations"][1]["label"] = "quality:7"
  with pytest.raises(DataError, match=r"f.jsonl:3: field 'conversations\[1\].label': attribute 'quality': value 7 "
                     "is out of range 0-4"):
    b.segments(bad, "f.jsonl", 3)
  bad["type"] = None  # without VALUE_TO_TEXT the label is not rendered, so not checked (as NeMo)
  b.segments(bad, "f.jsonl", 3)


def test_steerable_prompts_match_the_training_rendering():
  tok = load_tokenizer(CK)
  p = generate.Prompts(tok, _data_cfg(), "nemo")
  text = lambda row, a=None: tok.decode(p.ids(row, "in.jsonl", 1, a))
  assert text(SPEC_ROW) == SPEC_PROMPT  # the reference reply's own label
  unlabelled = {**SPEC_ROW, "type": None}
  want = SPEC_PROMPT.replace("quality:4,toxicity:0,humor:0,creativity:0", "quality:4,verbosity:0")
  assert text(unlabelled, {"verbosity": 0, "quality": 4}) == want
  assert text(SPEC_ROW, "quality:4,verbosity:0") == want  # desired attributes replace the reference's
  msgs = {"messages": [{"role": "system", "content": SPEC_ROW["system"]}, {"role": "user", "content": "What is 6*10?"}]}
  assert text(msgs, "quality:4,verbosity:0") == want
  assert text({**msgs, "attributes": {"quality": 4, "verbosity": 0}}) == want  # a row's own attributes
  raw = {"prompt": SPEC_PROMPT.split("<extra_id_2>")[0]}
  assert text(raw, "quality:4,verbosity:0") == want
  with pytest.raises(DataError, match=r"in.jsonl:1: field 'attributes': attribute 'quality': value 9"):
    p.ids(unlabelled, "in.jsonl", 1, "quality:9")
  with pytest.raises(DataError, match="field 'attributes': SteerLM attributes need"):
    p.ids({"input": "What is 6*10?"}, "in.jsonl", 1, "quality:4")


def test_generate_cli_attributes(tmp_path, capsys):
  inp = _write(tmp_path / "in.jsonl", [toy.nemo_chat_row("What is 8+17?", "25")])
  out = str(tmp_path / "out.jsonl")
  assert generate.main(["--checkpoint", CK, "--input", inp, "--output", out, "--max-new-tokens", "4",
                        "--attributes", '{"verbosity": 4}']) == 0
  with open(out) as f:
    assert len(json.loads(f.readline())["responses"]) == 1
  assert generate.main(["--checkpoint", CK, "--input", inp, "--output", str(tmp_path / "o2.jsonl"),
                        "--attributes", "verbosity:high"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "in.jsonl:1: field 'attributes': attribute 'verbosity': value 'high' is not an integer" \
      in err[0]


@pytest.fixture(scope="module")
def rm9(tmp_path_factory):
  """A nine-attribute regression RM: the tiny SFT model with a random value head (big enough that some predictions
  fall outside 0-4 and get clipped)."""
  import jalign
  from jalign import checkpoint
  m = jalign.load(CK)
  with open(os.path.join(CK, "model_config.json")) as f:
    meta = json.load(f)
  D = m.config.hidden_size
  rng = np.random.default_rng(0)
  params = dict(m.params, value_head={"w": rng.normal(0, 1.0, (D, 9)).astype(np.float32),
                                      "b": np.full(9, 2.0, np.float32)})
  d = str(tmp_path_factory.mktemp("rm9") / "rm")
  checkpoint.save_model(d, params, dict(meta, num_value_heads=9), tokenizer_files=[os.path.join(CK, "tokenizer.model")])
  return d


def test_annotate_labels_each_reply_with_the_rm_attributes(tmp_path, rm9):
  import jax.numpy as jnp

  import jalign
  from jalign.algorithms import rm
  two_turns = {"system": "", "mask": "User", "type": None, "conversations": [
      {"from": "User", "value": "What is 8+17?", "label": None}, {"from": "Assistant", "value": "25", "label": None},
      {"from": "User", "value": "Reverse abc.", "label": None}, {"from": "Assistant", "value": "cba", "label": None}]}
  rows = [toy.nemo_chat_row("What is 1+2?", "3"), two_turns]
  inp, out = _write(tmp_path / "chat.jsonl", rows), str(tmp_path / "annotated.jsonl")
  assert score.main(["--checkpoint", rm9, "--input", inp, "--output", out, "--annotate"]) == 0
  with open(out) as f:
    got = [json.loads(line) for line in f]
  # the text each reply is scored on, written out by hand: conversation up to the reply, then <extra_id_2>
  texts = ["<extra_id_0>System\n\n<extra_id_1>User\nWhat is 1+2?\n<extra_id_1>Assistant\n3\n<extra_id_2>",
           "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 8+17?\n<extra_id_1>Assistant\n25\n<extra_id_2>",
           "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 8+17?\n<extra_id_1>Assistant\n25\n<extra_id_1>User\n"
           "Reverse abc.\n<extra_id_1>Assistant\ncba\n<extra_id_2>"]
  m = jalign.load(rm9)
  want = []
  for t in texts:
    ids = jnp.asarray([m.tokenizer.encode(t)], jnp.int32)
    v = np.asarray(rm.last_token_values(m.params, ids, jnp.ones_like(ids), m.config))[0]
    want.append(",".join(f"{n}:{min(4, max(0, int(np.floor(x + 0.5))))}" for n, x in zip(attributes.HELPSTEER2, v)))
  assert {int(w.split(":")[1].split(",")[0]) for w in want} != {2}  # the head spreads values (a real check)
  assert got[0]["type"] == got[1]["type"] == "VALUE_TO_TEXT"
  assert [got[0]["conversations"][1]["label"], got[1]["conversations"][1]["label"],
          got[1]["conversations"][3]["label"]] == want
  assert got[1]["conversations"][0]["label"] is None and got[1]["conversations"][2]["value"] == "Reverse abc."
  # a subset, then the annotated rows train as SteerLM rows
  assert score.main(["--checkpoint", rm9, "--input", inp, "--output", out, "--annotate",
                     "--attributes", "helpfulness,verbosity"]) == 0
  with open(out) as f:
    sub = json.loads(f.readline())["conversations"][1]["label"]
  full = dict(kv.split(":") for kv in want[0].split(","))
  assert sub == f"helpfulness:{full['helpfulness']},verbosity:{full['verbosity']}"
  SegmentBuilder(m.tokenizer, _data_cfg(), "nemo").segments(json.loads(open(out).readline()), out, 1)


def test_annotate_errors_are_one_line(tmp_path, rm9, capsys):
  inp = _write(tmp_path / "chat.jsonl", [toy.nemo_chat_row("What is 1+2?", "3")])
  for flags, msg in [(["--attributes", "verbosity,helpfulness"], "in that order"),
                     (["--attribute-names", "a,b"], "2 attribute names for a reward head of 9 outputs"),
                     (["--attribute-weights", ",".join(["1"] * 9)], "drop --attribute-weights")]:
    assert score.main(["--checkpoint", rm9, "--input", inp, "--annotate", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
  prefs = _write(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"}])
  assert score.main(["--checkpoint", rm9, "--input", prefs, "--annotate"]) == 2
  assert "p.jsonl:1: field 'conversations': --annotate takes NeMo chat rows" in capsys.readouterr().err


def test_steerlm_quickstart_follows_the_asked_verbosity(tmp_path):
  """The toy SteerLM model, asked for a terse answer's attributes vs a worked answer's, answers tersely vs with its
  working shown on at least 80% of held-out questions each way (seeded; greedy)."""
  from jalign import train
  cfg, _ = config_lib.parse_args(["--config", "configs/steerlm_quickstart.py", "--config.eval.every_steps=300",
                                  "--config.eval.num_samples=0"])
  train.run(cfg, str(tmp_path / "run"))
  rows = []
  with open("examples/data/sft_eval.jsonl") as f:
    for line in list(f)[:60]:
      row = json.loads(line)
      q = row["conversations"][0]["value"]
      rows += [{**row, "attributes": toy.steer_label(q, toy.answer(q))},
               {**row, "attributes": toy.steer_label(q, toy.worked(q, toy.answer(q)))}]
  inp, out = _write(tmp_path / "asks.jsonl", rows), str(tmp_path / "answers.jsonl")
  assert generate.main(["--checkpoint", str(tmp_path / "run"), "--input", inp, "--output", out,
                        "--max-new-tokens", "16", "--batch-size", "40"]) == 0
  with open(out) as f:
    answers = [json.loads(line)["responses"][0] for line in f]
  terse = np.mean([not toy.shows_working(a) for a in answers[0::2]])
  worked = np.mean([toy.shows_working(a) for a in answers[1::2]])
  assert terse >= 0.8 and worked >= 0.8, (terse, worked, answers[:6])
