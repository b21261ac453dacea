"""The diffusion denoiser, DDIM + classifier-free guidance, the toy image task and ddpm training on the shared
trainer (8 simulated CPU devices)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import config as config_lib
from jalign import diffusion, sharding, train
from jalign.diffusion import ddim, denoiser, toy

TINY = dict(image_size=8, patch_size=2, width=32, depth=2, num_heads=2, num_classes=12)


def randomized(params, key, skip_lora_b=False):
  """Every tensor replaced by normal(0.3) draws (the init zeroes adaLN and the output layer, so a fresh model
  outputs zeros and any comparison of two views of it would pass trivially)."""
  flat, treedef = jax.tree.flatten_with_path(params)
  keys = jax.random.split(key, len(flat))
  out = []
  for (path, x), k in zip(flat, keys):
    names = [str(getattr(p, "key", p)) for p in path]
    keep = skip_lora_b and names[0] == "lora" and names[-1] == "b"
    out.append(x if keep else (0.3 * jax.random.normal(k, x.shape)).astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------- DDIM

def np_alphas_cumprod(n):
  """Stable Diffusion's scaled-linear schedule, transcribed: betas = linspace(sqrt(b0), sqrt(b1), n)^2."""
  betas = np.array([(0.00085 ** 0.5 + i / (n - 1) * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2 for i in range(n)])
  out, prod = [], 1.0
  for b in betas:
    prod *= 1.0 - b
    out.append(prod)
  return np.array(out)


def np_ddim(eps_fn, x, n_train, steps, eta, noises):
  """DDIM (Song et al. 2021, eq. 12) in float64 numpy: trailing timesteps, last step to alpha_bar = 1."""
  ab = np_alphas_cumprod(n_train)
  ts = [int(round(n_train - i * n_train / steps)) - 1 for i in range(steps)]
  for i, t in enumerate(ts):
    a = ab[t]
    a_prev = ab[ts[i + 1]] if i + 1 < steps else 1.0
    e = eps_fn(x, t)
    pred_x0 = (x - np.sqrt(1 - a) * e) / np.sqrt(a)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev - sigma ** 2) * e + sigma * noises[i]
  return x


def test_schedule():
  np.testing.assert_allclose(ddim.alphas_cumprod(1000), np_alphas_cumprod(1000), rtol=1e-12)
  assert list(ddim.ddim_timesteps(1000, 4)) == [999, 749, 499, 249]
  assert list(ddim.ddim_timesteps(10, 10)) == list(range(9, -1, -1))


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sample_matches_numpy_ddim(eta):
  steps, n_train = 6, 100
  x_T = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
  cond = np.array([0, 1, 2], np.int32)
  key = jax.random.PRNGKey(3)
  W = np.random.default_rng(1).normal(size=(2, 2)).astype(np.float32) * 0.3

  def eps_np(x, t):  # depends on x, t and the class
    return np.tanh(x @ W + 0.01 * t + 0.1 * cond[:, None, None, None])

  def eps_jax(x, t_B, c_B):
    return jnp.tanh(x @ W + 0.01 * t_B[:, None, None, None] + 0.1 * c_B[:, None, None, None])

  noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x_T.shape)) for i in range(steps)]
  want = np_ddim(eps_np, x_T.astype(np.float64), n_train, steps, eta, noises)
  got = jax.jit(lambda x: ddim.sample(eps_jax, x, jnp.asarray(cond), steps=steps, eta=eta, guidance=1.0, key=key,
                                      num_train_timesteps=n_train))(x_T)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_ddim_step_per_example_alphas_and_exact_noise():
  ab = np_alphas_cumprod(1000)
  rng = np.random.default_rng(0)
  x0, e = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(2, 4, 4, 3))
  a_t, a_prev = np.array([ab[900], ab[500]]), np.array([ab[600], ab[100]])
  x_t = np.sqrt(a_t)[:, None, None, None] * x0 + np.sqrt(1 - a_t)[:, None, None, None] * e
  # with eta = 0 and the true noise, one step lands exactly on the forward sample at alpha_prev
  got = ddim.ddim_step(jnp.asarray(x_t, jnp.float32), jnp.asarray(e, jnp.float32), a_t, a_prev, 0.0, 0.0)
  want = np.sqrt(a_prev)[:, None, None, None] * x0 + np.sqrt(1 - a_prev)[:, None, None, None] * e
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  final = ddim.ddim_step(jnp.asarray(x_t, jnp.float32), jnp.asarray(e, jnp.float32), a_t, 1.0, 0.0, 0.0)
  np.testing.assert_allclose(np.asarray(final), x0, atol=1e-4)


