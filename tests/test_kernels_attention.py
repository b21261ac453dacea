"""Pallas attention kernels (``kernels/flash_attention.py``, ``kernels/decode_attention.py``) in interpret mode on
CPU against the pure-JAX references: values and gradients, masks, GQA, padding, NaN-poisoned caches.

Unwritten outputs: in interpret mode Pallas starts every float output buffer as NaN (the interpreter fills outputs
with ``uninitialized_value``; ``test_interpret_mode_poisons_unwritten_outputs`` shows it with a kernel that skips
a block). So every element these tests compare (visible rows against the reference, fully masked rows against an
exact 0, gradients computed from the lse residual) fails if a kernel leaves it unwritten.
"""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jalign.kernels import attention_reference

# the modules, whatever the package exports under the same names
fa = importlib.import_module("jalign.kernels.flash_attention")
da = importlib.import_module("jalign.kernels.decode_attention")

BLOCKS = dict(block_q=8, block_k=16, block_q_bwd=16, block_k_bwd=8)  # differing fwd/bwd tiles: T pads to 16s


def _visible(q_seg, kv_seg, q_pos, kv_pos, causal, window, q_br=None, kv_br=None):
  """[B, T, S] numpy mask with the reference's rules."""
  ok = q_seg[:, :, None] == kv_seg[:, None, :]
  delta = q_pos[:, :, None] - kv_pos[:, None, :]
  if causal:
    ok &= delta >= 0
  if window:
    ok &= delta < window
  if q_br is not None:
    ok &= (kv_br[:, None, :] == 0) | (kv_br[:, None, :] == q_br[:, :, None])
  return ok


