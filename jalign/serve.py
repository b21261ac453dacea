"""``python -m jalign.serve --checkpoint CK [--reward-checkpoint RM]``: an HTTP server for a model.

FastAPI on uvicorn. Endpoints: NeMo's ``PUT /generate``, OpenAI's ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``stream`` over server-sent events), ``GET /v1/models``, ``GET /health`` and
``POST /v1/score`` (a reward model's rewards for prompt/response rows). One decode thread owns a fixed batch of
slots: requests join and leave it between chunks of ``--chunk`` decode steps, so concurrent requests share every
decode step (continuous batching). Stop strings are found on the host after each chunk, in the incrementally
decoded text.

Limits answer 4xx JSON errors ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed or invalid
requests (bad JSON, wrong types, unknown fields, out-of-range values, prompts over ``--max-prompt-tokens``,
``max_tokens`` over ``--max-new-tokens``), 401 for a missing or wrong API key, 404 for an unknown model or route,
413 for bodies over ``--max-body-bytes``; 503 when ``--slots`` + ``--max-queue`` sequences are already in flight.
SIGTERM stops accepting connections, finishes the requests in flight, and exits 0.

SteerLM: a chat request may carry ``attributes`` (``{"verbosity": 0}`` or ``"quality:4,verbosity:0"``; with the
``openai`` client, ``extra_body={"attributes": ...}``): they are rendered as the reply's label after
``<extra_id_2>``, as ``python -m jalign.generate --attributes`` does; bad attributes answer 400.
"""

import argparse
import asyncio
import bisect
import collections
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from typing import Literal

from jalign import config as config_lib

log = logging.getLogger("jalign.serve")

NEMO_MAX_SENTENCES = 128  # as NeMo's server


class ApiError(Exception):
  def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- text from tokens

class Detok:
  """Incremental detokenisation: the text each new token adds after the tokens before it. A token that ends
  inside a multi-byte character adds nothing until a later token completes it."""

  def __init__(self, tok, context=()):
    self.tok, self.ids = tok, list(context[-4:])
    self.start, self.read = 0, len(self.ids)  # decode(ids[start:read]) is already handed out

  def push(self, token: int) -> str:
    self.ids.append(token)
    before = self.tok.decode(self.ids[self.start:self.read])
    now = self.tok.decode(self.ids[self.start:])
    if now.endswith("\ufffd"):
      return ""
    self.ids = self.ids[self.read:]
    self.start, self.read = 0, len(self.ids)
    return now[len(before):]


def token_texts(tok, ids, context=()) -> list[str]:
  d = Detok(tok, context)
  return [d.push(t) for t in ids]


