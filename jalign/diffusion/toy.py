"""The toy image task: small images of one coloured shape on a dark background, from prompts like "red circle".

Prompts are colour x shape (4 x 3 = 12 classes); prompt id = colour * len(SHAPES) + shape. ``render`` draws one
image (float32 [H, W, 3] in [-1, 1], anti-aliased by 4x supersampling) with a random centre and size; ``dataset``
makes a balanced, seeded set. The grading helpers read an image back: a soft foreground mask (distance from the
background colour), the mean colour of the foreground and its nearest palette colour, and the shape from how much
of its bounding box the foreground fills (square 1, circle pi/4, triangle 1/2) and how top-heavy it is (a triangle
has a third as much area in its top half as in its bottom half). The colour helpers are pure jnp
and differentiable; ``classify_shape`` and ``grade`` are numpy graders for evaluation.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
PALETTE = np.array([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]], np.float32)
SHAPES = ("circle", "square", "triangle")
BACKGROUND = np.array([-0.6, -0.6, -0.6], np.float32)
PROMPTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
NUM_CLASSES = len(PROMPTS)
# (fill of the bounding box, top/bottom half area) per shape: ideal pi/4, 1 and 1/2 fills, rasterised slightly higher
SHAPE_FEATURES = np.array([[0.79, 1.0], [1.0, 1.0], [0.58, 0.38]], np.float32)
SUPERSAMPLE = 4


def prompt_id(prompt: str) -> int:
  if prompt not in PROMPTS:
    raise ValueError(f"unknown prompt {prompt!r}: choose from {', '.join(PROMPTS)}")
  return PROMPTS.index(prompt)


def prompt_of(pid: int) -> str:
  return PROMPTS[pid]


def colour_of(pid):
  return pid // len(SHAPES)


def shape_of(pid):
  return pid % len(SHAPES)


def shape_mask(shape: int, cx: float, cy: float, r: float, size: int) -> np.ndarray:
  """[size, size] coverage in [0, 1] of a shape centred at (cx, cy) (pixel units) with half-extent r."""
  n = size * SUPERSAMPLE
  c = (np.arange(n) + 0.5) / SUPERSAMPLE
  y, x = np.meshgrid(c, c, indexing="ij")
  dx, dy = x - cx, y - cy
  if SHAPES[shape] == "circle":
    m = dx * dx + dy * dy <= r * r
  elif SHAPES[shape] == "square":
    m = (np.abs(dx) <= r) & (np.abs(dy) <= r)
  else:  # isosceles triangle, apex up, base 2r at the bottom: half the bounding box
    m = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
  return m.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(pid: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
  """[size, size, 3] float32 in [-1, 1]: prompt ``pid``'s shape in its colour, random centre and size."""
  r = rng.uniform(0.22, 0.34) * size
  cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
  m = shape_mask(shape_of(pid), cx, cy, r, size)[..., None]
  return (m * PALETTE[colour_of(pid)] + (1 - m) * BACKGROUND).astype(np.float32)


def dataset(n: int, seed: int = 0, size: int = 16) -> dict:
  """{"images": [n, size, size, 3] float32, "labels": [n] int32}: balanced over the prompts, shuffled."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
  images = np.stack([render(int(p), rng, size) for p in labels]) if n else np.zeros((0, size, size, 3), np.float32)
  return {"images": images, "labels": labels}


# ------------------------------------------------------------------------------------------------- grading

def foreground(x_BHWC, sharpness: float = 8.0):
  """[B, H, W] soft foreground mask: sigmoid(sharpness (|x - background| - 0.5)) (differentiable)."""
  d = jnp.sqrt(jnp.sum(jnp.square(x_BHWC - BACKGROUND), axis=-1) + 1e-6)
  return jnp.asarray(1.0) / (1.0 + jnp.exp(-sharpness * (d - 0.5)))


def region_colour(x_BHWC, mask_BHW=None):
  """[B, 3] mean colour of the foreground (weighted by the soft mask)."""
  m = foreground(x_BHWC) if mask_BHW is None else mask_BHW
  return jnp.sum(x_BHWC * m[..., None], axis=(1, 2)) / (jnp.sum(m, axis=(1, 2))[..., None] + 1e-3)


def colour_logits(x_BHWC):
  """[B, len(COLOURS)]: minus the squared distance of the foreground colour to each palette colour."""
  c_B3 = region_colour(x_BHWC)
  return -jnp.sum(jnp.square(c_B3[:, None, :] - PALETTE[None]), axis=-1)


def colour_match(x_BHWC, pid_B):
  """[B] minus the squared distance of the foreground colour to the prompt's colour (0 is a perfect match)."""
  return jnp.take_along_axis(colour_logits(x_BHWC), jnp.asarray(colour_of(pid_B))[:, None], axis=1)[:, 0]