def _softcap_reference(q, k, v, visible, scale, cap):
  """Reference with a logit soft cap (``attention_reference`` has none); [B, S, K, D] keys."""
  B, T, H, D = q.shape
  k, v = (jnp.repeat(x, H // x.shape[2], axis=2) for x in (k, v))
  s = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  s = jnp.where(jnp.asarray(visible)[:, None], cap * jnp.tanh(s / cap), -jnp.inf)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def _close(got, want, rtol):
  """Max error relative to the scale of ``want``."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= rtol * scale, f"max error {err:.3g} > {rtol} * {scale:.3g}"


def _packed(lengths, T):
  """Segment ids 1, 2, ... of the given lengths, then padding (0); positions restart per segment."""
  seg, pos = np.zeros(T, np.int32), np.zeros(T, np.int32)
  start = 0
  for i, n in enumerate(lengths):
    seg[start:start + n] = i + 1
    pos[start:start + n] = np.arange(n)
    start += n
  pos[start:] = np.arange(T - start)
  return seg, pos


# name: (dtype, B, T, S, H, K, D, causal, window, softcap, kv_heads_first, segments per row, branches, cross)
CASES = {
    "mha_causal_ragged": (jnp.float32, 2, 20, 20, 2, 2, 8, True, 0, 0.0, False, ([9, 8], [20]), False, False),
    "gqa4_branch_window_softcap": (jnp.float32, 2, 20, 20, 8, 2, 8, True, 5, 5.0, False, ([12, 6], [7, 7]), True,
                                   False),
    "gqa8_heads_first_bidirectional": (jnp.float32, 2, 24, 24, 8, 1, 16, False, 0, 0.0, True, ([10, 9], [24]),
                                       False, False),
    "bf16_gqa4_causal": (jnp.bfloat16, 2, 20, 20, 4, 1, 8, True, 0, 0.0, False, ([5, 11], [13]), False, False),
    "cross_fully_masked_rows": (jnp.float32, 1, 12, 28, 4, 2, 8, True, 0, 0.0, False, None, False, True),
}


def _case_inputs(case, seed):
  dtype, B, T, S, H, K, D, causal, window, cap, heads_first, segs, branches, cross = case
  rng = np.random.RandomState(seed)
  q = rng.randn(B, T, H, D).astype(np.float32)
  k, v = (rng.randn(B, S, K, D).astype(np.float32) for _ in range(2))
  ids = {}
  if cross:  # 12 new tokens at positions 16..27 over a 28-slot context; segment 3 has no key: fully masked rows
    q_seg, kv_seg = np.array([[1] * 4 + [3] * 2 + [2] * 6]), np.array([[1] * 20 + [2] * 8])
    q_pos, kv_pos = np.arange(16, 28)[None], np.arange(28)[None]
    ids.update(kv_segment_ids_BS=kv_seg, q_positions_BT=q_pos, kv_positions_BS=kv_pos)
    q_br = kv_br = None
  else:
    q_seg, q_pos = (np.stack(x) for x in zip(*(_packed(lengths, T) for lengths in segs)))
    kv_seg, kv_pos = q_seg, q_pos
    ids.update(q_positions_BT=q_pos, kv_positions_BS=kv_pos)
    q_br = kv_br = None
    if branches:  # row 0: [prompt 4, chosen 4, rejected 4 | prompt 2, chosen 2, rejected 2], row 1: two pairs
      q_br = np.array([[0] * 4 + [1] * 4 + [2] * 4 + [0, 0, 1, 1, 2, 2] + [0] * 2,
                       [0, 0, 0, 1, 1, 2, 2] * 2 + [0] * 6])
      q_pos = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 0, 1, 2, 3, 2, 3, 0, 1],
                        [0, 1, 2, 3, 4, 3, 4] * 2 + list(range(6))])
      kv_br, kv_pos = q_br, q_pos
      ids.update(q_branch_ids_BT=q_br, q_positions_BT=q_pos, kv_positions_BS=kv_pos)
  ids["q_segment_ids_BT"] = q_seg
  visible = _visible(q_seg, kv_seg, q_pos, kv_pos, causal, window, q_br, kv_br)
  ct = rng.randn(B, T, H, D).astype(np.float32) * visible.any(-1)[:, :, None, None]  # masked rows: no gradient
  if heads_first:
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  cast = lambda x: jnp.asarray(x, dtype)
  kw = dict(causal=causal, sliding_window=window, kv_heads_first=heads_first,
            **{n: jnp.asarray(x) for n, x in ids.items()})
  return (cast(q), cast(k), cast(v)), cast(ct), kw, visible


def _value_and_vjp(f, args, ct):
  out, vjp = jax.vjp(f, *args)
  return out, vjp(ct)


def _check_flash(name, rtol, **kernel_kw):
  case = CASES[name]
  dtype, cap = case[0], case[9]
  (q, k, v), ct, kw, visible = _case_inputs(case, seed=len(name))
  kernel = functools.partial(fa.flash_attention, softcap=cap, **kernel_kw, **kw)
  out, grads = jax.jit(functools.partial(_value_and_vjp, kernel))((q, k, v), ct)

  f32 = lambda x: x.astype(jnp.float32)  # bf16 inputs: compare with the float32 computation on the same values
  if cap:  # the soft-capped case keeps keys [B, S, K, D]
    reference = lambda q, k, v: _softcap_reference(q, k, v, visible, q.shape[-1] ** -0.5, cap)
  else:
    reference = functools.partial(attention_reference, **kw)
  with jax.default_matmul_precision("float32"):
    ref_out, ref_grads = jax.jit(functools.partial(_value_and_vjp, reference))((f32(q), f32(k), f32(v)), f32(ct))

  rtol = rtol if dtype == jnp.float32 else 1e-2
  rows = visible.any(-1)
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  _close(np.asarray(out, np.float32)[rows], np.asarray(ref_out)[rows], rtol)
  assert np.all(np.asarray(out, np.float32)[~rows] == 0)  # fully masked rows are defined as 0 (and written)
  for g, ref_g in zip(grads, ref_grads):
    _close(g, ref_g, rtol)


@pytest.mark.parametrize("name", list(CASES))
def test_flash_attention_matches_reference(name):
  _check_flash(name, 1e-5, interpret=True, **BLOCKS)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize("name", ["gqa4_branch_window_softcap", "bf16_gqa4_causal", "cross_fully_masked_rows"])
def test_flash_attention_compiled_on_gpu(name):
  _check_flash(name, 1e-4, block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def test_interpret_mode_poisons_unwritten_outputs():
  """The mechanism the parity tests rely on: an output block a kernel never writes reads back as NaN."""
  def kernel(x_ref, o_ref):
    @pl.when(pl.program_id(0) < 3)
    def _():
      o_ref[...] = x_ref[...]

  x = jnp.ones((32, 16), jnp.float32)
  out = pl.pallas_call(kernel, grid=(4,), in_specs=[pl.BlockSpec((8, 16), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((8, 16), lambda i: (i, 0)),
                       out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
  assert np.all(np.asarray(out[:24]) == 1) and np.all(np.isnan(np.asarray(out[24:])))


def test_block_skipping_is_sound_and_tight():
  """For packed rows (positions restarting per segment, padding at the end) the block range each program loops
  over holds every block with a visible pair and no fully masked block."""
  rng = np.random.RandomState(0)
  bq, bk, T = 8, 4, 64
  for causal, window in ((True, 0), (True, 6), (False, 0), (False, 9)):
    seg, pos = (np.stack(x) for x in zip(*(_packed(rng.randint(1, 22, size=3), T) for _ in range(3))))
    seg[0, 50:] = fa.Q_PAD  # the wrapper's padding of queries
    kv_seg = np.where(seg == fa.Q_PAD, fa.KV_PAD, seg)
    visible = _visible(seg, kv_seg, pos, pos, causal, window)
    blocks = visible.reshape(3, T // bq, bq, T // bk, bk).any((2, 4))          # [B, nq, nk]
    may = fa._visible_blocks(jnp.asarray(seg), jnp.asarray(kv_seg), jnp.asarray(pos), jnp.asarray(pos), bq, bk,
                             causal, window)
    for axis in (2, 1):  # forward / dq loop over key blocks; dk, dv over query blocks
      lo, hi = (np.expand_dims(np.asarray(x), axis) for x in fa._block_range(may, axis))
      idx = np.arange(blocks.shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
      assert np.array_equal(blocks, (idx >= lo) & (idx < hi)), (causal, window, axis)


def test_tpu_route_splash_attention_in_interpret_mode():
  """The TPU path (upstream splash attention, run in TPU interpret mode on CPU) against the reference."""
  rng = np.random.RandomState(3)
  B, T, H, K, D = 1, 128, 4, 2, 64
  q, k, v = (jnp.asarray(rng.randn(B, T, n, D), jnp.float32) for n in (H, K, K))
  seg = jnp.asarray([[1] * 50 + [2] * 70 + [0] * 8])
  kw = dict(q_segment_ids_BT=seg, causal=True, sliding_window=16)
  assert fa.unsupported_reason(q, k, v, backend="tpu", **kw) is None
  splash = functools.partial(fa._splash_attention, scale=D ** -0.5, kv_heads_first=False, softcap=0.0,
                             interpret=True, **kw)
  ct = jnp.asarray(rng.randn(B, T, H, D), jnp.float32)
  out, grads = jax.jit(functools.partial(_value_and_vjp, splash))((q, k, v), ct)
  ref_out, ref_grads = _value_and_vjp(functools.partial(attention_reference, **kw), (q, k, v), ct)
  for got, want in zip((out, *grads), (ref_out, *ref_grads)):
    _close(got, want, 1e-5)


def test_backend_support_reasons():
  q, k = jnp.zeros((1, 128, 4, 64)), jnp.zeros((1, 128, 2, 64))
  assert "interpret=True" in fa.unsupported_reason(q, k, k, backend="cpu")
  assert fa.unsupported_reason(q, k, k, backend="cpu", interpret=True) is None
  assert fa.unsupported_reason(q, k, k, backend="gpu") is None
  assert "power-of-2" in fa.unsupported_reason(q, k, k, backend="gpu", block_q=8)
  assert fa.unsupported_reason(q, k, k, backend="tpu") is None
  assert "positions" in fa.unsupported_reason(q, k, k, backend="tpu", q_positions_BT=jnp.zeros((1, 128), int))
  assert "branch" in fa.unsupported_reason(q, k, k, backend="tpu", q_branch_ids_BT=jnp.zeros((1, 128), int))
  assert "GPU" in da.unsupported_reason(q[:, 0], k, k, jnp.zeros(1, int), backend="tpu")
  if jax.default_backend() == "cpu":
    with pytest.raises(NotImplementedError, match="interpret=True"):
      fa.flash_attention(q, k, k)
    with pytest.raises(NotImplementedError, match="interpret=True"):
      da.decode_attention(q[:, 0], k, k, jnp.zeros(1, int))


def test_kernels_lower_for_cuda(monkeypatch):
  """Without a GPU: lowering for CUDA runs the Pallas Triton lowering (power-of-2 tiles, supported ops), which is
  what compiling for an H100 starts from (PTX compilation itself is not checked here)."""
  monkeypatch.setattr(fa, "unsupported_reason", lambda *a, **k: None)
  monkeypatch.setattr(da, "unsupported_reason", lambda *a, **k: None)
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)

  def train_step(q, k, v, seg):
    f = functools.partial(fa.flash_attention, q_segment_ids_BT=seg, sliding_window=64, softcap=30.0)
    return _value_and_vjp(f, (q, k, v), q)

  seg = jax.ShapeDtypeStruct((1, 200), jnp.int32)
  text = jax.jit(train_step).trace(bf16(1, 200, 8, 128), bf16(1, 200, 1, 128), bf16(1, 200, 1, 128),
                                   seg).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") == 3  # forward, dq, dk/dv
  decode = functools.partial(da.decode_attention, num_splits=4)
  text = jax.jit(decode).trace(bf16(2, 16, 80), bf16(2, 2, 1000, 80), bf16(2, 2, 1000, 80),
                               jax.ShapeDtypeStruct((2,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") == 1


DECODE_CASES = [(jnp.float32, 4, 4, 8, 0, 1), (jnp.float32, 8, 2, 8, 5, 2), (jnp.bfloat16, 8, 1, 6, 0, 3)]


def _check_decode(dtype, H, K, D, window, num_splits, **kernel_kw):
  rng = np.random.RandomState(H + K)
  B, S = 4, 37
  lengths = np.array([0, 1, 20, 37])
  q = jnp.asarray(rng.randn(B, H, D), dtype)
  k, v = (rng.randn(B, K, S, D).astype(np.float32) for _ in range(2))
  for b, n in enumerate(lengths):  # garbage in the unfilled slots: one read would make the output NaN
    k[b, :, n:], v[b, :, n:] = np.nan, np.nan
  k, v = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
  kw = dict(sliding_window=window, num_splits=num_splits)
  out = da.decode_attention(q, k, v, jnp.asarray(lengths), **kernel_kw, **kw)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("float32"):
    ref = da.decode_attention_reference(f32(q), f32(k), f32(v), jnp.asarray(lengths), **kw)
  assert out.dtype == dtype and np.all(np.asarray(out[0], np.float32) == 0)  # length 0: nothing to attend to
  _close(out, ref, 1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("dtype,H,K,D,window,num_splits", DECODE_CASES)
def test_decode_attention_matches_reference_and_never_reads_past_length(dtype, H, K, D, window, num_splits):
  _check_decode(dtype, H, K, D, window, num_splits, interpret=True, block_s=8)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
@pytest.mark.parametrize("dtype,H,K,D,window,num_splits", DECODE_CASES)
def test_decode_attention_compiled_on_gpu(dtype, H, K, D, window, num_splits):
  _check_decode(dtype, H, K, D, window, num_splits, block_s=16)
