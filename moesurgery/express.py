"""Express a canonical model in a target layout, exactly where the math allows.

`express(model, layout)` returns the model rewritten for the layout (same function, new form) plus
notes on what was changed and the reasons it is NOT exact. Attention that the target cannot host is
refused outright (BadInputError); router/shared-expert differences are reported as lossy, and the
caller decides (`--allow-lossy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .canonical import Arch, Layer, Model, MoE, Router, SwiGLU
from .errors import BadInputError
from .layouts.base import GQA_ATTN_KEYS, Layout
from .lazy import Lazy, cat

ZERO_SHARED_WIDTH = 128  # width of the all-zero shared expert a layout that always has one gets


@dataclass
class Expressed:
    model: Model
    notes: list[str] = field(default_factory=list)  # exact rewrites worth telling
    lossy: list[str] = field(default_factory=list)  # reasons the result is not the same function

    @property
    def exact(self) -> bool:
        return not self.lossy


def is_zero(t: Lazy) -> bool:
    return not bool(t.load().any())


def _once(items: list[str], text: str) -> None:
    if text not in items:
        items.append(text)


# ---------------------------------------------------------------------------------------- attention
def express_attention(model: Model, layout: Layout, out: Expressed) -> tuple[Arch, list[Layer]]:
    arch, name = model.arch, layout.name
    if model.family == name:
        return arch, model.layers
    if arch.attention != layout.attention:
        raise BadInputError(f"{model.family} has {arch.attention.upper()} attention, {name} needs {layout.attention.upper()}: attention cannot be converted")
    if arch.rope_interleave != bool(layout.rope_interleave):
        have = "interleaved rope pairs" if arch.rope_interleave else "rotate-half rope"
        raise BadInputError(f"{model.family} attention uses {have}; {name} rotates the other way")
    arch = replace(arch)
    if arch.query_scale and not layout.query_scaling:
        _once(out.lossy, f"{name} has no Llama-4 query scaling: attention differs from position {arch.query_scale[1]} on")
        arch.rope_scaling = {k: v for k, v in arch.rope_scaling.items() if k != "llama_4_scaling_beta"}
    if arch.attention == "mla":
        return express_mla(model, arch, layout, out)
    if arch.attention == "hybrid":
        return arch, express_linear_attention(model, arch, layout)
    if arch.qk_norm not in layout.qk_norms:
        have = f"qk-norm over {'each head' if arch.qk_norm == 'head' else 'the whole projection'}" if arch.qk_norm else "no qk-norm"
        raise BadInputError(f"{model.family} attention has {have}; {name} attention cannot host it")
    if arch.partial_rotary_factor != 1.0 and not layout.partial_rotary:
        raise BadInputError(f"{model.family} uses partial rotary ({arch.partial_rotary_factor}); {name} rotates the whole head")
    if arch.sliding_window and arch.sliding_window < arch.max_position_embeddings and not layout.sliding_window:
        _once(out.lossy, f"{name} has no sliding window: attention differs beyond {arch.sliding_window} tokens")
        arch.sliding_window = None
    if not layout.sliding_window:
        arch.sliding_window = None
    layers = []
    for layer in model.layers:
        attn = dict(layer.attn)
        unknown = sorted(set(attn) - GQA_ATTN_KEYS)
        if unknown:
            raise BadInputError(f"model.layers.{layer.index}.{unknown[0]}: attention tensor {name} cannot hold")
        q = attn["self_attn.q_proj.weight"]
        dtype = q.dtype
        bias_shapes = {
            "q": arch.num_heads * arch.head_dim,
            "k": arch.num_kv_heads * arch.head_dim,
            "v": arch.num_kv_heads * arch.head_dim,
            "o": arch.hidden_size,
        }
        wanted = {"never": "", "always": "qkv", "optional": "qkv" if arch.qkv_bias else "", "with_o": "qkvo" if (arch.qkv_bias or arch.o_bias) else ""}[layout.qkv_bias]
        for p in "qkvo":
            key = f"self_attn.{p}_proj.bias"
            if p in wanted and key not in attn:
                attn[key] = Lazy.zeros((bias_shapes[p],), dtype)
            elif p not in wanted and key in attn:
                if not is_zero(attn[key]):
                    raise BadInputError(f"model.layers.{layer.index}.{key} is non-zero and {name} attention has no such bias")
                del attn[key]
        layers.append(replace(layer, attn=attn))
    arch.qkv_bias = "q" in wanted
    arch.o_bias = "o" in wanted
    return arch, layers


LINEAR_GROUPED = ("linear_attn.in_proj_qkvz.weight", "linear_attn.in_proj_ba.weight")  # Qwen3-Next: rows grouped per key head
LINEAR_FLAT = tuple(f"linear_attn.in_proj_{p}.weight" for p in ("qkv", "z", "b", "a"))  # Qwen3.5: flat


def express_linear_attention(model: Model, arch: Arch, layout: Layout) -> list[Layer]:
    """Gated DeltaNet layers in the target's projection form: Qwen3-Next's per-key-head fused rows and
    Qwen3.5's flat tensors are row permutations of each other (exact); everything else is the same tensor."""
    from .runtime.gdn import group_qkv_z_ba, split_qkvz_ba

    la, want = arch.linear_attn, layout.linear_attn_form
    layers = []
    for layer in model.layers:
        attn = dict(layer.attn)
        if want == "flat" and LINEAR_GROUPED[0] in attn:
            qkvz, ba = attn.pop(LINEAR_GROUPED[0]), attn.pop(LINEAR_GROUPED[1])
            flat = {f"linear_attn.{k}": v for k, v in _split_lazily(qkvz, ba, la, split_qkvz_ba).items()}
            attn.update(flat)
        elif want == "grouped" and LINEAR_FLAT[0] in attn:
            parts = {k[len("linear_attn."):]: attn.pop(k) for k in LINEAR_FLAT}
            attn.update(dict(zip(LINEAR_GROUPED, _group_lazily(parts, la, group_qkv_z_ba))))
        layers.append(replace(layer, attn=attn))
    return layers


