"""Reward-model quickstart: a Bradley-Terry reward model on NeMo-Aligner comparison pairs of the toy task
(alternating chosen/rejected ``{"text"}`` lines), starting from the SFT quickstart's model.

  python -m jalign.train --config configs/rm_quickstart.py --workdir runs/rm_quickstart
  python -m jalign.score --checkpoint runs/rm_quickstart --rewardbench examples/data/rewardbench_toy.jsonl
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "rm"
  c.model.checkpoint = "examples/tiny_sft_model"   # the value head starts at zero
  c.data.update(train_path="examples/data/rm_train.jsonl", eval_path="examples/data/rm_eval.jsonl",
                max_seq_len=32, add_bos=True, add_eos=False)
  c.rm.update(loss="bradley_terry")
  c.train.update(max_steps=300, global_batch_size=24, log_every=10)
  c.optim.update(lr=1e-3, warmup_steps=10, min_lr=1e-4, weight_decay=0.0)
  c.checkpoint.update(every_steps=150, keep=2)
  c.eval.update(every_steps=150)
  return c