class Seq:
  """One sampled continuation. The decode thread feeds it tokens and publishes ``snap`` = (text, tokens covering
  the text, finish reason or None); request handlers only read snapshots."""

  def __init__(self, prompt, sp, seed, stop_ids, stops=(), *, tok, keep_stop=False, end_of_turn="", sample=0):
    self.prompt, self.sp, self.seed, self.stop_ids = list(prompt), sp, seed, sorted(stop_ids)
    self.sample = sample  # the stream index under seed: the n choices of a request share its seed
    self.stops, self.keep_stop, self.end_of_turn = [s for s in stops if s], keep_stop, end_of_turn
    self.detok = Detok(tok, self.prompt)
    self.ids, self.logprobs, self.pieces, self.ends = [], [], [], []  # visible tokens, their texts, text ends
    self.n_generated = 0
    self.hold = max([len(s) - 1 for s in self.stops] + [len(end_of_turn)])  # characters held back while running
    self.snap = ("", 0, None)
    self.cancelled = self.ended = False  # ended: no longer counted against the server's capacity
    self.wake = lambda: None

  def feed(self, toks, lps, finished: bool, done: bool) -> bool:
    """Take one chunk's tokens; True when the sequence is over (a stop string may end it before the engine)."""
    self.n_generated += len(toks)
    if finished and toks and toks[-1] in self.stop_ids:  # the stop token ends the text, not part of it
      toks, lps = toks[:-1], lps[:-1]
    searched = self.ends[-1] if self.ends else 0  # text already searched for stop strings
    for t, lp in zip(toks, lps):
      piece = self.detok.push(t)
      self.ids.append(t)
      self.logprobs.append(lp)
      self.pieces.append(piece)
      self.ends.append((self.ends[-1] if self.ends else 0) + len(piece))
    text = "".join(self.pieces)
    cut = self._stop_at(text, max(0, searched - self.hold))
    if cut is not None:
      self._finish(text[:cut], "stop", by_string=True)
      return True
    if done:
      if finished and self.end_of_turn and text.endswith(self.end_of_turn):  # it closes the reply
        text = text[:-len(self.end_of_turn)]
      self._finish(text, "stop" if finished else "length")
      return True
    safe = max(0, len(text) - self.hold)
    self.snap = (text[:safe], bisect.bisect_right(self.ends, safe), None)
    return False

  def _stop_at(self, text, start):
    hits = [(i, s) for s in self.stops if (i := text.find(s, start)) >= 0]
    if not hits:
      return None
    i, s = min(hits)
    return i + len(s) if self.keep_stop else i

  def _finish(self, text, reason, by_string=False):
    n = bisect.bisect_left(self.ends, len(text)) + 1 if text else 0  # tokens covering the text
    n = min(n, len(self.ends))
    if by_string:
      self.n_generated = n
    self.snap = (text, n, reason)

  def fail(self):
    self.snap = (self.snap[0], self.snap[1], "error")

  @property
  def done(self) -> bool:
    return self.snap[2] is not None


# ---------------------------------------------------------------------------------------------- decode thread

class Worker:
  """Owns the Slots: admits waiting sequences into free slots, steps them a chunk at a time, feeds their tokens
  back. At most ``capacity`` sequences are accepted at once."""

  def __init__(self, slots, chunk: int, capacity: int):
    self.slots, self.chunk, self.capacity = slots, chunk, capacity
    self.waiting, self.owner, self.load = collections.deque(), {}, 0
    self.cv = threading.Condition()
    self.stopping = False
    self.thread = threading.Thread(target=self._run, name="jalign-decode", daemon=True)

  def start(self):
    self.thread.start()

  def submit(self, seqs) -> bool:
    with self.cv:
      if self.load + len(seqs) > self.capacity:
        return False
      self.load += len(seqs)
      self.waiting.extend(seqs)
      self.cv.notify()
      return True

  def stop(self):
    """Let the sequences in flight finish, then end the thread."""
    with self.cv:
      self.stopping = True
      self.cv.notify()
    self.thread.join()

  def _run(self):
    while True:
      with self.cv:
        while not self.waiting and not self.owner and not self.stopping:
          self.cv.wait()
        if self.stopping and not self.waiting and not self.owner:
          return
        admit = [(s, self.waiting.popleft()) for s in self.slots.free()[:len(self.waiting)]]
      try:
        self._step(admit)
      except Exception:  # a device failure must not leave requests waiting forever
        log.exception("decode step failed")
        self._fail_all([q for _, q in admit])

  def _step(self, admit):
    for s, seq in admit:
      if seq.cancelled:
        self._end(seq)
        continue
      self.slots.admit(s, seq.prompt, seq.sp, seed=seq.seed, sample=seq.sample, stop_ids=seq.stop_ids)
      self.owner[s] = seq
    if not self.owner:
      return
    for s, toks, lps, finished, done in self.slots.step(self.chunk):
      seq = self.owner[s]
      over = seq.feed(toks, lps, finished, done) or seq.cancelled
      if over:
        if not done:
          self.slots.release(s)
        del self.owner[s]
        self._end(seq)
      seq.wake()

  def _end(self, seq):
    with self.cv:
      if not seq.ended:
        seq.ended = True
        self.load -= 1

  def _fail_all(self, admitted):
    for seq in list(self.owner.values()) + admitted:
      if not seq.ended:
        seq.fail()
        self._end(seq)
        seq.wake()
    for s in self.owner:
      self.slots.release(s)
    self.owner.clear()


