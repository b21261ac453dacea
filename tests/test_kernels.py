import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import kernels


def naive_attention(q, k, v, seg, pos, window, branch=None):
  """Per-(batch, head, query) loops in numpy: the independent reference."""
  B, T, H, D = q.shape
  K = k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      kh = h // (H // K)
      for t in range(T):
        ok = (seg[b] == seg[b, t]) & (pos[b] <= pos[b, t])
        if window:
          ok &= pos[b, t] - pos[b] < window
        if branch is not None:
          ok &= (branch[b] == 0) | (branch[b] == branch[b, t])
        s = (k[b, :, kh] @ q[b, t, h]) / np.sqrt(D)
        s = np.where(ok, s, -np.inf)
        p = np.exp(s - s.max())
        out[b, t, h] = (p / p.sum()) @ v[b, :, kh]
  return out


@pytest.mark.parametrize("H,K,window", [(4, 4, 0), (4, 2, 0), (4, 1, 3)])
def test_attention_reference_against_loops(H, K, window):
  rng = np.random.RandomState(0)
  B, T, D = 2, 10, 8
  q, k, v = (rng.randn(B, T, n, D).astype(np.float32) for n in (H, K, K))
  seg = np.array([[1] * 6 + [2] * 4, [1] * 10])
  pos = np.array([list(range(6)) + list(range(4)), list(range(10))])
  got = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids_BT=jnp.asarray(seg),
                          q_positions_BT=jnp.asarray(pos), kv_positions_BS=jnp.asarray(pos), sliding_window=window)
  np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, seg, pos, window), atol=1e-5)
  # the KV cache's [B, K, S, D] layout gives the same result
  heads_first = kernels.attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 1, 3)),
                                  jnp.asarray(v.transpose(0, 2, 1, 3)), q_segment_ids_BT=jnp.asarray(seg),
                                  q_positions_BT=jnp.asarray(pos), kv_positions_BS=jnp.asarray(pos),
                                  sliding_window=window, kv_heads_first=True)
  np.testing.assert_allclose(np.asarray(heads_first), naive_attention(q, k, v, seg, pos, window), atol=1e-5)
  # and the CPU cache's transposed keys [B, K, D, S]
  k_transposed = kernels.attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 3, 1)),
                                   jnp.asarray(v.transpose(0, 2, 1, 3)), q_segment_ids_BT=jnp.asarray(seg),
                                   q_positions_BT=jnp.asarray(pos), kv_positions_BS=jnp.asarray(pos),
                                   sliding_window=window, kv_heads_first=True, k_transposed=True)
  np.testing.assert_allclose(np.asarray(k_transposed), naive_attention(q, k, v, seg, pos, window), atol=1e-5)
  with pytest.raises(ValueError, match="transposed k"):
    kernels.attention(jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 3, 1)), jnp.asarray(v.transpose(0, 2, 1, 3)),
                      implementation="pallas", kv_heads_first=True, k_transposed=True)


def test_branch_ids_hide_sibling_continuations():
  """One row [prompt, chosen, rejected]: each continuation sees the prompt (branch 0) and itself only; the second
  pair of the row (segment 2) sees nothing of the first."""
  rng = np.random.RandomState(2)
  B, T, H, K, D = 1, 12, 4, 2, 8
  q, k, v = (rng.randn(B, T, n, D).astype(np.float32) for n in (H, K, K))
  seg = np.array([[1] * 8 + [2] * 4])
  branch = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 0, 1, 2, 2]])
  pos = np.array([[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 1, 2]])
  got = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids_BT=jnp.asarray(seg),
                          q_positions_BT=jnp.asarray(pos), kv_positions_BS=jnp.asarray(pos),
                          q_branch_ids_BT=jnp.asarray(branch))
  np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, seg, pos, 0, branch), atol=1e-5)


