"""Qwen3-Next / Qwen3.5 token mixers, as transformers computes them (its torch fallback path):

Gated DeltaNet (linear attention), from the layer's normed input x [B, T, H]:
    qkv = in_proj_qkv(x) -> causal depthwise conv1d (kernel K, no bias) -> silu -> q, k [nk, dk], v [nv, dv]
    z = in_proj_z(x) [nv, dv]; beta = sigmoid(in_proj_b(x)); g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)
    o = gated_delta_rule(l2norm(q), l2norm(k), v, g, beta)   chunked (prefill) / recurrent (one-token decode)
    out = out_proj(rms_norm(o) * w * silu(z))
Qwen3-Next stores the projections fused and grouped per key head (in_proj_qkvz, in_proj_ba): `split_qkvz_ba`
permutes their rows into Qwen3.5's flat layout at load time, so one path serves both.

Gated full attention: q_proj gives [query | gate] per head; per-head q/k RMSNorm with (1 + w); rope on the
first partial_rotary_factor of each head; out = o_proj(attn * sigmoid(gate)).
Decode state of a linear layer: {"conv": the last K pre-conv projections [B, C, K], "rec": [B, nv, dk, dv] fp32}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..canonical import Arch
from .rope import apply_rotary


def rms_norm_offset(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: x_hat * (1 + w), in fp32, cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).type_as(x)


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * rms_norm(x) * silu(z) (a plain weight; silu in fp32)."""
    dt, xf = x.dtype, x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return ((w * xf.to(dt)) * F.silu(z.float())).to(dt)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def split_qkvz_ba(w_qkvz: torch.Tensor, w_ba: torch.Tensor, la: dict) -> dict[str, torch.Tensor]:
    """Qwen3-Next's per-key-head fused rows [q_g | k_g | v_g (r dv) | z_g (r dv)] and [b_g (r) | a_g (r)] as
    Qwen3.5's flat in_proj_qkv = [q all | k all | v all], in_proj_z, in_proj_b, in_proj_a (a row permutation)."""
    nk, dk, nv, dv = la["nk"], la["dk"], la["nv"], la["dv"]
    r, H = nv // nk, w_qkvz.shape[-1]
    q, k, v, z = w_qkvz.view(nk, 2 * dk + 2 * r * dv, H).split([dk, dk, r * dv, r * dv], dim=1)
    b, a = w_ba.view(nk, 2 * r, H).split([r, r], dim=1)

    def flat(t):
        return t.reshape(-1, H)

    return {"in_proj_qkv.weight": torch.cat([flat(q), flat(k), flat(v)]), "in_proj_z.weight": flat(z),
            "in_proj_b.weight": flat(b), "in_proj_a.weight": flat(a)}


