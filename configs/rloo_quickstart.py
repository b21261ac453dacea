"""REINFORCE with the RLOO baseline (NeMo-Aligner's ``reinforce``) on the toy task: 8 samples per prompt from the
SFT quickstart's model, rewarded by the programmatic grader, KL to the starting model in the reward.

  python -m jalign.train --config configs/rloo_quickstart.py --workdir runs/rloo_quickstart
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "rloo"
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/sft_train.jsonl", eval_path="examples/data/sft_eval.jsonl", add_bos=True)
  c.rollout.update(num_prompts=64, num_generations=8, max_new_tokens=8, max_prompt_len=28, temperature=1.0,
                   eval_prompts=200)
  c.reward.sources = ("fn:jalign.toy:reward",)
  c.rloo.update(kl_coef=0.01, use_absolute_kl=True)
  c.train.update(max_steps=100, global_batch_size=512, log_every=10)
  c.optim.update(lr=5e-5, warmup_steps=5, schedule="constant", weight_decay=0.0)
  c.checkpoint.update(every_steps=50, keep=2)
  c.eval.update(every_steps=25)
  return c
