"""SteerLM step 3, attribute-conditioned SFT: the SFT quickstart's model learns to answer as the label asks.

The toy SteerLM rows (``examples/data/steerlm_*.jsonl``, NeMo chat with ``type: VALUE_TO_TEXT``) answer tersely or
with the working shown, rightly or wrongly, each labelled ``correctness:C,verbosity:V`` after
``<extra_id_2>`` (label tokens are not trained on). Afterwards (about 2 minutes on CPU) the model answers with its
working shown when asked for a worked answer's verbosity (4) and tersely when asked for a terse one's:

  python -m jalign.train --config configs/steerlm_quickstart.py --workdir runs/steerlm
  python -m jalign.generate --checkpoint runs/steerlm --input examples/data/sft_eval.jsonl \\
      --attributes correctness:4,verbosity:4 --max-new-tokens 16
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.model.checkpoint = "examples/tiny_sft_model"
  c.data.update(train_path="examples/data/steerlm_train.jsonl", eval_path="examples/data/steerlm_eval.jsonl",
                max_seq_len=128, packing=True, add_bos=True)
  c.train.update(max_steps=300, global_batch_size=32, log_every=10)
  c.optim.update(lr=1e-3, warmup_steps=10, min_lr=1e-4, weight_decay=0.0)
  c.checkpoint.update(every_steps=300, keep=1)
  c.eval.update(every_steps=100, num_samples=4, max_new_tokens=16)
  return c
