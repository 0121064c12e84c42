"""gpt-oss (`gpt_oss`, OpenAI gpt-oss-20b / -120b): every layer MoE, no shared expert; the router is a biased
linear (`mlp.router.weight` + `.bias`) whose top-k logits are softmaxed (= softmax over all experts, renormalised
over the top-k); experts fused and transposed (`mlp.experts.gate_up_proj [E, H, 2I]` with gate/up interleaved
along 2I, `down_proj [E, I, H]`, biases `*_bias`), computing (up.clamp(±limit) + 1) * g * sigmoid(1.702 g) with
g = gate.clamp(max=limit); attention with q/k/v/o biases and a learned sink logit per head (`self_attn.sinks`),
sliding-window and full layers alternating (`layer_types`), YaRN rope. MXFP4 releases are read dequantized."""

from ..canonical import Activation
from .base import Layout, MoESpec, get_float, layer_kinds, need_int, router_settings

LAYER_TYPES = ("sliding_attention", "full_attention")


class GptOss(Layout):
    name = "gpt_oss"
    architecture = "GptOssForCausalLM"
    router_key = "router.weight"
    router_bias_key = "router.bias"
    fused_keys = ("experts.gate_up_proj", "experts.down_proj")
    fused_transposed = True
    gate_up_interleaved = True
    expert_bias_suffix = "_bias"
    experts_on_disk = "fused"
    hub_experts = "fused"
    expert_kind = "gpt_oss"
    writes_head = True  # vLLM 0.32's GptOss model never ties lm_head to the embeddings
    moe = True
    qkv_bias = "with_o"
    default_attention_bias = True  # GptOssConfig's default
    sliding_window = True
    dense_layers = "none"
    rope_parameters_style = True
    default_rope_theta = 150000.0
    llama_cpp = None  # not checked against llama.cpp

    def read_arch(self, cfg):
        arch = super().read_arch(cfg)
        n = arch.num_layers
        types = cfg.get("layer_types") or [LAYER_TYPES[(i + 1) % 2 == 0] for i in range(n)]
        arch.layer_types = layer_kinds(types, n, LAYER_TYPES)
        arch.sinks = True
        return arch

    def read_sliding_window(self, cfg):
        return cfg.get("sliding_window") or None

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_local_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        act = Activation("gpt_oss", get_float(cfg, "swiglu_alpha", 1.702), get_float(cfg, "swiglu_limit", 7.0))
        return MoESpec(E, k, need_int(cfg, "intermediate_size", self.name), 0, router_settings(E, k), act)

    def attention_config(self, arch):
        return {"head_dim": arch.head_dim, "attention_bias": arch.qkv_bias, "sliding_window": arch.sliding_window,
                "layer_types": list(arch.layer_types)}

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        return {"num_local_experts": len(moe.experts), "num_experts_per_tok": moe.router.top_k, "intermediate_size": moe.expert_width,
                "swiglu_limit": moe.act.limit, "router_aux_loss_coef": model.config.get("router_aux_loss_coef", 0.9),
                "output_router_logits": False}


LAYOUT = GptOss()
