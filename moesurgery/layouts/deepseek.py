"""DeepSeekMoE v1 (`DeepseekForCausalLM`, remote code): Llama attention, dense layers below
`first_k_dense_replace`, softmax router in the model dtype (renormalised iff k > 1 and
norm_topk_prob), ungated shared experts of width moe_intermediate_size * n_shared_experts.

The DeepSeek-family helpers here are reused by deepseek_v2, deepseek_v3 and glm4_moe.
"""


from ..canonical import MoE, SwiGLU
from .base import schedule_config, Layout, MoESpec, get_int, need_int, router_settings

AUTO_MAP = {
    "AutoConfig": "deepseek-ai/deepseek-moe-16b-base--configuration_deepseek.DeepseekConfig",
    "AutoModel": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "deepseek-ai/deepseek-moe-16b-base--modeling_deepseek.DeepseekForCausalLM",
}


class DeepseekFamily(Layout):
    """Keys and layer pattern shared by deepseek v1/v2/v3 and glm4_moe."""

    shared_key = "shared_experts"
    moe = True
    shared = "multiple"
    needs_shared = True
    dense_layers = "prefix"
    schedule = "first_k_dense"
    writes_head = True  # vLLM 0.32's DeepseekV2/V3 and Glm4Moe models never tie lm_head; llama.cpp's dots1 needs output.weight

    def spec_fields(self, cfg) -> tuple[int, int, int, int]:
        E = need_int(cfg, "n_routed_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        width = need_int(cfg, "moe_intermediate_size", self.name)
        shared = get_int(cfg, "n_shared_experts", 0) * width
        return E, k, width, shared

    def moe_common_config(self, model) -> dict:
        moe = model.moe_layers()[0].ffn
        dense = [l for l in model.layers if isinstance(l.ffn, SwiGLU)]
        assert moe.shared_width % moe.expert_width == 0
        return {
            "n_routed_experts": len(moe.experts),
            "n_shared_experts": moe.shared_width // moe.expert_width,
            "num_experts_per_tok": moe.router.top_k,
            "moe_intermediate_size": moe.expert_width,
            **schedule_config(self.schedule, [isinstance(l.ffn, MoE) for l in model.layers]),
            "norm_topk_prob": moe.router.renormalize,
            "intermediate_size": dense[0].ffn.width if dense else model.config.get("intermediate_size", moe.expert_width),
        }


class Deepseek(DeepseekFamily):
    name = "deepseek"
    architecture = "DeepseekForCausalLM"
    renorm = "config_k>1"
    softmax_in_model_dtype = True
    needs_remote_code = True  # model_type deepseek: transformers and vLLM need DeepSeek's config code from the Hub
    llama_cpp = "deepseek"
    llama_cpp_renorm = "never"

    def read_moe_spec(self, cfg):
        E, k, width, shared = self.spec_fields(cfg)
        renorm = bool(cfg.get("norm_topk_prob", False)) and k > 1
        router = router_settings(E, k, renormalize=renorm, softmax_in_model_dtype=True)
        return MoESpec(E, k, width, shared, router)

    def attention_config(self, arch):
        return {"attention_bias": False, "pretraining_tp": 1}

    def ffn_config(self, model):
        cfg = self.moe_common_config(model)
        cfg.update(
            scoring_func="softmax",
            aux_loss_alpha=model.config.get("aux_loss_alpha", 0.001),
            seq_aux=True,
            auto_map=AUTO_MAP,
        )
        if not cfg["n_shared_experts"]:
            cfg["n_shared_experts"] = None  # DeepSeek's remote code (and vLLM) build shared experts iff not None
        return cfg


LAYOUT = Deepseek()
