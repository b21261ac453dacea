"""Knowledge distillation quickstart: a fresh 2-layer student learns the toy chat task from the top-32 logits of
the shipped SFT model (4 layers), on CPU in a couple of minutes.

  python -m jalign.distill topk --teacher examples/tiny_sft_model --config configs/kd_quickstart.py \\
      --input examples/data/sft_train.jsonl --k 32 --output runs/kd_topk/train
  python -m jalign.distill topk --teacher examples/tiny_sft_model --config configs/kd_quickstart.py \\
      --input examples/data/sft_eval.jsonl --k 32 --output runs/kd_topk/eval
  python -m jalign.train --config configs/kd_quickstart.py --workdir runs/kd_quickstart

Or without files, the teacher running beside the student in every step:
  python -m jalign.train --config configs/kd_quickstart.py --workdir runs/kd_online \\
      --config.kd.mode=online --config.kd.teacher_checkpoint=examples/tiny_sft_model
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "kd"
  # the student: smaller than the teacher (4 layers, hidden 128), same vocabulary and tokenizer, fresh weights
  c.model.update(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128,
                 tie_embeddings=True)
  c.tokenizer.path = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/sft_train.jsonl", eval_path="examples/data/sft_eval.jsonl",
                max_seq_len=32, add_bos=True)
  c.kd.update(topk_path="runs/kd_topk/train", eval_topk_path="runs/kd_topk/eval", k=32)
  c.train.update(max_steps=300, global_batch_size=16, log_every=25)
  c.optim.update(lr=3e-3, warmup_steps=20, min_lr=3e-4, weight_decay=0.0)
  c.checkpoint.update(every_steps=100, keep=2)
  c.eval.update(every_steps=100, num_samples=6, max_new_tokens=12)
  return c