class Batch:
  """The sequences of one request and an asyncio queue their progress arrives on (from the decode thread)."""

  def __init__(self, seqs, loop):
    self.seqs, self.queue = seqs, asyncio.Queue()
    for i, seq in enumerate(seqs):
      seq.wake = lambda i=i: loop.call_soon_threadsafe(self.queue.put_nowait, i)

  async def updates(self):
    """(index, snapshot) as sequences progress, until every one is done."""
    left = set(range(len(self.seqs)))
    for i, s in enumerate(self.seqs):  # those done before anyone listened
      if s.done:
        left.discard(i)
        yield i, s.snap
    while left:
      i = await self.queue.get()
      if i not in left:
        continue
      snap = self.seqs[i].snap
      if snap[2] is not None:
        left.discard(i)
      yield i, snap

  async def results(self):
    async for _ in self.updates():
      pass
    if any(s.snap[2] == "error" for s in self.seqs):
      raise ApiError(500, "generation failed on the device; see the server log", "server_error")
    return [s.snap for s in self.seqs]

  def cancel(self):
    for s in self.seqs:
      s.cancelled = True


# ---------------------------------------------------------------------------------------------- request models

def _models():
  """The pydantic request models (built on first use: pydantic is a server dependency)."""
  from pydantic import BaseModel, ConfigDict, Field

  class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

  class StreamOptions(Body):
    include_usage: bool = False

  class Sampling(Body):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    min_tokens: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, lt=2 ** 32)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

  class Completion(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)

  class TextPart(Body):
    type: Literal["text"]
    text: str

  class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart]
    name: str | None = None

  class Chat(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    attributes: dict[str, int] | str | None = None  # SteerLM: the reply's desired attributes

  class Nemo(Body):
    sentences: list[str] = Field(min_length=1, max_length=NEMO_MAX_SENTENCES)
    tokens_to_generate: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, le=100)
    add_BOS: bool = False
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.9, ge=0, le=1)
    greedy: bool = False
    all_probs: bool = False
    repetition_penalty: float = Field(1.0, ge=1)
    min_tokens_to_generate: int = Field(0, ge=0)
    end_strings: list[str] = ["<|endoftext|>"]
    compute_logprob: bool = False
    random_seed: int | None = Field(None, ge=0, lt=2 ** 32)

  class ScoreRow(Body):
    prompt: str | None = None
    response: str | None = None
    messages: list[Message] | None = None

  class Score(Body):
    model: str | None = None
    rows: list[ScoreRow] = Field(min_length=1, max_length=1024)

  return Completion, Chat, Nemo, Score


# ---------------------------------------------------------------------------------------------- the server

def _text(content) -> str:
  return content if isinstance(content, str) else "".join(p.text for p in content)


