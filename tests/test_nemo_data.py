"""NeMo-Aligner data, token for token: what NeMo's SFT, chat, DPO and reward-model datasets render, train and
append. The expected strings are written out by hand from NeMo's rules, and checked by decoding the trained
tokens in context (a token's text is what it adds to the decoding of the tokens before it)."""
import io
import json

import numpy as np
import pytest

from jalign import config as config_lib
from jalign.data import DataError, load_sft_examples, load_tokenizer, preference

TOK = "examples/tiny_model/tokenizer.model"
P = "<extra_id_0>System\n\n<extra_id_1>User\nWhat is 2+3?\n<extra_id_1>Assistant\n"
LLAMA3_TOKENS = dict(system_turn_start="<|begin_of_text|>", turn_start="", label_start="<extra_id_2>",
                     end_of_turn="<|eot_id|>", end_of_name="\n\n")
USER = "<|start_header_id|>user<|end_header_id|>"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>"
# Llama 3's pre-tokenizer split, so that a lone "\n\n" and "\n\n" before text tokenise alike
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def sp():
  """The shipped SentencePiece model: no dummy prefix, so space-sensitive in NeMo's sense."""
  tok = load_tokenizer(TOK)
  assert tok.encode("x y") != tok.encode("x") + tok.encode("y")
  return tok