def group_qkv_z_ba(w: dict[str, torch.Tensor], la: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of split_qkvz_ba: Qwen3.5's flat in_proj_qkv / z / b / a as Qwen3-Next's (in_proj_qkvz, in_proj_ba)."""
    nk, dk, nv, dv = la["nk"], la["dk"], la["nv"], la["dv"]
    r, H = nv // nk, w["in_proj_qkv.weight"].shape[-1]
    q, k, v = w["in_proj_qkv.weight"].split([nk * dk, nk * dk, nv * dv])
    z, b, a = w["in_proj_z.weight"], w["in_proj_b.weight"], w["in_proj_a.weight"]
    qkvz = torch.cat([q.view(nk, dk, H), k.view(nk, dk, H), v.view(nk, r * dv, H), z.view(nk, r * dv, H)], dim=1)
    return qkvz.reshape(-1, H), torch.cat([b.view(nk, r, H), a.view(nk, r, H)], dim=1).reshape(-1, H)


def chunk_gated_delta_rule(q, k, v, g, beta, state=None, chunk: int = 64):
    """q, k [B, T, nk, dk], v [B, T, nv, dv], g, beta [B, T, nv] -> (out [B, T, nv, dv] in q.dtype, state [B, nv, dk, dv] fp32)."""
    dt, (B, T, nk, dk), (nv, dv) = q.dtype, k.shape, v.shape[-2:]
    if nk != nv:
        q, k = q.repeat_interleave(nv // nk, dim=2), k.repeat_interleave(nv // nk, dim=2)
    q, k, v, beta, g = [x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format) for x in (q, k, v, beta, g)]
    q, k = l2norm(q), l2norm(k)
    q = q * dk**-0.5
    pad = (chunk - T % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = [x.reshape(B, nv, -1, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta)]
    g = g.reshape(B, nv, -1, chunk).cumsum(dim=3)  # cumulative log-decay within each chunk
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (g.unsqueeze(4) - g.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()  # [.., i, j] = exp(g_i - g_j), j <= i
    ut = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(ut, k_beta * g.exp().unsqueeze(-1), upper=False, unitriangular=True)
    S = torch.zeros(B, nv, dk, dv, dtype=u.dtype, device=u.device) if state is None else state.to(u)
    out = torch.zeros_like(u)
    q = q * g.exp().unsqueeze(-1)
    k = k * (g[..., -1:] - g).exp().unsqueeze(-1)
    chunk_decay = g[..., -1].exp()[..., None, None]
    for i in range(q.shape[2]):
        v_new = u[:, :, i] - w[:, :, i] @ S
        out[:, :, i] = q[:, :, i] @ S + intra[:, :, i] @ v_new
        S = S * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(B, nv, -1, dv)[:, :, :T]
    return out.transpose(1, 2).to(dt, memory_format=torch.contiguous_format), S


def recurrent_gated_delta_rule(q, k, v, g, beta, state=None):
    """The one-token decode path; same inputs and outputs as chunk_gated_delta_rule."""
    dt, (B, T, nk, dk), (nv, dv) = q.dtype, k.shape, v.shape[-2:]
    if nk != nv:
        q, k = q.repeat_interleave(nv // nk, dim=2), k.repeat_interleave(nv // nk, dim=2)
    q, k, v, beta, g = [x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format) for x in (q, k, v, beta, g)]
    q, k = l2norm(q), l2norm(k)
    q = q / dk**0.5
    S = torch.zeros(B, nv, dk, dv, dtype=v.dtype, device=v.device) if state is None else state.to(v)
    out = torch.zeros_like(v)
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]
        delta = (v[:, :, t] - (S * k[:, :, t].unsqueeze(-1)).sum(-2)) * beta[:, :, t].unsqueeze(-1)
        S = S + k[:, :, t].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, :, t] = (S * q[:, :, t].unsqueeze(-1)).sum(-2)
    return out.transpose(1, 2).contiguous().to(dt), S


def gated_deltanet(x: torch.Tensor, w: dict[str, torch.Tensor], arch: Arch, state: dict | None = None):
    """x [B, T, H] (input_layernorm applied), w: the layer's tensors -> (out [B, T, H], state for decoding)."""
    la = arch.linear_attn
    B, T, _ = x.shape
    nk, dk, nv, dv, K = la["nk"], la["dk"], la["nv"], la["dv"], la["kernel"]
    p = "linear_attn."
    if p + "in_proj_qkv.weight" not in w:  # Qwen3-Next's fused per-head layout
        w = {**w, **{p + k: v for k, v in split_qkvz_ba(w[p + "in_proj_qkvz.weight"], w[p + "in_proj_ba.weight"], la).items()}}
    qkv = F.linear(x, w[p + "in_proj_qkv.weight"]).transpose(1, 2)  # [B, C, T]
    z = F.linear(x, w[p + "in_proj_z.weight"]).reshape(B, T, nv, dv)
    b, a = F.linear(x, w[p + "in_proj_b.weight"]), F.linear(x, w[p + "in_proj_a.weight"])  # [B, T, nv]
    prev = state["conv"] if state is not None else qkv.new_zeros(B, qkv.shape[1], K)
    full = torch.cat([prev, qkv], dim=-1)  # [B, C, K + T]: the last K cached inputs, then the new ones
    conv = F.silu(F.conv1d(full, w[p + "conv1d.weight"], None, padding=0, groups=full.shape[1])[:, :, -T:])
    q, k, v = conv.transpose(1, 2).split([nk * dk, nk * dk, nv * dv], dim=-1)
    q, k, v = q.reshape(B, T, nk, dk), k.reshape(B, T, nk, dk), v.reshape(B, T, nv, dv)
    beta = b.sigmoid()
    g = -w[p + "A_log"].float().exp() * F.softplus(a.float() + w[p + "dt_bias"])  # log-decay <= 0
    rule = recurrent_gated_delta_rule if (state is not None and T == 1) else chunk_gated_delta_rule
    o, S = rule(q, k, v, g, beta, state["rec"] if state is not None else None)
    o = gated_rms_norm(o.reshape(-1, dv), z.reshape(-1, dv), w[p + "norm.weight"], arch.rms_norm_eps).reshape(B, T, nv * dv)
    length = (state["len"] if state is not None else 0) + T
    return F.linear(o, w[p + "out_proj.weight"]), {"conv": full[:, :, -K:], "rec": S, "len": length}


def gated_attention(x, w, arch: Arch, cos, sin, positions, cache=None):
    """x [B, T, H] (normed) -> (out, (k, v) cache [B, kv, S, hd] after rope)."""
    B, T, _ = x.shape
    h, kv, hd, eps = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.rms_norm_eps
    q, gate = F.linear(x, w["self_attn.q_proj.weight"]).view(B, T, h, 2 * hd).chunk(2, dim=-1)  # per head: [query | gate]
    gate = gate.reshape(B, T, h * hd)
    q = rms_norm_offset(q, w["self_attn.q_norm.weight"], eps).transpose(1, 2)  # [B, h, T, hd]
    k = rms_norm_offset(F.linear(x, w["self_attn.k_proj.weight"]).view(B, T, kv, hd), w["self_attn.k_norm.weight"], eps).transpose(1, 2)
    v = F.linear(x, w["self_attn.v_proj.weight"]).view(B, T, kv, hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    S = k.shape[2]
    kr, vr = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    scores = (q @ kr.transpose(2, 3)) * hd**-0.5
    allowed = torch.arange(S, device=x.device)[None, :] <= torch.arange(S - T, S, device=x.device)[:, None]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    out = (scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ vr).transpose(1, 2).reshape(B, T, h * hd)
    return F.linear(out * torch.sigmoid(gate), w["self_attn.o_proj.weight"]), (k, v)
