"""Pretrains the tiny base model of the embedded default (run by examples/make_default.py)."""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=320, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_size=256,
                 tie_embeddings=True)
  c.tokenizer.path = "examples/tiny_model/tokenizer.model"
  c.data.update(train_path="examples/data/pretrain.jsonl", max_seq_len=128, packing=True, add_bos=True)
  c.train.update(max_steps=1200, global_batch_size=16, log_every=100)
  c.optim.update(lr=3e-3, warmup_steps=30, min_lr=3e-4, weight_decay=0.0)
  c.checkpoint.update(every_steps=1000, keep=1)
  c.eval.update(every_steps=0)
  return c
