"""Qwen3.5 / 3.6 MoE (`qwen3_5_moe_text`, the language model of the `qwen3_5_moe` vision-language wrapper;
`--to qwen3_5_moe` names it too): Qwen3-Next's hybrid attention (Gated DeltaNet with flat in_proj_qkv / z /
b / a) and zero-centred norms; every layer MoE; a softmax router always renormalised; a sigmoid-gated shared
expert; experts per expert or fused on disk (read both, written in the form read)."""

from .base import MoESpec, get_int, need_int, router_settings
from .qwen3_next import Qwen3Next


class Qwen35Moe(Qwen3Next):
    name = "qwen3_5_moe_text"
    aliases = ("qwen3_5_moe",)
    architecture = "Qwen3_5MoeForCausalLM"
    schedule = "all"
    dense_layers = "none"
    renorm = "always"
    linear_attn_form = "flat"  # in_proj_qkv, in_proj_z, in_proj_b, in_proj_a
    hub_experts = "fused"  # Qwen/Qwen3.5-*, Qwen3.6-*: gate_up_proj [E, 2I, H], down_proj [E, H, I]

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        shared = get_int(cfg, "shared_expert_intermediate_size", 0)
        return MoESpec(E, k, need_int(cfg, "moe_intermediate_size", self.name), shared, router_settings(E, k))

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        return {"num_experts": len(moe.experts), "num_experts_per_tok": moe.router.top_k, "moe_intermediate_size": moe.expert_width,
                "shared_expert_intermediate_size": moe.shared_width}


LAYOUT = Qwen35Moe()
