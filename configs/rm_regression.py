"""A SteerLM / HelpSteer2 multi-attribute regression reward model on the toy task: 9 attributes in NeMo's order
(quality, toxicity, humor, creativity, helpfulness, correctness, coherence, complexity, verbosity); the toy data
labels helpfulness, correctness and verbosity and marks the rest missing (-100).

  python -m jalign.train --config configs/rm_regression.py --workdir runs/rm_regression
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "rm"
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/rm_regression_train.jsonl",
                eval_path="examples/data/rm_regression_eval.jsonl", max_seq_len=32, add_bos=True, add_eos=False)
  c.rm.update(loss="regression", num_attributes=9, reward_index=4, label_range=(0.0, 4.0))
  # helpfulness/correctness need about this much data to be ranked (verbosity, i.e. length, is learned first)
  c.train.update(max_steps=300, global_batch_size=48, log_every=10)
  c.optim.update(lr=1e-3, warmup_steps=10, min_lr=1e-4, weight_decay=0.0)
  c.checkpoint.update(every_steps=100, keep=2)
  c.eval.update(every_steps=50)
  return c
