"""Pretrains the tiny base denoiser of the toy image task (examples/tiny_denoiser; docs/diffusion.md):
ε-prediction MSE on 16x16 coloured shapes generated at load time, with 10% null labels for guidance. 4x4
patches (16 tokens) keep it to about 3-4 minutes on a 2-core CPU.

  python -m jalign.train --config configs/ddpm_tiny.py --workdir /tmp/ddpm
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "ddpm"
  c.diffusion.update(image_size=16, patch_size=4, width=96, depth=4, num_heads=4, class_dropout=0.1)
  c.data.update(train_path="toy:6000", eval_path="toy:240:1")
  c.train.update(max_steps=1500, global_batch_size=64, log_every=100, grad_clip=1.0)
  c.optim.update(lr=1e-3, warmup_steps=100, min_lr=1e-4, weight_decay=0.0)
  c.checkpoint.update(every_steps=1000, keep=1)
  c.eval.update(every_steps=500)
  return c
