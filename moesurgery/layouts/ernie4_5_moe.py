"""ERNIE-4.5 MoE (`ernie4_5_moe`, Baidu): a softmax router whose correction bias is added to the
probabilities for the choice (`mlp.moe_statics.e_score_correction_bias`, stored [1, E]), always
renormalised; ungated shared experts; MoE layers from moe_layer_start/end_index and interval;
Llama attention with interleaved rope pairs; tied embeddings by default."""

from ..canonical import MoE, SwiGLU
from ..errors import BadInputError
from .base import Layout, MoESpec, get_int, need_int, router_settings, schedule_config


class Ernie45Moe(Layout):
    name = "ernie4_5_moe"
    architecture = "Ernie4_5_MoeForCausalLM"
    bias_key = "moe_statics.e_score_correction_bias"
    bias_row = True
    shared_key = "shared_experts"
    moe = True
    renorm = "always"
    has_bias = True
    shared = "multiple"
    dense_layers = "prefix"
    schedule = "ernie"
    rope_interleave = True
    default_rope_theta = 500000.0

    def read_arch(self, cfg):
        if cfg.get("use_bias"):
            raise BadInputError("config.json: ernie4_5_moe with use_bias=true (biased projections and lm_head) is not supported")
        arch = super().read_arch(cfg)
        arch.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", True))
        arch.rope_interleave = True
        return arch

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "moe_num_experts", self.name)
        k = need_int(cfg, "moe_k", self.name)
        width = need_int(cfg, "moe_intermediate_size", self.name)
        shared = (get_int(cfg, "moe_num_shared_experts", 0) or 0) * width
        return MoESpec(E, k, width, shared, router_settings(E, k))

    def attention_config(self, arch):
        return {"use_bias": False, "head_dim": arch.head_dim}

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        dense = [l for l in model.layers if isinstance(l.ffn, SwiGLU)]
        assert moe.shared_width % moe.expert_width == 0
        return {
            "moe_num_experts": len(moe.experts), "moe_k": moe.router.top_k, "moe_intermediate_size": moe.expert_width,
            "moe_num_shared_experts": moe.shared_width // moe.expert_width,
            **schedule_config(self.schedule, [isinstance(l.ffn, MoE) for l in model.layers]),
            "intermediate_size": dense[0].ffn.width if dense else model.config.get("intermediate_size", moe.expert_width),
        }


LAYOUT = Ernie45Moe()
