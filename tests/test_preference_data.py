"""Preference, reward-label and KTO records: every accepted format, and bad input named by file and line."""
import json

import numpy as np
import pytest

from jalign import config as config_lib
from jalign.data import DataError, load_tokenizer, preference

TOK = "examples/tiny_model/tokenizer.model"
P = "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 2+3?\n<extra_id_1>Assistant\n"


@pytest.fixture(scope="module")
def sp():
  return load_tokenizer(TOK)


def data_cfg(**kw):
  c = config_lib.base_config().data
  c.update({"max_seq_len": 64, "add_eos": False, **kw})
  return c


def write(tmp_path, rows, name="d.jsonl"):
  p = tmp_path / name
  p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(p)


def response(tok, ex):
  return tok.decode(ex.tokens[ex.loss_mask])


def prompt_part(tok, ex):
  return tok.decode(ex.tokens[~ex.loss_mask])


def test_nemo_dpo_strings(sp, tmp_path):
  path = write(tmp_path, [{"prompt": P, "chosen_response": "5\n<extra_id_1>", "rejected_response": "6\n<extra_id_1>",
                           "chosen_reward": 4, "rejected_reward": 1}])
  (pair,), skipped = preference.load_pairs(path, sp, data_cfg())
  assert skipped == 0 and pair.line == 1
  assert response(sp, pair.chosen) == "5\n<extra_id_1>" and response(sp, pair.rejected) == "6\n<extra_id_1>"
  assert prompt_part(sp, pair.chosen) == P
  assert (pair.chosen_reward, pair.rejected_reward, pair.margin) == (4.0, 1.0, 0.0)
  # defaults as NeMo-Aligner's data.default_chosen_reward / default_rejected_reward
  path = write(tmp_path, [{"prompt": P, "chosen_response": "5", "rejected_response": "6"}])
  (pair,), _ = preference.load_pairs(path, sp, data_cfg(append_eod=True))
  assert (pair.chosen_reward, pair.rejected_reward) == (1.0, 0.0)
  assert pair.chosen.tokens[-1] == sp.eos_id and pair.chosen.loss_mask[-1]


def test_nemo_dpo_chat_matches_string_form(sp, tmp_path):
  chat = {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "What is 2+3?"}],
          "chosen_response": {"role": "assistant", "content": "5"},
          "rejected_response": {"role": "assistant", "content": "6"}}
  (pair,), _ = preference.load_pairs(write(tmp_path, [chat]), sp, data_cfg())
  assert sp.decode(pair.chosen.tokens) == P + "5\n<extra_id_1>"
  # as NeMo-Aligner: the prompt conversation ends after the user turn, so the assistant header is response
  assert response(sp, pair.chosen) == "<extra_id_1>Assistant\n5\n<extra_id_1>"


def test_trl_formats(sp, tmp_path):
  rows = [
      {"prompt": "Q: 2+3? A: ", "chosen": "5", "rejected": "6", "margin": 0.5},                     # explicit
      {"chosen": "Q: 2+3? A: 5", "rejected": "Q: 2+3? A: 7"},                                    # implicit
      {"prompt": [{"role": "user", "content": "What is 2+3?"}],                                 # conversational
       "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]},
      {"chosen": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
       "rejected": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "7"}]},
  ]
  pairs, _ = preference.load_pairs(write(tmp_path, rows), sp, data_cfg())
  assert [p.line for p in pairs] == [1, 2, 3, 4]
  assert pairs[0].margin == 0.5 and response(sp, pairs[0].chosen) == "5"
  assert prompt_part(sp, pairs[1].chosen) == "Q: 2+3? A: " and response(sp, pairs[1].rejected) == "7"
  for p, bad in ((pairs[2], "6"), (pairs[3], "7")):
    assert sp.decode(p.chosen.tokens) == P + "5\n<extra_id_1>"
    assert response(sp, p.rejected) == bad + "\n<extra_id_1>"


def test_nemo_comparisons_alternate(sp, tmp_path):
  rows = [{"text": P + "5\n<extra_id_1>"}, {"text": P + "6\n<extra_id_1>"},
          {"text": P + "7"}, {"text": P + "5"}]
  pairs, _ = preference.load_pairs(write(tmp_path, rows), sp, data_cfg())
  assert [p.line for p in pairs] == [1, 3]
  assert response(sp, pairs[0].chosen) == "5\n<extra_id_1>" and response(sp, pairs[1].chosen) == "7"
  with pytest.raises(DataError, match=r"d.jsonl:3: .*3 rows.*even number"):
    preference.load_pairs(write(tmp_path, rows[:3]), sp, data_cfg())


def test_prompt_not_a_prefix_is_an_error(sp, tmp_path):
  rows = [{"prompt": P, "chosen_response": "5", "rejected_response": "6"},
          {"prompt": "Revers", "chosen_response": "e abc.", "rejected_response": "e abd."}]
  with pytest.raises(DataError, match=r"d.jsonl:2: field 'chosen_response': the prompt's tokens are not a prefix"):
    preference.load_pairs(write(tmp_path, rows), sp, data_cfg())
  pairs, skipped = preference.load_pairs(write(tmp_path, rows), sp, data_cfg(skip_invalid=True))
  assert len(pairs) == 1 and skipped == 1


