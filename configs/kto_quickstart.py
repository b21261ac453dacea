"""KTO on unpaired toy data (NeMo-Aligner's ``prompt``/``response``/``preference`` rows), from the SFT
quickstart's model.

  python -m jalign.train --config configs/kto_quickstart.py --workdir runs/kto_quickstart
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "kto"
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/kto_train.jsonl", eval_path="examples/data/kto_eval.jsonl",
                max_seq_len=40,  # KL samples pair a prompt with another row's response
                add_bos=True, add_eos=False)
  c.kto.update(beta=0.2)
  c.train.update(max_steps=150, global_batch_size=16, log_every=10)
  c.optim.update(lr=2e-4, warmup_steps=10, min_lr=2e-5, weight_decay=0.0)
  c.checkpoint.update(every_steps=50, keep=2)
  c.eval.update(every_steps=50, num_samples=6, max_new_tokens=8)
  return c
