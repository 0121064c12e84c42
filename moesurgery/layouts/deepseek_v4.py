"""DeepSeek-V4 (`deepseek_v4`: V4-Flash / V4-Pro), DeepSeek-V3's fine-grained + shared experts with
almost everything around them changed:

  router    scores sqrt(softplus(x W^T)) (in the model dtype); `moe` layers select top-k of score + fp32
            correction bias (`gate.e_score_correction_bias`), `hash_moe` layers take the experts of the
            token id from `gate.tid2eid [V, k]`; weights always renormalised, x routed_scaling_factor
  experts   clamped SwiGLU silu(gate.clamp(max=L)) * up.clamp(-L, L), L = swiglu_limit, routed and the
            one shared MLP alike; the shared MLP has the experts' width (one moe_intermediate_size), so
            finer experts are refused like Llama 4's (pruning and merging keep the width)
  attention one shared KV head (K = V, head_dim 512), sinks, grouped low-rank output projection, a
            128-token sliding window on every layer, plus compressed KV: CSA (/4, lightning indexer) or
            HCA (/128); hc_mult hyper-connection streams instead of a residual (runtime/dsv4.py)

Tensors circulate in two names: DeepSeek's own (no `model.` prefix: `embed.weight`, `layers.L.attn.wq_a`,
`layers.L.ffn.experts.E.w1`...) and what transformers' save_pretrained writes (the same with `model.`,
`model.embed_tokens`, `head.weight`, `model.hc_head.*`); both read (KeyForm), written back in the form read.
"""

from __future__ import annotations

import re

from ..canonical import Activation
from ..errors import BadInputError
from ..keyforms import KeyForm, prefixed
from .base import Layout, MoESpec, get_float, get_int, layer_kinds, need_int, router_settings

LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
COMPRESS_RATIO_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
MLP_TYPES = ("hash_moe", "moe")

# (DeepSeek's name, transformers' in-memory name); experts per expert
_LAYER = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    *((f"hc_{s}_{p}", f"{s}_hc.{p}") for s in ("attn", "ffn") for p in ("fn", "base", "scale")),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.norm.weight", "self_attn.kv_norm.weight"),
    ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    *((f"ffn.shared_experts.{w}.weight", f"mlp.shared_experts.{p}_proj.weight") for w, p in (("w1", "gate"), ("w3", "up"), ("w2", "down"))),
    *((f"ffn.experts.{{E}}.{w}.weight", f"mlp.experts.{{E}}.{p}_proj.weight") for w, p in (("w1", "gate"), ("w3", "up"), ("w2", "down"))),
)
_TOP = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("head.weight", "lm_head.weight"),
    ("norm.weight", "model.norm.weight"),
    *((f"hc_head_{p}", f"model.hc_head.hc_{p}") for p in ("fn", "base", "scale")),
)
_HUB_PAIRS = _TOP + tuple((f"layers.{{L}}.{d}", f"model.layers.{{L}}.{m}") for d, m in _LAYER)
HUB = KeyForm("deepseek", _HUB_PAIRS, marker="embed.weight", scale_name="scale")  # DeepSeek's release names
# transformers' save_pretrained: `model.` before DeepSeek's names, but its own embed / norm / hc_head names
SAVED = KeyForm("transformers-saved", prefixed(_HUB_PAIRS, "model.", {"embed.weight": "model.embed_tokens.weight", "head.weight": "head.weight",
                                                                        "norm.weight": "model.norm.weight",
                                                                        **{f"hc_head_{p}": f"model.hc_head.hc_{p}" for p in ("fn", "base", "scale")}}),
                marker="head.weight", scale_name="scale")


def layer_types(cfg: dict, n: int) -> list[str]:
    """transformers' reading: layer_types, else compress_ratios (0 / 4 / 128), else 2 HCA + CSA/HCA alternating."""
    types = cfg.get("layer_types")
    if types is None and cfg.get("compress_ratios") is not None:
        try:
            types = [COMPRESS_RATIO_TYPES[int(r)] for r in cfg["compress_ratios"]]
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"config.json: compress_ratios must be 0, 4 or 128 per layer, got {cfg['compress_ratios']!r}") from None
    if types is None:
        types = ["heavily_compressed_attention"] * min(n, 2) + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                                                                for i in range(max(n - 2, 0))]
    return layer_kinds(list(types)[:n], n, LAYER_TYPES)


def mlp_layer_types(cfg: dict, n: int) -> list[str]:
    types = cfg.get("mlp_layer_types")
    if types is None:
        hashed = get_int(cfg, "num_hash_layers", 3)
        types = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
    return layer_kinds(list(types)[:n], n, MLP_TYPES, "mlp_layer_types")


