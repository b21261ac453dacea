import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jalign import config as config_lib
from jalign.data import DataError, build_rows, load_sft_examples, load_tokenizer, train_dataset
from jalign.data import templates
from jalign.data.formats import Example
from jalign.data.pipeline import eval_batches

TOK = "examples/tiny_model/tokenizer.model"


@pytest.fixture(scope="module")
def sp():
  return load_tokenizer(TOK)


def data_cfg(**kw):
  c = config_lib.base_config().data
  c.update({"max_seq_len": 64, **kw})
  return c


def show(tok, ids):
  """Decode, spelling out a final EOS (SentencePiece's decode drops control tokens)."""
  ids = list(ids)
  eos = ids and ids[-1] == tok.eos_id
  return tok.decode(ids[:-1] if eos else ids) + ("</s>" if eos else "")


def write(tmp_path, rows, name="d.jsonl"):
  p = tmp_path / name
  with open(p, "wb") as f:
    for r in rows:
      f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
  return str(p)


# ------------------------------------------------------------------------------------------ templates

def test_nemo_template_single_turn():
  segs = templates.nemo_chat_segments("", [("User", "Hi", None), ("Assistant", "Hello!", None)], "User")
  assert "".join(t for t, _ in segs) == ("<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
                                         "Hello!\n<extra_id_1>")
  assert [t for t, tr in segs if tr] == ["Hello!\n", "<extra_id_1>"]


def test_nemo_template_multi_turn_and_label():
  turns = [("User", "What is 6*10?", None), ("Assistant", "60", "quality:4,toxicity:0"),
           ("User", "And 6*11?", None), ("Assistant", "66", "quality:4,toxicity:0")]
  segs = templates.nemo_chat_segments("Be brief.", turns, "User", "VALUE_TO_TEXT")
  assert "".join(t for t, _ in segs) == (
      "<extra_id_0>System\nBe brief.\n"
      "<extra_id_1>User\nWhat is 6*10?\n"
      "<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0\n60\n"
      "<extra_id_1>User\nAnd 6*11?\n"
      "<extra_id_1>Assistant\n<extra_id_2>quality:4,toxicity:0\n66\n<extra_id_1>")
  # names and labels are masked; a later user turn trains only its leading <extra_id_1> (the end of a reply)
  assert [t for t, tr in segs if tr] == ["60\n", "<extra_id_1>", "66\n", "<extra_id_1>"]


def test_nemo_generation_prompt():
  assert (templates.nemo_generation_prompt("", [("User", "Hi")])
          == "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n")


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Reverse abc."},
     {"role": "assistant", "content": "cba"}],
    [{"role": "user", "content": "  spaces  "}],
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A BPE tokenizer.json with special tokens and a tokenizer_config.json carrying a chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  d = tmp_path_factory.mktemp("hf_tok")
  specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [json.dumps(c) for c in CONVERSATIONS] * 20 + ["What is 12+34? The answer is 46."] * 20
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(d / "tokenizer.json"))
  with open(d / "tokenizer_config.json", "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML}, f)
  return d


@pytest.mark.parametrize("template", [CHATML, LLAMA3])
@pytest.mark.parametrize("gen", [False, True])
def test_hf_template_matches_transformers(hf_dir, template, gen):
  transformers = pytest.importorskip("transformers")
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="<s>",
                                             eos_token="</s>")
  ref.chat_template = template
  for conv in CONVERSATIONS:
    want = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    got = templates.render_hf(template, conv, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
    assert got == want


def test_hf_tokenizer_matches_transformers(hf_dir):
  transformers = pytest.importorskip("transformers")
  ours = load_tokenizer(str(hf_dir))
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
  for conv in CONVERSATIONS:
    text = templates.render_hf(CHATML, conv)
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text
  assert ours.bos_id == ref.convert_tokens_to_ids("<s>") and ours.eos_id == ref.convert_tokens_to_ids("</s>")
  assert ours.pad_id == ours.eos_id  # no pad token: EOS pads (always masked)


def test_hf_chat_masks_answer_only(hf_dir, tmp_path):
  tok = load_tokenizer(str(hf_dir))
  path = write(tmp_path, [{"messages": CONVERSATIONS[1]}])
  (ex,), _ = load_sft_examples(path, tok, data_cfg(max_seq_len=256), "hf")
  assert tok.decode(ex.tokens[ex.loss_mask]) == "Hello.<|im_end|>\ncba<|im_end|>\n"


def test_sentencepiece_roundtrip(sp):
  import sentencepiece as spm
  ref = spm.SentencePieceProcessor(model_file=TOK)
  s = "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 12+34?\n<extra_id_1>Assistant\n46\n<extra_id_1>"
  assert sp.encode(s) == list(ref.encode(s)) and sp.decode(sp.encode(s)) == s
  assert sp.encode("<extra_id_1>") == [sp.token_to_id("<extra_id_1>")]


# ------------------------------------------------------------------------------------------ formats

def test_all_formats_mask_the_answer(sp, tmp_path):
  rows = [
      {"input": "What is 1+2?", "output": "3"},
      {"system": "", "mask": "User", "type": None,
       "conversations": [{"from": "User", "value": "What is 1+2?", "label": None},
                         {"from": "Assistant", "value": "3", "label": None}]},
      {"messages": [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "3"}]},
      {"prompt": "What is 1+2? ", "completion": "3"},
      {"prompt": [{"role": "user", "content": "What is 1+2?"}],
       "completion": [{"role": "assistant", "content": "3"}]},
      {"text": "1+2=3"},
  ]
  exs, skipped = load_sft_examples(write(tmp_path, rows), sp, data_cfg(add_bos=True), "nemo")
  assert skipped == 0
  trained = [show(sp, e.tokens[e.loss_mask]) for e in exs]
  # NeMo's "{input} {output}" keeps the space with the answer for this (space-sensitive) tokenizer
  assert trained == [" 3</s>", "3\n<extra_id_1>", "3\n<extra_id_1>", "3</s>", "3\n<extra_id_1>", "1+2=3</s>"]
  assert all(e.tokens[0] == sp.bos_id for e in exs)
  # chat rows render identically whichever format they came in
  assert list(exs[1].tokens) == list(exs[2].tokens) == list(exs[4].tokens)
  full = load_sft_examples(write(tmp_path, rows[:1], "b.jsonl"), sp, data_cfg(answer_only_loss=False), "nemo")[0]
  assert full[0].loss_mask.all()


