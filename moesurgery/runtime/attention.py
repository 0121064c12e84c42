"""GQA attention (Llama, Mistral, Qwen2/3, Mixtral, OLMoE, GLM-4.5, DeepSeek v1) from canonical Arch.

Matches transformers' eager attention: q/k/v projections (+bias), optional qk RMSNorm (per head or
over the whole projection), rotary on the first `rot` dims, causal (optionally sliding) mask,
softmax in fp32, o projection (+bias). On CUDA the scores go through torch's fused
scaled_dot_product_attention instead (flash / memory-efficient kernels: no [h, T, S] scores in
memory), as transformers' default `sdpa` attention does; on CPU the eager math is kept, which is what
the exactness tests compare with transformers' eager attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..canonical import Arch
from .cpu_gemv import linear
from .rope import apply_rotary, apply_rotary_interleave


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, chunk: int | None = None) -> torch.Tensor:
    """[Tq, Tk] bool, True where attending is allowed (sliding window, or Llama 4's aligned chunks)."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window:
        allowed &= diff < window
    if chunk:
        allowed &= (q_pos[:, None] // chunk) == (k_pos[None, :] // chunk)
    return allowed


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless qk norm: x / rms(x) in fp32, cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


SDPA_DEVICES = ("cuda",)  # device types that use F.scaled_dot_product_attention (tests add "cpu")


def _linear(x, w, prefix):
    return linear(x, w[prefix + ".weight"], w.get(prefix + ".bias"))


def gqa_attention(
    x: torch.Tensor,  # [B, T, H]
    w: dict[str, torch.Tensor],  # keys relative to the layer: "self_attn.q_proj.weight", ...
    arch: Arch,
    cos: torch.Tensor,  # [T, rot]
    sin: torch.Tensor,
    positions: torch.Tensor,  # [T]
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    window: int | None = -1,  # this layer's sliding window (-1: the model's)
    index: int = 0,  # the layer (Llama 4's per-layer rope / NoPE and chunking)
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Sinks (gpt-oss): self_attn.sinks [h] is one more logit per head in the softmax, its probability dropped.
    Llama 4: NoPE layers skip rope (and scale q by the attention temperature), rope layers L2-normalise q and k
    after rope and attend within their chunk."""
    B, T, _ = x.shape
    window = arch.sliding_window if window == -1 else window
    use_rope = arch.rope_layers is None or bool(arch.rope_layers[index])
    chunk = arch.attention_chunk if arch.layer_types is not None and arch.layer_types[index] == "chunked_attention" else None
    sinks = w.get("self_attn.sinks")
    h, kv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    q = _linear(x, w, "self_attn.q_proj")  # [B, T, h*d]
    k = _linear(x, w, "self_attn.k_proj")  # [B, T, kv*d]
    v = _linear(x, w, "self_attn.v_proj")
    if arch.qk_norm == "full":
        q = rms_norm(q, w["self_attn.q_norm.weight"], arch.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], arch.rms_norm_eps)
    q = q.view(B, T, h, d)
    k = k.view(B, T, kv, d)
    if arch.qk_norm == "head":
        q = rms_norm(q, w["self_attn.q_norm.weight"], arch.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], arch.rms_norm_eps)
    if not use_rope:  # Llama 4 NoPE layer
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if arch.attn_temperature is not None:
            floor_scale, attn_scale = arch.attn_temperature
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q = q * scale[:, None].to(q.dtype)
    elif arch.rope_interleave:  # ERNIE, Llama 4: (x0, x1), (x2, x3)... pairs, in fp32 (q.k as transformers, dims permuted alike)
        q = apply_rotary_interleave(q.transpose(1, 2).float(), cos, sin).to(x.dtype)
        k = apply_rotary_interleave(k.transpose(1, 2).float(), cos, sin).to(x.dtype)
    else:
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, h, T, d]
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # [B, kv, T, d]
    if use_rope and arch.qk_l2:  # Llama 4, after rope
        q, k = l2_norm(q, arch.rms_norm_eps), l2_norm(k, arch.rms_norm_eps)
    if arch.query_scale is not None:  # Llama-4 query scaling (Ministral 3), after rope
        beta, orig = arch.query_scale
        q = q * (1 + beta * torch.log(1 + torch.floor(positions.float() / orig)))[:, None].to(q.dtype)
    v = v.view(B, T, kv, d).transpose(1, 2)
    if cache is not None:
        k = torch.cat([cache[0], k], dim=2)
        v = torch.cat([cache[1], v], dim=2)
    new_cache = (k, v)
    S = k.shape[2]
    if h != kv:
        k_all, v_all = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)  # [B, h, S, d]
    else:
        k_all, v_all = k, v
    if x.device.type in SDPA_DEVICES and sinks is None and chunk is None:
        window_ok = not window or S <= window
        if window_ok and (T == S or T == 1):  # causal over everything (prefill) or all of the cache (decode)
            out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=T == S and T > 1, scale=d**-0.5)
        else:
            k_pos = torch.arange(S, device=x.device) + (positions[0] - (S - T))
            mask = causal_mask(positions, k_pos, window)  # [T, S]
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=d**-0.5)
        out = out.transpose(1, 2).reshape(B, T, h * d)
        return _linear(out, w, "self_attn.o_proj"), new_cache
    k, v = k_all, v_all
    k_pos = torch.arange(S, device=x.device) + (positions[0] - (S - T))
    mask = causal_mask(positions, k_pos, window, chunk)  # [T, S]
    scores = (q @ k.transpose(-1, -2)) * d**-0.5  # [B, h, T, S]
    if sinks is not None:  # gpt-oss: masked with finfo.min, a sink column per head, softmax, the sink dropped
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        scores = torch.cat([scores, sinks.reshape(1, h, 1, 1).expand(B, h, T, 1).to(scores.dtype)], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = scores.softmax(dim=-1, dtype=scores.dtype)[..., :-1].to(q.dtype)
    else:
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q.dtype)
    out = (probs @ v).transpose(1, 2).reshape(B, T, h * d)
    return _linear(out, w, "self_attn.o_proj"), new_cache
