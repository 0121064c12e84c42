"""dots.llm1 (`dots1`): DeepSeek-V3's MoE (sigmoid + correction bias, groups, shared experts,
dense first layers, keys as glm4_moe) with Qwen3's attention (per-head qk-norm; attention_bias on
q, k, v and o)."""

from ..errors import BadInputError
from .deepseek import DeepseekFamily
from .deepseek_v3 import SigmoidRouterMixin


class Dots1(SigmoidRouterMixin, DeepseekFamily):
    name = "dots1"
    architecture = "Dots1ForCausalLM"
    qkv_bias = "with_o"
    qk_norms = ("head",)
    norm_topk_default = False
    llama_cpp = "dots1"

    def read_sliding_window(self, cfg):
        types = cfg.get("layer_types") or []
        if "sliding_attention" in types:
            raise BadInputError("config.json: dots1 with sliding-window layers (layer_types) is not supported")
        return None

    def attention_config(self, arch):
        return {"attention_bias": arch.qkv_bias or arch.o_bias, "head_dim": arch.head_dim, "sliding_window": None}


LAYOUT = Dots1()
