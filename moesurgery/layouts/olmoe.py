"""OLMoE: q/k RMSNorm over the whole projection (`q_norm [H]`, `k_norm [kv*hd]`), every layer MoE."""


from .base import Layout, MoESpec, need_int, router_settings


class Olmoe(Layout):
    name = "olmoe"
    architecture = "OlmoeForCausalLM"
    moe = True
    qkv_bias = "with_o"
    qk_norms = ("full",)
    dense_layers = "none"
    llama_cpp = "olmoe"
    llama_cpp_renorm = "never"
    writes_head = True

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        renorm = bool(cfg.get("norm_topk_prob", False))
        width = need_int(cfg, "intermediate_size", self.name)
        return MoESpec(E, k, width, 0, router_settings(E, k, renormalize=renorm))

    def attention_config(self, arch):
        return {"attention_bias": arch.qkv_bias or arch.o_bias, "clip_qkv": None}

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        return {
            "num_experts": len(moe.experts),
            "num_experts_per_tok": moe.router.top_k,
            "intermediate_size": moe.expert_width,
            "norm_topk_prob": moe.router.renormalize,
            "output_router_logits": False,
        }


LAYOUT = Olmoe()
