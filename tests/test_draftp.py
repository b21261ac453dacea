"""DRaFT+: truncated gradients against stop_gradient references, the LoRA-off regulariser, flat memory in the
number of sampling steps, AIG weights, rewards, and the quickstart's efficacy (shortened, seeded)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.diffusion import aig, ddim, denoiser, draftp

H, C, NCLS = 4, 3, 3


# ------------------------------------------------------------------------------------------- a tiny stand-in

def standin_params(key, lora_scale=0.3):
  k = jax.random.split(key, 5)
  return {"w": jax.random.normal(k[0], (C, C)) * 0.5, "emb": jax.random.normal(k[1], (NCLS + 1, C)),
          "tw": jax.random.normal(k[2], (C,)) * 1e-3,
          "lora": {"a": jax.random.normal(k[3], (C, 2)) * lora_scale,
                   "b": jax.random.normal(k[4], (2, C)) * lora_scale}}


def standin_eps(p, x_BHWC, t_B, cond_B):
  """A nonlinear, class- and time-dependent eps; the adapter adds x @ A @ B when present."""
  c = jnp.where((cond_B < 0) | (cond_B >= NCLS), NCLS, cond_B)
  h = x_BHWC @ p["w"] + p["emb"][c][:, None, None, :] + (t_B[:, None] * p["tw"])[:, None, None, :]
  if "lora" in p:
    h = h + x_BHWC @ p["lora"]["a"] @ p["lora"]["b"]
  return jnp.tanh(h)


def reward_mean_red(x0_BHWC, cond_B):
  return jnp.mean(x0_BHWC[..., 0], axis=(1, 2)) - 0.1 * jnp.mean(jnp.square(x0_BHWC), axis=(1, 2, 3))


SAMPLE_KW = dict(image_shape=(H, H, C), eta=0.5, guidance=3.0, num_train_timesteps=100)


def reference_loss(params, cond_B, keys_B, *, steps, stop_before, kl_coeff):
  """The same loss written as a plain Python loop over every step, with stop_gradient on the state entering step
  ``stop_before`` (None: full backprop) and the regulariser over the steps from there on."""
  t_S, a_S, ap_S = ddim.ddim_schedule(SAMPLE_KW["num_train_timesteps"], steps)
  B = cond_B.shape[0]
  x = draftp.row_normal(keys_B, 0, (H, H, C))
  first = 0 if stop_before is None else stop_before
  kls = []
  for i in range(steps):
    if i == stop_before:
      x = jax.lax.stop_gradient(x)
    t_B = jnp.full((B,), t_S[i])
    g = SAMPLE_KW["guidance"]
    eps = ddim.cfg_eps(functools.partial(standin_eps, params), x, t_B, cond_B, g)
    if i >= first:
      base = {k: v for k, v in params.items() if k != "lora"}
      eps0 = jax.lax.stop_gradient(ddim.cfg_eps(functools.partial(standin_eps, base), x, t_B, cond_B, g))
      kls.append(jnp.sum(jnp.square(eps - eps0), axis=(1, 2, 3)) / (H * H * C))
    noise = draftp.row_normal(keys_B, i + 1, (H, H, C))
    x = ddim.ddim_step(x, eps, a_S[i], ap_S[i], SAMPLE_KW["eta"], noise)
  r = reward_mean_red(jnp.clip(x, -1, 1), cond_B)
  return jnp.mean(-r + kl_coeff * jnp.mean(jnp.stack(kls), axis=0))


def draftp_mean_loss(params, cond_B, keys_B, *, steps, K, kl_coeff):
  loss_B, _, _ = draftp.loss_terms(standin_eps, denoiser.lora_off, reward_mean_red, params, cond_B, keys_B,
                                   kl_coeff=kl_coeff, steps=steps, truncation_steps=K, **SAMPLE_KW)
  return jnp.mean(loss_B)


grad_draftp = jax.jit(jax.grad(draftp_mean_loss), static_argnames=("steps", "K", "kl_coeff"))
grad_reference = jax.jit(jax.grad(reference_loss), static_argnames=("steps", "stop_before", "kl_coeff"))


@pytest.fixture(scope="module")
def standin():
  params = standin_params(jax.random.PRNGKey(0))
  cond_B = jnp.array([0, 2, 1])
  keys_B = draftp.row_keys(jax.random.PRNGKey(1), jnp.array([5, 6, 7]))
  return params, cond_B, keys_B


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("K", [1, 3])
def test_truncated_gradient_equals_stop_gradient_reference(standin, K):
  params, cond_B, keys_B = standin
  S = 6
  got = grad_draftp(params, cond_B, keys_B, steps=S, K=K, kl_coeff=0.7)
  want = grad_reference(params, cond_B, keys_B, steps=S, stop_before=S - K, kl_coeff=0.7)
  _close(got, want)
  full = grad_reference(params, cond_B, keys_B, steps=S, stop_before=None, kl_coeff=0.7)
  assert not np.allclose(got["w"], full["w"], atol=1e-4)  # truncation does change the gradient


def test_all_steps_equals_full_backprop(standin):
  params, cond_B, keys_B = standin
  S = 4
  got = grad_draftp(params, cond_B, keys_B, steps=S, K=S, kl_coeff=0.3)
  want = grad_reference(params, cond_B, keys_B, steps=S, stop_before=None, kl_coeff=0.3)
  _close(got, want)


def test_truncation_steps_out_of_range(standin):
  params, cond_B, keys_B = standin
  with pytest.raises(ValueError, match="truncation_steps"):
    draftp_mean_loss(params, cond_B, keys_B, steps=3, K=4, kl_coeff=0.0)


# ------------------------------------------------------------------------------------------- a tiny denoiser

TINY = denoiser.DenoiserConfig(image_size=4, channels=3, num_classes=3, patch_size=2, width=16, depth=1,
                               num_heads=2, lora_rank=2, num_train_timesteps=100)


@pytest.fixture(scope="module")
def tiny():
  """Tiny denoiser params, every tensor random (a fresh adapter and adaLN-zero would be no-ops)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                      denoiser.param_shapes(TINY))


