"""SteerLM 2.0 on the toy task: per (prompt, attribute string) 4 responses sampled from the current model (first the
SteerLM quickstart's, Q'), scored with the toy's exact attributes as P(a|x,y) and the SFT model as P(y|x), and
trained with the importance-weighted loss; ``distance`` (KL(w || b)) falls as the model moves towards P(y|a,x)
(about 1.0 to 0.1 over each of two iterations). Under a minute per iteration on a CPU.

  python -m jalign.steerlm2 iterate --config configs/steerlm2_quickstart.py --iterations 2 --workdir runs/steerlm2
  python -m jalign.steerlm2 generate --config configs/steerlm2_quickstart.py --output runs/steerlm2_data.jsonl
  python -m jalign.train --config configs/steerlm2_quickstart.py --workdir runs/steerlm2_one \
      --config.data.train_path=runs/steerlm2_data.jsonl
"""
from jalign.config import base_config


def get_config():
  c = base_config()
  c.algorithm = "steerlm2"
  c.model.checkpoint = "examples/tiny_steerlm_model"  # Q'(y|a,x): the SteerLM quickstart's model
  c.data.update(max_seq_len=80, add_bos=True)
  c.steerlm2.update(prompts_path="examples/data/sft_train.jsonl", num_prompts=16,
                    labels=("correctness:4,verbosity:4", "correctness:4,verbosity:2"),
                    unconditional_checkpoint="examples/tiny_sft_model",  # P(y|x): the SFT model
                    num_responses=4, max_new_tokens=8, max_prompt_len=64, temperature=1.0,
                    attribute_model="fn:jalign.steerlm2:toy_attributes", attribute_sigma=1.0)
  c.train.update(max_steps=16, global_batch_size=8, log_every=4)
  c.optim.update(lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0)
  c.checkpoint.update(every_steps=16, keep=1)
  c.eval.update(every_steps=0)
  return c