def test_blocked_attention_equals_the_loops_and_the_reference_gradients():
  """attention_blocked (query block i against keys up to the end of block i) on causal rows with packed segments,
  shared-prompt branches, padding, a window and T not a multiple of the block: the numpy loops' values, and the
  reference's gradients; the model's dispatch takes it on CPU."""
  from jalign.kernels import attention_ops
  rng = np.random.RandomState(3)
  B, T, H, K, D, block = 2, 23, 4, 2, 8, 8
  q, k, v = (rng.randn(B, T, n, D).astype(np.float32) for n in (H, K, K))
  seg = np.array([[1] * 9 + [2] * 11 + [0] * 3, [1] * 23])
  pos_seg = [*range(9), *range(11), 0, 1, 2]
  branch = np.array([[0] * 23, [0] * 5 + [1] * 6 + [2] * 12])  # row 1: a prompt of 5 and two branches after it
  for window, br in ((0, None), (0, branch), (5, branch)):
    pos = np.array([pos_seg, [*range(11), *range(5, 17)] if br is not None else list(range(23))])
    kw = dict(q_segment_ids_BT=jnp.asarray(seg), q_positions_BT=jnp.asarray(pos), kv_positions_BS=jnp.asarray(pos),
              sliding_window=window, q_branch_ids_BT=None if br is None else jnp.asarray(br))
    got = attention_ops.attention_blocked(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block=block, **kw)
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, seg, pos, window, br), atol=1e-5)
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a, **kw))))
    g_blocked = jax.grad(loss(lambda *a, **w: attention_ops.attention_blocked(*a, block=block, **w)),
                         argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(attention_ops.attention_reference), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_blocked, g_ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # dispatch: rows of at least two blocks take the blocked path on CPU, the cache's layout never does
  calls = []
  orig = attention_ops.attention_blocked
  attention_ops.attention_blocked = lambda *a, **w: calls.append(1) or orig(*a, **w)
  try:
    x = jnp.ones((1, 2 * attention_ops.BLOCK, 2, 4))
    kernels.attention(x, x, x, causal_rows=True)
    kernels.attention(x, x, x, causal_rows=False)
    kernels.attention(x[:, :1], x.transpose(0, 2, 1, 3), x.transpose(0, 2, 1, 3), kv_heads_first=True,
                      causal_rows=True, q_positions_BT=jnp.zeros((1, 1), jnp.int32),
                      kv_positions_BS=jnp.arange(2 * attention_ops.BLOCK)[None])
  finally:
    attention_ops.attention_blocked = orig
  assert len(calls) == (1 if jax.default_backend() == "cpu" else 0)


def test_attention_grads_finite_differences():
  rng = np.random.RandomState(1)
  q, k, v = (jnp.asarray(rng.randn(1, 5, 2, 4), jnp.float64 if jax.config.x64_enabled else jnp.float32)
             for _ in range(3))
  f = lambda q: jnp.sum(kernels.attention_reference(q, k, v) ** 2)
  g = jax.grad(f)(q)
  eps = 1e-2
  d = jnp.asarray(rng.randn(*q.shape), q.dtype)
  fd = (f(q + eps * d) - f(q - eps * d)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.sum(g * d)), float(fd), rtol=2e-2)


def test_unknown_implementation_fails():
  x = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    kernels.attention(x, x, x, implementation="flash")


@pytest.mark.parametrize("implementation,why", [("pallas", "run only with interpret"),
                                                ("cudnn", "needs a GPU")])
def test_unavailable_implementation_warns_once_and_runs_the_reference(implementation, why, monkeypatch):
  """On CPU (not interpreted) the kernels cannot run: the reference's values, and one warning saying why."""
  monkeypatch.delenv("JALIGN_PALLAS_INTERPRET", raising=False)
  monkeypatch.setattr(kernels.attention_ops, "_WARNED", set())
  rng = np.random.RandomState(3)
  q, k, v = (jnp.asarray(rng.randn(1, 6, 2, 8), jnp.float32) for _ in range(3))
  with pytest.warns(UserWarning, match=why) as record:
    out = kernels.attention(q, k, v, implementation=implementation)
    kernels.attention(q, k, v, implementation=implementation)
  assert len(record) == 1
  np.testing.assert_array_equal(np.asarray(out), np.asarray(kernels.attention_reference(q, k, v)))


def test_kernels_package_ships_in_the_wheel(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", root, "--no-deps", "--no-build-isolation", "-q",
                      "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  (whl,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
  names = zipfile.ZipFile(tmp_path / whl).namelist()
  assert "jalign/kernels/__init__.py" in names and "jalign/kernels/attention_ops.py" in names
  assert "jalign/models/transformer.py" in names
