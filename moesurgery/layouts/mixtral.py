"""Mixtral: every layer MoE, `block_sparse_moe.experts.{j}.w1/w3/w2`, softmax top-k renormalised."""

from .base import Layout, MoESpec, need_int, router_settings


class Mixtral(Layout):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    ffn_prefix = "block_sparse_moe"
    expert_key = "experts.{j}.{proj}.weight"
    expert_proj = {"gate": "w1", "up": "w3", "down": "w2"}
    moe = True
    sliding_window = True
    renorm = "always"
    dense_layers = "none"
    llama_cpp = "llama"  # Mixtral is llama.cpp's llama architecture with experts
    llama_cpp_renorm = "always"
    default_rope_theta = 1e6

    def read_sliding_window(self, cfg):
        return cfg.get("sliding_window") or None

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_local_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        return MoESpec(E, k, need_int(cfg, "intermediate_size", self.name), 0, router_settings(E, k))

    def attention_config(self, arch):
        return {"sliding_window": arch.sliding_window}

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        return {
            "num_local_experts": len(moe.experts),
            "num_experts_per_tok": moe.router.top_k,
            "intermediate_size": moe.expert_width,
            "output_router_logits": False,
            "router_jitter_noise": 0.0,
            "router_aux_loss_coef": model.config.get("router_aux_loss_coef", 0.02),
        }


LAYOUT = Mixtral()
