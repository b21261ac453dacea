"""``python -m jalign.diffusion.generate --checkpoint RUN --prompts "red circle,blue square" --aig linear
--output grid.png``: sample a DRaFT+ run with Annealed Importance Guidance and write an image grid PNG.

``RUN`` is a finished DRaFT+ run (its ``model/`` is the tuned denoiser, its ``config.json`` names the base in
``diffusion.checkpoint`` and the sampler in ``draftp.*``) or a denoiser model dir (then ``--base`` is needed for
any schedule but ``draft``). ``--aig`` takes ``base``, ``draft``, ``linear``, ``power_<p>``, ``step_<f>``
(``jalign.diffusion.aig``). ``--tradeoff OUT.json`` instead measures the mean reward and the diversity (mean
pairwise distance between the samples of one prompt) of each schedule in ``--schedules`` (``--plot PNG``
draws it, with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib

import numpy as np


# ------------------------------------------------------------------------------------------- PNG and grids

def to_uint8(x_HWC) -> np.ndarray:
  """Images in [-1, 1] -> uint8."""
  return np.round((np.clip(np.asarray(x_HWC, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def image_grid(x_RNHWC, scale: int = 4, pad: int = 2) -> np.ndarray:
  """[R, N, H, W, 3] images in [-1, 1] -> one uint8 [rows, cols, 3] grid (row r = prompt r), each image
  scaled up ``scale`` times (nearest), white gaps of ``pad`` pixels."""
  R, N, H, W, C = x_RNHWC.shape
  img = np.repeat(np.repeat(to_uint8(x_RNHWC), scale, axis=2), scale, axis=3)
  h, w = H * scale, W * scale
  out = np.full((R * (h + pad) + pad, N * (w + pad) + pad, C), 255, np.uint8)
  for r in range(R):
    for n in range(N):
      out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + n * (w + pad):pad + n * (w + pad) + w] = img[r, n]
  return out


def png_bytes(rgb_HW3: np.ndarray) -> bytes:
  """An 8-bit RGB PNG: signature, IHDR, one zlib IDAT of filter-0 rows, IEND."""
  rgb = np.ascontiguousarray(rgb_HW3, np.uint8)

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  H, W, _ = rgb.shape
  raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(H))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_png(path: str, rgb_HW3: np.ndarray):
  """Write an RGB PNG with PIL when it is installed, else with :func:`png_bytes`."""
  try:
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(rgb_HW3, np.uint8), "RGB").save(path)
  except ImportError:
    with open(path, "wb") as f:
      f.write(png_bytes(rgb_HW3))


# ------------------------------------------------------------------------------------------- sampling

def diversity(x_NHWC) -> float:
  """Mean pairwise distance between N samples (RMS per pixel value: ||x_i - x_j|| / sqrt(D))."""
  x = np.asarray(x_NHWC, np.float64).reshape(len(x_NHWC), -1)
  if len(x) < 2:
    return 0.0
  # differences, not the Gram-matrix expansion, whose rounding depends on the BLAS (identical samples: exactly 0)
  d = [np.sqrt(np.mean((x[i + 1:] - x[i]) ** 2, axis=1)) for i in range(len(x) - 1)]
  return float(np.concatenate(d).mean())


def make_sampler(base_params, draft_params, dcfg, *, schedule, steps, eta, guidance):
  """A jitted ``(cond_B, key) -> x0_BHWC`` for one AIG schedule."""
  import jax

  from jalign.diffusion import aig, denoiser

  @jax.jit
  def run(cond_B, key):
    x_T = jax.random.normal(key, (cond_B.shape[0], dcfg.image_size, dcfg.image_size, dcfg.channels))
    return aig.sample(lambda x, t, c: denoiser.apply(base_params, x, t, c, dcfg),
                      lambda x, t, c: denoiser.apply(draft_params, x, t, c, dcfg), x_T, cond_B,
                      schedule=schedule, steps=steps, eta=eta, guidance=guidance, key=jax.random.fold_in(key, 1),
                      num_train_timesteps=dcfg.num_train_timesteps)
  return run


def load_pair(checkpoint: str, base: str = ""):
  """(base params, draft params, config, run config dict or {}) for a run or model dir (+ ``base``)."""
  from jalign import diffusion
  run_cfg = {}
  cfg_path = os.path.join(checkpoint, "config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      run_cfg = json.load(f)
  draft, dcfg = diffusion.load(checkpoint)
  base = base or run_cfg.get("diffusion", {}).get("checkpoint", "")
  base_params = diffusion.load(base)[0] if base else None
  return base_params, draft, dcfg, run_cfg


def tradeoff(base_params, draft_params, dcfg, *, schedules, prompts, per_prompt, steps, eta, guidance, reward_fn,
             seed=0) -> list[dict]:
  """Per schedule: mean reward over every sample, and diversity (mean over prompts of the mean pairwise
  distance of the prompt's ``per_prompt`` samples); the same noise for every schedule."""
  import jax
  import jax.numpy as jnp
  cond_B = jnp.asarray(np.repeat(np.asarray(prompts), per_prompt), jnp.int32)
  rows = []
  for name in schedules:
    run = make_sampler(base_params, draft_params, dcfg, schedule=name, steps=steps, eta=eta, guidance=guidance)
    x0 = jnp.clip(run(cond_B, jax.random.PRNGKey(seed)), -1.0, 1.0)
    r = float(jnp.mean(reward_fn(x0, cond_B)))
    per = np.asarray(x0).reshape(len(prompts), per_prompt, *x0.shape[1:])
    rows.append({"schedule": name, "reward": r, "diversity": float(np.mean([diversity(p) for p in per]))})
  return rows


def plot_tradeoff(rows: list[dict], path: str, title: str = ""):
  """Reward against diversity, one labelled point per schedule (needs matplotlib)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
  xs, ys = [r["diversity"] for r in rows], [r["reward"] for r in rows]
  ax.plot(xs, ys, "-", color="0.8", zorder=1)
  ax.scatter(xs, ys, zorder=2)
  for r in rows:
    ax.annotate(r["schedule"], (r["diversity"], r["reward"]), textcoords="offset points", xytext=(5, 5))
  ax.set_xlabel("diversity (mean pairwise distance, same prompt)")
  ax.set_ylabel("mean reward")
  ax.set_title(title or "AIG: reward vs diversity")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jalign.diffusion.generate", description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", required=True, help="a finished DRaFT+ run (or a denoiser model dir)")
  ap.add_argument("--base", default="", help="the base denoiser (default: the run's diffusion.checkpoint)")
  ap.add_argument("--prompts", default="", help="comma-separated toy prompts (default: all)")
  ap.add_argument("--aig", default="draft", help="base | draft | linear | power_<p> | step_<f>")
  ap.add_argument("--num", type=int, default=8, help="samples per prompt")
  ap.add_argument("--steps", type=int, default=0, help="DDIM steps (default: the run's draftp.inference_steps)")
  ap.add_argument("--eta", type=float, default=None)
  ap.add_argument("--guidance", type=float, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--output", default="grid.png")
  ap.add_argument("--tradeoff", default="", help="write the reward/diversity table of --schedules here (JSON)")
  ap.add_argument("--schedules", default="base,power_2,linear,step_0.6,draft")
  ap.add_argument("--reward", default="", help="reward for --tradeoff (default: the run's draftp.reward_model)")
  ap.add_argument("--plot", default="", help="with --tradeoff: also plot it to this PNG (needs matplotlib)")
  a = ap.parse_args(argv)
  import jax

  from jalign.diffusion import aig, rewards, toy
  try:
    names = [s for s in (a.schedules.split(",") if a.tradeoff else [a.aig]) if s]
    for n in names:
      aig.parse_schedule(n)
    prompts = [toy.prompt_id(p.strip()) for p in a.prompts.split(",") if p.strip()] or list(range(toy.NUM_CLASSES))
    base_params, draft, dcfg, run_cfg = load_pair(a.checkpoint, a.base)
  except (ValueError, OSError) as e:
    print(f"jalign.diffusion.generate: error: {e}", file=sys.stderr)
    return 2
  if base_params is None:
    if any(n != "draft" for n in names):
      print("jalign.diffusion.generate: error: no base model: pass --base (the checkpoint is not a DRaFT+ run)",
            file=sys.stderr)
      return 2
    base_params = draft
  sam = {**{"inference_steps": 50, "eta": 0.0, "unconditional_guidance_scale": 7.5}, **run_cfg.get("draftp", {})}
  kw = dict(steps=a.steps or sam["inference_steps"], eta=sam["eta"] if a.eta is None else a.eta,
            guidance=sam["unconditional_guidance_scale"] if a.guidance is None else a.guidance)
  if a.tradeoff:
    reward_fn = rewards.get(a.reward or run_cfg.get("draftp", {}).get("reward_model", "toy"))
    rows = tradeoff(base_params, draft, dcfg, schedules=names, prompts=prompts, per_prompt=a.num,
                    reward_fn=reward_fn, seed=a.seed, **kw)
    with open(a.tradeoff, "w") as f:
      json.dump(rows, f, indent=2)
    for r in rows:
      print(f"{r['schedule']:>10}  reward {r['reward']:+.4f}  diversity {r['diversity']:.4f}")
    if a.plot:
      plot_tradeoff(rows, a.plot)
    return 0
  import jax.numpy as jnp
  run = make_sampler(base_params, draft, dcfg, schedule=names[0], **kw)
  cond_B = jnp.asarray(np.repeat(np.asarray(prompts), a.num), jnp.int32)
  x0 = np.asarray(run(cond_B, jax.random.PRNGKey(a.seed)))
  write_png(a.output, image_grid(x0.reshape(len(prompts), a.num, *x0.shape[1:])))
  print(f"wrote {a.output}: {len(prompts)} prompt(s) x {a.num} samples, AIG {names[0]}, {kw}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