def _split_lazily(qkvz: Lazy, ba: Lazy, la: dict, split) -> dict[str, Lazy]:
    """Lazy views of split_qkvz_ba's four tensors (the two sources read once per output tensor)."""
    nk, dk, nv, dv, H = la["nk"], la["dk"], la["nv"], la["dv"], qkvz.shape[-1]
    rows = {"in_proj_qkv.weight": 2 * nk * dk + nv * dv, "in_proj_z.weight": nv * dv, "in_proj_b.weight": nv, "in_proj_a.weight": nv}
    return {k: Lazy((n, H), qkvz.dtype, lambda k=k: split(qkvz.load(), ba.load(), la)[k]) for k, n in rows.items()}


def _group_lazily(parts: dict[str, Lazy], la: dict, group) -> tuple[Lazy, Lazy]:
    first = parts["in_proj_qkv.weight"]
    H, nv, dv = first.shape[-1], la["nv"], la["dv"]
    n_qkvz = first.shape[0] + nv * dv

    def load(i: int) -> torch.Tensor:
        return group({k: v.load() for k, v in parts.items()}, la)[i]

    return Lazy((n_qkvz, H), first.dtype, lambda: load(0)), Lazy((2 * nv, H), first.dtype, lambda: load(1))


def express_mla(model: Model, arch: Arch, layout: Layout, out: Expressed) -> tuple[Arch, list[Layer]]:
    """MLA to MLA: the same tensors; the rotation (v2 complex pairs = v3 interleaved pairs) and the
    sparse-attention indexer must be ones the target computes."""
    name = layout.name
    arch.mla = {**arch.mla, "variant": getattr(layout, "mla_variant", arch.mla.get("variant"))}
    if arch.mla.get("variant") == "deepseek_v3" and "rope_interleave" not in arch.mla:
        arch.mla["rope_interleave"] = True  # v2's complex pairs are v3's interleaved pairs
    want = getattr(layout, "indexer_interleave", None)
    layers = model.layers
    if arch.indexer and want is None:  # the target has no indexer: dense attention, exact up to index_topk keys
        _once(out.lossy, f"{name} has no sparse-attention indexer: attention differs beyond {arch.indexer['topk']} tokens (index_topk)")
        layers = [replace(l, attn={k: v for k, v in l.attn.items() if not k.startswith("self_attn.indexer.")}) for l in layers]
        arch.indexer = None
    elif arch.indexer and want != arch.indexer["interleave"]:
        raise BadInputError(f"{model.family}'s sparse-attention indexer rotates {'interleaved pairs' if arch.indexer['interleave'] else 'half split'}; "
                            f"{name}'s the other way: attention cannot be converted")
    elif arch.indexer and "shared" in arch.indexer["types"] and not getattr(layout, "indexer_types", None):
        raise BadInputError(f"{model.family} has layers that reuse another layer's sparse-attention choice; {name} cannot")
    elif not arch.indexer and want is not None:
        raise BadInputError(f"{name} needs a sparse-attention indexer in every layer; {model.family} has none")
    return arch, layers