@pytest.fixture(scope="module")
def sp_prefix(tmp_path_factory):
  """A SentencePiece model with the usual dummy prefix (not space-sensitive), where "Paris" is one piece."""
  import sentencepiece as spm
  corpus = ["What is the capital of France? Paris is the capital."] * 50 + ["The capital of Italy is Rome."] * 20
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=80,
                                 model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
  path = tmp_path_factory.mktemp("sp_prefix") / "tokenizer.model"
  path.write_bytes(model.getvalue())
  tok = load_tokenizer(str(path))
  assert tok.encode("x y") == tok.encode("x") + tok.encode("y")
  assert tok.sp.encode("Paris is the capital.", out_type=str)[0] == "\u2581Paris"
  return tok


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A byte-level BPE with Llama 3's special tokens and pre-tokenizer (space-sensitive)."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  d = tmp_path_factory.mktemp("bpe")
  specials = ["<unk>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  corpus = ["Hi! Hello! Bye. Goodbye. user assistant System quality:4"] * 20 + ["1 2 3 4 5 5 4 3 2 1"] * 20
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  tok = load_tokenizer(str(d / "tokenizer.json"))
  assert tok.encode("x y") != tok.encode("x") + tok.encode("y")
  return tok


def data_cfg(**kw):
  c = config_lib.base_config().data
  c.update({"max_seq_len": 128, **kw})
  return c


def llama3_cfg(**kw):
  c = data_cfg(**kw)
  c.chat_prompt_tokens.update(LLAMA3_TOKENS)
  return c


def write(tmp_path, rows, name="d.jsonl"):
  p = tmp_path / name
  p.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(p)


def trained(tok, ex):
  """The text of each run of trained tokens, read in context ("</s>" for EOS, which SentencePiece won't print)."""
  ids, out, prev = [int(i) for i in ex.tokens], [], -2
  for j in np.flatnonzero(ex.loss_mask):
    t = "</s>" if ids[j] == tok.eos_id else tok.decode(ids[:j + 1])[len(tok.decode(ids[:j])):]
    if j == prev + 1:
      out[-1] += t
    else:
      out.append(t)
    prev = j
  return out


# ------------------------------------------------------------------------------------------ prompt/response

def test_prompt_template_trains_the_space_before_the_answer_sentencepiece(sp, tmp_path):
  """'{input} {output}' with a space-sensitive tokenizer: NeMo keeps the space with the answer piece
  ' 5 4 3 2 1' (values stripped of spaces), tokenises each piece alone, and trains the answer plus EOS."""
  row = {"input": "1 2 3 4 5 ", "output": " 5 4 3 2 1"}
  (ex,), _ = load_sft_examples(write(tmp_path, [row]), sp, data_cfg(), "nemo")
  assert trained(sp, ex) == [" 5 4 3 2 1</s>"]
  assert list(ex.tokens) == sp.encode("1 2 3 4 5") + sp.encode(" 5 4 3 2 1") + [sp.eos_id]


def test_prompt_template_keeps_the_first_word_sentencepiece_dummy_prefix(sp_prefix, tmp_path):
  """Not space-sensitive: NeMo drops the template's space and tokenises 'Paris is the capital.' alone; its
  dummy prefix makes '▁Paris' the first trained token, read as ' Paris' after the question."""
  row = {"input": "What is the capital of France?", "output": "Paris is the capital."}
  (ex,), _ = load_sft_examples(write(tmp_path, [row]), sp_prefix, data_cfg(), "nemo")
  assert trained(sp_prefix, ex) == [" Paris is the capital.</s>"]
  assert list(ex.tokens) == (sp_prefix.encode("What is the capital of France?")
                             + sp_prefix.encode("Paris is the capital.") + [sp_prefix.eos_id])


def test_prompt_template_trains_the_space_before_the_answer_bpe(bpe, tmp_path):
  row = {"input": "1 2 3 4 5", "output": "5 4 3 2 1"}
  (ex,), _ = load_sft_examples(write(tmp_path, [row]), bpe, data_cfg(), "nemo")
  assert trained(bpe, ex) == [" 5 4 3 2 1</s>"]
  assert bpe.decode(ex.tokens) == "1 2 3 4 5 5 4 3 2 1</s>"


# ------------------------------------------------------------------------------------------ chat tokens

def test_default_chat_tokens_are_nemos():
  assert config_lib.base_config().data.chat_prompt_tokens.to_dict() == {
      "system_turn_start": "<extra_id_0>", "turn_start": "<extra_id_1>", "label_start": "<extra_id_2>",
      "end_of_turn": "\n", "end_of_name": "\n"}


def test_llama3_chat_tokens_render_and_mask_as_nemo(bpe, tmp_path):
  """A row as in NeMo-Aligner's Llama 3 data: roles are whole headers, the mask names the user header, extra
  fields are ignored; NeMo's header keeps its literal 'System' name and a label ends with end_of_name."""
  row = {"system": "", "mask": USER, "system_token": "<|start_header_id|>system<|end_header_id|>",
         "following_inst": "", "type": "VALUE_TO_TEXT",
         "conversations": [{"from": USER, "value": "Hi", "label": None},
                           {"from": ASSISTANT, "value": "Hello!", "label": "quality:4"},
                           {"from": USER, "value": "Bye"},
                           {"from": ASSISTANT, "value": "Goodbye."}]}
  (ex,), _ = load_sft_examples(write(tmp_path, [row]), bpe, llama3_cfg(), "nemo")
  assert bpe.decode(ex.tokens) == (
      "<|begin_of_text|>System\n\n<|eot_id|>"
      f"{USER}\n\nHi<|eot_id|>"
      f"{ASSISTANT}\n\n<extra_id_2>quality:4\n\nHello!<|eot_id|>"
      f"{USER}\n\nBye<|eot_id|>"
      f"{ASSISTANT}\n\nGoodbye.<|eot_id|>")
  # the empty turn_start leaves nothing to train at a user turn or after the last reply
  assert trained(bpe, ex) == ["Hello!<|eot_id|>", "Goodbye.<|eot_id|>"]


# ------------------------------------------------------------------------------------------ masks

def test_masked_role_at_index_one_is_masked_whole(sp, tmp_path):
  """NeMo masks a masked-role turn at index 1 completely (its leading <extra_id_1> too)."""
  assistant_first = {"system": "", "mask": "User", "conversations": [
      {"from": "Assistant", "value": "Welcome."}, {"from": "User", "value": "Hi"},
      {"from": "Assistant", "value": "Hello!"}]}
  mask_assistant = {"system": "", "mask": "Assistant", "conversations": [
      {"from": "User", "value": "Q1"}, {"from": "Assistant", "value": "A1"}, {"from": "User", "value": "Q2"}]}
  exs, _ = load_sft_examples(write(tmp_path, [assistant_first, mask_assistant]), sp, data_cfg(), "nemo")
  assert trained(sp, exs[0]) == ["Hello!\n<extra_id_1>"]
  assert trained(sp, exs[1]) == ["Q2\n<extra_id_1>"]


def test_nemo_dpo_chat_rows_label_the_assistant_header(sp, tmp_path):
  """NeMo-Aligner renders the prompt messages alone (ending after the user turn) and prompt + reply; the
  response is everything after the prompt's tokens. TRL's message lists train only the reply (no EOS: TRL
  adds none after a chat template)."""
  prompt = [{"role": "user", "content": "What is 2+3?"}]
  nemo = {"prompt": prompt, "chosen_response": {"role": "assistant", "content": "5"},
          "rejected_response": {"role": "assistant", "content": "6"}}
  trl = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "5"}],
         "rejected": [{"role": "assistant", "content": "6"}]}
  (n, t), _ = preference.load_pairs(write(tmp_path, [nemo, trl]), sp, data_cfg())
  assert trained(sp, n.chosen) == ["<extra_id_1>Assistant\n5\n<extra_id_1>"]
  assert trained(sp, n.rejected) == ["<extra_id_1>Assistant\n6\n<extra_id_1>"]
  assert list(n.chosen.tokens) == sp.encode(P + "5\n<extra_id_1>")
  assert trained(sp, t.chosen) == ["5\n<extra_id_1>"]


