"""Qwen3-Next (`qwen3_next`): a hybrid of Gated DeltaNet (linear attention) and gated full-attention layers
(`layer_types`), zero-centred RMSNorms (x_hat * (1 + w)), Qwen2-MoE's MoE (softmax router, renormalised iff
norm_topk_prob, a sigmoid-gated shared expert), dense layers from mlp_only_layers / decoder_sparse_step.
The attention tensors (linear_attn.*, self_attn.*) pass through untouched; the runtime computes both kinds."""

from ..errors import BadInputError
from .base import Layout, MoESpec, get_int, layer_kinds, need_int, router_settings
from .qwen2_moe import qwen_moe_config


def read_hybrid(layout, cfg, arch):
    """The Gated DeltaNet / gated-attention fields of a Qwen3-Next / 3.5 config into `arch`."""
    n = arch.num_layers
    types = cfg.get("layer_types")
    if types is None:
        interval = get_int(cfg, "full_attention_interval", 4) or 4
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)]
    arch.layer_types = layer_kinds(types, n, ("linear_attention", "full_attention"))
    arch.linear_attn = {"nk": need_int(cfg, "linear_num_key_heads", layout.name), "nv": need_int(cfg, "linear_num_value_heads", layout.name),
                        "dk": need_int(cfg, "linear_key_head_dim", layout.name), "dv": need_int(cfg, "linear_value_head_dim", layout.name),
                        "kernel": get_int(cfg, "linear_conv_kernel_dim", 4)}
    if arch.linear_attn["nv"] % arch.linear_attn["nk"]:
        raise BadInputError("config.json: linear_num_value_heads must be a multiple of linear_num_key_heads")
    arch.norm_offset = True
    arch.qk_norm = "head"  # the gated attention layers' q_norm / k_norm [head_dim] (zero-centred)
    if cfg.get("attention_bias"):
        raise BadInputError(f"config.json: {layout.name} with attention_bias=true is not supported")
    return arch


class HybridAttention(Layout):
    """What every Qwen3-Next / 3.5 layout shares: the hybrid attention, its config fields, zero-centred norms."""
    attention = "hybrid"
    rope_parameters_style = True
    partial_rotary = True
    default_partial_rotary = 0.25  # transformers' default when the config has none
    llama_cpp = None  # not checked against llama.cpp
    linear_attn_form = "grouped"  # in_proj_qkvz + in_proj_ba, rows grouped per key head

    def read_arch(self, cfg):
        return read_hybrid(self, cfg, super().read_arch(cfg))

    def attention_config(self, arch):
        la = arch.linear_attn
        return {"head_dim": arch.head_dim, "attention_bias": False, "layer_types": list(arch.layer_types),
                "linear_num_key_heads": la["nk"], "linear_num_value_heads": la["nv"], "linear_key_head_dim": la["dk"],
                "linear_value_head_dim": la["dv"], "linear_conv_kernel_dim": la["kernel"]}


class Qwen3Next(HybridAttention):
    name = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"
    shared_key = "shared_expert"
    shared_gate_key = "shared_expert_gate.weight"
    moe = True
    shared = "gated"
    dense_layers = "any"
    schedule = "qwen"
    experts_on_disk = "as_read"  # per expert (transformers' save_pretrained) or fused (the official Qwen3.5 releases)
    writes_head = True  # vLLM 0.32's Qwen3Next model never ties lm_head to the embeddings

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        shared = get_int(cfg, "shared_expert_intermediate_size", 0)
        return MoESpec(E, k, need_int(cfg, "moe_intermediate_size", self.name), shared,
                       router_settings(E, k, renormalize=bool(cfg.get("norm_topk_prob", True))))

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        return {**qwen_moe_config(model), "shared_expert_intermediate_size": moe.shared_width}


LAYOUT = Qwen3Next()