# ---------------------------------------------------------------------------------------- router
def express_router(r: Router, layout: Layout, out: Expressed, experts: list[SwiGLU]) -> tuple[Router, list[SwiGLU]]:
    name = layout.name
    new = replace(r, softmax_in_model_dtype=layout.softmax_in_model_dtype, logits_in_model_dtype=layout.logits_in_model_dtype)
    plain_top1 = r.top_k == 1 and r.renormalize and r.bias is None and not r.grouped
    if r.scoring not in layout.scorings:
        new.scoring = layout.scorings[0]
        if not plain_top1:
            _once(out.lossy, f"{name} routes with {new.scoring}, the source with {r.scoring}: routing weights differ")
    # renormalisation
    renorm_ok = {
        "always": r.renormalize,
        "never": not r.renormalize,
        "config": True,
        "config_k>1": r.top_k > 1 or not r.renormalize,
    }[layout.renorm]
    if not renorm_ok:
        _once(out.lossy, f"{name} cannot {'renormalise' if r.renormalize else 'skip renormalising'} top-{r.top_k} weights as the source does")
        new.renormalize = {"always": True, "never": False}.get(layout.renorm, False)
    if layout.renorm == "config_k>1" and r.top_k == 1:
        new.renormalize = False
    # groups
    if r.grouped and layout.group_score != r.group_score:
        _once(out.lossy, f"{name} cannot express group-limited routing ({r.topk_group} of {r.n_group} groups, {r.group_score})")
    if not (r.grouped and layout.group_score == r.group_score):
        new.n_group = new.topk_group = 1
    # selection bias
    if r.bias is not None and not layout.has_bias:
        if not is_zero(r.bias):
            _once(out.lossy, f"{name} has no e_score_correction_bias: expert selection differs")
        new.bias = None
    # scaling: folded into the experts when the layout has no factor
    if r.scaling != 1.0 and not layout.scaling:
        experts = [replace(e, down=e.down.scale(r.scaling)) for e in experts]
        _once(out.notes, f"routed_scaling_factor {r.scaling} folded into the experts' down_proj")
        new.scaling = 1.0
    return new, experts


# ---------------------------------------------------------------------------------------- shared
def zero_swiglu(width: int, hidden: int, dtype: torch.dtype) -> SwiGLU:
    return SwiGLU(Lazy.zeros((width, hidden), dtype), Lazy.zeros((width, hidden), dtype), Lazy.zeros((hidden, width), dtype))


def pad_width(ffn: SwiGLU, width: int) -> SwiGLU:
    """Add zero neurons up to `width`: silu(0) * 0 contributes nothing, so this is exact."""
    extra = width - ffn.width
    if extra == 0:
        return ffn
    H, dtype = ffn.gate.shape[1], ffn.gate.dtype
    z = zero_swiglu(extra, H, dtype)
    return SwiGLU(cat([ffn.gate, z.gate]), cat([ffn.up, z.up]), cat([ffn.down, z.down], dim=1))


HALF_GATE_BOUND = 2.0**-26  # |gate . x| below this: sigmoid rounds to exactly 1/2 (fp32, bf16, fp16)


