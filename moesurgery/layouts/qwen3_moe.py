"""Qwen3-MoE: qwen3 attention (per-head q/k norm), routed experts only, optional dense layers."""


from .base import Layout, MoESpec, need, need_int, router_settings
from .dense import qwen_sliding_config, qwen_sliding_window
from .qwen2_moe import qwen_moe_config


class Qwen3Moe(Layout):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    moe = True
    qkv_bias = "with_o"
    qk_norms = ("head",)
    sliding_window = True
    dense_layers = "any"
    schedule = "qwen"
    llama_cpp = "qwen3moe"
    llama_cpp_renorm = "always"

    def read_sliding_window(self, cfg):
        return qwen_sliding_window(cfg, self.name)

    def read_moe_spec(self, cfg):
        E = int(cfg.get("num_experts") or need(cfg, "num_local_experts", self.name))
        k = need_int(cfg, "num_experts_per_tok", self.name)
        renorm = bool(cfg.get("norm_topk_prob", False))
        width = need_int(cfg, "moe_intermediate_size", self.name)
        return MoESpec(E, k, width, 0, router_settings(E, k, renormalize=renorm))

    def attention_config(self, arch):
        return {"attention_bias": arch.qkv_bias or arch.o_bias, **qwen_sliding_config(arch)}

    def ffn_config(self, model):
        return qwen_moe_config(model)


LAYOUT = Qwen3Moe()
