"""Rotary position embeddings from the canonical `Arch`, bit-for-bit as transformers computes them.

Ports of transformers' `modeling_rope_utils._compute_*_parameters` (default, linear, dynamic,
llama3, yarn) plus the three ways models apply the rotation:
  - `apply_rotary`: rotate_half on the first cos.shape[-1] dims (llama, glm4_moe partial, deepseek_v3)
  - `apply_rotary_interleave`: deepseek_v3 with rope_interleave (pairs (x0,x1),(x2,x3)..., output
    de-interleaved: [rotated evens, rotated odds])
  - `apply_rotary_complex`: deepseek_v2's complex-pair rotation (fp32, layout kept interleaved)
For MLA, arch.head_dim == qk_rope_head_dim, which is the head_dim transformers' deepseek configs use.
"""

from __future__ import annotations

import math

import torch

from ..canonical import Arch


def rope_params(arch: Arch) -> dict:
    """The rope_scaling dict with rope_type resolved and original_max_position_embeddings defaulted
    (transformers' standardize_rope_params)."""
    params = dict(arch.rope_scaling or {})
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", arch.max_position_embeddings)
    return params


def rotary_dim(arch: Arch) -> int:
    return int(arch.head_dim * arch.partial_rotary_factor)


def _base_inv_freq(base, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _get_mscale(scale: float, mscale: float = 1) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(arch: Arch, p: dict, dim: int) -> tuple[torch.Tensor, float]:
    base = arch.rope_theta
    factor = p.get("factor")
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    original_max = p["original_max_position_embeddings"]
    if factor is None:
        factor = arch.max_position_embeddings / original_max
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_get_mscale(factor, mscale) / _get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent singularity

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def _llama3(arch: Arch, p: dict, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(arch.rope_theta, dim)
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_ff
    high_freq_wavelen = old_context_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def inv_freq_and_scale(arch: Arch, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies [rotary_dim // 2] and the attention_scaling applied to cos/sin.

    seq_len only matters for "dynamic": a fresh transformers rotary embedding run over positions
    0..seq_len-1 rescales the base only when seq_len > max_position_embeddings (dynamic_rope_update)."""
    p = rope_params(arch)
    kind, dim = p["rope_type"], rotary_dim(arch)
    if kind == "default":
        return 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if kind == "linear":
        return _base_inv_freq(arch.rope_theta, dim) / p["factor"], 1.0
    if kind == "dynamic":
        max_pos = arch.max_position_embeddings
        if seq_len is None or seq_len <= max_pos:  # init-time value: base * 1.0
            return _base_inv_freq(arch.rope_theta, dim), 1.0
        # grown past the original length: transformers recomputes with a 0-dim int64 tensor seq_len
        n = torch.maximum(torch.tensor(seq_len), torch.tensor(max_pos))
        factor = p["factor"]
        base = arch.rope_theta * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3(arch, p, dim), 1.0
    if kind == "yarn":
        return _yarn(arch, p, dim)
    raise NotImplementedError(f"rope_type {kind!r}")


def _freqs(arch: Arch, positions: torch.Tensor, seq_len: int | None) -> tuple[torch.Tensor, float]:
    if seq_len is None and positions.numel():
        seq_len = int(positions.max()) + 1
    inv_freq, scale = inv_freq_and_scale(arch, seq_len)
    return positions[:, None].float() * inv_freq.to(positions.device), scale  # [T, dim/2]


def cos_sin(arch: Arch, positions: torch.Tensor, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rotary_dim] fp32, emb = cat(freqs, freqs), times attention_scaling.
    seq_len defaults to max(positions) + 1 (what transformers' dynamic update sees)."""
    freqs, scale = _freqs(arch, positions, seq_len)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def freqs_cis(arch: Arch, positions: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
    """deepseek_v2's complex rotary table [T, rotary_dim / 2] (complex64), times attention_scaling."""
    freqs, scale = _freqs(arch, positions, seq_len)
    return torch.polar(torch.ones_like(freqs), freqs) * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, T, d]; cos/sin [T, r] with r <= d: rotate_half on x[..., :r], the rest passes through.
    Like transformers, cos/sin are cast to x.dtype and the rotation runs in x.dtype (no fp32 upcast)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat([(x_rot * cos) + (rotate_half(x_rot) * sin), x_pass], dim=-1)


def apply_rotary_interleave(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """deepseek_v3 rope_interleave: pairs (x0, x1), (x2, x3)... each rotated by one frequency; the
    output is de-interleaved: [x_even * cos - x_odd * sin, x_odd * cos + x_even * sin]. In x.dtype."""
    cos, sin = cos[..., : cos.shape[-1] // 2].to(x.dtype), sin[..., : sin.shape[-1] // 2].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rotary_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """deepseek_v2: x [B, h, T, d] viewed as d/2 complex pairs (fp32), times freqs_cis [T, d/2];
    the layout stays interleaved; cast back to x.dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(3).type_as(x)