# ------------------------------------------------------------------------------------------ BOS / EOS

def test_nemo_preference_and_reward_rows_get_no_eos(sp, tmp_path):
  """NeMo-Aligner's DPO, KTO and reward-model datasets tokenise the text as it is (append_eod defaults off)."""
  dpo = {"prompt": P, "chosen_response": "5\n<extra_id_1>", "rejected_response": "6\n<extra_id_1>"}
  (pair,), _ = preference.load_pairs(write(tmp_path, [dpo]), sp, data_cfg())
  assert list(pair.chosen.tokens) == sp.encode(P + "5\n<extra_id_1>")
  assert trained(sp, pair.chosen) == ["5\n<extra_id_1>"]
  texts = [P + "5\n<extra_id_1>", P + "6\n<extra_id_1>"]
  (pair,), _ = preference.load_pairs(write(tmp_path, [{"text": t} for t in texts], "rm.jsonl"), sp, data_cfg())
  assert [list(pair.chosen.tokens), list(pair.rejected.tokens)] == [sp.encode(t) for t in texts]
  reg = [{"text": texts[0], "label": [3]}]
  ((ex, _),), _ = preference.load_regression(write(tmp_path, reg, "reg.jsonl"), sp, data_cfg(), 1, (0, 4))
  assert list(ex.tokens) == sp.encode(texts[0])
  kto = [{"prompt": P, "response": "5\n<extra_id_1>", "preference": "chosen"},
         {"prompt": P, "response": "6\n<extra_id_1>", "preference": "rejected"}]
  ((samples, _, _), _) = preference.load_unpaired(write(tmp_path, kto, "kto.jsonl"), sp, data_cfg())
  assert list(samples[0].tokens) == sp.encode(texts[0])
  (pair,), _ = preference.load_pairs(write(tmp_path, [dpo], "eod.jsonl"), sp, data_cfg(append_eod=True))
  assert trained(sp, pair.chosen) == ["5\n<extra_id_1></s>"]


def test_trl_preference_rows_get_an_eos(sp, tmp_path):
  """TRL appends EOS to each chosen / rejected / KTO completion string that does not end with one already."""
  rows = [{"prompt": "Q: 2+3? A:", "chosen": " 5", "rejected": " 6</s>"},
          {"chosen": "Q: 2+3? A: 5", "rejected": "Q: 2+3? A: 7"}]
  pairs, _ = preference.load_pairs(write(tmp_path, rows), sp, data_cfg())
  assert list(pairs[0].chosen.tokens) == sp.encode("Q: 2+3? A: 5") + [sp.eos_id]
  assert list(pairs[0].rejected.tokens) == sp.encode("Q: 2+3? A: 6</s>")
  assert trained(sp, pairs[0].chosen) == [" 5</s>"] and trained(sp, pairs[1].rejected) == ["7</s>"]
  kto = [{"prompt": "Q: 2+3? A:", "completion": " 5", "label": True},
         {"prompt": "Q: 2+3? A:", "completion": " 6", "label": False}]
  ((samples, _, _), _) = preference.load_unpaired(write(tmp_path, kto, "kto.jsonl"), sp, data_cfg())
  assert trained(sp, samples[0]) == [" 5</s>"]


# ------------------------------------------------------------------------------------------ truncation

def test_left_truncation_keeps_one_prompt_for_both_responses(sp, tmp_path):
  row = {"prompt": P, "chosen_response": "1 2 3 4 5 6 7 8 9\n<extra_id_1>", "rejected_response": "6\n<extra_id_1>"}
  path = write(tmp_path, [row])
  n = len(sp.encode(P + row["chosen_response"]))
  (pair,), _ = preference.load_pairs(path, sp, data_cfg(max_seq_len=n - 3, truncation="left"))
  c, r = pair.chosen, pair.rejected
  assert len(c.tokens) == n - 3
  assert list(c.tokens[~c.loss_mask]) == list(r.tokens[~r.loss_mask]) == sp.encode(P)[3:]
  assert trained(sp, c) == ["1 2 3 4 5 6 7 8 9\n<extra_id_1>"] and trained(sp, r) == ["6\n<extra_id_1>"]
  with pytest.raises(DataError, match=r":1: .*shared prompt has only"):
    preference.load_pairs(path, sp, data_cfg(max_seq_len=10, truncation="left"))
