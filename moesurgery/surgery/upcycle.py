"""Upcycling, exact at init.

Dense -> MoE with virtual groups (Megatron-Core granular upcycling, arXiv 2410.07524): the FFN's
neurons are cut into S shared slices and G routed slices of equal width f. Routed expert e holds
routed slice e mod G, so N experts form N/G virtual groups of G consecutive experts, each group a
full copy of the routed part. Router rows are equal within a group and differ between groups, so
top-k with k = t*G picks t whole groups. Renormalised weights are then equal within a group and sum
to 1: the routed output is FFN_routed(x) / G, and the factor G goes on down_proj (never on gate/up:
SwiGLU is not homogeneous in them). Shared slices are always-on experts with weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..canonical import MoE, Router, SwiGLU
from ..lazy import Lazy
from .slicing import concat_neurons, take_neurons


@dataclass
class UpcycleSpec:
    granularity: int  # G: routed slices of the FFN
    experts: int  # N routed experts (multiple of G)
    top_k: int  # multiple of G
    shared: int = 0  # S always-on experts carved from the FFN
    scoring: str = "softmax"  # the target's router: softmax or sigmoid (both renormalised)
    fold_into_scaling: bool = False  # put G on routed_scaling_factor instead of down_proj
    router_std: float = 0.02  # init of the per-group router rows
    router_noise: float = 0.0  # symmetry breaking: noise on every router row (lossy)
    reinit_fraction: float = 0.0  # Drop-Upcycling: re-initialise this fraction of each expert's neurons (lossy)
    seed: int = 0

    def check(self, width: int) -> int:
        """Validate against an FFN width; returns the expert width f."""
        G, N, K, S = self.granularity, self.experts, self.top_k, self.shared
        if G < 1 or N < 1 or K < 1 or S < 0:
            raise ValueError("granularity, experts and top-k must be positive, shared >= 0")
        if N % G:
            raise ValueError(f"--experts {N} must be a multiple of --granularity {G} (whole virtual groups)")
        if K % G:
            raise ValueError(f"--top-k {K} must be a multiple of --granularity {G} (top-k picks whole groups)")
        if K > N:
            raise ValueError(f"--top-k {K} is larger than --experts {N}")
        if width % (G + S):
            raise ValueError(f"FFN width {width} does not split into {G} routed + {S} shared slices of equal width")
        return width // (G + S)


def upcycle_dense(ffn: SwiGLU, spec: UpcycleSpec, layer_index: int = 0) -> tuple[MoE, list[str]]:
    """(MoE, reasons it is not exact) for one dense FFN."""
    f = spec.check(ffn.width)
    G, N, S = spec.granularity, spec.experts, spec.shared
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + layer_index)
    slices = [torch.arange(i * f, (i + 1) * f) for i in range(S + G)]  # shared first, then routed
    down_scale = 1.0 if spec.fold_into_scaling else float(G)
    routed = [take_neurons(ffn, slices[S + g], down_scale) for g in range(G)]
    experts = [routed[e % G] for e in range(N)]
    lossy = []
    if spec.reinit_fraction > 0:
        experts = [reinit_neurons(e, spec.reinit_fraction, gen) for e in experts]
        lossy.append(f"{spec.reinit_fraction:.0%} of each expert's neurons re-initialised (Drop-Upcycling)")
    H = ffn.gate.shape[1]
    groups = torch.randn(N // G, H, generator=gen) * spec.router_std  # [N/G, H]
    rows = groups.repeat_interleave(G, dim=0)  # [N, H]: equal within a group
    if spec.router_noise > 0:
        rows = rows + torch.randn(rows.shape, generator=gen) * spec.router_noise
        lossy.append(f"router rows perturbed (std {spec.router_noise:g}): groups no longer tie")
    router = Router(
        Lazy.of(rows.to(ffn.gate.dtype)),
        top_k=spec.top_k,
        scoring=spec.scoring,
        renormalize=True,
        scaling=float(G) if spec.fold_into_scaling else 1.0,
    )
    shared = concat_neurons([take_neurons(ffn, slices[s]) for s in range(S)]) if S else None
    return MoE(router, experts, shared), lossy


def reinit_neurons(expert: SwiGLU, fraction: float, gen: torch.Generator) -> SwiGLU:
    """Drop-Upcycling: re-draw `fraction` of the neurons from N(0, std of the originals)."""
    width = expert.width
    count = int(round(width * fraction))
    chosen = torch.randperm(width, generator=gen)[:count]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))

    def redraw(t: torch.Tensor, dim: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + dim)
        t = t.clone()
        shape = list(t.shape)
        shape[dim] = count
        noise = (torch.randn(shape, generator=g) * t.float().std()).to(t.dtype)
        t.index_copy_(dim, chosen, noise)
        return t

    return SwiGLU(expert.gate.map(lambda t: redraw(t, 0)), expert.up.map(lambda t: redraw(t, 0)), expert.down.map(lambda t: redraw(t, 1)))


def extract_shared(moe: MoE, width: int, match: float = 1.0) -> tuple[MoE, list[str], dict]:
    """Move `width` neuron positions that the experts have in common into an always-on shared expert.

    Neuron i of every expert is compared across experts (cosine similarity of its gate row, up row
    and down column, averaged over expert pairs); the `width` most similar positions leave every
    expert and their mean becomes a shared neuron. With renormalised weights summing to 1, a neuron
    identical in all experts contributes the same whether routed or shared: exact when every chosen
    position is identical across experts (similarity >= `match`), measured otherwise.
    """
    r = moe.router
    E, f = len(moe.experts), moe.expert_width
    if width <= 0:
        return moe, [], {}
    if moe.act.kind != "silu" or moe.experts[0].biased:
        raise ValueError("shared experts are plain SwiGLU: neurons of gpt-oss experts (clamped, biased) cannot move into one")
    if width >= f:
        raise ValueError(f"shared width {width} must be smaller than the expert width {f}")
    def features(e: SwiGLU) -> torch.Tensor:  # [f, 3H]: neuron i's gate row, up row and down column
        return torch.cat([e.gate.load().float(), e.up.load().float(), e.down.load().float().T], dim=1)

    # one expert at a time (a Mixtral-8x7B layer in fp32 would not fit twice in memory)
    unit_sum = None
    for e in moe.experts:
        unit = torch.nn.functional.normalize(features(e), dim=-1)
        unit_sum = unit if unit_sum is None else unit_sum.add_(unit)
        del unit
    # mean pairwise cosine = (|sum of unit vectors|^2 - E) / (E (E - 1))
    similarity = (unit_sum.pow(2).sum(-1) - E) / (E * (E - 1)) if E > 1 else torch.ones(f)
    del unit_sum
    chosen = similarity.topk(width).indices.sort().values
    total, first, identical = None, None, True
    for e in moe.experts:
        rows = features(e)[chosen]  # [width, 3H]
        if first is None:
            first, total = rows, rows.clone()
        else:
            identical = identical and torch.equal(rows, first)
            total += rows
    mean = first if identical else total / E  # [width, 3H]
    keep = torch.tensor(sorted(set(range(f)) - set(chosen.tolist())))
    weight_sum = r.scaling if r.renormalize else None  # the routed weights of a token sum to this
    lossy = []
    if weight_sum is None:
        lossy.append("routing weights do not sum to a constant (no renormalisation): shared neurons change the output")
        weight_sum = 1.0
    if weight_sum != 1.0:
        mean[:, 2 * mean.shape[1] // 3 :] *= weight_sum
    if moe.shared_gate is not None:  # Qwen's only slot: the gated shared expert, widened
        lossy.append("the new shared neurons widen the gated shared expert: they take its sigmoid gate (between 0 and 1 per token), "
                     "where as routed neurons they had weight 1")
    if not identical:
        lossy.append("shared neurons are the mean of neuron positions that differ across experts (similarity in `measured`)")
    H = moe.experts[0].gate.shape[1]
    dtype = moe.experts[0].gate.dtype
    shared_new = SwiGLU(Lazy.of(mean[:, :H].to(dtype)), Lazy.of(mean[:, H : 2 * H].to(dtype)), Lazy.of(mean[:, 2 * H :].T.contiguous().to(dtype)))
    shared = shared_new if moe.shared is None else concat_neurons([moe.shared, shared_new])
    experts = [take_neurons(e, keep) for e in moe.experts]
    stats = {"shared_min_similarity": float(similarity[chosen].min()), "shared_mean_similarity": float(similarity[chosen].mean()), "shared_identical": identical}
    return replace(moe, experts=experts, shared=shared), lossy, stats
