"""Hy3 (`hy_v3`, Tencent): DeepSeek-V3's sigmoid router without groups, always renormalised, times
`router_scaling_factor`, under its own names (`mlp.router.gate.weight`, `mlp.expert_bias`,
`mlp.shared_mlp`); dense layers from `mlp_layer_types`; per-head qk-norm, attention_bias on q/k/v/o."""

from ..errors import BadInputError
from ..canonical import MoE, SwiGLU
from .base import Layout, MoESpec, get_float, get_int, need_int, router_settings, schedule_config


class HyV3(Layout):
    name = "hy_v3"
    architecture = "HYV3ForCausalLM"
    router_key = "router.gate.weight"
    bias_key = "expert_bias"
    shared_key = "shared_mlp"
    moe = True
    qkv_bias = "with_o"
    qk_norms = ("head",)
    scorings = ("sigmoid",)
    renorm = "always"
    scaling = True
    has_bias = True
    shared = "multiple"
    dense_layers = "any"
    schedule = "layer_types"

    def read_arch(self, cfg):
        if cfg.get("mlp_bias"):
            raise BadInputError("config.json: hy_v3 with mlp_bias=true (biased dense/shared MLPs) is not supported")
        return super().read_arch(cfg)

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        width = need_int(cfg, "moe_intermediate_size", self.name)
        shared = (get_int(cfg, "num_shared_experts", 1) or 0) * width
        router = router_settings(E, k, "sigmoid", True, scaling=get_float(cfg, "router_scaling_factor", 1.0))
        return MoESpec(E, k, width, shared, router)

    def attention_config(self, arch):
        return {"attention_bias": arch.qkv_bias or arch.o_bias, "head_dim": arch.head_dim, "mlp_bias": False}

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        dense = [l for l in model.layers if isinstance(l.ffn, SwiGLU)]
        assert moe.shared_width % moe.expert_width == 0
        return {
            "num_experts": len(moe.experts), "num_experts_per_tok": moe.router.top_k, "moe_intermediate_size": moe.expert_width,
            "num_shared_experts": moe.shared_width // moe.expert_width, "router_scaling_factor": moe.router.scaling,
            **schedule_config(self.schedule, [isinstance(l.ffn, MoE) for l in model.layers]),
            "intermediate_size": dense[0].ffn.width if dense else model.config.get("intermediate_size", moe.expert_width),
            # the Hub's names for the same fields, which vLLM's hy_v3 reads
            "expert_hidden_dim": moe.expert_width, "route_norm": True, "qk_norm": True,
        }


LAYOUT = HyV3()
