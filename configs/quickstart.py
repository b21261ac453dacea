"""The quickstart: SFT of the shipped tiny base model on the toy chat task, on CPU in a few minutes.

  python -m jalign.train --config configs/quickstart.py --workdir runs/quickstart
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.model.checkpoint = "examples/tiny_model"   # architecture and weights; tokenizer found beside them
  c.data.update(train_path="examples/data/sft_train.jsonl", eval_path="examples/data/sft_eval.jsonl",
                max_seq_len=128, packing=True, add_bos=True)
  c.train.update(max_steps=200, global_batch_size=16, log_every=20)
  c.optim.update(lr=1e-3, warmup_steps=20, min_lr=1e-4, weight_decay=0.0)
  c.checkpoint.update(every_steps=100, keep=2)
  c.eval.update(every_steps=50, num_samples=6, max_new_tokens=12)
  return c
