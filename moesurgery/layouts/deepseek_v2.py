"""DeepSeek-V2: MLA attention; fp32 softmax router, greedy or group-limited (group score = max),
times routed_scaling_factor, not renormalised (transformers' native class)."""

from .base import Layout, MoESpec, get_float, get_int, router_settings
from .deepseek import DeepseekFamily

MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")


class MLAMixin:
    attention = "mla"

    def read_arch(self, cfg):
        arch = Layout.read_arch(self, cfg)
        arch.mla = {k: cfg[k] for k in MLA_FIELDS if k in cfg}
        arch.head_dim = get_int(cfg, "qk_rope_head_dim", arch.head_dim)
        return arch

    def attention_config(self, arch):
        return dict(arch.mla)


class DeepseekV2(MLAMixin, DeepseekFamily):
    name = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    renorm = "never"
    scaling = True
    group_score = "max"

    def read_moe_spec(self, cfg):
        E, k, width, shared = self.spec_fields(cfg)
        grouped = cfg.get("topk_method", "greedy") == "group_limited_greedy"
        n_group = (get_int(cfg, "n_group", 1) or 1) if grouped else 1
        topk_group = (get_int(cfg, "topk_group", 1) or 1) if grouped else 1
        router = router_settings(
            E, k, renormalize=False, scaling=get_float(cfg, "routed_scaling_factor", 1.0),
            n_group=n_group, topk_group=topk_group, group_score="max",
        )
        return MoESpec(E, k, width, shared, router)

    def ffn_config(self, model):
        router = model.moe_layers()[0].ffn.router
        cfg = self.moe_common_config(model)
        cfg.update(
            norm_topk_prob=False,
            routed_scaling_factor=router.scaling,
            topk_method="group_limited_greedy" if router.grouped else "greedy",
            n_group=router.n_group,
            topk_group=router.topk_group,
            scoring_func="softmax",
        )
        return cfg


LAYOUT = DeepseekV2()
