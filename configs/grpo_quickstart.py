"""GRPO quickstart: the SFT quickstart's model answers the toy questions, 8 samples per prompt, rewarded by the
task's programmatic grader (``jalign.toy:reward``: 1 for the right answer, partial credit below), on CPU in a few
minutes. ``val_rollouts/rewards`` (greedy answers to held-out prompts) rises.

  python -m jalign.train --config configs/grpo_quickstart.py --workdir runs/grpo_quickstart
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "grpo"
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/sft_train.jsonl", eval_path="examples/data/sft_eval.jsonl", add_bos=True)
  c.rollout.update(num_prompts=64, num_generations=8, max_new_tokens=8, max_prompt_len=28, temperature=1.0,
                   eval_prompts=200)
  c.reward.sources = ("fn:jalign.toy:reward",)
  c.grpo.update(scale_rewards="group", loss_agg="token_mean", beta=0.0)
  c.train.update(max_steps=100, global_batch_size=512, log_every=10)
  c.optim.update(lr=5e-5, warmup_steps=5, schedule="constant", weight_decay=0.0)
  c.checkpoint.update(every_steps=50, keep=2)
  c.eval.update(every_steps=25)
  return c