BAD = [
    (b'{"input": "a", "output": "b"}\n{"input": "a", "output": \n', 2, None, "malformed JSON"),
    ({"input": "a"}, 1, "output", "missing"),
    ({"input": "a", "output": 5}, 1, "output", "expected a string"),
    ({"conversations": []}, 1, "conversations", "empty conversation"),
    ({"messages": []}, 1, "messages", "empty conversation"),
    ({"conversations": [{"from": 5, "value": "x"}]}, 1, "conversations[0].from", "expected a role name"),
    ({"conversations": [{"from": "Bot", "value": "x"}]}, 1, "mask", "'User' does not occur"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 1, "messages[0].role", "unknown role"),
    (b'{"input": "caf\xe9", "output": "b"}\n', 1, None, "not valid UTF-8"),
    ([1, 2], 1, None, "expected a JSON object"),
    ({"question": "a"}, 1, None, "unrecognised row"),
    ({"input": "x" * 200, "output": "y"}, 1, None, "data.max_seq_len=64"),
]


@pytest.mark.parametrize("row,line,field,msg", BAD)
def test_bad_input_names_file_line_field(sp, tmp_path, row, line, field, msg):
  path = write(tmp_path, [row])
  with pytest.raises(DataError) as e:
    load_sft_examples(path, sp, data_cfg(), "nemo")
  text = str(e.value)
  assert text.startswith(f"{path}:{line}:") and msg in text and "\n" not in text
  if field:
    assert f"field {field!r}" in text


def test_empty_and_missing_files(sp, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(DataError, match="file is empty"):
    load_sft_examples(str(empty), sp, data_cfg(), "nemo")
  with pytest.raises(DataError, match="file not found"):
    load_sft_examples(str(tmp_path / "nope.jsonl"), sp, data_cfg(), "nemo")


def test_truncation_policies(sp, tmp_path):
  long_prompt = {"input": "x" * 100, "output": "the answer"}
  path = write(tmp_path, [long_prompt])
  with pytest.raises(DataError, match="no response tokens left after right-truncation"):
    load_sft_examples(path, sp, data_cfg(truncation="right"), "nemo")
  (ex,), _ = load_sft_examples(path, sp, data_cfg(truncation="left"), "nemo")
  assert len(ex.tokens) == 64 and show(sp, ex.tokens[ex.loss_mask]) == " the answer</s>"
  long_answer = write(tmp_path, [{"input": "q", "output": "y" * 100}], "b.jsonl")
  (ex,), _ = load_sft_examples(long_answer, sp, data_cfg(truncation="right"), "nemo")
  assert len(ex.tokens) == 64 and ex.loss_mask[-1]


def test_skip_invalid_counts(sp, tmp_path):
  rows = [{"input": "a", "output": "b"}, {"input": "a"}, b"not json\n", {"input": "c", "output": "d"}]
  exs, skipped = load_sft_examples(write(tmp_path, rows), sp, data_cfg(skip_invalid=True), "nemo")
  assert len(exs) == 2 and skipped == 2


def test_cli_bad_input_is_one_line(tmp_path):
  path = write(tmp_path, [{"input": "a", "output": "b"}, {"input": "a", "output": 3}])
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "jalign.train", "--config", "configs/sft_tiny.py", "--workdir",
                      str(tmp_path / "run"), f"--config.data.train_path={path}"], capture_output=True, text=True,
                     env=env, timeout=300)
  assert r.returncode == 2
  err = [ln for ln in r.stderr.splitlines() if ln.startswith("jalign: error")]
  assert err == [f"jalign: error: {path}:2: field 'output': expected a string, got int"]
  assert "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ packing, pipeline

