"""``python -m jalign.generate``: prompt rendering per row format, greedy answers against a full-forward decode,
n samples and seeds, resuming, stop strings and one-line errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import config as config_lib
from jalign import generate, toy
from jalign.data import DataError, load_tokenizer
from jalign.models import transformer

MODEL = "examples/tiny_sft_model"
EVAL = "examples/data/sft_eval.jsonl"
PROMPT_0 = "<extra_id_0>System\n\n<extra_id_1>User\nReverse aehg.\n<extra_id_1>Assistant\n"


def _eval_rows(n):
  with open(EVAL) as f:
    return [json.loads(line) for line in f][:n]


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _run(tmp_path, rows, *flags, name="out.jsonl", checkpoint=MODEL):
  """Generate greedily (unless flags say otherwise) with BOS, as the tiny model was trained; returns the rows."""
  inp = rows if isinstance(rows, str) else _write(tmp_path / "in.jsonl", rows)
  out = str(tmp_path / name)
  assert generate.main(["--checkpoint", checkpoint, "--input", inp, "--output", out, "--max-new-tokens", "8",
                        "--add-bos", "true", *flags]) == 0
  return _read(out)


def _prompts(chat_template="nemo", tok_dir=MODEL, **data):
  d = config_lib.base_config().data
  d.update(data)
  return generate.Prompts(load_tokenizer(tok_dir), d, chat_template)


def _text(prompts, row):
  return "".join(t for t, _ in prompts.segments(row, "in.jsonl", 1))


def test_prompt_rendering_per_format(tmp_path):
  p = _prompts()
  nemo = _eval_rows(1)[0]
  assert _text(p, nemo) == PROMPT_0  # the reference reply is left out
  assert _text(p, {**nemo, "conversations": nemo["conversations"][:1]}) == PROMPT_0
  msgs = [{"role": "user", "content": "Reverse aehg."}, {"role": "assistant", "content": "ghea"}]
  assert _text(p, {"messages": msgs}) == PROMPT_0
  assert _text(p, {"prompt": msgs[:1], "completion": msgs[1:]}) == PROMPT_0
  assert _text(p, {"prompt": PROMPT_0}) == PROMPT_0  # a string is raw text
  steer = {"system": "Be brief.", "mask": "User", "type": "VALUE_TO_TEXT", "conversations": [
      {"from": "User", "value": "Hi", "label": None},
      {"from": "Assistant", "value": "Hello", "label": "quality:4"},
      {"from": "User", "value": "Reverse ab.", "label": None},
      {"from": "Assistant", "value": "ba", "label": "quality:2"}]}
  assert _text(p, steer) == ("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
                             "<extra_id_2>quality:4\nHello\n<extra_id_1>User\nReverse ab.\n<extra_id_1>Assistant\n"
                             "<extra_id_2>quality:2\n")
  pr = _prompts(prompt_template="Q: {input}\nA: {output}")
  # pieces as training cuts them (spaces before a key go with it; this tokenizer is space-sensitive)
  assert pr.segments({"input": " 1+2 ", "output": "3"}, "in.jsonl", 1) == [("Q:", False), (" 1+2", False),
                                                                          ("\nA:", False)]
  # a Hugging Face template: rendered with the generation prompt after the last (non-assistant) message
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  os.symlink(os.path.abspath(f"{MODEL}/tokenizer.model"), tok_dir / "tokenizer.model")
  chatml = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml}))
  hf = _prompts("hf", str(tok_dir))
  assert _text(hf, {"messages": msgs}) == "<|im_start|>user\nReverse aehg.<|im_end|>\n<|im_start|>assistant\n"


def _greedy_full_forward(model, ids, n_new, stop):
  """Reference decode: the whole sequence recomputed for every token (right padding never reaches a causal
  model's earlier logits)."""
  fwd = jax.jit(lambda p, t: transformer.forward(p, t, model.config))
  buf = np.zeros((1, 64), np.int32)
  buf[0, :len(ids)] = ids
  out = []
  for i in range(len(ids), len(ids) + n_new):
    t = int(jnp.argmax(fwd(model.params, jnp.asarray(buf))[0, i - 1]))
    if t in stop:
      break
    out.append(t)
    buf[0, i] = t
  return out


def test_nemo_chat_greedy_from_a_run(tmp_path):
  """A run directory's config.json supplies data.add_bos; greedy responses equal a full-forward decode, exclude
  the end of turn and the stop token, and some are the known right answers."""
  import jalign
  run = tmp_path / "run"
  run.mkdir()
  os.symlink(os.path.abspath(MODEL), run / "model")
  (run / "config.json").write_text(json.dumps({"data": {"add_bos": True}, "tokenizer": {"chat_template": "nemo"}}))
  rows = _eval_rows(12)
  inp = _write(tmp_path / "in.jsonl", rows)
  out = str(tmp_path / "out.jsonl")
  assert generate.main(["--checkpoint", str(run / "model"), "--input", inp, "--output", out, "--max-new-tokens",
                        "8", "--logprobs"]) == 0
  got = _read(out)
  assert [{k: r[k] for k in rows[0]} for r in got] == rows
  answers = [r["responses"][0] for r in got]
  questions = [r["conversations"][0]["value"] for r in rows]
  assert {0, 4, 6} <= {i for i, (q, a) in enumerate(zip(questions, answers)) if toy.grade(q, a)}
  assert answers[0] == "ghea" and all(r["finished"] == [True] for r in got)
  model = jalign.load(MODEL)
  tok = model.tokenizer
  p = _prompts(add_bos=True)
  stop = {tok.eos_id, tok.token_to_id("<extra_id_1>")}
  for i in (0, 2, 5):
    ref = _greedy_full_forward(model, p.ids(rows[i], "in", i + 1), 8, stop)
    assert tok.decode(ref) == answers[i] + "\n"  # the reply's own end of turn is not part of the response
    assert len(got[i]["logprobs"][0]) == len(ref) - 1


def test_model_dir_config_supplies_add_bos(tmp_path):
  """The shipped model directory holds its run's config.json: without --add-bos it generates as trained (with
  BOS), and the flag still overrides."""
  rows = _eval_rows(3)
  inp = _write(tmp_path / "in.jsonl", rows)
  outs = {}
  for name, flags in (("default", []), ("bos", ["--add-bos", "true"]), ("no_bos", ["--add-bos", "false"])):
    out = str(tmp_path / f"{name}.jsonl")
    assert generate.main(["--checkpoint", MODEL, "--input", inp, "--output", out, "--max-new-tokens", "8",
                          *flags]) == 0
    outs[name] = [r["responses"] for r in _read(out)]
  assert outs["default"] == outs["bos"] and outs["default"][0] == ["ghea"]
  assert outs["no_bos"] != outs["bos"]


def test_trl_and_raw_prompts_agree_with_nemo_rows(tmp_path):
  nemo = _eval_rows(3)
  trl = [{"messages": [{"role": "user", "content": r["conversations"][0]["value"]}]} for r in nemo]
  raw = [{"prompt": PROMPT_0}, {"prompt": "12+34="}]
  rows = nemo + trl + [{"prompt": trl[1]["messages"]}] + raw
  got = [r["responses"][0] for r in _run(tmp_path, rows)]
  assert got[3:6] == got[:3] and got[6] == got[1] and got[7] == got[0]
  assert isinstance(got[8], str)


def test_n_samples_reproducible_by_seed(tmp_path):
  rows = _eval_rows(3)
  flags = ("--n", "3", "--temperature", "1.5", "--batch-size", "2")
  a = _run(tmp_path, rows, *flags, "--seed", "7", name="a.jsonl")
  b = _run(tmp_path, rows, *flags, "--seed", "7", name="b.jsonl")
  c = _run(tmp_path, rows, *flags, "--seed", "8", name="c.jsonl")
  assert all(len(r["responses"]) == 3 and len(r["finished"]) == 3 for r in a)
  assert a == b and a != c
  assert any(len(set(r["responses"])) > 1 for r in a)


def test_resume_continues_where_it_stopped(tmp_path):
  """A run on a prefix, then on the whole file (after a half-written line), equals an uninterrupted run."""
  rows = _eval_rows(7)
  flags = ("--n", "2", "--temperature", "1.0", "--seed", "3", "--batch-size", "2", "--logprobs")
  full = _run(tmp_path, rows, *flags, name="full.jsonl")
  part = _run(tmp_path, _write(tmp_path / "prefix.jsonl", rows[:3]), *flags, name="resumed.jsonl")
  assert part == full[:3]
  with open(tmp_path / "resumed.jsonl", "a") as f:
    f.write('{"system": "", "conv')  # killed while writing
  assert _run(tmp_path, rows, *flags, name="resumed.jsonl") == full
  assert _run(tmp_path, rows, *flags, name="resumed.jsonl") == full  # finished: nothing to do


def test_stop_strings_cut_the_response(tmp_path):
  rows = _eval_rows(1) + [{"prompt": PROMPT_0}]
  plain = _run(tmp_path, rows, "--logprobs", name="plain.jsonl")
  cut = _run(tmp_path, rows, "--logprobs", "--stop", "xyz", "--stop", "e", name="cut.jsonl")
  assert plain[0]["responses"] == ["ghea"] and cut[0]["responses"] == ["gh"]
  assert cut[0]["finished"] == [True] and cut[0]["logprobs"][0] == plain[0]["logprobs"][0][:2]
  unstopped = _run(tmp_path, rows, "--max-new-tokens", "2", name="short.jsonl")
  assert unstopped[0]["responses"] == ["gh"] and unstopped[0]["finished"] == [False]


@pytest.mark.parametrize("row, where", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "field 'messages[0].role'"),
    ({"conversations": [], "system": ""}, "field 'conversations'"),
    ({"input": 3}, "field 'input'"),
    ({"text": "hi"}, "unrecognised row"),
])
def test_bad_rows_are_one_line_errors(tmp_path, capsys, row, where):
  inp = _write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, row])
  assert generate.main(["--checkpoint", MODEL, "--input", inp, "--output", str(tmp_path / "o.jsonl")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("jalign.generate: error: ") and "bad.jsonl:2: " in err
  assert where in err and not os.path.exists(tmp_path / "o.jsonl")


def test_cli_errors_exit_2(tmp_path):
  inp = _write(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
  other = _write(tmp_path / "other.jsonl", [{"prompt": "c"}])
  for args, msg in ((["--n", "2"], "identical responses"), (["--top-p", "0"], "--top-p=0.0"),
                    (["--output", other], "other.jsonl:1: is not input row 1")):
    r = subprocess.run([sys.executable, "-m", "jalign.generate", "--checkpoint", MODEL, "--input", inp, *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


def test_stop_ids_of_each_template():
  tok = load_tokenizer(MODEL)
  tokens = _prompts().b.chat_tokens
  assert generate.stop_ids(tok, "nemo", tokens) == sorted({tok.eos_id, tok.token_to_id("<extra_id_1>")})
  assert generate.stop_ids(tok, "hf", tokens) == [tok.eos_id]  # no end-of-turn token in this vocabulary
  with pytest.raises(DataError, match="empty prompt"):
    _prompts().ids({"prompt": ""}, "in.jsonl", 1)


def test_windows_align_to_multiples_of_their_size():
  """A resumed run batches the remaining rows as an uninterrupted run does, after its first window."""
  assert list(generate.windows(5, 40, 16)) == [(5, 16), (16, 32), (32, 40)]
  assert list(generate.windows(0, 16, 16)) == [(0, 16)] and list(generate.windows(16, 16, 16)) == []


def test_compile_cache_keeps_the_compiled_sampler(tmp_path):
  """``--compile-cache DIR`` (outside the suite's own cache) leaves the compiled prefill and decode in DIR."""
  inp = _write(tmp_path / "in.jsonl", _eval_rows(2))
  cache = tmp_path / "xla"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  r = subprocess.run([sys.executable, "-m", "jalign.generate", "--checkpoint", MODEL, "--input", inp, "--output",
                      str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--compile-cache", str(cache)],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr
  assert len(list(cache.iterdir())) >= 2, sorted(os.listdir(cache))
