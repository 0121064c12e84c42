"""Expert pruning and merging of an MoE block, with the router kept consistent.

    prune_moe(moe, keep)              the experts `keep` (router rows, correction bias, stored forms with them)
    unselectable(moe)                 experts no input can route to (provably: their pruning is exact)
    cluster_experts(features, n)      average-linkage clustering of experts by their outputs (HC-SMoE)
    merge_moe(moe, clusters, ...)     one expert per cluster; its router row fitted to the cluster's routing mass

Saliencies (`routing.expert_stats`): reap (router-weighted activation norm, REAP), frequency (tokens
routed), mass (routing weight), random.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..canonical import MoE, SwiGLU
from ..lazy import Lazy, cat

METHODS = ("reap", "output", "frequency", "mass", "random")
MERGE_METHODS = ("select", "frequency", "aligned")


def saliency(stats: dict, method: str, experts: int, seed: int = 0) -> torch.Tensor:
    """[E] higher = keep first."""
    if method == "random":
        return torch.rand(experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    key = {"reap": "reap", "frequency": "counts", "mass": "mass", "output": "output"}[method]
    return torch.as_tensor(stats[key], dtype=torch.float64)


def keep_top(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring experts, in their original order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return sorted(order[:keep])


def _rows(t: Lazy, index: list[int]) -> Lazy:
    return t.index_select(0, torch.tensor(index))


def prune_moe(moe: MoE, keep: list[int]) -> MoE:
    """The MoE block with only experts `keep` (their router rows and correction bias; top-k unchanged;
    shared experts untouched). Whole experts keep their stored (FP8 / INT4) forms."""
    r = moe.router
    router = replace(r, weight=_rows(r.weight, keep), bias=_rows(r.bias, keep) if r.bias is not None else None)
    return MoE(router, [moe.experts[e] for e in keep], moe.shared, moe.shared_gate)


def unselectable(moe: MoE) -> list[int]:
    """Experts no input can select: with a selection bias b and scores in (0, 1) (sigmoid, softmax), expert e
    is never in the top-k if k other experts have b_j >= b_e + 1 (their score exceeds b_j, e's stays below b_e + 1)."""
    r = moe.router
    if r.bias is None or r.grouped:
        return []
    b = r.bias.load().double()
    out = []
    for e in range(len(b)):
        others = torch.cat([b[:e], b[e + 1 :]])
        if int((others >= b[e] + 1).sum()) >= r.top_k:
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------- merging
def expert_outputs(h: torch.Tensor, moe: MoE, dtype=torch.float32) -> torch.Tensor:
    """[E, T, H]: every expert applied to the same tokens h [T, H] (unweighted)."""
    outs = []
    for e in moe.experts:
        g, u, d = (t.load().to(dtype) for t in (e.gate, e.up, e.down))
        outs.append(F.linear(F.silu(F.linear(h, g)) * F.linear(h, u), d))
    return torch.stack(outs)


def cluster_experts(features: torch.Tensor, n: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of E feature rows [E, D] by cosine distance into n clusters."""
    E = features.shape[0]
    f = F.normalize(features.double().flatten(1), dim=-1)
    dist = 1 - f @ f.T  # [E, E]
    clusters = [[e] for e in range(E)]
    d = dist.clone()
    d.fill_diagonal_(float("inf"))
    sizes = torch.ones(E, dtype=torch.float64)
    alive = list(range(E))
    while len(alive) > n:
        sub = d[alive][:, alive]
        flat = int(sub.argmin())
        i, j = alive[flat // len(alive)], alive[flat % len(alive)]
        a, b = min(i, j), max(i, j)
        # average linkage: the new distance is the size-weighted mean of the two
        d[a] = (d[a] * sizes[a] + d[b] * sizes[b]) / (sizes[a] + sizes[b])
        d[:, a] = d[a]
        d[a, a] = float("inf")
        sizes[a] += sizes[b]
        clusters[a] += clusters[b]
        alive.remove(b)
    return [sorted(clusters[a]) for a in alive]


def _weighted(parts: list[Lazy], weights: list[float]) -> Lazy:
    def load():
        out = None
        for p, w in zip(parts, weights):
            t = p.load().double() * w
            out = t if out is None else out + t
        return out.to(parts[0].dtype)

    return Lazy(parts[0].shape, parts[0].dtype, load)


def distinct_top(importance: torch.Tensor, rows: torch.Tensor, n: int, same: float = 0.999) -> torch.Tensor:
    """The n most important neurons, skipping copies of one already kept (gate|up rows [N, 2H] at cosine >= `same`:
    merging identical experts keeps each neuron once and the refit down_proj counts it for both); sorted."""
    unit = F.normalize(rows.double(), dim=-1)
    order = importance.argsort(descending=True).tolist()
    kept, blocked = [], torch.zeros(len(order), dtype=torch.bool)
    for j in order:
        if not blocked[j]:
            kept.append(j)
            if len(kept) == n:
                break
            blocked |= (unit @ unit[j]) >= same
    rest = [j for j in order if j not in set(kept)]
    return torch.tensor(sorted(kept + rest[: n - len(kept)]))


def select_neurons(moe: MoE, members: list[int], X: torch.Tensor, logits: torch.Tensor, ridge: float) -> tuple[SwiGLU, float]:
    """One expert of the members' width from their neurons: the union holds every member's neurons; the ones that
    carry most of the cluster's routed output on X [T, H] are kept, and down_proj is refitted (weighted least
    squares) to the members' output mixed by their routing probabilities, token by token. Works whether or not
    the members' neurons correspond (experts split from one dense FFN share none)."""
    probs = logits.softmax(-1) if moe.router.scoring == "softmax" else logits.sigmoid()  # [T, E]
    q = probs[:, members]  # [T, m]
    s = q.sum(-1).clamp(min=1e-12)  # [T] the cluster's routing mass per token
    acts, downs, owner = [], [], []
    want = torch.zeros(X.shape[0], X.shape[1], dtype=torch.float64)
    for i, e in enumerate(members):
        g, u, d = (t.load().double() for t in (moe.experts[e].gate, moe.experts[e].up, moe.experts[e].down))
        a = F.silu(X @ g.T) * (X @ u.T)  # [T, I]
        want += (q[:, i] / s)[:, None] * (a @ d.T)
        acts.append(a)
        downs.append(d)
        owner.append(torch.full((a.shape[1],), i))
    A, D, owner = torch.cat(acts, 1), torch.cat(downs, 1), torch.cat(owner)  # [T, mI], [H, mI], [mI]
    share = (q / s[:, None])[:, owner]  # [T, mI] each neuron's weight in the mixture
    importance = ((A * share).pow(2) * s[:, None]).sum(0).sqrt() * D.norm(dim=0)  # [mI]
    I = moe.expert_width
    keep = distinct_top(importance, torch.cat([torch.cat([moe.experts[e].gate.load(), moe.experts[e].up.load()], 1) for e in members]), I)
    Ak = A[:, keep] * s.sqrt()[:, None]  # weighted rows
    B = Ak.T @ Ak
    B += ridge * B.diagonal().mean() * torch.eye(I, dtype=torch.float64)  # ridge relative to the activations' scale
    d_new = torch.linalg.solve(B, Ak.T @ (want * s.sqrt()[:, None])).T  # [H, I]
    err = float(((A[:, keep] @ d_new.T - want) * s.sqrt()[:, None]).norm() / (want * s.sqrt()[:, None]).norm().clamp(min=1e-30))
    offsets = [0]
    for e in members:
        offsets.append(offsets[-1] + moe.experts[e].width)
    gates, ups = [], []
    for i, e in enumerate(members):  # the kept neurons of each member, as one row selection of its gate / up
        mine = keep[(keep >= offsets[i]) & (keep < offsets[i + 1])]
        if mine.numel():
            gates.append(moe.experts[e].gate.index_select(0, mine - offsets[i]))
            ups.append(moe.experts[e].up.index_select(0, mine - offsets[i]))
  # keep is sorted, so the members' neurons come in the order d_new's columns hold them
    dtype = moe.experts[members[0]].down.dtype
    return SwiGLU(cat(gates), cat(ups), Lazy.of(d_new.to(dtype).contiguous())), err


def merge_moe(moe: MoE, clusters: list[list[int]], freq: torch.Tensor, h: torch.Tensor, method: str = "frequency",
              ridge: float = 1e-3) -> tuple[MoE, dict]:
    """One expert per cluster: the frequency-weighted average of its members' weights ("aligned": down_proj then
    refitted by least squares so the merged output matches the members' frequency-weighted output on h [T, H]).
    The merged router row is fitted so its logit tracks the cluster's routing mass on h (softmax: log-sum-exp of
    the members' logits; sigmoid: the logit of their summed scores); the bias is the frequency-weighted mean."""
    r = moe.router
    W = r.weight.load().double()  # [E, H]
    X = h.double()  # [T, H]
    logits = X @ W.T  # [T, E]
    rows, experts, biases = [], [], []
    A = X.T @ X + ridge * X.shape[0] * torch.eye(X.shape[1], dtype=torch.float64)  # ridge normal equations
    errors = []
    for members in clusters:
        p = freq[members].double()
        p = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1 / len(members))
        if len(members) == 1:
            rows.append(W[members[0]])
            experts.append(moe.experts[members[0]])
            biases.append(members)
            continue
        if r.scoring == "softmax":
            target = torch.logsumexp(logits[:, members], dim=-1)  # [T]
        else:
            s = torch.sigmoid(logits[:, members]).sum(-1).clamp(1e-6, 1 - 1e-6)
            target = torch.log(s / (1 - s))
        rows.append(torch.linalg.solve(A, X.T @ target))
        if method == "select":
            expert, err = select_neurons(moe, members, X, logits, ridge)
            experts.append(expert)
            errors.append(err)
            biases.append(members)
            continue
        gate = _weighted([moe.experts[e].gate for e in members], p.tolist())
        up = _weighted([moe.experts[e].up for e in members], p.tolist())
        down = _weighted([moe.experts[e].down for e in members], p.tolist())
        if method == "aligned":  # down_proj fitted so the merged output matches the members' weighted output on h
            ys = expert_outputs(h, MoE(r, [moe.experts[e] for e in members]))  # [m, T, H]
            want = (ys.double() * p[:, None, None]).sum(0)  # [T, H]
            g, u = gate.load().double(), up.load().double()
            act = F.silu(X @ g.T) * (X @ u.T)  # [T, I]
            B = act.T @ act + ridge * act.shape[0] * torch.eye(act.shape[1], dtype=torch.float64)
            d_new = torch.linalg.solve(B, act.T @ want).T  # [H, I]
            errors.append(float((act @ d_new.T - want).norm() / want.norm().clamp(min=1e-30)))
            down = Lazy.of(d_new.to(moe.experts[members[0]].down.dtype))
        experts.append(SwiGLU(gate, up, down))
        biases.append(members)
    weight = torch.stack(rows).to(r.weight.dtype)
    bias = None
    if r.bias is not None:
        b = r.bias.load().double()
        bias = Lazy.of(torch.stack([(b[m] * (freq[m].double() / freq[m].double().sum().clamp(min=1e-30))).sum() if len(m) > 1 else b[m[0]]
                                    for m in biases]).to(r.bias.dtype))
    router = replace(r, weight=Lazy.of(weight), bias=bias)
    return MoE(router, experts, moe.shared, moe.shared_gate), {"clusters": clusters, "aligned_rel_err": errors}