class Server:
  """The loaded model(s), the decode worker and the request handling behind the routes."""

  def __init__(self, args):
    import jalign
    from jalign import generate as gen
    from jalign.generation import Engine, Slots
    from jalign.score import data_settings
    self.args, self.name = args, args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    model = jalign.load(args.checkpoint)
    if model.tokenizer is None:
      raise ValueError(f"{args.checkpoint} has no tokenizer")
    self.model, self.tok = model, model.tokenizer
    self.data_cfg, self.template = data_settings(argparse.Namespace(
        checkpoint=args.checkpoint, add_bos=args.add_bos, add_eos=None, max_seq_len=None, truncation="error",
        chat_template=args.chat_template))
    self.prompts = gen.Prompts(self.tok, self.data_cfg, self.template)
    self.chat_stops = gen.stop_ids(self.tok, self.template, self.prompts.b.chat_tokens)
    self.end_of_turn = self.prompts.b.chat_tokens.end_of_turn if self.template == "nemo" else ""
    self.eos = [self.tok.eos_id] if self.tok.eos_id is not None else []
    self.engine = Engine(model.params, model.config, batch_size=args.slots, max_new_tokens=args.max_new_tokens,
                         pad_id=self.tok.pad_id)
    self.slots = Slots(self.engine, size=args.slots, max_prompt=args.max_prompt_tokens)
    self.worker = Worker(self.slots, args.chunk, args.slots + args.max_queue)
    self.scorer = self._scorer(args) if args.reward_checkpoint else None
    self.score_lock = threading.Lock()
    self._prompt_lp = None
    self.created = int(time.time())

  def _scorer(self, args):
    import jalign
    from jalign.data import preference
    from jalign.score import Scorer, data_settings
    rm = jalign.load(args.reward_checkpoint)
    if rm.tokenizer is None:
      raise ValueError(f"{args.reward_checkpoint} has no tokenizer")
    data_cfg, template = data_settings(argparse.Namespace(
        checkpoint=args.reward_checkpoint, add_bos=None, add_eos=None, max_seq_len=None, truncation="error",
        chat_template=None))
    self.pair_tok = preference.PairTokenizer(rm.tokenizer, data_cfg, template)
    self.rm_name = os.path.basename(os.path.normpath(args.reward_checkpoint))
    return Scorer(rm)

  def warm_up(self):
    """Compile prefill for every prompt bucket, the insert and the decode chunk before serving."""
    from jalign.generation import SamplingParams
    for b in self.engine.buckets:
      if b > self.slots.max_prompt:
        break
      self.slots.admit(0, [self.tok.pad_id] * b, SamplingParams(max_new_tokens=1))
      self.slots.step(self.args.chunk)

  # -------------------------------------------------------------------------------------------- common checks

  def _check_model(self, model):
    if model is not None and model != self.name:
      raise ApiError(404, f"model {model!r} does not exist; this server serves {self.name!r}", "not_found_error",
                     "model", "model_not_found")

  def _sampling(self, r, max_tokens):
    from jalign.generation import SamplingParams
    a = self.args
    if max_tokens > a.max_new_tokens:
      raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of {a.max_new_tokens}",
                     param="max_tokens")
    if r.top_k > self.engine.k_cap:
      raise ApiError(400, f"top_k={r.top_k} is over this server's limit of {self.engine.k_cap}", param="top_k")
    if r.min_tokens > max_tokens:
      raise ApiError(400, f"min_tokens={r.min_tokens} is over max_tokens={max_tokens}", param="min_tokens")
    return SamplingParams(temperature=r.temperature, top_k=max(r.top_k, 0), top_p=r.top_p, min_p=r.min_p,
                          repetition_penalty=r.repetition_penalty, min_tokens=r.min_tokens,
                          max_new_tokens=max_tokens)

  def _check_prompt(self, ids, param):
    if not ids:
      raise ApiError(400, "the prompt is empty", param=param)
    if len(ids) > self.args.max_prompt_tokens:
      raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                     f"{self.args.max_prompt_tokens}", param=param)
    if max(ids) >= self.model.config.vocab_size or min(ids) < 0:
      raise ApiError(400, f"prompt token ids must be in [0, {self.model.config.vocab_size})", param=param)
    return ids

  @staticmethod
  def _stops(stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
      raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
    return stops

  async def _run(self, seqs):
    batch = Batch(seqs, asyncio.get_running_loop())
    if len(seqs) > self.worker.capacity:
      raise ApiError(400, f"the request asks for {len(seqs)} sequences; this server runs at most "
                     f"{self.worker.capacity} at once", param="n")
    if not self.worker.submit(seqs):
      raise ApiError(503, "the server is busy; try again shortly", "server_overloaded", None, "queue_full")
    return batch

  # -------------------------------------------------------------------------------------------- OpenAI

  async def completions(self, r):
    self._check_model(r.model)
    p = r.prompt
    if isinstance(p, list) and not p:
      raise ApiError(400, "prompt is an empty list", param="prompt")
    if isinstance(p, str) or (isinstance(p, list) and isinstance(p[0], int)):
      p = [p]
    prompts = [self._check_prompt(self._encode(x) if isinstance(x, str) else list(x), "prompt") for x in p]
    sp = self._sampling(r, r.max_tokens or 16)
    stops, seed = self._stops(r.stop), self._seed(r.seed)
    seqs = [Seq(ids, sp, seed, self.eos, stops, tok=self.tok, sample=j) for ids in prompts for j in range(r.n)]
    batch = await self._run(seqs)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.name}
    logprobs = r.logprobs is not None
    usage = lambda: self._usage(prompts, seqs, r.n)
    if r.stream:
      return self._sse(batch, base, lambda i, text, lo, hi, reason: {
          "index": i, "text": text, "logprobs": self._cmpl_logprobs(seqs[i], lo, hi) if logprobs else None,
          "finish_reason": reason}, usage if r.stream_options and r.stream_options.include_usage else None)
    snaps = await batch.results()
    choices = [{"index": i, "text": t, "logprobs": self._cmpl_logprobs(seqs[i], 0, n) if logprobs else None,
                "finish_reason": reason} for i, (t, n, reason) in enumerate(snaps)]
    return {**base, "choices": choices, "usage": usage()}

  async def chat(self, r):
    from jalign.data import DataError
    self._check_model(r.model)
    if r.max_tokens and r.max_completion_tokens:
      raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    msgs = [{"role": m.role, "content": _text(m.content)} for m in r.messages]
    try:
      ids = self.prompts.ids({"prompt": msgs}, "messages", 0, r.attributes)
    except DataError as e:
      raise ApiError(400, str(e), param="attributes" if e.field == "attributes" else "messages") from None
    self._check_prompt(ids, "messages")
    sp = self._sampling(r, r.max_tokens or r.max_completion_tokens or self.args.max_new_tokens)
    stops, seed = self._stops(r.stop), self._seed(r.seed)
    seqs = [Seq(ids, sp, seed, self.chat_stops, stops, tok=self.tok, end_of_turn=self.end_of_turn, sample=j)
            for j in range(r.n)]
    batch = await self._run(seqs)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.name}
    usage = lambda: self._usage([ids], seqs, r.n)
    if r.stream:
      def choice(i, text, lo, hi, reason):
        delta = {"content": text} if text or reason is None else {}
        return {"index": i, "delta": delta, "logprobs": self._chat_logprobs(seqs[i], lo, hi) if r.logprobs else None,
                "finish_reason": reason}
      first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
               for i in range(len(seqs))]
      return self._sse(batch, {**base, "object": "chat.completion.chunk"}, choice,
                       usage if r.stream_options and r.stream_options.include_usage else None, first)
    snaps = await batch.results()
    choices = [{"index": i, "message": {"role": "assistant", "content": t},
                "logprobs": self._chat_logprobs(seqs[i], 0, n) if r.logprobs else None, "finish_reason": reason}
               for i, (t, n, reason) in enumerate(snaps)]
    return {**base, "choices": choices, "usage": usage()}

  def _encode(self, text):
    ids = self.tok.encode(text)
    return [self.tok.bos_id] + ids if self.data_cfg.add_bos and self.tok.bos_id is not None else ids

  @staticmethod
  def _seed(seed):
    return secrets.randbits(32) if seed is None else seed

  @staticmethod
  def _usage(prompts, seqs, n):
    p = sum(len(x) for x in prompts)
    c = sum(s.n_generated for s in seqs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

  @staticmethod
  def _cmpl_logprobs(seq, lo, hi):
    starts = [0] + seq.ends[:hi]
    return {"tokens": seq.pieces[lo:hi], "token_logprobs": seq.logprobs[lo:hi], "top_logprobs": None,
            "text_offset": starts[lo:hi]}

  @staticmethod
  def _chat_logprobs(seq, lo, hi):
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(seq.pieces[lo:hi], seq.logprobs[lo:hi])]}

  def _sse(self, batch, base, choice, usage=None, first=()):
    """A server-sent-event stream of chunks: each new piece of text (and its tokens), then the finish reason,
    then an optional usage chunk and ``[DONE]``. A client that goes away cancels its sequences."""
    from fastapi.responses import StreamingResponse

    def event(obj):
      return f"data: {json.dumps(obj)}\n\n"

    async def gen():
      sent = [(0, 0)] * len(batch.seqs)  # (characters, tokens) handed out per sequence
      try:
        for c in first:
          yield event({**base, "choices": [c]})
        async for i, (text, n, reason) in batch.updates():
          if reason == "error":
            yield event({"error": ApiError(500, "generation failed on the device", "server_error").body()["error"]})
            return
          chars, toks = sent[i]
          if len(text) > chars or n > toks or reason:
            yield event({**base, "choices": [choice(i, text[chars:], toks, n, reason)]})
            sent[i] = (len(text), n)
        if usage is not None:
          yield event({**base, "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"
      finally:
        batch.cancel()

    return StreamingResponse(gen(), media_type="text/event-stream")

  # -------------------------------------------------------------------------------------------- NeMo

  async def nemo_generate(self, r):
    """NeMo's answer: ``sentences`` (prompt + generated text, end string included), ``tokens`` (the text of each
    token, prompt included), ``offsets`` (where each token's text starts in its sentence), ``token_ids`` and
    ``logprob`` (with ``compute_logprob``: the log-prob of every token after the first, prompt included; else
    null)."""
    from jalign.generation import SamplingParams
    if r.all_probs:
      raise ApiError(400, "all_probs (full-vocabulary log-probs) is not supported; use compute_logprob",
                     param="all_probs")
    if r.tokens_to_generate > self.args.max_new_tokens:
      raise ApiError(400, f"tokens_to_generate={r.tokens_to_generate} is over this server's limit of "
                     f"{self.args.max_new_tokens}", param="tokens_to_generate")
    if r.top_k > self.engine.k_cap:
      raise ApiError(400, f"top_k={r.top_k} is over this server's limit of {self.engine.k_cap}", param="top_k")
    bos = [self.tok.bos_id] if r.add_BOS and self.tok.bos_id is not None else []
    prompts = [self._check_prompt(bos + self.tok.encode(s), "sentences") for s in r.sentences]
    sp = SamplingParams(temperature=0.0 if r.greedy else r.temperature, top_k=r.top_k, top_p=r.top_p or 1.0,
                        repetition_penalty=r.repetition_penalty,
                        min_tokens=min(r.min_tokens_to_generate, r.tokens_to_generate),
                        max_new_tokens=r.tokens_to_generate)
    seed = self._seed(r.random_seed)
    seqs = [Seq(ids, sp, seed, self.eos, r.end_strings, tok=self.tok, keep_stop=True, sample=i)
            for i, ids in enumerate(prompts)]
    snaps = await (await self._run(seqs)).results()
    out = {"sentences": [], "tokens": [], "offsets": [], "token_ids": [], "logprob": [] if r.compute_logprob else None}
    for sentence, ids, seq, (text, n, _) in zip(r.sentences, prompts, seqs, snaps):
      texts = token_texts(self.tok, ids) + seq.pieces[:n]
      out["sentences"].append(sentence + text)
      out["tokens"].append(texts)
      out["offsets"].append([0] + [sum(map(len, texts[:k])) for k in range(1, len(texts))])
      out["token_ids"].append(ids + seq.ids[:n])
      if r.compute_logprob:
        out["logprob"].append(await asyncio.to_thread(self._prompt_logprobs, ids) + seq.logprobs[:n])
    return out

  def _prompt_logprobs(self, ids) -> list[float]:
    """log p(token t | tokens before) for t = 1 .. len - 1 (one compile per prompt bucket)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jalign.models import transformer
    if self._prompt_lp is None:
      cfg = self.model.config

      def f(params, tokens_1P):
        lp = jax.nn.log_softmax(transformer.forward(params, tokens_1P, cfg)[0, :-1].astype(jnp.float32))
        return jnp.take_along_axis(lp, tokens_1P[0, 1:, None], -1)[:, 0]
      self._prompt_lp = jax.jit(f)
    P = self.engine.bucket(len(ids))
    tokens = np.full((1, P), self.tok.pad_id, np.int32)
    tokens[0, :len(ids)] = ids
    return np.asarray(self._prompt_lp(self.model.params, jnp.asarray(tokens)))[:len(ids) - 1].tolist()

  # -------------------------------------------------------------------------------------------- scores

  async def score(self, r):
    from jalign.data import DataError
    if self.scorer is None:
      raise ApiError(404, "this server has no reward model; start it with --reward-checkpoint RM",
                     "not_found_error", None, "no_reward_model")
    if r.model is not None and r.model != self.rm_name:
      raise ApiError(404, f"model {r.model!r} does not exist; the reward model is {self.rm_name!r}",
                     "not_found_error", "model", "model_not_found")
    examples = []
    for i, row in enumerate(r.rows):
      if row.messages is not None and row.prompt is None and row.response is None:
        obj = {"messages": [{"role": m.role, "content": _text(m.content)} for m in row.messages]}
      elif row.messages is None and row.prompt is not None and row.response is not None:
        obj = {"prompt": row.prompt, "completion": row.response}
      else:
        raise ApiError(400, f"rows[{i}]: give prompt and response, or messages", param=f"rows[{i}]")
      try:
        segs, eos = self.pair_tok.builder.segments(obj, "rows", i)
        examples.append(self.pair_tok.encode(segs, eos, "rows", i))
      except DataError as e:
        raise ApiError(400, f"rows[{i}]: {e}", param=f"rows[{i}]") from None
    rewards = await asyncio.to_thread(self._score, examples)
    return {"object": "list", "model": self.rm_name, "rewards": rewards}

  def _score(self, examples):
    with self.score_lock:  # one batch at a time (in a worker thread, never on the event loop)
      return self.scorer(examples)


# ---------------------------------------------------------------------------------------------- HTTP layer

class Guard:
  """ASGI middleware in front of every route: the API key (every path but /health), then the body-size limit,
  enforced on Content-Length and on the bytes actually read, before anything parses the body."""

  def __init__(self, app, max_body: int, api_key: str | None):
    self.app, self.max_body = app, max_body
    self.key = f"Bearer {api_key}".encode() if api_key else None

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope["headers"])
    if self.key and scope["path"] != "/health" and not secrets.compare_digest(
        headers.get(b"authorization", b""), self.key):
      return await _send(send, ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                        "authentication_error", None, "invalid_api_key"))
    too_big = ApiError(413, f"request body over {self.max_body} bytes", param=None, code="body_too_large")
    length = headers.get(b"content-length", b"0")
    if not length.isdigit() or int(length) > self.max_body:
      return await _send(send, too_big)
    body, more = bytearray(), True
    while more:
      msg = await receive()
      if msg["type"] == "http.disconnect":
        return
      body += msg.get("body", b"")
      more = msg.get("more_body", False)
      if len(body) > self.max_body:
        return await _send(send, too_big)
    replayed = False

    async def replay():
      nonlocal replayed
      if replayed:
        return await receive()
      replayed = True
      return {"type": "http.request", "body": bytes(body), "more_body": False}

    await self.app(scope, replay, send)


async def _send(send, err: ApiError):
  body = json.dumps(err.body()).encode()
  await send({"type": "http.response.start", "status": err.status,
              "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
  await send({"type": "http.response.body", "body": body})


def _validation_message(exc) -> tuple[str, str | None]:
  errs = exc.errors()
  if not errs:
    return "invalid request", None
  e = errs[0]
  loc = [str(x) for x in e.get("loc", ()) if x != "body"]
  if e.get("type") == "json_invalid":
    return f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
  where = ".".join(loc)
  more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
  return (f"{where}: {e.get('msg')}" if where else e.get("msg", "invalid request")) + more, where or None


def build_app(server: Server):
  from contextlib import asynccontextmanager

  from fastapi import FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import JSONResponse
  from starlette.exceptions import HTTPException
  Completion, Chat, Nemo, Score = _models()

  @asynccontextmanager
  async def lifespan(app):
    server.worker.start()
    yield
    await asyncio.to_thread(server.worker.stop)  # uvicorn has already waited for the requests in flight

  app = FastAPI(title="jalign", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(ApiError)
  async def api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)

  @app.exception_handler(RequestValidationError)
  async def invalid(request: Request, exc: RequestValidationError):
    message, param = _validation_message(exc)
    return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, exc: HTTPException):
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

  @app.exception_handler(Exception)
  async def crash(request: Request, exc: Exception):
    log.exception("request failed")
    return JSONResponse(ApiError(500, "internal error; see the server log", "server_error").body(), status_code=500)

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "jalign",
            "max_model_len": server.args.max_prompt_tokens + server.args.max_new_tokens}
    return {"object": "list", "data": [card]}

  @app.post("/v1/completions")
  async def completions(body: Completion):
    return await server.completions(body)

  @app.post("/v1/chat/completions")
  async def chat(body: Chat):
    return await server.chat(body)

  @app.put("/generate")
  async def generate(body: Nemo):
    return await server.nemo_generate(body)

  @app.post("/v1/score")
  async def score(body: Score):
    return await server.score(body)

  return Guard(app, server.args.max_body_bytes, server.args.api_key)


# ---------------------------------------------------------------------------------------------- command line

def _parser():
  p = argparse.ArgumentParser(prog="python -m jalign.serve", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="a run, a jalign model dir, an HF dir or a .nemo")
  p.add_argument("--reward-checkpoint", help="a reward model for POST /v1/score")
  p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint's name)")
  p.add_argument("--api-key", default=os.environ.get("JALIGN_API_KEY"),
                 help="require Authorization: Bearer KEY (default: $JALIGN_API_KEY)")
  p.add_argument("--slots", type=int, default=16, help="sequences decoded together")
  p.add_argument("--chunk", type=int, default=16, help="decode steps between admissions")
  p.add_argument("--max-prompt-tokens", type=int, default=512)
  p.add_argument("--max-new-tokens", type=int, default=256, help="the most max_tokens a request may ask")
  p.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a slot before 503")
  p.add_argument("--max-body-bytes", type=int, default=1 << 20)
  p.add_argument("--chat-template", choices=("nemo", "hf"), help="default: the run's, else nemo")
  p.add_argument("--add-bos", type=lambda s: s.lower() in ("1", "true", "yes"),
                 help="BOS before chat and completion prompts (default: the run's data.add_bos)")
  p.add_argument("--compile-cache", default=config_lib.COMPILE_CACHE,
                 help="JAX's persistent compilation cache: a restart loads the compiled sampler (\"\": off)")
  p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
  return p


def _check(args):
  for name in ("slots", "chunk", "max_prompt_tokens", "max_new_tokens", "max_body_bytes", "port"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
  if args.max_queue < 0:
    raise ValueError("--max-queue must be >= 0")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    import fastapi  # noqa: F401
    import uvicorn
  except ImportError:
    print('jalign.serve: error: the server needs FastAPI and uvicorn: pip install -e ".[serve]"', file=sys.stderr)
    return 2
  logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
  config_lib.enable_compile_cache(args.compile_cache)
  from jalign.checkpoint import CheckpointError
  from jalign.data import DataError, TokenizerError
  try:
    _check(args)
    server = Server(args)
    server.warm_up()
  except (ValueError, DataError, TokenizerError, CheckpointError, FileNotFoundError) as e:
    print(f"jalign.serve: error: {e}", file=sys.stderr)
    return 2
  config = uvicorn.Config(build_app(server), host=args.host, port=args.port, log_level=args.log_level,
                          timeout_graceful_shutdown=None)
  # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler makes that a clean exit
  signal.signal(signal.SIGTERM, lambda *_: None)
  print(f"jalign.serve: {server.name} on http://{args.host}:{args.port}", flush=True)
  uvicorn.Server(config).run()
  return 0


if __name__ == "__main__":
  sys.exit(main())
