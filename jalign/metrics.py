"""Metrics: ``WORKDIR/metrics.jsonl`` (one object per logged step, with ``step``), TensorBoard events and a
progress display (a bar with ETA on a terminal, plain periodic lines otherwise)."""
from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter
    self.tb_dir = os.path.join(workdir, "tensorboard")
    self.tb = SummaryWriter(self.tb_dir, purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int):
    """On resume, drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [ln for ln in f if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    with open(self.path, "w") as f:
      f.writelines(keep)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else v)
                                for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, float) and math.isfinite(v):
        self.tb.add_scalar(k, v, step)

  def close(self):
    if self.tb is not None:
      self.tb.close()


class Progress:
  def __init__(self, total: int, start: int, enabled: bool, every: int = 1):
    self.total, self.enabled, self.every = total, enabled, max(every, 1)
    self.bar = None
    self.t0, self.start = time.time(), start
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")

  def update(self, step: int, metrics: dict):
    if not self.enabled:
      return
    short = {k: metrics[k] for k in ("loss", "lr", "grad_norm", "tokens_per_sec") if k in metrics}
    if self.bar is not None:
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in short.items()}, refresh=False)
      self.bar.update(1)
    elif step % self.every == 0 or step == self.total:
      done = step - self.start
      eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
      msg = " ".join(f"{k}={v:.4g}" for k, v in short.items())
      print(f"step {step}/{self.total} {msg} eta={eta:.0f}s", flush=True)

  def message(self, text: str):
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.close()
