"""Mistral Small 4 (`mistral4`, usually the text model of the `mistral3` wrapper): DeepSeek-V3's
MLA and shared expert with a softmax router (model dtype, optional groups scored by top-2 sum, no
correction bias), Llama-4 query scaling (`llama_4_scaling_beta` in rope_parameters), and experts
stored fused on disk (`mlp.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`: transformers
has no per-expert form for it)."""

from .base import MoESpec, get_float, get_int, router_settings
from .deepseek import DeepseekFamily
from .deepseek_v2 import MLAMixin


class Mistral4(MLAMixin, DeepseekFamily):
    name = "mistral4"
    architecture = "Mistral4ForCausalLM"
    llama_cpp = None  # not checked against llama.cpp
    mla_variant = "deepseek_v3"
    rope_interleave_default = True
    experts_on_disk = "fused"
    scaling = True
    group_score = "top2_sum"
    softmax_in_model_dtype = True
    query_scaling = True
    rope_parameters_style = True

    def read_moe_spec(self, cfg):
        E, k, width, shared = self.spec_fields(cfg)
        router = router_settings(E, k, renormalize=bool(cfg.get("norm_topk_prob", True)), scaling=get_float(cfg, "routed_scaling_factor", 1.0),
                                 n_group=get_int(cfg, "n_group", 1) or 1, topk_group=get_int(cfg, "topk_group", 1) or 1,
                                 group_score="top2_sum", softmax_in_model_dtype=True)
        return MoESpec(E, k, width, shared, router)

    def ffn_config(self, model):
        router = model.moe_layers()[0].ffn.router
        cfg = self.moe_common_config(model)
        cfg.pop("moe_layer_freq", None)
        cfg.update(routed_scaling_factor=router.scaling, n_group=router.n_group, topk_group=router.topk_group)
        return cfg


LAYOUT = Mistral4()