def half_gate(hidden: int, norm: Lazy | None, dtype: torch.dtype) -> Lazy:
    """A shared_expert_gate [1, H] whose sigmoid is exactly 1/2 on every input, yet not zero: c * ones, with
    c a power of two such that |c * sum(x)| <= 2^-26 for any FFN input x = rms_norm(.) * w (|x| summed is at
    most H * max|w|). A zero gate computes the same in transformers and vLLM, but llama.cpp evaluates
    sigmoid as silu(z) / z, which is 0/0 = NaN at z = 0 (its qwen2moe graph)."""
    store = torch.float32 if dtype == torch.float16 else dtype  # c underflows fp16

    def load() -> torch.Tensor:
        w = float(norm.load().float().abs().max()) if norm is not None else 1.0
        c = 2.0 ** math.floor(math.log2(HALF_GATE_BOUND / (hidden * max(w, 1e-30))))
        return torch.full((1, hidden), c, dtype=store)

    return Lazy((1, hidden), store, load)


def is_half(gate: Lazy, norm: Lazy | None) -> bool:
    """A gate whose sigmoid is 1/2 on every input: zero, or small enough (see half_gate)."""
    g = gate.load().float()
    if not bool(g.any()):
        return True
    w = float(norm.load().float().abs().max()) if norm is not None else float("inf")
    return float(g.abs().max()) * g.shape[-1] * w <= HALF_GATE_BOUND


