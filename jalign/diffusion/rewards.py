"""Differentiable image rewards for DRaFT+: ``reward(x0_BHWC, cond_B) -> r_B`` (images in [-1, 1], prompt ids).

- programmatic (the toy task, ``jalign.diffusion.toy``): ``colour`` (how close the shape's mean colour is to the
  prompt's), ``purity`` (every pixel the prompt's colour or the background), ``size`` (the fraction of the image
  the shape covers), ``toy`` (colour + purity, with the size pulled to the data's 0.3);
- ``scorer:DIR``: a small learned CNN scorer, trained with Bradley-Terry on toy preference pairs
  (``python -m jalign.diffusion.rewards train-scorer --output DIR``);
- ``clip:DIR``: an image-text scorer with CLIP-style weights (PickScore/HPSv2-like): ``logit_scale *
  cos(image_embed(x0), text_embed[cond])``; the user provides the vision tower and one text embedding per prompt;
- ``fn:package.module:function``: any function with the signature above.

``get(spec, image_size)`` resolves a spec (``draftp.reward_model``) to the function.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jalign.diffusion import toy

PROGRAMMATIC = ("toy", "colour", "purity", "size")


# ------------------------------------------------------------------------------------------- programmatic

def colour_reward(x0_BHWC, cond_B):
  """[B] minus the squared distance between the shape's mean colour and the prompt's colour (0: exact)."""
  return toy.colour_match(x0_BHWC, cond_B)


def purity_reward(x0_BHWC, cond_B):
  """[B] minus the mean over pixels of the squared distance (per channel) to the nearer of the prompt's colour
  and the background: every pixel should be one or the other (no speckles, no other colour)."""
  col_B113 = jnp.asarray(toy.PALETTE)[toy.colour_of(cond_B)][:, None, None, :]
  d_fg = jnp.mean(jnp.square(x0_BHWC - col_B113), axis=-1)
  d_bg = jnp.mean(jnp.square(x0_BHWC - toy.BACKGROUND), axis=-1)
  return -jnp.mean(jnp.minimum(d_fg, d_bg), axis=(1, 2))


def size_reward(x0_BHWC, cond_B):
  """[B] fraction of the image covered by the (soft) foreground."""
  del cond_B
  return jnp.mean(toy.foreground(x0_BHWC), axis=(1, 2))


TARGET_SIZE = 0.3  # the training images' shapes cover about 0.29 of the image


def toy_reward(x0_BHWC, cond_B):
  """[B] colour + purity - 4 (size - 0.3)^2: a clean shape in the prompt's colour at the data's size (strong
  guidance makes the base model's shapes swell into blobs: the target it misses)."""
  size_B = size_reward(x0_BHWC, cond_B)
  return colour_reward(x0_BHWC, cond_B) + purity_reward(x0_BHWC, cond_B) - 4.0 * jnp.square(size_B - TARGET_SIZE)


# ------------------------------------------------------------------------------------------- learned scorer

@dataclasses.dataclass(frozen=True)
class ScorerConfig:
  num_classes: int = toy.NUM_CLASSES
  channels: int = 3
  width: int = 16   # conv channels (the second conv has 2 * width)


def scorer_init(cfg: ScorerConfig, rng) -> dict:
  k1, k2, k3 = jax.random.split(rng, 3)
  w2 = 2 * cfg.width
  return {"conv1": jax.random.normal(k1, (3, 3, cfg.channels, cfg.width)) / math.sqrt(9 * cfg.channels),
          "conv1_b": jnp.zeros((cfg.width,)),
          "conv2": jax.random.normal(k2, (3, 3, cfg.width, w2)) / math.sqrt(9 * cfg.width),
          "conv2_b": jnp.zeros((w2,)),
          "class_embed": jax.random.normal(k3, (cfg.num_classes, w2)) / math.sqrt(w2),
          "bias": jnp.zeros((cfg.num_classes,))}


def scorer_apply(params, x_BHWC, cond_B):
  """[B] score: two strided 3x3 convs (GELU), mean-pooled features dotted with the prompt's embedding."""
  def conv(x, w, b):
    y = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.gelu(y + b)
  h = conv(conv(x_BHWC, params["conv1"], params["conv1_b"]), params["conv2"], params["conv2_b"])
  f_BF = jnp.mean(h, axis=(1, 2))
  return jnp.sum(f_BF * params["class_embed"][cond_B], axis=-1) + params["bias"][cond_B]


def preference_pairs(n: int, seed: int, size: int = 16) -> dict:
  """Toy preference pairs {"chosen", "rejected": [n, H, W, 3], "cond": [n]}: the chosen image is the prompt drawn
  right; the rejected one is a drawing of another prompt (wrong colour, wrong shape or both) or the right one
  shrunk and blurred toward the background."""
  rng = np.random.default_rng(seed)
  cond = rng.integers(0, toy.NUM_CLASSES, n).astype(np.int32)
  chosen = np.stack([toy.render(int(c), rng, size) for c in cond])
  rejected = []
  for c in cond:
    if rng.random() < 0.75:
      other = (int(c) + rng.integers(1, toy.NUM_CLASSES)) % toy.NUM_CLASSES
      rejected.append(toy.render(other, rng, size))
    else:
      img = toy.render(int(c), rng, size)
      rejected.append(0.5 * img + 0.5 * toy.BACKGROUND)
  return {"chosen": chosen, "rejected": np.stack(rejected).astype(np.float32), "cond": cond}


def train_scorer(*, steps: int = 300, batch: int = 64, lr: float = 3e-3, seed: int = 0, n_pairs: int = 2048,
                 cfg: ScorerConfig = ScorerConfig()):
  """(params, metrics): the scorer trained with jalign's Bradley-Terry loss and optimizer on toy pairs; metrics
  hold the held-out pair accuracy before and after."""
  from jalign import trainer
  from jalign.algorithms import rm
  import ml_collections
  train, held = preference_pairs(n_pairs, seed), preference_pairs(512, seed + 1)
  optim = ml_collections.ConfigDict(dict(lr=lr, min_lr=0.0, warmup_steps=0, schedule="cosine", b1=0.9, b2=0.98,
                                         eps=1e-8, weight_decay=0.0))
  opt, _ = trainer.make_optimizer(optim, steps, grad_clip=1.0)
  params = scorer_init(cfg, jax.random.PRNGKey(seed))
  state = opt.init(params)

  def loss(p, b):
    return jnp.mean(rm.bradley_terry(scorer_apply(p, b["chosen"], b["cond"]), scorer_apply(p, b["rejected"],
                                                                                          b["cond"])))

  @jax.jit
  def step(p, s, b):
    g = jax.grad(loss)(p, b)
    u, s = opt.update(g, s, p)
    return jax.tree.map(jnp.add, p, u), s

  @jax.jit
  def accuracy(p):
    return jnp.mean(scorer_apply(p, held["chosen"], held["cond"]) > scorer_apply(p, held["rejected"], held["cond"]))

  acc0 = float(accuracy(params))
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, n_pairs, batch)
    params, state = step(params, state, {k: v[idx] for k, v in train.items()})
  return params, {"held_out_acc_before": acc0, "held_out_acc": float(accuracy(params))}