@pytest.mark.parametrize("row,match", [
    ({"prompt": P, "chosen_response": "5"}, r":1: field 'rejected_response': missing"),
    ({"prompt": P, "chosen": "5"}, r":1: field 'rejected': missing"),
    ({"prompt": P, "chosen": "5", "rejected": "6", "margin": "big"}, r":1: field 'margin': expected a finite number"),
    ({"question": "x"}, r":1: unrecognised preference row"),
    ({"chosen": "same", "rejected": "same"}, r":1: field 'rejected': identical to chosen"),
])
def test_bad_pairs(sp, tmp_path, row, match):
  with pytest.raises(DataError, match=match):
    preference.load_pairs(write(tmp_path, [row]), sp, data_cfg())


def test_over_length_pairs(sp, tmp_path):
  path = write(tmp_path, [{"prompt": P, "chosen_response": "1234567890", "rejected_response": "6"}])
  with pytest.raises(DataError, match=r":1: .*tokens > data.max_seq_len=20"):
    preference.load_pairs(path, sp, data_cfg(max_seq_len=20))
  (pair,), _ = preference.load_pairs(path, sp, data_cfg(max_seq_len=20, truncation="left"))
  assert len(pair.chosen.tokens) == 20 and response(sp, pair.chosen) == "1234567890"


def test_regression_labels(sp, tmp_path):
  good = {"text": P + "5\n<extra_id_2>", "label": [-100, 4, 0]}
  items, _ = preference.load_regression(write(tmp_path, [good]), sp, data_cfg(), 3, (0, 4))
  ex, lab = items[0]
  assert lab.tolist() == [-100, 4, 0] and ex.loss_mask.all()
  for bad, match in (({**good, "label": [-100, 5, 0]}, r"d.jsonl:2: field 'label\[1\]': 5 is out of range \[0, 4\]"),
                     ({**good, "label": [1, 2]}, r"d.jsonl:2: field 'label': has 2 values, rm.num_attributes=3"),
                     ({"text": "x"}, r"d.jsonl:2: field 'label': expected a list of 3 numbers")):
    with pytest.raises(DataError, match=match):
      preference.load_regression(write(tmp_path, [good, bad]), sp, data_cfg(), 3, (0, 4))


def test_helpsteer_pairs(sp, tmp_path):
  a = {"text": P + "5", "label": [-2] + [-100] * 8}
  b = {"text": P + "6", "label": [-100] * 9}
  (pair,), _ = preference.load_helpsteer_pairs(write(tmp_path, [a, b]), sp, data_cfg(), 9)
  assert pair.margin == -2.0 and sp.decode(pair.chosen.tokens).endswith("5")
  with pytest.raises(DataError, match=r":3: field 'label\[0\]': preference strength 4 is not an integer in -3..3"):
    preference.load_helpsteer_pairs(write(tmp_path, [a, b, {**a, "label": [4] + [-100] * 8}, b]), sp, data_cfg(), 9)
  with pytest.raises(DataError, match=r":3: .*even number"):
    preference.load_helpsteer_pairs(write(tmp_path, [a, b, a]), sp, data_cfg(), 9)


def test_kto_formats_and_kl_pairs(sp, tmp_path):
  nemo = [{"prompt": P, "response": "5\n<extra_id_1>", "preference": "chosen"},
          {"prompt": P.replace("2+3", "1+1"), "response": "3\n<extra_id_1>", "preference": "rejected"},
          {"prompt": P.replace("2+3", "4+4"), "response": "8\n<extra_id_1>", "preference": "chosen"}]
  (samples, kl, good), _ = preference.load_unpaired(write(tmp_path, nemo), sp, data_cfg())
  assert good.tolist() == [True, False, True]
  assert response(sp, samples[1]) == "3\n<extra_id_1>"
  # KL sample i = prompt i + response of row i+1 (cyclic)
  assert [response(sp, k) for k in kl] == ["3\n<extra_id_1>", "8\n<extra_id_1>", "5\n<extra_id_1>"]
  assert prompt_part(sp, kl[2]) == P.replace("2+3", "4+4")
  trl = [{"prompt": [{"role": "user", "content": "What is 2+3?"}],
          "completion": [{"role": "assistant", "content": "5"}], "label": True},
         {"prompt": [{"role": "user", "content": "What is 1+1?"}],
          "completion": [{"role": "assistant", "content": "3"}], "label": False}]
  (samples, kl, good), _ = preference.load_unpaired(write(tmp_path, trl), sp, data_cfg())
  assert good.tolist() == [True, False] and sp.decode(samples[0].tokens) == P + "5\n<extra_id_1>"
  with pytest.raises(DataError, match=r":2: field 'preference': expected 'chosen' or 'rejected'"):
    preference.load_unpaired(write(tmp_path, [nemo[0], {**nemo[1], "preference": "good"}]), sp, data_cfg())
  with pytest.raises(DataError, match=r":1: field 'label': expected true or false"):
    preference.load_unpaired(write(tmp_path, [{**trl[0], "label": 1}]), sp, data_cfg())


def test_stack_pairs_layout(sp, tmp_path):
  path = write(tmp_path, [{"prompt": P, "chosen_response": "5", "rejected_response": "16"}])
  pairs, _ = preference.load_pairs(path, sp, data_cfg())
  rows = preference.stack_pairs([(p.chosen, p.rejected) for p in pairs], 40, sp.pad_id)
  assert rows["tokens"].shape == (1, 2, 40)
  n_c, n_r = len(pairs[0].chosen.tokens), len(pairs[0].rejected.tokens)
  assert rows["segment_ids"][0].sum(-1).tolist() == [n_c, n_r]
  assert (rows["tokens"][0, 0, n_c:] == sp.pad_id).all() and not rows["loss_mask"][0, 1, n_r:].any()
