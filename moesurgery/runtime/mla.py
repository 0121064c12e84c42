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
    """Explicit kwarg, else arch.mla["variant"], else v3 if the config spelled rope_interleave, else v2."""
    variant = variant or arch.mla.get("variant") or ("deepseek_v3" if "rope_interleave" in arch.mla else "deepseek_v2")
    if variant not in VARIANTS:
        raise ValueError(f"unknown MLA variant {variant!r}; expected one of {VARIANTS}")
    return variant


def _linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    return linear(x, w[f"self_attn.{name}.weight"], w.get(f"self_attn.{name}.bias"))


def mla_attention(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    arch: Arch,
    positions: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    rms_norm_eps: float = 1e-6,
    variant: str | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """x [B, T, H], positions [T] -> (out [B, T, H], (keys, values) [B, h, S + T, .]).

    `cache` holds earlier post-rope keys/values [B, h, S, .]; queries attend causally to them plus
    themselves. rms_norm_eps defaults to 1e-6 because transformers builds q_a_layernorm and
    kv_a_layernorm without the config's eps."""
    variant = resolve_variant(arch, variant)
    m = arch.mla
    B, T, _ = x.shape
    h = arch.num_heads
    nope, rd, vd, r = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"], m["kv_lora_rank"]

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
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # [B, h, S + T, .]

    S = k.shape[2] - T
    scores = torch.matmul(q, k.transpose(2, 3)) * softmax_scale(arch)  # [B, h, T, S + T]
    future = torch.arange(S + T, device=q.device)[None, :] > (S + torch.arange(T, device=q.device))[:, None]  # [T, S + T]
    scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, h * vd)  # [B, T, h * vd]
    return _linear(out, w, "o_proj"), (k, v)
