"""Llama 4 (`llama4_text`, the language model of the `llama4` wrapper: Scout, Maverick): MoE layers from
`moe_layers` / `interleave_moe_layer_step`, dense layers of width `intermediate_size_mlp`; a top-k sigmoid router
whose weight scales the expert's *input* (e(w x), not w e(x)), never renormalised; one ungated shared expert of
the experts' width (`intermediate_size`); experts fused and transposed (`feed_forward.experts.gate_up_proj
[E, H, 2I]` = [gate | up], `down_proj [E, I, H]`). Attention: rope on adjacent pairs (complex), NoPE every
`no_rope_layer_interval`-th layer (no rope, q scaled by the attention temperature), weightless L2 qk-norm after
rope, rope layers attending within `attention_chunk_size` chunks.

The shared expert has the experts' width, one `intermediate_size`: finer experts would need a narrower shared
expert than Llama 4 can hold, so they are refused (pruning and merging keep the width)."""

from ..errors import BadInputError
from .base import Layout, MoESpec, get_float, get_int, layer_kinds, need_int, router_settings


class Llama4(Layout):
    name = "llama4_text"
    architecture = "Llama4ForCausalLM"
    ffn_prefix = "feed_forward"
    router_key = "router.weight"
    shared_key = "shared_expert"
    fused_transposed = True
    experts_on_disk = "fused"
    hub_experts = "fused"
    moe = True
    shared = "multiple"
    scorings = ("sigmoid",)
    renorm = "never"
    rope_interleave = True
    dense_layers = "any"
    schedule = "llama4"
    dense_width_key = "intermediate_size_mlp"
    weight_on_input = True
    default_rope_theta = 500000.0
    llama_cpp = None  # not checked against llama.cpp

    def read_arch(self, cfg):
        arch = super().read_arch(cfg)
        n = arch.num_layers
        if cfg.get("attention_bias"):
            raise BadInputError("config.json: llama4_text with attention_bias=true is not supported")
        rope = cfg.get("no_rope_layers") or [int((i + 1) % (get_int(cfg, "no_rope_layer_interval", 4) or 4) != 0) for i in range(n)]
        if len(rope) != n:
            raise BadInputError(f"config.json: no_rope_layers must list {n} layers")
        arch.rope_layers = [bool(r) for r in rope]
        chunk = get_int(cfg, "attention_chunk_size", 8192)
        types = cfg.get("layer_types") or [("chunked_attention" if r and chunk else "full_attention") for r in arch.rope_layers]
        arch.layer_types, arch.attention_chunk = layer_kinds(types, n, ("chunked_attention", "full_attention")), chunk or None
        arch.qk_l2 = bool(cfg.get("use_qk_norm", True))
        if cfg.get("attn_temperature_tuning", True):  # Scout / Maverick configs say 4: any true value turns it on
            arch.attn_temperature = (get_float(cfg, "floor_scale", 8192.0), get_float(cfg, "attn_scale", 0.1))
        arch.qk_norm, arch.rope_interleave = None, True
        return arch

    def is_moe_layer(self, cfg, index):
        n = get_int(cfg, "num_hidden_layers", 0)
        step = get_int(cfg, "interleave_moe_layer_step", 1) or 1
        layers = cfg.get("moe_layers")
        layers = list(range(step - 1, n, step)) if layers is None else layers
        return index in layers

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "num_local_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        width = need_int(cfg, "intermediate_size", self.name)
        return MoESpec(E, k, width, width, router_settings(E, k, "sigmoid", False, weight_on_input=True))

    def attention_config(self, arch):
        return {"head_dim": arch.head_dim, "attention_bias": False, "no_rope_layers": [int(r) for r in arch.rope_layers],
                "use_qk_norm": arch.qk_l2, "attention_chunk_size": arch.attention_chunk, "layer_types": list(arch.layer_types),
                "attn_temperature_tuning": arch.attn_temperature is not None,
                **({"floor_scale": arch.attn_temperature[0], "attn_scale": arch.attn_temperature[1]} if arch.attn_temperature else {})}

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        if moe.shared_width != moe.expert_width:
            raise BadInputError(f"llama4_text's shared expert has the experts' width (one intermediate_size): experts of {moe.expert_width} "
                                f"with a shared expert of {moe.shared_width} cannot be written (finer experts need a narrower shared expert)")
        dense = [l.ffn for l in model.layers if not hasattr(l.ffn, "router")]
        return {"num_local_experts": len(moe.experts), "num_experts_per_tok": moe.router.top_k, "intermediate_size": moe.expert_width,
                "intermediate_size_mlp": dense[0].width if dense else model.config.get("intermediate_size_mlp", moe.expert_width * 2),
                "moe_layers": [l.index for l in model.moe_layers()], "interleave_moe_layer_step": model.config.get("interleave_moe_layer_step", 1)}

    def write_config(self, model):
        cfg = super().write_config(model)
        cfg["attn_temperature_tuning"] = bool(cfg.get("attn_temperature_tuning", True))  # the Hub's 4 is refused by transformers' bool field
        return cfg


LAYOUT = Llama4()
