"""Random-weight models with the shapes of real MoE models, scaled down, for `bench --synthetic`.

`synthetic_model("mixtral-8x7b", scale=4, layers=2)` is an in-memory canonical Model (Lazy.of over
seeded random tensors) with hidden size, expert/shared widths, vocabulary and head counts divided by
`scale` (head_dim kept). Every layer is an MoE layer (leading dense layers, as in DeepSeek-V3, are
left out: the bench compares MoE layouts). DeepSeek-V3's MLA attention is replaced by GQA
(128/8 heads x 128 at scale 1): the FFN shapes are exact, the attention is an approximation.

`layout_candidate(model, granularity=M, shared=S)` is the in-memory output of the exact surgeries
(`split-experts --granularity M`, or `upcycle --granularity M --shared S`): it shares the source's
weights, so source and candidate compute the same function and only the layout differs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .canonical import Arch, Layer, Model, MoE, Router, SwiGLU
from .errors import UsageError
from .lazy import Lazy
from .surgery.finer import finer_experts
from .surgery.upcycle import extract_shared


@dataclass(frozen=True)
class Shape:
    family: str  # the layout these shapes come from
    hidden: int
    expert_width: int
    experts: int
    top_k: int
    layers: int  # MoE layers of the real model
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    shared_width: int = 0
    shared_gate: bool = False
    scoring: str = "softmax"
    renormalize: bool = True
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False
    qkv_bias: bool = False
    qk_norm: str | None = None
    note: str = ""


SHAPES: dict[str, Shape] = {
    "mixtral-8x7b": Shape("mixtral", 4096, 14336, 8, 2, 32, 32, 8, 128, 32000),
    "mixtral-8x22b": Shape("mixtral", 6144, 16384, 8, 2, 56, 48, 8, 128, 32768),
    "deepseek-v3": Shape(
        "deepseek_v3", 7168, 2048, 256, 8, 58, 128, 8, 128, 129280, shared_width=2048, scoring="sigmoid",
        scaling=2.5, n_group=8, topk_group=4, correction_bias=True,
        note="GQA 128/8 heads instead of MLA; the 3 leading dense layers left out",
    ),
    "qwen1.5-moe": Shape(
        "qwen2_moe", 2048, 1408, 60, 4, 24, 16, 16, 128, 151936, shared_width=5632, shared_gate=True, renormalize=False, qkv_bias=True,
    ),
    "qwen3-30b-a3b": Shape("qwen3_moe", 2048, 768, 128, 8, 48, 32, 4, 128, 151936, qk_norm="head"),
    "olmoe": Shape("olmoe", 2048, 1024, 64, 8, 16, 16, 16, 128, 50304, renormalize=False, qk_norm="full"),
}


def synthetic_names() -> list[str]:
    return list(SHAPES)


def _scaled(value: int, scale: int, quantum: int = 64) -> int:
    """value / scale, rounded to a multiple of `quantum` (at least one quantum)."""
    if value == 0:
        return 0
    return max(quantum, round(value / scale / quantum) * quantum)


def scaled_shape(name: str, scale: int = 1) -> Shape:
    if name not in SHAPES:
        raise UsageError(f"--synthetic: unknown shape {name!r} (have: {', '.join(SHAPES)})")
    if scale < 1:
        raise UsageError("--scale must be >= 1")
    s = SHAPES[name]
    if scale == 1:
        return s
    heads = max(1, s.heads // scale)
    kv = max(1, s.kv_heads // scale)
    kv = kv if heads % kv == 0 else 1
    return replace(
        s, hidden=_scaled(s.hidden, scale), expert_width=_scaled(s.expert_width, scale), shared_width=_scaled(s.shared_width, scale),
        vocab=_scaled(s.vocab, scale), heads=heads, kv_heads=kv,
    )


def synthetic_params(shape: Shape, layers: int) -> int:
    """Parameters of the synthetic model (what `synthetic_model` allocates, in elements)."""
    H, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attn = H * q * 2 + H * kv * 2 + 2 * H
    ffn = shape.experts * (H + 3 * H * shape.expert_width) + 3 * H * shape.shared_width + (H if shape.shared_gate else 0)
    return layers * (attn + ffn) + 2 * shape.vocab * H + H


def synthetic_model(
    name: str, scale: int = 1, layers: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0, common_width: int = 0
) -> Model:
    """A random-weight Model with the (scaled) shapes of `name`. `common_width` neuron positions are
    made identical in every expert of a layer (what `extract_shared` moves, exactly, to a shared expert)."""
    s = scaled_shape(name, scale)
    if layers < 1:
        raise UsageError("--layers must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    H, f, E = s.hidden, s.expert_width, s.experts
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim

    def rand(*shape: int, std: float) -> Lazy:
        return Lazy.of((torch.randn(shape, generator=gen) * std).to(dtype))

    def ones(n: int) -> Lazy:
        return Lazy.of(torch.ones(n, dtype=dtype))

    def expert(width: int, common: tuple[torch.Tensor, ...] | None = None) -> SwiGLU:
        g = torch.randn(width, H, generator=gen) * H**-0.5
        u = torch.randn(width, H, generator=gen) * H**-0.5
        d = torch.randn(H, width, generator=gen) * width**-0.5
        if common is not None:
            c = common[0].shape[0]
            g[:c], u[:c], d[:, :c] = common
        return SwiGLU(Lazy.of(g.to(dtype)), Lazy.of(u.to(dtype)), Lazy.of(d.to(dtype)))

    model_layers = []
    for i in range(layers):
        attn = {
            "input_layernorm.weight": ones(H),
            "post_attention_layernorm.weight": ones(H),
            "self_attn.q_proj.weight": rand(q, H, std=H**-0.5),
            "self_attn.k_proj.weight": rand(kv, H, std=H**-0.5),
            "self_attn.v_proj.weight": rand(kv, H, std=H**-0.5),
            "self_attn.o_proj.weight": rand(H, q, std=q**-0.5),
        }
        if s.qkv_bias:
            attn |= {f"self_attn.{p}_proj.bias": rand(n, std=0.02) for p, n in (("q", q), ("k", kv), ("v", kv))}
        if s.qk_norm == "head":
            attn |= {"self_attn.q_norm.weight": ones(s.head_dim), "self_attn.k_norm.weight": ones(s.head_dim)}
        elif s.qk_norm == "full":
            attn |= {"self_attn.q_norm.weight": ones(q), "self_attn.k_norm.weight": ones(kv)}
        common = None
        if common_width:
            c = common_width
            common = (torch.randn(c, H, generator=gen) * H**-0.5, torch.randn(c, H, generator=gen) * H**-0.5, torch.randn(H, c, generator=gen) * f**-0.5)
        router = Router(
            rand(E, H, std=H**-0.5), top_k=s.top_k, scoring=s.scoring, renormalize=s.renormalize, scaling=s.scaling,
            n_group=s.n_group, topk_group=s.topk_group, bias=Lazy.of(torch.zeros(E)) if s.correction_bias else None,
        )
        experts = [expert(f, common) for _ in range(E)]
        shared = expert(s.shared_width) if s.shared_width else None
        gate = rand(1, H, std=H**-0.5) if s.shared_gate else None
        model_layers.append(Layer(i, attn, MoE(router, experts, shared, gate)))
    arch = Arch(
        hidden_size=H, vocab_size=s.vocab, num_layers=layers, num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
        rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1e6, qkv_bias=s.qkv_bias, qk_norm=s.qk_norm,
        dtype=str(dtype).removeprefix("torch."),
    )
    return Model(
        family=s.family, arch=arch, embed=rand(s.vocab, H, std=1.0), norm=ones(H), lm_head=rand(s.vocab, H, std=H**-0.5),
        layers=model_layers, config={"synthetic": name, "scale": scale},
    )


def layout_candidate(model: Model, granularity: int = 1, shared: int = 0) -> tuple[Model, list[str]]:
    """Every MoE layer re-laid out in memory: `shared` fine experts (width f/M) extracted from what the
    experts share, the rest of each expert cut into M - shared finer experts (as `upcycle`/`split-experts`)."""
    if granularity < 1:
        raise UsageError("--granularity must be >= 1")
    if shared and shared >= granularity:
        raise UsageError(f"--shared {shared} must be smaller than --granularity {granularity}")
    if not model.moe_layers():
        raise UsageError("--granularity/--shared need an MoE source")
    layers, lossy = [], []
    for layer in model.layers:
        ffn = layer.ffn
        if isinstance(ffn, MoE):
            f = ffn.expert_width
            if f % granularity:
                raise UsageError(f"layer {layer.index}: expert width {f} does not split into {granularity} finer experts")
            try:
                if shared:
                    if ffn.shared_gate is not None:
                        raise UsageError(f"layer {layer.index} has a gated shared expert: cannot add ungated shared neurons to it")
                    ffn, why, _ = extract_shared(ffn, shared * (f // granularity))
                    lossy += why
                ffn, why = finer_experts(ffn, granularity - shared)
            except ValueError as e:
                raise UsageError(str(e)) from None
            lossy += why
        layers.append(Layer(layer.index, layer.attn, ffn))
    return model.with_layers(layers), sorted(set(lossy))