def test_cfg_by_hand_in_one_call():
  calls = []

  def eps_fn(x, t, c):
    calls.append(x.shape[0])
    return x * jnp.where(c < 0, 0.5, c + 2.0)[:, None, None, None] + 0.001 * t[:, None, None, None]

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
  t, c = jnp.array([10, 20]), jnp.array([1, 3])
  got = ddim.cfg_eps(eps_fn, x, t, c, 4.0)
  cond = x * jnp.array([3.0, 5.0])[:, None, None, None] + 0.001 * t[:, None, None, None]
  uncond = x * 0.5 + 0.001 * t[:, None, None, None]
  np.testing.assert_allclose(np.asarray(got), np.asarray(uncond + 4.0 * (cond - uncond)), rtol=1e-6)
  assert calls == [4]


# --------------------------------------------------------------------------------------------- denoiser

@pytest.fixture(scope="module")
def tiny():
  cfg = diffusion.DenoiserConfig(**TINY, lora_rank=3)
  params = randomized(diffusion.init_params(cfg, jax.random.PRNGKey(0)), jax.random.PRNGKey(1),
                      skip_lora_b=True)
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
  return cfg, params, x, jnp.array([0, 250, 500, 999]), jnp.array([0, 5, 11, -1])


def test_shapes_dtypes_axes():
  for dt in ("float32", "bfloat16"):
    cfg = diffusion.DenoiserConfig(**TINY, lora_rank=2, dtype=dt, param_dtype=dt)
    params = diffusion.init_params(cfg, jax.random.PRNGKey(0))
    shapes, axes = diffusion.param_shapes(cfg), diffusion.param_axes(cfg)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)):
      assert p.shape == s.shape and p.dtype == s.dtype == jnp.dtype(dt)
    is_axes = lambda a: isinstance(a, tuple)
    for a, s in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(shapes)):
      assert len(a) == len(s.shape)
    assert params["lora"]["q"]["a"].shape == (2, 32, 2) and params["lora"]["q"]["b"].shape == (2, 2, 2, 16)
    assert params["lora"]["o"]["a"].shape == (2, 2, 16, 2) and params["lora"]["o"]["b"].shape == (2, 2, 32)
    assert not np.any(np.asarray(params["lora"]["v"]["b"], np.float32))
    eps = diffusion.apply(params, jnp.zeros((3, 8, 8, 3), dt), jnp.array([1, 2, 3]), jnp.array([0, 1, 12]), cfg)
    assert eps.shape == (3, 8, 8, 3) and eps.dtype == jnp.float32


def test_bf16_close_to_f32(tiny):
  cfg, params, x, t, c = tiny
  want = diffusion.apply(params, x, t, c, cfg)
  got = diffusion.apply(params, x, t, c, diffusion.DenoiserConfig(**TINY, lora_rank=3, dtype="bfloat16"))
  assert float(jnp.max(jnp.abs(got - want))) < 0.1 * float(jnp.max(jnp.abs(want)))


