"""GLM-4.5 (glm4_moe): GQA attention (optional q/k/v bias, optional per-head qk-norm, partial
rotary: 0.5 when absent) with DeepSeek-V3's sigmoid router and shared experts."""

from .deepseek import DeepseekFamily
from .deepseek_v3 import SigmoidRouterMixin


class Glm4Moe(SigmoidRouterMixin, DeepseekFamily):
    name = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    qkv_bias = "optional"
    qk_norms = (None, "head")
    partial_rotary = True
    default_partial_rotary = 0.5
    llama_cpp = "glm4moe"

    def read_qk_norm(self, cfg):
        return "head" if cfg.get("use_qk_norm") else None

    def attention_config(self, arch):
        # vLLM needs head_dim; Llama-style attention needs the full rotary dim.
        return {
            "attention_bias": arch.qkv_bias,
            "use_qk_norm": arch.qk_norm == "head",
            "partial_rotary_factor": arch.partial_rotary_factor,
            "head_dim": arch.head_dim,
        }


LAYOUT = Glm4Moe()
