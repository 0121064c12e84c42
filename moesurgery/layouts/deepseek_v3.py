"""DeepSeek-V3: MLA attention; sigmoid router with e_score_correction_bias for selection,
group-limited (group score = sum of top-2), optional renormalisation, routed_scaling_factor."""


from .base import MoESpec, get_float, get_int, router_settings
from .deepseek import DeepseekFamily
from .deepseek_v2 import MLAMixin


class SigmoidRouterMixin:
    bias_key = "gate.e_score_correction_bias"
    scorings = ("sigmoid",)
    renorm = "config"
    scaling = True
    group_score = "top2_sum"
    has_bias = True
    norm_topk_default = True

    def read_moe_spec(self, cfg):
        E, k, width, shared = self.spec_fields(cfg)
        router = router_settings(
            E, k, "sigmoid", bool(cfg.get("norm_topk_prob", self.norm_topk_default)), scaling=get_float(cfg, "routed_scaling_factor", 1.0),
            n_group=(get_int(cfg, "n_group", 1) or 1), topk_group=(get_int(cfg, "topk_group", 1) or 1), group_score="top2_sum",
        )
        return MoESpec(E, k, width, shared, router)

    def ffn_config(self, model):
        router = model.moe_layers()[0].ffn.router
        cfg = self.moe_common_config(model)
        cfg.update(
            routed_scaling_factor=router.scaling,
            n_group=router.n_group,
            topk_group=router.topk_group,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
        )
        if model.family != self.name:
            cfg["num_nextn_predict_layers"] = 0
        return cfg


class DeepseekV3(MLAMixin, SigmoidRouterMixin, DeepseekFamily):
    name = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    mla_variant = "deepseek_v3"
    llama_cpp = "deepseek2"


LAYOUT = DeepseekV3()