def test_conditioning_matters_and_null_ids(tiny):
  cfg, params, x, t, c = tiny
  base = diffusion.apply(params, x, t, c, cfg)
  assert float(jnp.max(jnp.abs(base - diffusion.apply(params, x, t, (c + 1) % 12, cfg)))) > 1e-3
  assert float(jnp.max(jnp.abs(base - diffusion.apply(params, x, t + 7, c, cfg)))) > 1e-3
  null = diffusion.apply(params, x, t, jnp.full((4,), 12), cfg)
  np.testing.assert_array_equal(np.asarray(null), np.asarray(diffusion.apply(params, x, t, jnp.full((4,), -1), cfg)))


def test_lora_zero_b_and_lora_off_equal_base(tiny):
  cfg, params, x, t, c = tiny
  base_cfg = diffusion.DenoiserConfig(**TINY)
  base = diffusion.apply(diffusion.lora_off(params), x, t, c, base_cfg)
  assert float(jnp.max(jnp.abs(base))) > 0.1
  np.testing.assert_array_equal(np.asarray(diffusion.apply(params, x, t, c, cfg)), np.asarray(base))  # B = 0
  trained = randomized(params, jax.random.PRNGKey(5))  # adapters with B != 0
  trained = {**params, "lora": trained["lora"]}
  with_lora = diffusion.apply(trained, x, t, c, cfg)
  assert float(jnp.max(jnp.abs(with_lora - base))) > 1e-2
  off = diffusion.lora_off(trained)
  assert off["layers"] is params["layers"]  # a view, no copy
  np.testing.assert_array_equal(np.asarray(diffusion.apply(off, x, t, c, cfg)), np.asarray(base))
  merged = diffusion.merge_lora(trained, cfg)
  np.testing.assert_allclose(np.asarray(diffusion.apply(merged, x, t, c, base_cfg)), np.asarray(with_lora),
                             atol=2e-4 * float(jnp.max(jnp.abs(with_lora))))