def classify_colour(x_BHWC) -> np.ndarray:
  return np.asarray(jnp.argmax(colour_logits(jnp.asarray(x_BHWC)), axis=-1))


def shape_features(x_BHWC) -> np.ndarray:
  """[B, 2] (foreground area / bounding-box area, top-half area / bottom-half area of the bounding box) of the
  hard foreground mask; zeros for an empty image."""
  m = np.asarray(foreground(jnp.asarray(x_BHWC))) > 0.5
  out = np.zeros((len(m), 2), np.float32)
  for i, mi in enumerate(m):
    ys, xs = np.nonzero(mi)
    if len(ys):
      box = mi[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
      h = box.shape[0] / 2
      top, bottom = box[:int(np.floor(h))].sum(), box[int(np.ceil(h)):].sum()
      out[i] = box.mean(), top / max(bottom, 1.0)
  return out


def classify_shape(x_BHWC) -> np.ndarray:
  """[B] the shape whose features (``SHAPE_FEATURES``) are nearest the image's."""
  f = shape_features(x_BHWC)
  return np.argmin(np.sum(np.square(f[:, None, :] - SHAPE_FEATURES[None]), axis=-1), axis=1)


def grade(x_BHWC, pid_B) -> dict:
  """Fractions of images whose colour, shape and both match their prompts."""
  pid_B = np.asarray(pid_B)
  col = classify_colour(x_BHWC) == colour_of(pid_B)
  shp = classify_shape(x_BHWC) == shape_of(pid_B)
  return {"colour_acc": float(col.mean()), "shape_acc": float(shp.mean()), "acc": float((col & shp).mean())}


def toy_spec(path: str) -> tuple[int, int]:
  """``"toy:N[:SEED]"`` -> (N, SEED); SEED defaults to 0."""
  from jalign.data import DataError
  parts = path.split(":")[1:]
  try:
    if not 1 <= len(parts) <= 2:
      raise ValueError
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
  except ValueError:
    raise DataError(path, None, None, "expected toy:N or toy:N:SEED") from None


def load_images(path: str, size: int = 16) -> dict:
  """Rows for ``data.train_path`` / ``eval_path``: ``"toy:N[:SEED]"`` generates N toy images (seed 0 unless
  given) at load time; a ``.npz`` path holds ``images`` ([N, size, size, C], float in [-1, 1] or uint8) and
  ``labels`` ([N] class ids)."""
  from jalign.data import DataError
  if path.startswith("toy:"):
    return dataset(*toy_spec(path), size)
  try:
    with np.load(path) as f:
      images, labels = f["images"], f["labels"]
  except (OSError, KeyError, ValueError) as e:
    raise DataError(path, None, None, f"expected an .npz with images and labels ({type(e).__name__}: {e})") from None
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  if images.ndim != 4 or images.shape[1:3] != (size, size) or len(labels) != len(images):
    raise DataError(path, None, None, f"images {images.shape} / labels {labels.shape}: expected "
                    f"[N, {size}, {size}, C] and [N]")
  return {"images": images.astype(np.float32), "labels": labels.astype(np.int32)}