def _examples(lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [Example(rng.randint(5, 100, n).astype(np.int32), rng.rand(n) > 0.3) for n in lengths]


def test_packing_keeps_every_token_and_restarts_positions():
  exs = _examples([10, 30, 5, 20, 31, 2, 16])
  rows = build_rows(exs, 32, 0, packing=True)
  assert rows["tokens"].shape[1] == 32 and len(rows["tokens"]) < len(exs)
  seen = []
  for r in range(len(rows["tokens"])):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.nonzero(seg == s)[0]
      assert (np.diff(idx) == 1).all() and (rows["positions"][r, idx] == np.arange(len(idx))).all()
      seen.append(tuple(rows["tokens"][r, idx]))
  assert sorted(seen) == sorted(tuple(e.tokens) for e in exs)


def test_pipeline_deterministic_sharded_and_resumable():
  rows = build_rows(_examples([8] * 40), 8, 0, packing=False)
  one = iter(train_dataset(rows, global_batch=8, seed=3, shuffle=True, process_index=0, process_count=1))
  batches = [next(one)["tokens"] for _ in range(7)]   # crosses an epoch boundary (40 rows / 8)
  again = iter(train_dataset(rows, global_batch=8, seed=3, shuffle=True, process_index=0, process_count=1))
  assert all((next(again)["tokens"] == b).all() for b in batches)
  shards = [iter(train_dataset(rows, global_batch=8, seed=3, shuffle=True, process_index=p, process_count=2))
            for p in range(2)]
  for b in batches:
    union = np.concatenate([next(s)["tokens"] for s in shards])
    assert sorted(map(tuple, union)) == sorted(map(tuple, b))
  it = iter(train_dataset(rows, global_batch=8, seed=3, shuffle=True, process_index=0, process_count=1))
  for _ in range(3):
    next(it)
  state = it.get_state()
  it2 = iter(train_dataset(rows, global_batch=8, seed=3, shuffle=True, process_index=0, process_count=1))
  it2.set_state(json.loads(json.dumps(state)))
  assert (next(it2)["tokens"] == batches[3]).all()


def test_eval_batches_pad_with_empty_rows():
  rows = build_rows(_examples([8] * 5), 8, 0, packing=False)
  bs = list(eval_batches(rows, global_batch=4, pad_id=0, process_index=0, process_count=1))
  assert len(bs) == 2 and bs[1]["loss_mask"][1:].sum() == 0 and bs[1]["segment_ids"][1:].sum() == 0


NEMO_JINJA = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
              "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
              "{{ '<extra_id_0>System\n' + sys + '\n' }}{% for m in msgs %}"
              "{{ '<extra_id_1>' + ('User' if m['role'] == 'user' else 'Assistant') + '\n' + m['content'] + '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<extra_id_1>Assistant\n' }}{% endif %}")


@pytest.mark.parametrize("gen", [False, True])
def test_sentencepiece_chat_matches_transformers(tmp_path, gen):
  """A SentencePiece tokenizer with a Jinja chat template: our rendering and token ids equal transformers'."""
  import shutil
  transformers = pytest.importorskip("transformers")
  shutil.copy(TOK, tmp_path / "tokenizer.model")
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": False,
               "add_eos_token": False, "add_prefix_space": False, "bos_token": "<s>", "eos_token": "</s>",
               "chat_template": NEMO_JINJA}, f)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = load_tokenizer(str(tmp_path))
  assert ours.kind == "sentencepiece" and ours.chat_template == NEMO_JINJA
  convs = [[{"role": "user", "content": "What is 12+34?"}, {"role": "assistant", "content": "46"}],
           [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse abc."},
            {"role": "assistant", "content": "cba"}, {"role": "user", "content": "What is 1+2?"}]]
  for conv in convs:
    text = templates.render_hf(ours.chat_template, conv, add_generation_prompt=gen, bos_token="<s>",
                               eos_token="</s>")
    assert text == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    want = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ours.encode(text) == list(want)
  # and the NeMo template rendered by jalign itself equals the Jinja one
  segs = templates.nemo_chat_segments("", [("User", "What is 12+34?", None), ("Assistant", "46", None)], "User")
  assert "".join(t for t, _ in segs) == templates.render_hf(NEMO_JINJA, convs[0]) + "<extra_id_1>"
