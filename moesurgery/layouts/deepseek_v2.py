"""DeepSeek-V2: MLA attention; fp32 softmax router, greedy or group-limited (group score = max),
times routed_scaling_factor, not renormalised (transformers' native class)."""

from .base import need_int, Layout, MoESpec, get_float, get_int, router_settings
from .deepseek import DeepseekFamily

MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")


INDEXER_FIELDS = ("index_topk", "index_n_heads", "index_head_dim")


class MLAMixin:
    attention = "mla"
    mla_variant = "deepseek_v2"  # how the runtime rotates (complex pairs; deepseek_v3: rotate_half / interleaved)
    rope_interleave_default: bool | None = None  # a value when the config has no rope_interleave field
    indexer_interleave: bool | None = None  # sparse-attention indexer: None (none), False (half split), True (pairs)

    def read_arch(self, cfg):
        arch = Layout.read_arch(self, cfg)
        arch.mla = {k: cfg[k] for k in MLA_FIELDS if k in cfg}
        if "rope_interleave" not in arch.mla and self.rope_interleave_default is not None:
            arch.mla["rope_interleave"] = self.rope_interleave_default
        arch.mla["variant"] = self.mla_variant
        arch.head_dim = get_int(cfg, "qk_rope_head_dim", arch.head_dim)
        arch.partial_rotary_factor = 1.0  # the rope part of each head rotates whole (transformers: partial = rope / (nope + rope))
        if self.indexer_interleave is not None:
            arch.indexer = {"topk": need_int(cfg, "index_topk", self.name), "heads": need_int(cfg, "index_n_heads", self.name),
                            "head_dim": need_int(cfg, "index_head_dim", self.name), "interleave": self.indexer_interleave,
                            "types": self.indexer_types(cfg)}
        return arch

    def indexer_types(self, cfg) -> list[str]:
        return ["full"] * get_int(cfg, "num_hidden_layers", 0)

    def attention_config(self, arch):
        out = {k: v for k, v in arch.mla.items() if k in MLA_FIELDS}
        if arch.indexer:
            out.update(index_topk=arch.indexer["topk"], index_n_heads=arch.indexer["heads"], index_head_dim=arch.indexer["head_dim"])
        return out


class DeepseekV2(MLAMixin, DeepseekFamily):
    name = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    renorm = "never"
    scaling = True
    llama_cpp = "deepseek2"
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
