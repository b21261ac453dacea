"""DPO quickstart: align the SFT quickstart's model (shipped as examples/tiny_sft_model) on toy preference pairs
(chosen = the right answer, rejected = a plausible wrong one), on CPU in a few minutes.

  python -m jalign.train --config configs/dpo_quickstart.py --workdir runs/dpo_quickstart

Watch ``val_acc`` (held-out pairs whose implicit reward ranks chosen above rejected) rise from 0 (all ties at
step 0: policy == reference) to above 0.9.
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "dpo"
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/dpo_train.jsonl", eval_path="examples/data/dpo_eval.jsonl",
                max_seq_len=32, add_bos=True, add_eos=False)
  c.dpo.update(loss="dpo", beta=0.2)
  c.train.update(max_steps=200, global_batch_size=16, log_every=10)
  c.optim.update(lr=5e-4, warmup_steps=10, min_lr=5e-5, weight_decay=0.0)
  c.checkpoint.update(every_steps=100, keep=2)
  c.eval.update(every_steps=100, num_samples=6, max_new_tokens=8)
  return c