def express_shared(moe: MoE, layout: Layout, out: Expressed, norm: Lazy | None = None) -> tuple[SwiGLU | None, Lazy | None]:
    """`norm`: the layer's post_attention_layernorm weight (bounds the FFN input, for the 1/2 gate)."""
    shared, gate, name = moe.shared, moe.shared_gate, layout.name
    H = moe.router.weight.shape[1]
    dtype = moe.experts[0].gate.dtype
    if gate is not None and layout.shared != "gated":
        if is_half(gate, norm):  # sigmoid(.) = 1/2 exactly
            shared = replace(shared, down=shared.down.scale(0.5))
            _once(out.notes, "shared_expert_gate with a constant sigmoid of 1/2 folded into the shared down_proj")
        elif all(is_zero(t) for t in (shared.gate, shared.up)) or is_zero(shared.down):
            shared = None
        else:
            _once(out.lossy, f"{name} has no gate on its shared experts: the source's sigmoid gate is dropped")
        gate = None
    if shared is not None and layout.shared is None:
        if not (is_zero(shared.down) or all(is_zero(t) for t in (shared.gate, shared.up))):
            _once(out.lossy, f"{name} has no shared experts: the source's shared expert is dropped")
        return None, None
    if layout.shared == "gated":
        if shared is None:
            _once(out.notes, f"{name} always has a shared expert: written as zeros")
            width = min(ZERO_SHARED_WIDTH, moe.expert_width)
            return zero_swiglu(width, H, dtype), half_gate(H, norm, dtype)
        if gate is None:  # ungated -> sigmoid(.) = 1/2, down_proj x 2: exact
            _once(out.notes, "ungated shared experts written with a shared_expert_gate whose sigmoid is exactly 1/2 "
                             "(a tiny constant, not zero: llama.cpp's sigmoid is NaN at 0) and down_proj x2")
            return replace(shared, down=shared.down.scale(2.0)), half_gate(H, norm, dtype)
        return shared, gate
    if layout.shared == "multiple" and shared is None and layout.needs_shared:
        _once(out.notes, f"one all-zero shared expert written: vLLM's {name} fails to load with n_shared_experts = 0 (exact: it adds nothing)")
        return zero_swiglu(moe.expert_width, H, dtype), None
    if layout.shared == "multiple" and shared is not None:
        width = -(-shared.width // moe.expert_width) * moe.expert_width
        if width != shared.width:
            _once(out.notes, f"shared experts padded with zero neurons to a multiple of the expert width ({shared.width} -> {width})")
        return pad_width(shared, width), None
    return shared, gate


# ---------------------------------------------------------------------------------------- model
def express(model: Model, layout: Layout) -> Expressed:
    out = Expressed(model)
    name = layout.name
    moe_layers = [l for l in model.layers if isinstance(l.ffn, MoE)]
    dense_layers = [l for l in model.layers if isinstance(l.ffn, SwiGLU)]
    if not layout.moe and moe_layers:
        raise BadInputError(f"{name} is a dense layout: it cannot hold the MoE layers of {model.family} (layer {moe_layers[0].index})")
    if layout.moe and not moe_layers:
        raise BadInputError(f"{model.family} is dense: use `split-experts` or `upcycle` to make an MoE, not `convert --to {name}`")
    if dense_layers and layout.dense_layers == "none":
        raise BadInputError(f"{name} has no dense layers: layer {dense_layers[0].index} of {model.family} is dense")
    if dense_layers and layout.dense_layers == "prefix":
        first = [l.index for l in dense_layers]
        if first != list(range(len(first))):
            raise BadInputError(f"{name} can only have dense layers first (first_k_dense_replace); dense layers are {first}")
    widths = {l.ffn.width for l in dense_layers}
    if len(widths) > 1:
        raise BadInputError(f"dense layers have different widths {sorted(widths)}: {name} has one intermediate_size")
    shapes = {(len(l.ffn.experts), l.ffn.router.top_k, l.ffn.expert_width) for l in moe_layers}
    if len(shapes) > 1:
        raise BadInputError(f"MoE layers differ in (experts, top-k, width) {sorted(shapes)}: {name} has one of each")

    if layout.shared is None and any(l.ffn.shared is not None for l in moe_layers) and model.family == name:
        raise BadInputError(f"{name} has no shared experts: the result's shared experts have no place in it "
                            "(choose a --to layout that holds them, e.g. glm4_moe, deepseek_v3, qwen2_moe)")
    arch, layers = express_attention(model, layout, out)
    if model.family != name:
        new_layers = []
        for layer in layers:
            if isinstance(layer.ffn, MoE):
                router, experts = express_router(layer.ffn.router, layout, out, layer.ffn.experts)
                shared, gate = express_shared(layer.ffn, layout, out, layer.attn.get("post_attention_layernorm.weight"))
                if layer.ffn.router.weight_on_input != layout.weight_on_input:
                    have = "routing weights on the experts' input (Llama 4)" if layout.weight_on_input is False else "routing weights on the experts' output"
                    raise BadInputError(f"{model.family} has {have}; {name} weighs the other side: experts cannot be converted")
                kind = "gpt_oss" if layer.ffn.act.kind == "gpt_oss" or layer.ffn.experts[0].biased else "clamped" if layer.ffn.act.kind == "clamped" else "swiglu"
                if kind != layout.expert_kind:
                    have = {"gpt_oss": "gpt-oss experts (clamped SwiGLU, biases)", "clamped": "clamped SwiGLU experts (DeepSeek-V4)", "swiglu": "SwiGLU experts"}[kind]
                    raise BadInputError(f"{model.family} has {have}; {name} experts compute another function: experts cannot be converted")
                layer = replace(layer, ffn=replace(layer.ffn, router=router, experts=experts, shared=shared, shared_gate=gate))
            new_layers.append(layer)
        layers = new_layers
        extras = {}
        if model.extras:
            _once(out.notes, f"{len(model.extras)} tensors outside the decoder (e.g. {next(iter(model.extras))}) are not carried to {name}")
    else:
        extras = model.extras
    out.model = replace(model, family=model.family, arch=arch, layers=layers, extras=extras)
    # one router config for all layers
    routers = {(l.ffn.router.scoring, l.ffn.router.renormalize, l.ffn.router.scaling, l.ffn.router.n_group, l.ffn.router.topk_group) for l in out.model.layers if isinstance(l.ffn, MoE)}
    if len(routers) > 1:
        raise BadInputError(f"MoE layers differ in router settings: {name} has one router config")
    shared_widths = {l.ffn.shared_width for l in out.model.layers if isinstance(l.ffn, MoE)}
    if len(shared_widths) > 1:
        raise BadInputError(f"MoE layers differ in shared-expert width {sorted(shared_widths)}")
    return out
