"""PPO with NeMo-Aligner's semantics on the toy task: one sample per prompt from the SFT quickstart's model, the
programmatic grader as reward, per-token KL to the starting model in the reward, GAE, a critic (a second copy of
the starting model with a value head: ``ppo.critic_checkpoint``, or the first ``rm:`` reward source when there is
one) trained with its own learning rate. Each rollout of 512 samples trains in 8 mini-batch steps of 64, as
NeMo-Aligner trains PPO (``train.global_batch_size`` below ``rollout.num_prompts``): 25 rollouts in 200 steps.

  python -m jalign.train --config configs/ppo_quickstart.py --workdir runs/ppo_quickstart
  # rewarded by the RM quickstart's reward model instead:
  python -m jalign.train --config configs/ppo_quickstart.py --workdir runs/ppo_rm \\
      --config.reward.sources=rm:runs/rm_quickstart
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "ppo"
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/sft_train.jsonl", eval_path="examples/data/sft_eval.jsonl", add_bos=True)
  c.rollout.update(num_prompts=512, num_generations=1, max_new_tokens=8, max_prompt_len=28, temperature=1.0,
                   eval_prompts=200)
  c.reward.sources = ("fn:jalign.toy:reward",)
  c.ppo.update(kl_coef=0.01, gamma=1.0, lam=0.95, critic_lr=1e-3)
  c.train.update(max_steps=200, global_batch_size=64, log_every=10)
  c.optim.update(lr=5e-5, warmup_steps=5, schedule="constant", weight_decay=0.0)
  c.checkpoint.update(every_steps=40, keep=2)  # multiples of the 8 steps per rollout
  c.eval.update(every_steps=50)
  return c
