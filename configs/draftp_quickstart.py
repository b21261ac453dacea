"""DRaFT+ with LoRA on the tiny base denoiser (examples/tiny_denoiser) and the toy reward (a clean shape in the
prompt's colour at the data's size), on CPU in a few minutes; val_reward (fixed held-out noise) rises.
See docs/draftp.md.

  python -m jalign.train --config configs/draftp_quickstart.py --workdir /tmp/draftp
  python -m jalign.diffusion.generate --checkpoint /tmp/draftp --prompts "red circle,blue square" --aig linear \\
      --output grid.png
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "draftp"
  c.diffusion.update(checkpoint="examples/tiny_denoiser", lora_rank=8, lora_alpha=16.0)
  # NeMo-Aligner's DRaFT+ recipe: K=1, kl_coeff=0.2 (its docs), DDIM eta 0, guidance 7.5; fewer DDIM steps (20,
  # not 50) to fit a CPU.
  c.draftp.update(kl_coeff=0.2, truncation_steps=1, inference_steps=20, eta=0.0, unconditional_guidance_scale=7.5,
                  reward_model="toy")
  c.data.update(train_path="toy:1200", eval_path="toy:48:1")
  c.train.update(max_steps=100, global_batch_size=8, log_every=10, grad_clip=10.0)  # NeMo: gradient_clip_val 10
  c.optim.update(lr=1e-3, schedule="constant", warmup_steps=5, weight_decay=0.0)  # NeMo: warmup then hold
  c.checkpoint.update(every_steps=50, keep=1)
  c.eval.update(every_steps=50)
  return c