def test_sharded_apply_matches(tiny):
  cfg, params, x, t, c = tiny
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.rules_from_config(sharding.DEFAULT_RULES)
  sh = sharding.tree_shardings(diffusion.param_axes(cfg), diffusion.param_shapes(cfg), rules, mesh)
  assert tuple(sh["layers"]["q"].spec)[:3] == (None, "fsdp", "tensor")
  placed = jax.device_put(params, sh)
  f = jax.jit(sharding.bind(lambda p, x, t, c: diffusion.apply(p, x, t, c, cfg), mesh, rules))
  np.testing.assert_allclose(np.asarray(f(placed, x, t, c)), np.asarray(diffusion.apply(params, x, t, c, cfg)),
                             rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ toy task

def test_toy_dataset_and_graders():
  ds = toy.load_images("toy:96:4", 16)
  again = toy.dataset(96, 4, 16)
  np.testing.assert_array_equal(ds["images"], again["images"])
  assert ds["images"].shape == (96, 16, 16, 3) and ds["images"].min() >= -1 and ds["images"].max() <= 1
  assert np.bincount(ds["labels"], minlength=12).tolist() == [8] * 12
  assert toy.prompt_id("red circle") == 0 and toy.prompt_of(toy.prompt_id("yellow triangle")) == "yellow triangle"
  g = toy.grade(ds["images"], ds["labels"])
  assert g["colour_acc"] == 1.0 and g["acc"] >= 0.95, g
  wrong = toy.grade(ds["images"], (ds["labels"] + 1) % 12)  # the next prompt: same colour, other shape (mostly)
  assert wrong["shape_acc"] < 0.1, wrong
  red = toy.colour_match(jnp.asarray(ds["images"][:12]), jnp.zeros(12, jnp.int32))
  assert np.all(np.asarray(red)[toy.colour_of(ds["labels"][:12]) == 0] > -0.2)  # edge pixels blend with the background
  assert np.all(np.asarray(red)[toy.colour_of(ds["labels"][:12]) != 0] < -1.0)
  grads = jax.grad(lambda x: jnp.sum(toy.colour_match(x, jnp.zeros(2, jnp.int32))))(jnp.asarray(ds["images"][:2]))
  assert np.all(np.isfinite(np.asarray(grads))) and float(jnp.max(jnp.abs(grads))) > 0


# ------------------------------------------------------------------------------------ training (ddpm)

def make_cfg(workdir_overrides=None, **kw):
  merged = config_lib.base_config()
  config_lib._merge(merged, config_lib.load_config_file("configs/ddpm_tiny.py"))
  over = {"diffusion.image_size": "8", "diffusion.patch_size": "2", "diffusion.width": "32", "diffusion.depth": "2",
          "diffusion.num_heads": "2", "data.train_path": "toy:256", "data.eval_path": "toy:20:1",
          "train.max_steps": "30", "train.global_batch_size": "16", "train.log_every": "10", "optim.lr": "3e-3",
          "optim.warmup_steps": "3", "checkpoint.every_steps": "10", "eval.every_steps": "30"}
  config_lib.apply_overrides(merged, {**over, **kw})
  config_lib.validate(merged)
  return merged


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ddpm"))
  losses = {}
  summary = train.run(make_cfg(), wd, on_step=lambda s, m: losses.__setitem__(s, float(m["loss"])))
  return wd, summary, losses


def test_ddpm_loss_falls_and_exports(ddpm_run):
  wd, summary, losses = ddpm_run
  assert summary["reason"] == "done" and summary["final_step"] == 30
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (28, 29, 30)])
  assert first > 0.9 and last < 0.6 * first, (first, last)
  assert summary["initial_eval"]["val_loss"] > 0.9
  rows = [json.loads(ln) for ln in open(os.path.join(wd, "metrics.jsonl"))]
  assert rows[-1]["val_loss"] < 0.7 * summary["initial_eval"]["val_loss"]
  params, cfg = diffusion.load(wd)  # the finished run's model/
  assert cfg.width == 32 and cfg.image_size == 8 and cfg.lora_rank == 0
  final = summary["state"]["params"]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ddpm_resume_and_lora_from_checkpoint(ddpm_run, tmp_path):
  wd, summary, _ = ddpm_run
  more = train.run(make_cfg(**{"train.max_steps": "40"}), wd)  # resumes from checkpoint 30
  assert more["start_step"] == 30 and more["final_step"] == 40
  lwd = str(tmp_path / "lora")
  out = train.run(make_cfg(**{"diffusion.checkpoint": wd, "diffusion.lora_rank": "4", "train.max_steps": "4",
                              "diffusion.width": "8"}), lwd)  # architecture keys come from the checkpoint
  base, _ = diffusion.load(wd)
  st = out["state"]
  assert set(st["params"]) == {"lora"}  # only adapters train; the base is frozen and loaded from the checkpoint
  for a, b in zip(jax.tree.leaves(st["frozen"]), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  merged, cfg = diffusion.load(lwd)
  assert cfg.width == 32 and cfg.lora_rank == 0
  full = {**st["frozen"], **st["params"]}
  x, t, c = jnp.zeros((2, 8, 8, 3)), jnp.array([10, 900]), jnp.array([0, 3])
  lcfg = diffusion.DenoiserConfig(**{**TINY, "lora_rank": 4})
  np.testing.assert_allclose(np.asarray(diffusion.apply(merged, x, t, c, cfg)),
                             np.asarray(diffusion.apply(full, x, t, c, lcfg)), atol=1e-4)


def test_save_load_round_trip(tiny, tmp_path):
  cfg, params, *_ = tiny
  diffusion.save(str(tmp_path / "m"), params, cfg)
  saved = json.load(open(tmp_path / "m" / "model_config.json"))
  assert saved["family"] == "denoiser" and saved["lora_rank"] == 0
  loaded, lcfg = diffusion.load(str(tmp_path / "m"), dtype="bfloat16")
  assert lcfg.dtype == "bfloat16" and lcfg.width == cfg.width and "lora" not in loaded
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(diffusion.lora_off(params))):  # B = 0: merge is a no-op
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(Exception, match="not a denoiser"):
    diffusion.load("examples/tiny_model")
