"""DeepSeek-V2/V3 multi-head latent attention, as transformers' DeepseekV2Attention /
DeepseekV3Attention (eager) compute it.

    q      = q_proj(x)  |  q_b_proj(rms(q_a_proj(x)))            -> [B, h, T, nope + rope]
    kv, kr = split(kv_a_proj_with_mqa(x), [kv_lora_rank, rope])   # kr: one shared rope key
    k, v   = split(kv_b_proj(rms(kv)), [nope, v_head_dim])        -> [B, h, T, .]
    rope on q[..., nope:] and kr; keys = cat(k, kr)
    out    = o_proj(softmax(q k^T * scale + causal) v)

Rotation: deepseek_v2 multiplies complex pairs in fp32 (layout stays interleaved);
deepseek_v3 uses rotate_half, or with rope_interleave (default True) even/odd pairs written back
de-interleaved. Both rotate q and k alike, so only the rounding differs between them.

DeepSeek-V3.2 / GLM-5 sparse attention (`arch.indexer`): a lightning indexer scores every earlier
key per query and keeps the top `index_topk`; the other keys are masked out of the attention:

    q_i   = wq_b(q_resid)                [B, T, Hi, D]    (q_resid = q_a_layernorm(q_a_proj(x)))
    k_i   = LayerNorm(wk(x))              [B, T, D]        one key head, eps 1e-6, with bias
    rope on the first qk_rope_head_dim dims of both (rotate_half; GLM-5: interleaved pairs)
    score = sum_h (weights_proj(x)_h / sqrt(Hi)) * relu(q_i,h . k_i / sqrt(D))   [B, T, S], causal
    keep  = top_k(score, min(index_topk, S))
GLM-5's "shared" layers reuse the previous indexer layer's choice (`state["topk"]`). Mistral 4's
Llama-4 query scaling multiplies q by 1 + beta log(1 + floor(pos / orig)) after rope.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..canonical import Arch
from . import rope
from .cpu_gemv import linear

VARIANTS = ("deepseek_v2", "deepseek_v3")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """DeepseekV2/V3RMSNorm: normalise in fp32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def softmax_scale(arch: Arch) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 (yarn_apply_mscale)."""
    m = arch.mla
    scale = (m["qk_nope_head_dim"] + m["qk_rope_head_dim"]) ** -0.5
    p = rope.rope_params(arch)
    if p["rope_type"] != "default" and p.get("mscale_all_dim"):
        mscale = rope._get_mscale(p["factor"], p["mscale_all_dim"])
        scale = scale * mscale * mscale
    return scale


def resolve_variant(arch: Arch, variant: str | None) -> str:
    """The explicit kwarg, else arch.mla["variant"] (set by the layout), else v3 if the config spelled
    rope_interleave, else v2."""
    variant = variant or arch.mla.get("variant") or ("deepseek_v3" if "rope_interleave" in arch.mla else "deepseek_v2")
    if variant not in VARIANTS:
        raise ValueError(f"unknown MLA variant {variant!r}; expected one of {VARIANTS}")
    return variant


def _linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    return linear(x, w[f"self_attn.{name}.weight"], w.get(f"self_attn.{name}.bias"))


def query_scale(arch: Arch, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Llama-4 query scaling [T, 1] (Mistral 4, Ministral 3), or None."""
    if arch.query_scale is None:
        return None
    beta, orig = arch.query_scale
    return (1 + beta * torch.log(1 + torch.floor(positions.float() / orig)))[:, None].to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def indexer_topk(x, q_resid, w, arch: Arch, cos, sin, positions, k_cache: torch.Tensor | None):
    """Top-k key indices [B, T, k] of the lightning indexer, and its key cache [B, S, D]."""
    ix = arch.indexer
    B, T, _ = x.shape
    Hi, D, R = ix["heads"], ix["head_dim"], arch.mla["qk_rope_head_dim"]
    q = F.linear(q_resid, w["self_attn.indexer.wq_b.weight"]).view(B, T, Hi, D)  # [B, T, Hi, D]
    k = layer_norm(F.linear(x, w["self_attn.indexer.wk.weight"]), w["self_attn.indexer.k_norm.weight"], w["self_attn.indexer.k_norm.bias"])
    k = k.unsqueeze(2)  # [B, T, 1, D]
    rot = rope.apply_rotary_interleave if ix["interleave"] else rope.apply_rotary
    c, s_ = cos[None, :, None, :], sin[None, :, None, :]  # broadcast over [B, T, h, R]
    q = torch.cat([rot(q[..., :R], c, s_), q[..., R:]], dim=-1)
    k = torch.cat([rot(k[..., :R], c, s_), k[..., R:]], dim=-1).squeeze(2)  # [B, T, D]
    if k_cache is not None:
        k = torch.cat([k_cache, k], dim=1)  # [B, S, D]
    S = k.shape[1]
    scores = F.relu(torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * D**-0.5)  # [B, T, Hi, S]
    weights = F.linear(x, w["self_attn.indexer.weights_proj.weight"]).float() * Hi**-0.5  # [B, T, Hi]
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # [B, T, S]
    future = torch.arange(S, device=x.device)[None, :] > (S - T + torch.arange(T, device=x.device))[:, None]  # [T, S]
    index_scores = index_scores.masked_fill(future, float("-inf"))
    return index_scores.topk(min(ix["topk"], S), dim=-1).indices, k


