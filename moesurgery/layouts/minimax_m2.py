"""MiniMax-M2 (`minimax_m2`): Mixtral's keys (`block_sparse_moe.experts.{j}.w1/w3/w2`, every layer
MoE, intermediate_size = expert width) with DeepSeek-V3's sigmoid router and a correction bias on
the block (`block_sparse_moe.e_score_correction_bias`), always renormalised, no scale, logits in the
model dtype; qk-norm over the whole projection; partial rotary from `rotary_dim`."""

from .base import Layout, MoESpec, get_int, need_int, router_settings


class MinimaxM2(Layout):
    name = "minimax_m2"
    architecture = "MiniMaxM2ForCausalLM"
    ffn_prefix = "block_sparse_moe"
    expert_key = "experts.{j}.{proj}.weight"
    expert_proj = {"gate": "w1", "up": "w3", "down": "w2"}
    bias_key = "e_score_correction_bias"
    moe = True
    qk_norms = ("full",)
    partial_rotary = True
    scorings = ("sigmoid",)
    renorm = "always"
    has_bias = True
    dense_layers = "none"
    logits_in_model_dtype = True
    default_rope_theta = 5e6
    llama_cpp = "minimax-m2"
    writes_head = True

    def read_arch(self, cfg):
        arch = super().read_arch(cfg)
        rotary = get_int(cfg, "rotary_dim", 0)
        if rotary:
            arch.partial_rotary_factor = rotary / arch.head_dim
        return arch

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_local_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        return MoESpec(E, k, need_int(cfg, "intermediate_size", self.name), 0,
                       router_settings(E, k, "sigmoid", True, logits_in_model_dtype=True))

    def attention_config(self, arch):
        return {"rotary_dim": int(arch.head_dim * arch.partial_rotary_factor), "partial_rotary_factor": arch.partial_rotary_factor}

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        return {"num_local_experts": len(moe.experts), "num_experts_per_tok": moe.router.top_k, "intermediate_size": moe.expert_width,
                "output_router_logits": False, "router_jitter_noise": 0.0,
                "scoring_func": "sigmoid", "use_routing_bias": True}  # the Hub's names, which vLLM reads


LAYOUT = MinimaxM2()