def tiny_eps(p, x, t, c):
  return denoiser.apply(p, x, t, c, TINY)


def test_eps_init_is_the_base_model(tiny):
  """The regulariser of the last step equals sum (eps_lora - eps_base)^2 / D, eps_base from a separate copy of the
  base weights run as a LoRA-free model; the LoRA-off view shares the arrays (no copy)."""
  view = denoiser.lora_off(tiny)
  assert "lora" not in view and view["layers"]["q"] is tiny["layers"]["q"]
  base_cfg = dataclasses.replace(TINY, lora_rank=0)
  base = jax.tree.map(lambda a: jnp.array(np.array(a)), view)
  cond_B, keys_B, S, g = jnp.array([0, 1, 2, 3]), draftp.row_keys(None, jnp.arange(4)), 3, 2.0
  sample = jax.jit(functools.partial(draftp.sample_with_grad, tiny_eps, denoiser.lora_off, image_shape=(4, 4, 3),
                                     steps=S, truncation_steps=1, eta=0.0, guidance=g, num_train_timesteps=100))
  _, kl_B = sample(tiny, cond_B, keys_B)
  t_S, a_S, ap_S = ddim.ddim_schedule(100, S)

  @jax.jit
  def reference(params, base):
    x = draftp.row_normal(keys_B, 0, (4, 4, 3))
    for i in range(S):
      t_B = jnp.full((4,), t_S[i])
      eps = ddim.cfg_eps(functools.partial(tiny_eps, params), x, t_B, cond_B, g)
      if i == S - 1:
        eps_base = ddim.cfg_eps(lambda x, t, c: denoiser.apply(base, x, t, c, base_cfg), x, t_B, cond_B, g)
        return jnp.sum(jnp.square(eps - eps_base), axis=(1, 2, 3)) / 48
      x = ddim.ddim_step(x, eps, a_S[i], ap_S[i], 0.0, 0.0)

  want = reference(tiny, base)
  assert float(jnp.min(want)) > 1e-4  # the adapter does change eps
  np.testing.assert_allclose(kl_B, want, rtol=1e-4)


def _temp_bytes(f, *args):
  return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_flat_in_sampling_steps(tiny):
  """Temporary bytes of the compiled DRaFT+ loss+grad (tiny denoiser) do not grow with the number of sampling
  steps (K=1), while those of plain backprop through every step of the sampler do."""
  cond_B, keys_B = jnp.array([0, 1, 2, 0]), draftp.row_keys(None, jnp.arange(4))

  def truncated(S):
    def f(p):
      return jnp.mean(draftp.loss_terms(tiny_eps, denoiser.lora_off, reward_mean_red, p, cond_B, keys_B,
                                        kl_coeff=0.5, image_shape=(4, 4, 3), steps=S, truncation_steps=1,
                                        eta=0.0, guidance=3.0, num_train_timesteps=100)[0])
    return _temp_bytes(jax.grad(f), tiny)

  def full(S):  # the measurement does see growth: plain backprop through the sampler (the cheap stand-in)
    def f(p):
      x0 = ddim.sample(functools.partial(standin_eps, p), draftp.row_normal(keys_B, 0, (H, H, C)), cond_B,
                       steps=S, guidance=3.0, num_train_timesteps=100)
      return jnp.mean(reward_mean_red(x0, cond_B))
    return _temp_bytes(jax.grad(f), standin_params(jax.random.PRNGKey(0)))

  t4, t16 = truncated(4), truncated(16)
  assert abs(t16 - t4) <= 0.02 * t4 + 1024, (t4, t16)
  f4, f8 = full(4), full(8)
  assert f8 > 1.5 * f4, (f4, f8)


