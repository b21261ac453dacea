"""A tiny randomly initialised model trained from scratch on the toy chat task: the smallest full SFT run,
used by tests and as a template for your own configs."""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128)
  c.tokenizer.path = "examples/tiny_model/tokenizer.model"
  c.data.update(train_path="examples/data/sft_train.jsonl", eval_path="examples/data/sft_eval.jsonl",
                max_seq_len=64, add_bos=True)
  c.train.update(max_steps=20, global_batch_size=8, log_every=5)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.checkpoint.update(every_steps=10, keep=2)
  c.eval.update(every_steps=10)
  return c
