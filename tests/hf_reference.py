"""Test helpers: tiny Hugging Face models in torch and their weights in jalign's layout."""
import numpy as np

from jalign.models import ModelConfig


def tiny_hf_model(kind="llama", **overrides):
  import torch
  import transformers
  torch.manual_seed(0)
  common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
  common.update(overrides)
  if kind == "llama":
    cfg = transformers.LlamaConfig(**common)
    model = transformers.LlamaForCausalLM(cfg)
  elif kind == "qwen2":
    cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
    model = transformers.Qwen2ForCausalLM(cfg)
  elif kind == "mistral":
    cfg = transformers.MistralConfig(**common)
    model = transformers.MistralForCausalLM(cfg)
  else:
    raise ValueError(kind)
  with torch.no_grad():  # non-trivial norms so a mix-up of norm weights shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model.eval()


def jalign_from_hf(model, **cfg_overrides):
  c = model.config
  rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
  theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
  kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, ffn_size=c.intermediate_size,
            rope_theta=float(theta), rms_norm_eps=c.rms_norm_eps,
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=bool(getattr(c, "attention_bias", False)) or c.model_type == "qwen2",
            sliding_window=int(getattr(c, "sliding_window", 0) or 0) if c.model_type == "mistral" else 0)
  rtype = rope.get("rope_type", "default")
  if rtype == "linear":
    kw.update(rope_scaling="linear", rope_factor=rope["factor"])
  elif rtype == "llama3":
    kw.update(rope_scaling="llama3", rope_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
              rope_high_freq_factor=rope["high_freq_factor"],
              rope_original_max_position=rope["original_max_position_embeddings"])
  kw.update(cfg_overrides)
  cfg = ModelConfig(**kw)
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
  D, H, K, Dh, L = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dh, cfg.num_layers
  lay = lambda i, n: sd[f"model.layers.{i}.{n}"]
  stack = lambda f: np.stack([f(i) for i in range(L)])
  layers = {
      "attn_norm": stack(lambda i: lay(i, "input_layernorm.weight")),
      "mlp_norm": stack(lambda i: lay(i, "post_attention_layernorm.weight")),
      "q": stack(lambda i: lay(i, "self_attn.q_proj.weight").T.reshape(D, H, Dh)),
      "k": stack(lambda i: lay(i, "self_attn.k_proj.weight").T.reshape(D, K, Dh)),
      "v": stack(lambda i: lay(i, "self_attn.v_proj.weight").T.reshape(D, K, Dh)),
      "o": stack(lambda i: lay(i, "self_attn.o_proj.weight").T.reshape(H, Dh, D)),
      "gate": stack(lambda i: lay(i, "mlp.gate_proj.weight").T),
      "up": stack(lambda i: lay(i, "mlp.up_proj.weight").T),
      "down": stack(lambda i: lay(i, "mlp.down_proj.weight").T),
  }
  if cfg.qkv_bias:
    layers["q_bias"] = stack(lambda i: lay(i, "self_attn.q_proj.bias").reshape(H, Dh))
    layers["k_bias"] = stack(lambda i: lay(i, "self_attn.k_proj.bias").reshape(K, Dh))
    layers["v_bias"] = stack(lambda i: lay(i, "self_attn.v_proj.bias").reshape(K, Dh))
  params = {"embed": sd["model.embed_tokens.weight"], "layers": layers, "final_norm": sd["model.norm.weight"]}
  if not cfg.tie_embeddings:
    params["lm_head"] = sd["lm_head.weight"].T
  return cfg, params