# ------------------------------------------------------------------------------------------- AIG

@pytest.mark.parametrize("name", ["base", "draft", "linear", "power_2", "power_0.5", "step_0.6", "step_0.25"])
def test_aig_weights(name):
  T = 10
  w = aig.weights(name, T)
  i = np.arange(T)
  want = {"base": 0 * i, "draft": 1 + 0 * i, "linear": i / T, "power_2": (i / T) ** 2, "power_0.5": (i / T) ** 0.5,
          "step_0.6": (i / T >= 0.6) * 1.0, "step_0.25": (i / T >= 0.25) * 1.0}[name]
  np.testing.assert_allclose(w, want, atol=1e-7)
  assert w.shape == (T,)


def test_aig_schedule_errors_and_endpoints(standin):
  for bad in ("power", "step_x", "cosine"):
    with pytest.raises(ValueError, match="AIG schedule"):
      aig.weights(bad, 4)
  # base / draft reproduce plain sampling with the base / tuned model; linear lies between
  params, cond_B, _ = standin
  key = jax.random.PRNGKey(3)
  base_fn = functools.partial(standin_eps, denoiser.lora_off(params))
  draft_fn = functools.partial(standin_eps, params)
  kw = dict(steps=4, eta=0.0, guidance=2.0, key=key, num_train_timesteps=100)

  @jax.jit
  def run(x_T):
    mixed = [aig.sample(base_fn, draft_fn, x_T, cond_B, schedule=n, **kw) for n in ("base", "draft", "linear")]
    return mixed, [ddim.sample(fn, x_T, cond_B, **kw) for fn in (base_fn, draft_fn)]

  (base, draft, linear), (want_base, want_draft) = run(jax.random.normal(key, (3, H, H, C)))
  np.testing.assert_allclose(base, want_base, atol=1e-5)
  np.testing.assert_allclose(draft, want_draft, atol=1e-5)
  assert not np.allclose(linear, base, atol=1e-3) and not np.allclose(linear, draft, atol=1e-3)


def test_png_grid_round_trip():
  import struct
  import zlib

  from jalign.diffusion import generate
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 4, 4, 3)).astype(np.float32)
  grid = generate.image_grid(x, scale=2, pad=1)
  assert grid.shape == (2 * 9 + 1, 3 * 9 + 1, 3)
  np.testing.assert_array_equal(grid[1:3, 1:3], generate.to_uint8(x[0, 0, :1, :1]).repeat(2, 0).repeat(2, 1))
  data = generate.png_bytes(grid)
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  w, h = struct.unpack(">II", data[16:24])
  idat_len = struct.unpack(">I", data[33:37])[0]
  raw = np.frombuffer(zlib.decompress(data[41:41 + idat_len]), np.uint8).reshape(h, 1 + 3 * w)
  assert (w, h) == (grid.shape[1], grid.shape[0]) and (raw[:, 0] == 0).all()
  np.testing.assert_array_equal(raw[:, 1:].reshape(grid.shape), grid)
  assert generate.diversity(np.stack([x[0, 0], x[0, 0]])) == 0.0
  np.testing.assert_allclose(generate.diversity(np.stack([x[0, 0], x[0, 1]])),
                             np.sqrt(np.mean(np.square(x[0, 0] - x[0, 1]))), rtol=1e-6)


# ------------------------------------------------------------------------------------------- rewards

def test_rewards_prefer_the_prompt_and_are_differentiable():
  from jalign.diffusion import rewards, toy
  d = toy.dataset(24, seed=5)
  x, y = jnp.asarray(d["images"]), jnp.asarray(d["labels"])
  wrong = (y + len(toy.SHAPES)) % toy.NUM_CLASSES  # same shape, another colour
  for name in ("toy", "colour", "purity"):
    f = rewards.get(name)
    assert float(jnp.mean(f(x, y))) > float(jnp.mean(f(x, wrong))) + 0.1, name
  blob = jnp.broadcast_to(jnp.asarray(toy.PALETTE)[toy.colour_of(y)][:, None, None, :], x.shape)
  assert float(jnp.mean(rewards.toy_reward(x, y))) > float(jnp.mean(rewards.toy_reward(blob, y))) + 0.5
  g = jax.grad(lambda x: jnp.sum(rewards.toy_reward(x, y)))(x * 0.5)
  assert np.isfinite(g).all() and float(jnp.abs(g).sum()) > 0
  with pytest.raises(ValueError, match="reward"):
    rewards.check_spec("pickscore")


