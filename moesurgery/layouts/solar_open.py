"""Solar-Open (`solar_open`, Upstage): GLM-4.5's MoE (sigmoid + correction bias, shared experts) in
every layer, with plain Llama attention (optional q/k/v bias, full rotary, no qk-norm)."""

from .deepseek import DeepseekFamily
from .deepseek_v3 import SigmoidRouterMixin


class SolarOpen(SigmoidRouterMixin, DeepseekFamily):
    name = "solar_open"
    architecture = "SolarOpenForCausalLM"
    qkv_bias = "optional"
    dense_layers = "none"
    schedule = "all"
    default_rope_theta = 1e6

    def attention_config(self, arch):
        return {"attention_bias": arch.qkv_bias, "head_dim": arch.head_dim}

    def ffn_config(self, model):
        cfg = super().ffn_config(model)
        for key in ("first_k_dense_replace", "moe_layer_freq", "intermediate_size", "num_nextn_predict_layers"):
            cfg.pop(key, None)
        return cfg


LAYOUT = SolarOpen()
