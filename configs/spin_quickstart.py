"""SPIN quickstart: self-play fine-tuning of the SFT quickstart's model (shipped as examples/tiny_sft_model) on the
toy chat task, 3 iterations on CPU in a couple of minutes.

  python -m jalign.train --config configs/spin_quickstart.py --workdir runs/spin_quickstart

Each iteration, the previous iteration's model samples an answer to every prompt of the step's batch and the
policy learns to prefer the ground truth over it (DPO with that model as the reference). Watch
``val_gt_minus_generated`` (held-out: log-likelihood of the ground truth minus that of the starting model's sample)
rise at each iteration's end, and the samples in ``runs/spin_quickstart/spin/generations_iter*.jsonl``.
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "spin"
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/sft_train.jsonl", eval_path="examples/data/sft_eval.jsonl",
                max_seq_len=40, add_bos=True)
  c.spin.update(max_iterations=3, steps_per_iteration=20, ref_policy_kl_penalty=(0.2,), temperature=1.0,
                max_new_tokens=12)
  c.train.update(max_steps=60, global_batch_size=16, log_every=5)
  c.optim.update(lr=3e-5, schedule="constant", weight_decay=0.0)
  c.checkpoint.update(every_steps=20, keep=2)
  c.eval.update(every_steps=20, max_batches=0, num_samples=6, max_new_tokens=8)
  return c