def save_scorer(directory: str, params: dict, cfg: ScorerConfig):
  from jalign import checkpoint
  checkpoint.save_model(directory, params, {**dataclasses.asdict(cfg), "family": "image_scorer"})


def load_scorer(path: str) -> tuple[dict, ScorerConfig]:
  from jalign import checkpoint
  model_dir = checkpoint.resolve_model_dir(path)
  saved = checkpoint.read_model_config(model_dir)
  if saved.get("family") != "image_scorer":
    raise ValueError(f"{path}: not an image scorer directory (model_config.json family != 'image_scorer')")
  cfg = ScorerConfig(**{f.name: saved[f.name] for f in dataclasses.fields(ScorerConfig)})
  abstract = jax.eval_shape(lambda: scorer_init(cfg, jax.random.PRNGKey(0)))
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract)
  return checkpoint.load_params(model_dir, abstract, optional=()), cfg


# ------------------------------------------------------------------------------------------- CLIP-style scorer

@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """The vision tower of a CLIP model (HF ``CLIPVisionModelWithProjection`` layout)."""
  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  layers: int = 24
  heads: int = 16
  mlp: int = 4096
  embed_dim: int = 768   # projection (and text embedding) size
  act: str = "gelu"      # gelu (open_clip/PickScore/HPSv2) | quick_gelu (OpenAI CLIP)
  eps: float = 1e-5
  mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalisation
  std: tuple = (0.26862954, 0.26130258, 0.27577711)


