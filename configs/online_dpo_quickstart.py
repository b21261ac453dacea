"""Online DPO on the toy task: two samples per prompt from the current policy, the one the programmatic grader
prefers is chosen (ties are left out), DPO loss against the starting model.

  python -m jalign.train --config configs/online_dpo_quickstart.py --workdir runs/online_dpo_quickstart
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "online_dpo"
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/sft_train.jsonl", eval_path="examples/data/sft_eval.jsonl", add_bos=True)
  c.rollout.update(num_prompts=32, num_generations=2, max_new_tokens=8, max_prompt_len=32, temperature=1.0)
  c.reward.sources = ("fn:jalign.toy:reward",)
  c.online_dpo.update(beta=0.1, loss="dpo")
  c.train.update(max_steps=50, global_batch_size=32, log_every=5)
  c.optim.update(lr=1e-4, warmup_steps=10, schedule="constant", weight_decay=0.0)
  c.checkpoint.update(every_steps=25, keep=2)
  c.eval.update(every_steps=25)
  return c
