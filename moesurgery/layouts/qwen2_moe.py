"""Qwen2-MoE (Qwen1.5-MoE): qwen2 attention; routed experts + one sigmoid-gated shared expert.

MoE iff L not in mlp_only_layers and (L+1) % decoder_sparse_step == 0. The shared expert always
exists: "no shared expert" is written as a zero one.
"""


from ..canonical import MoE, SwiGLU
from .base import schedule_config, Layout, MoESpec, get_int, need_int, router_settings
from .dense import qwen_sliding_config, qwen_sliding_window


def qwen_moe_config(model, experts_key: str = "num_experts") -> dict:
    moe = model.moe_layers()[0].ffn
    dense = [l for l in model.layers if isinstance(l.ffn, SwiGLU)]
    return {
        experts_key: len(moe.experts),
        "num_experts_per_tok": moe.router.top_k,
        "moe_intermediate_size": moe.expert_width,
        "norm_topk_prob": moe.router.renormalize,
        **schedule_config("qwen", [isinstance(l.ffn, MoE) for l in model.layers]),
        "intermediate_size": dense[0].ffn.width if dense else model.config.get("intermediate_size", moe.expert_width),
        "output_router_logits": False,
        "router_aux_loss_coef": model.config.get("router_aux_loss_coef", 0.001),
    }


class Qwen2Moe(Layout):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    shared_key = "shared_expert"
    shared_gate_key = "shared_expert_gate.weight"
    moe = True
    qkv_bias = "always"
    sliding_window = True
    shared = "gated"
    dense_layers = "any"
    schedule = "qwen"
    llama_cpp = "qwen2moe"
    llama_cpp_renorm = "never"  # its graph ignores norm_topk_prob
    writes_head = True

    def read_sliding_window(self, cfg):
        return qwen_sliding_window(cfg, self.name)

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        renorm = bool(cfg.get("norm_topk_prob", False))
        shared = get_int(cfg, "shared_expert_intermediate_size", 0)
        width = need_int(cfg, "moe_intermediate_size", self.name)
        return MoESpec(E, k, width, shared, router_settings(E, k, renormalize=renorm))

    def attention_config(self, arch):
        return qwen_sliding_config(arch)

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        return {**qwen_moe_config(model), "shared_expert_intermediate_size": moe.shared_width}


LAYOUT = Qwen2Moe()