def mla_attention(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    arch: Arch,
    positions: torch.Tensor,
    cache: tuple | None = None,
    rms_norm_eps: float = 1e-6,
    variant: str | None = None,
    state: dict | None = None,
) -> tuple[torch.Tensor, tuple]:
    """x [B, T, H], positions [T] -> (out [B, T, H], (keys, values) [B, h, S + T, .]).

    `cache` holds earlier post-rope keys/values [B, h, S, .] (+ the indexer's keys); queries attend
    causally to them plus themselves. rms_norm_eps defaults to 1e-6 because transformers builds
    q_a_layernorm and kv_a_layernorm without the config's eps. `state` carries the indexer's last
    choice from layer to layer (GLM-5 "shared" layers reuse it)."""
    variant = resolve_variant(arch, variant)
    m = arch.mla
    B, T, _ = x.shape
    h = arch.num_heads
    nope, rd, vd, r = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"], m["kv_lora_rank"]

    q_a = None
    if m.get("q_lora_rank") is None:
        q = _linear(x, w, "q_proj")
    else:
        q_a = rms_norm(_linear(x, w, "q_a_proj"), w["self_attn.q_a_layernorm.weight"], rms_norm_eps)  # [B, T, q_lora]
        q = _linear(q_a, w, "q_b_proj")
    q = q.view(B, T, h, nope + rd).transpose(1, 2)  # [B, h, T, nope + rd]
    q_nope, q_rot = torch.split(q, [nope, rd], dim=-1)

    kv, k_rot = torch.split(_linear(x, w, "kv_a_proj_with_mqa"), [r, rd], dim=-1)  # [B, T, r], [B, T, rd]
    kv = rms_norm(kv, w["self_attn.kv_a_layernorm.weight"], rms_norm_eps)
    k_rot = k_rot.view(B, 1, T, rd)  # [B, 1, T, rd]

    if variant == "deepseek_v2":
        fc = rope.freqs_cis(arch, positions)
        q_rot, k_rot = rope.apply_rotary_complex(q_rot, fc), rope.apply_rotary_complex(k_rot, fc)
    else:
        cos, sin = rope.cos_sin(arch, positions)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # the rotary embedding returns them in the model dtype
        apply = rope.apply_rotary_interleave if m.get("rope_interleave", True) else rope.apply_rotary
        q_rot, k_rot = apply(q_rot, cos, sin), apply(k_rot, cos, sin)

    kv = F.linear(kv, w["self_attn.kv_b_proj.weight"]).view(B, T, h, nope + vd).transpose(1, 2)  # [B, h, T, nope + vd]
    k_nope, v = torch.split(kv, [nope, vd], dim=-1)
    k = torch.cat([k_nope, k_rot.expand(-1, h, -1, -1)], dim=-1)  # [B, h, T, nope + rd]
    q = torch.cat([q_nope, q_rot], dim=-1)  # [B, h, T, nope + rd]
    scale_q = query_scale(arch, positions, q.dtype)
    if scale_q is not None:
        q = q * scale_q
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # [B, h, S + T, .]

    S = k.shape[2] - T
    scores = torch.matmul(q, k.transpose(2, 3)) * softmax_scale(arch)  # [B, h, T, S + T]
    future = torch.arange(S + T, device=q.device)[None, :] > (S + torch.arange(T, device=q.device))[:, None]  # [T, S + T]
    k_index = cache[2] if cache is not None and len(cache) > 2 else None
    if arch.indexer:
        if "self_attn.indexer.wk.weight" in w:  # a layer with its own indexer
            cos, sin = rope.cos_sin(arch, positions)
            topk, k_index = indexer_topk(x, q_a, w, arch, cos.to(x.dtype), sin.to(x.dtype), positions, k_index)
            if state is not None:
                state["topk"] = topk
        elif state is not None and "topk" in state:  # GLM-5 "shared": the previous indexer layer's choice
            topk = state["topk"]
        else:
            raise ValueError("a shared sparse-attention layer needs an earlier indexer layer")
        dropped = torch.ones(B, T, S + T, dtype=torch.bool, device=q.device).scatter(-1, topk.long(), False)  # [B, T, S + T]
        future = future | dropped[:, None]  # [B, 1, T, S + T]
    scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, h * vd)  # [B, T, h * vd]
    return _linear(out, w, "o_proj"), (k, v) if k_index is None else (k, v, k_index)
