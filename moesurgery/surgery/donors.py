"""An MoE from several fine-tuned models of one base (mergekit-moe's "clown car", Branch-Train-MiX), done
the DeepSeek way: each donor's FFN becomes a virtual group of G fine-grained experts, and S always-on
shared experts are carved from the base's FFN (or the donors' mean).

Per layer, every FFN (base and donors) is cut into S shared + G routed slices of width f. Donor d's routed
slices are experts d*G .. d*G + G - 1, their router rows all equal to donor d's row r_d, so top-k with
k = t*G picks t whole donors; renormalised weights are w_d / G within a group, and the factor G sits on
down_proj (or the routed scaling factor). The routed output is sum_d w_d * FFN_d,routed(x), the shared
one the base's (or the donors' mean) shared slices: with every donor equal to the base, base FFN exactly.

Router rows r_d, from BASE's FFN inputs (streamed, one layer at a time):
    hidden       mean over donor d's prompts (mergekit's `hidden`), centred over donors, unit norm
    calibration  the same mean, each token weighted by donor d's FFN activation mass on it
    random       N(0, 0.02)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..canonical import MoE, Router, SwiGLU
from ..lazy import Lazy
from .slicing import concat_neurons, take_neurons

ROUTER_MODES = ("hidden", "calibration", "random")
SHARED_FROM = ("base", "mean")


def slices(width: int, granularity: int, shared: int) -> tuple[list[range], list[range]]:
    """(shared slices, routed slices) of an FFN of `width` neurons."""
    if granularity < 1 or shared < 0 or width % (granularity + shared):
        raise ValueError(f"FFN width {width} does not split into {granularity} routed + {shared} shared slices of equal width")
    f = width // (granularity + shared)
    return [range(i * f, (i + 1) * f) for i in range(shared)], [range((shared + g) * f, (shared + g + 1) * f) for g in range(granularity)]


def mean_swiglu(parts: list[SwiGLU]) -> SwiGLU:
    """The neuron-wise mean of FFNs of one shape (gate, up and down averaged: a new FFN, not their output mean)."""
    def avg(ts: list[Lazy]) -> Lazy:
        return Lazy(ts[0].shape, ts[0].dtype, lambda: (sum(t.load().double() for t in ts) / len(ts)).to(ts[0].dtype))

    return SwiGLU(avg([p.gate for p in parts]), avg([p.up for p in parts]), avg([p.down for p in parts]))


def donor_moe(base: SwiGLU, donors: list[SwiGLU], rows: torch.Tensor, *, granularity: int, top_k: int, shared: int = 0,
              shared_from: str = "base", scoring: str = "softmax", fold_into_scaling: bool = False) -> MoE:
    """The MoE block of one layer: donors' routed slices as virtual groups under rows [D, H], shared slices
    from the base (or the donors' mean)."""
    G, D = granularity, len(donors)
    if top_k % G or not 0 < top_k <= D * G:
        raise ValueError(f"--top-k {top_k} must be a multiple of --granularity {G} and at most {D * G} (whole donors)")
    shared_idx, routed_idx = slices(base.width, G, shared)
    down = 1.0 if fold_into_scaling else float(G)
    experts = [take_neurons(d, idx, down) for d in donors for idx in routed_idx]
    weight = rows.repeat_interleave(G, dim=0).to(base.gate.dtype)  # [D*G, H]: tied within a donor's group
    router = Router(Lazy.of(weight), top_k=top_k, scoring=scoring, renormalize=True, scaling=float(G) if fold_into_scaling else 1.0)
    shared_ffn = None
    if shared:
        source = base if shared_from == "base" else mean_swiglu(donors)
        shared_ffn = concat_neurons([take_neurons(source, idx) for idx in shared_idx])
    return MoE(router, experts, shared_ffn)


def activation_mass(h: torch.Tensor, ffn: SwiGLU) -> torch.Tensor:
    """[T]: sum over the FFN's neurons of |silu(gate.x) * (up.x)| for each token."""
    g, u = ffn.gate.load().float(), ffn.up.load().float()
    return (F.silu(h @ g.T) * (h @ u.T)).abs().sum(-1)


def router_rows(means: list[torch.Tensor], mode: str, donors: int, hidden: int, seed: int = 0, layer: int = 0) -> torch.Tensor:
    """[D, H] router rows from each donor's mean FFN input (centred over donors, unit norm), or random."""
    if mode == "random" or not means:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        return torch.randn(donors, hidden, generator=gen) * 0.02
    m = torch.stack([x.double() for x in means])  # [D, H]
    centred = m - m.mean(0, keepdim=True) if len(means) > 1 else m
    return (centred / centred.norm(dim=-1, keepdim=True).clamp(min=1e-12)).float()


def separability(rows: torch.Tensor, per_donor_h: list[torch.Tensor], means: list[torch.Tensor]) -> dict:
    """How distinct the donors' router rows are at one layer: the largest cosine between donors' mean FFN
    inputs (mergekit's degenerate-gate warning, as a number; 1 = indistinguishable), and the share of each
    donor's prompt tokens routed first to its own group."""
    m = torch.stack([x.double() for x in means])
    mn = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cos = mn @ mn.T
    cos.fill_diagonal_(-1)
    own = [float(((h.float() @ rows.T).argmax(-1) == d).float().mean()) for d, h in enumerate(per_donor_h) if len(h)]
    return {"max_mean_cosine": float(cos.max()) if len(means) > 1 else None, "own_group_first": own}