def rope_tables(cfg: dict, prf: float) -> dict:
    """{"main": ..., "compress": ...} as transformers nests them: main plain rope at rope_theta; compress at
    compress_rope_theta with the top-level yarn (attention_factor 1), if any."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        return {"main": dict(rp["main"]), "compress": dict(rp["compress"])}
    yarn = {k: v for k, v in rp.items() if k not in ("main", "compress")}
    if "type" in yarn:
        yarn.setdefault("rope_type", yarn.pop("type"))
    main = {"rope_type": "default", "rope_theta": get_float(cfg, "rope_theta", 10000.0), "partial_rotary_factor": prf}
    compress = {**yarn, "rope_theta": get_float(cfg, "compress_rope_theta", 160000.0), "partial_rotary_factor": prf}
    compress.setdefault("rope_type", "default")
    if compress["rope_type"] == "yarn":
        compress.setdefault("attention_factor", 1.0)
    return {"main": main, "compress": compress}


# what V4's releases store quantized: FP8 e4m3 (128 x 128 E8M0 blocks) attention and shared MLP, FP4 routed experts
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj|compressor\.indexer\.q_b_proj)"
                       r"|mlp\.(shared_experts|experts\.\d+)\.(gate|up|down)_proj)\.weight")


class DeepseekV4(Layout):
    name = "deepseek_v4"
    quantized_weights = QUANTIZED
    architecture = "DeepseekV4ForCausalLM"
    key_forms = (HUB, SAVED)
    router_key = "gate.weight"
    bias_key = "gate.e_score_correction_bias"
    hash_key = "gate.tid2eid"
    shared_key = "shared_experts"
    moe = True
    writes_head = True  # vLLM 0.32's DeepseekV4 model never ties lm_head to the embeddings
    attention = "dsv4"
    scorings = ("sqrtsoftplus",)
    renorm = "always"
    scaling = True
    has_bias = True
    shared = "multiple"
    dense_layers = "none"
    logits_in_model_dtype = True
    expert_kind = "clamped"
    llama_cpp = None  # not checked against llama.cpp

    def read_arch(self, cfg):
        f = self.name
        n = need_int(cfg, "num_hidden_layers", f)
        head_dim = get_int(cfg, "head_dim", 512)
        prf = cfg.get("partial_rotary_factor")
        if prf is None:
            prf = get_int(cfg, "qk_rope_head_dim", 64) / head_dim
        rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(cfg.get("compress_rates") or {})}
        for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"), ("compress_rate_hca", "heavily_compressed_attention")):
            if cfg.get(legacy) is not None:
                rates[kind] = get_int(cfg, legacy)
        arch = super().read_arch({**cfg, "num_key_value_heads": 1, "head_dim": head_dim})
        arch.attention, arch.head_dim, arch.num_kv_heads = "dsv4", head_dim, 1
        arch.layer_types = layer_types(cfg, n)
        arch.sliding_window = get_int(cfg, "sliding_window", 128)
        arch.partial_rotary_factor = float(prf)
        arch.sinks = True
        arch.dsv4 = {
            "q_lora_rank": get_int(cfg, "q_lora_rank", 1024), "o_groups": get_int(cfg, "o_groups", 8), "o_lora_rank": get_int(cfg, "o_lora_rank", 1024),
            "hc_mult": get_int(cfg, "hc_mult", 4), "hc_sinkhorn_iters": get_int(cfg, "hc_sinkhorn_iters", 20), "hc_eps": get_float(cfg, "hc_eps", 1e-6),
            "compress_rates": rates, "index_n_heads": get_int(cfg, "index_n_heads", 64), "index_head_dim": get_int(cfg, "index_head_dim", 128),
            "index_topk": get_int(cfg, "index_topk", 512), "rope": rope_tables(cfg, float(prf)), "mlp_layer_types": mlp_layer_types(cfg, n),
        }
        return arch

    def is_moe_layer(self, cfg, index):
        return True

    def read_moe_spec(self, cfg):
        E = need_int(cfg, "n_routed_experts", self.name)
        k = need_int(cfg, "num_experts_per_tok", self.name)
        width = need_int(cfg, "moe_intermediate_size", self.name)
        scoring = cfg.get("scoring_func", "sqrtsoftplus")
        if scoring != "sqrtsoftplus":
            raise BadInputError(f"config.json: deepseek_v4 with scoring_func {scoring!r} is not supported (sqrtsoftplus)")
        act = Activation("clamped", limit=get_float(cfg, "swiglu_limit", 10.0))
        router = router_settings(E, k, "sqrtsoftplus", True, scaling=get_float(cfg, "routed_scaling_factor", 1.5), logits_in_model_dtype=True)
        return MoESpec(E, k, width, width, router, act, act)

    def validate(self, model, spec=None):
        super().validate(model, spec)
        types = model.arch.dsv4["mlp_layer_types"]
        for layer in model.layers:
            r = layer.ffn.router
            hashed = types[layer.index] == "hash_moe"
            where = f"model.layers.{layer.index}.mlp.gate"
            if hashed and r.hash_table is None:
                raise BadInputError(f"config.json says layer {layer.index} is hash-routed (mlp_layer_types), but {where}.tid2eid is missing")
            if not hashed and r.hash_table is not None:
                raise BadInputError(f"{where}.tid2eid: layer {layer.index} is not hash-routed in config.json (mlp_layer_types)")
            if hashed and r.hash_table.shape != (model.arch.vocab_size, r.top_k):
                raise BadInputError(f"{where}.tid2eid: shape {list(r.hash_table.shape)}, expected [{model.arch.vocab_size}, {r.top_k}]")

    def ffn_config(self, model):
        moe = model.moe_layers()[0].ffn
        if moe.shared_width != moe.expert_width:
            raise BadInputError(f"deepseek_v4's shared MLP has the experts' width (one moe_intermediate_size): experts of {moe.expert_width} "
                                f"with a shared expert of {moe.shared_width} cannot be written (finer experts need a narrower shared expert)")
        return {"n_routed_experts": len(moe.experts), "num_experts_per_tok": moe.router.top_k, "moe_intermediate_size": moe.expert_width,
                "routed_scaling_factor": moe.router.scaling, "swiglu_limit": moe.act.limit}


LAYOUT = DeepseekV4()