def test_learned_scorer_trains_with_jalign(tmp_path):
  from jalign.diffusion import rewards
  params, m = rewards.train_scorer(steps=60, n_pairs=512)
  assert m["held_out_acc"] > 0.85 and m["held_out_acc"] > m["held_out_acc_before"] + 0.2, m
  rewards.save_scorer(str(tmp_path / "scorer"), params, rewards.ScorerConfig())
  f = rewards.get(f"scorer:{tmp_path / 'scorer'}")
  pairs = rewards.preference_pairs(64, seed=9)
  r_c, r_r = f(jnp.asarray(pairs["chosen"]), pairs["cond"]), f(jnp.asarray(pairs["rejected"]), pairs["cond"])
  assert float(jnp.mean(r_c > r_r)) > 0.85


def test_clip_scorer_interface(tmp_path):
  """Random CLIP-style weights through the file interface: shapes, the cosine formula, gradients."""
  import json as json_lib

  from jalign.diffusion import rewards
  cfg = rewards.ClipConfig(image_size=8, patch_size=4, width=16, layers=2, heads=2, mlp=32, embed_dim=8)
  rng = np.random.default_rng(0)
  w = {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in rewards.clip_param_shapes(cfg).items()}
  w["logit_scale"] = np.float32(np.log(100.0))
  (tmp_path / "clip").mkdir()
  np.savez(tmp_path / "clip" / "weights.npz", **w)
  np.save(tmp_path / "clip" / "text_embeds.npy", rng.standard_normal((12, 8)).astype(np.float32))
  (tmp_path / "clip" / "clip_config.json").write_text(json_lib.dumps(
      {"image_size": 8, "patch_size": 4, "width": 16, "layers": 2, "heads": 2, "mlp": 32, "embed_dim": 8}))
  f = rewards.get(f"clip:{tmp_path / 'clip'}")
  x, c = jnp.asarray(rng.uniform(-1, 1, (3, 16, 16, 3)), jnp.float32), jnp.array([0, 5, 11])
  r = f(x, c)
  wj, text, cfg2 = rewards.load_clip(str(tmp_path / "clip"))
  e = rewards.clip_image_embed(wj, x, cfg2)
  t = text[c] / jnp.linalg.norm(text[c], axis=-1, keepdims=True)
  np.testing.assert_allclose(r, 100.0 * jnp.sum(e * t, -1), rtol=1e-4)
  assert r.shape == (3,) and float(jnp.max(jnp.abs(jnp.sum(e * e, -1) - 1))) < 1e-5
  assert float(jnp.abs(jax.grad(lambda x: jnp.sum(f(x, c)))(x)).sum()) > 0
  np.savez(tmp_path / "clip" / "weights.npz", **{k: v for k, v in w.items() if k != "logit_scale"})
  with pytest.raises(ValueError, match="missing"):
    rewards.load_clip(str(tmp_path / "clip"))


# ------------------------------------------------------------------------------------------- efficacy

QUICK = ["--config", "configs/draftp_quickstart.py", "--config.train.max_steps=20", "--config.checkpoint.every_steps=20",
         "--config.draftp.inference_steps=10", "--config.data.eval_path="]


def test_quickstart_raises_held_out_reward(tmp_path):
  """The shortened quickstart (20 steps, 10 DDIM steps, seeded) raises the mean reward on held-out noise far beyond the
  spread of that mean over noise seeds, and logs NeMo-Aligner's metric names."""
  import json as json_lib

  from jalign import config as config_lib
  from jalign import train
  from jalign.algorithms import draftp as draftp_alg
  cfg, _ = config_lib.parse_args(QUICK)
  summary = train.run(cfg, str(tmp_path))
  assert summary["reason"] == "done"
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json_lib.loads(line) for line in f]
  assert {"reward", "kl_penalty", "loss"} <= set(rows[-1])
  st = summary["state"]
  after = {**st["frozen"], **st["params"]}
  before = {**after, "lora": jax.tree.map(jnp.zeros_like, after["lora"])}  # = the base model
  dcfg = draftp_alg.model_family(cfg).config
  loss_fn = jax.jit(draftp_alg.make_loss(cfg, dcfg), static_argnums=2)

  def mean_reward(p, seed):
    rows = jax.tree.map(jnp.asarray, draftp_alg.prompt_rows(f"toy:48:{seed}"))
    _, w, m = loss_fn(p, rows, None)
    return float(m["reward"] / w)

  rb = np.array([mean_reward(before, s) for s in (2, 3, 4)])
  ra = np.array([mean_reward(after, s) for s in (2, 3, 4)])
  spread = max(rb.std(), ra.std())
  print("held-out reward before", rb, "after", ra)
  assert ra.mean() - rb.mean() > max(3 * spread, 0.2), (rb, ra)