def clip_param_shapes(cfg: ClipConfig) -> dict:
  """Names and shapes of the weights :func:`clip_score` reads: HF's, with ``vision_model.`` dropped and the
  layers stacked on a leading axis (``encoder.layers.{i}.x`` -> ``layers.x`` [L, ...]); see docs/draftp.md."""
  D, L, F, P = cfg.width, cfg.layers, cfg.mlp, cfg.patch_size
  N = (cfg.image_size // P) ** 2 + 1
  layer = {f"self_attn.{n}_proj.weight": (L, D, D) for n in "qkv"}
  layer.update({f"self_attn.{n}_proj.bias": (L, D) for n in "qkv"})
  layer.update({"self_attn.out_proj.weight": (L, D, D), "self_attn.out_proj.bias": (L, D),
                "layer_norm1.weight": (L, D), "layer_norm1.bias": (L, D), "layer_norm2.weight": (L, D),
                "layer_norm2.bias": (L, D), "mlp.fc1.weight": (L, F, D), "mlp.fc1.bias": (L, F),
                "mlp.fc2.weight": (L, D, F), "mlp.fc2.bias": (L, D)})
  return {"embeddings.class_embedding": (D,), "embeddings.patch_embedding.weight": (D, 3, P, P),
          "embeddings.position_embedding.weight": (N, D), "pre_layrnorm.weight": (D,), "pre_layrnorm.bias": (D,),
          "post_layernorm.weight": (D,), "post_layernorm.bias": (D,), "visual_projection.weight": (cfg.embed_dim, D),
          "logit_scale": (), **{f"layers.{k}": v for k, v in layer.items()}}


def _gelu(u):
  return jax.nn.gelu(u, approximate=False)


def _ln(x, w, b, eps):
  mu = jnp.mean(x, -1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + eps) * w + b


def clip_image_embed(w: dict, x_BHWC, cfg: ClipConfig):
  """[B, embed_dim] L2-normalised image embeddings of images in [-1, 1] (resized to ``image_size``)."""
  B, D, P, nh = x_BHWC.shape[0], cfg.width, cfg.patch_size, cfg.heads
  x = jax.image.resize((x_BHWC + 1.0) / 2.0, (B, cfg.image_size, cfg.image_size, 3), "bilinear")
  x = (x - jnp.asarray(cfg.mean)) / jnp.asarray(cfg.std)
  g = cfg.image_size // P
  patches = x.reshape(B, g, P, g, P, 3).transpose(0, 1, 3, 5, 2, 4).reshape(B, g * g, 3 * P * P)
  h = patches @ w["embeddings.patch_embedding.weight"].reshape(D, -1).T
  cls = jnp.broadcast_to(w["embeddings.class_embedding"], (B, 1, D))
  h = jnp.concatenate([cls, h], 1) + w["embeddings.position_embedding.weight"]
  h = _ln(h, w["pre_layrnorm.weight"], w["pre_layrnorm.bias"], cfg.eps)
  act = (lambda u: u * jax.nn.sigmoid(1.702 * u)) if cfg.act == "quick_gelu" else _gelu
  lw = {k[len("layers."):]: v for k, v in w.items() if k.startswith("layers.")}

  def lin(u, name, i):
    return u @ lw[f"{name}.weight"][i].T + lw[f"{name}.bias"][i]

  def body(h, i):
    u = _ln(h, lw["layer_norm1.weight"][i], lw["layer_norm1.bias"][i], cfg.eps)
    q, k, v = (lin(u, f"self_attn.{n}_proj", i).reshape(B, -1, nh, D // nh) for n in "qkv")
    a = jax.nn.softmax(jnp.einsum("bnhk,bmhk->bhnm", q, k) / math.sqrt(D // nh), axis=-1)
    h = h + lin(jnp.einsum("bhnm,bmhk->bnhk", a, v).reshape(B, -1, D), "self_attn.out_proj", i)
    u = _ln(h, lw["layer_norm2.weight"][i], lw["layer_norm2.bias"][i], cfg.eps)
    return h + lin(act(lin(u, "mlp.fc1", i)), "mlp.fc2", i), None

  h, _ = jax.lax.scan(body, h, jnp.arange(cfg.layers))
  e = _ln(h[:, 0], w["post_layernorm.weight"], w["post_layernorm.bias"], cfg.eps) @ w["visual_projection.weight"].T
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def clip_score(w: dict, text_embeds_KE, x0_BHWC, cond_B, cfg: ClipConfig):
  """[B] ``exp(logit_scale) * cos(image, text[cond])`` (PickScore's score; HPSv2 uses scale 1: set
  logit_scale 0)."""
  t = text_embeds_KE[cond_B]
  t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  return jnp.exp(w["logit_scale"]) * jnp.sum(clip_image_embed(w, x0_BHWC, cfg) * t, axis=-1)


def load_clip(path: str):
  """``path``/clip_config.json (ClipConfig fields), weights.npz (:func:`clip_param_shapes` names) and
  text_embeds.npy ([num_prompts, embed_dim], row k = the text tower's embedding of prompt k)."""
  with open(os.path.join(path, "clip_config.json")) as f:
    d = json.load(f)
  cfg = ClipConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
  want = clip_param_shapes(cfg)
  with np.load(os.path.join(path, "weights.npz")) as z:
    w = {k: jnp.asarray(z[k], jnp.float32) for k in z.files}
  missing = sorted(set(want) - set(w))
  bad = [f"{k}: {w[k].shape} != {s}" for k, s in want.items() if k in w and tuple(w[k].shape) != s]
  if missing or bad:
    raise ValueError(f"{path}/weights.npz: missing {missing[:5]}, mis-shaped {bad[:5]}")
  text = jnp.asarray(np.load(os.path.join(path, "text_embeds.npy")), jnp.float32)
  if text.ndim != 2 or text.shape[1] != cfg.embed_dim:
    raise ValueError(f"{path}/text_embeds.npy: shape {text.shape}, expected [num_prompts, {cfg.embed_dim}]")
  return w, text, cfg


# ------------------------------------------------------------------------------------------- resolving a spec

def get(spec: str):
  """The reward function for ``draftp.reward_model``: toy | colour | purity | size | scorer:DIR | clip:DIR |
  fn:package.module:function."""
  if spec in PROGRAMMATIC:
    return {"toy": toy_reward, "colour": colour_reward, "purity": purity_reward, "size": size_reward}[spec]
  kind, _, arg = spec.partition(":")
  if kind == "scorer" and arg:
    p, _ = load_scorer(arg)
    return lambda x0, cond: scorer_apply(p, x0, cond)
  if kind == "clip" and arg:
    w, text, cfg = load_clip(arg)
    return lambda x0, cond: clip_score(w, text, x0, cond, cfg)
  if kind == "fn" and ":" in arg:
    mod, _, name = arg.rpartition(":")
    return getattr(importlib.import_module(mod), name)
  raise ValueError(f"reward {spec!r}: choose {', '.join(PROGRAMMATIC)}, scorer:DIR, clip:DIR or "
                   "fn:package.module:function")


def check_spec(spec: str):
  """Raise ValueError for a malformed spec (without loading anything)."""
  kind, _, arg = spec.partition(":")
  if spec in PROGRAMMATIC or (kind in ("scorer", "clip") and arg) or (kind == "fn" and ":" in arg):
    return
  raise ValueError(f"draftp.reward_model={spec!r}: choose {', '.join(PROGRAMMATIC)}, scorer:DIR, clip:DIR or "
                   "fn:package.module:function")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jalign.diffusion.rewards")
  sub = ap.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train-scorer", help="train the toy Bradley-Terry image scorer")
  t.add_argument("--output", required=True)
  t.add_argument("--steps", type=int, default=300)
  t.add_argument("--seed", type=int, default=0)
  a = ap.parse_args(argv)
  params, metrics = train_scorer(steps=a.steps, seed=a.seed)
  save_scorer(a.output, params, ScorerConfig())
  print(json.dumps(metrics))
  print(f"scorer written to {a.output}; use --config.draftp.reward_model=scorer:{a.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
