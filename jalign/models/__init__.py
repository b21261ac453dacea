from jalign.models import lora
from jalign.models.transformer import (ModelConfig, count_params, forward, hidden_states, init_params,
                                       logits_from_hidden, param_axes, param_shapes, token_logprobs,
                                       values_from_hidden)

__all__ = ["ModelConfig", "count_params", "forward", "hidden_states", "init_params", "logits_from_hidden",
           "lora", "param_axes", "param_shapes", "token_logprobs", "values_from_hidden"]
