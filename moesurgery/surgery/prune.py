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

from ..canonical import SILU, MoE, SwiGLU
from ..lazy import Lazy, cat

METHODS = ("reap", "output", "frequency", "mass", "random")
MERGE_METHODS = ("select", "frequency", "aligned")
MERGE_WHAT = {"select": "the members' strongest neurons, down_proj refitted", "frequency": "frequency-weighted average",
              "aligned": "frequency-weighted average, down_proj refitted"}


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
    shared experts untouched). Whole experts keep their stored (FP8 / INT4) forms. A hash-routed layer's
    table sends a token's removed expert to the kept expert whose router row is closest (one it does not have)."""
    r = moe.router
    router = replace(r, weight=_rows(r.weight, keep), bias=_rows(r.bias, keep) if r.bias is not None else None,
                     logit_bias=_rows(r.logit_bias, keep) if r.logit_bias is not None else None)
    if r.hash_table is not None:
        router.hash_table = remap_hash(r.hash_table, {e: [e] for e in keep}, lambda: closest_rows(r.weight, keep))  # read when written
    return replace(moe, router=router, experts=[moe.experts[e] for e in keep])


def closest_rows(weight: Lazy, keep: list[int]) -> dict[int, list[int]]:
    """{removed expert: the kept experts, closest router row (cosine) first}."""
    W = F.normalize(weight.load().double(), dim=-1)  # [E, H]
    kept = torch.tensor(keep)
    return {e: kept[(W[kept] @ W[e]).argsort(descending=True)].tolist() for e in range(W.shape[0]) if e not in set(keep)}


def remap_hash(table: Lazy, groups: dict[int, list[int]], substitutes) -> Lazy:
    """A hash layer's token -> experts table [V, k] after reducing the experts: `groups` {kept expert (old id): the old
    experts it stands for, itself first} numbers the kept ones 0.. in order; each removed expert of a token's row becomes
    the first of its `substitutes` (old ids; a dict, or a function giving it when the table is read) not already in
    the row (a row never names an expert twice)."""
    kept = list(groups)

    def load() -> torch.Tensor:
        t = table.load().long().clone()  # [V, k]
        subs = substitutes() if callable(substitutes) else substitutes
        for removed, ranked in subs.items():
            pending = (t == removed).any(1).nonzero().flatten()
            for c in ranked:
                if not len(pending):
                    break
                free = ~(t[pending] == c).any(1)
                rows = pending[free]
                t[rows, (t[rows] == removed).long().argmax(1)] = c
                pending = pending[~free]
            if len(pending):
                raise ValueError(f"hash table: no kept expert left for the rows of expert {removed}")
        lut = torch.full((int(t.max()) + 1,), -1, dtype=torch.long)
        lut[torch.tensor(kept)] = torch.arange(len(kept))
        return lut[t].to(table.dtype)

    return Lazy(table.shape, table.dtype, load)


def unselectable(moe: MoE) -> list[int]:
    """Experts no input can select: with a selection bias b and scores in (0, 1) (sigmoid, softmax), expert e
    is never in the top-k if k other experts have b_j >= b_e + 1 (their score exceeds b_j, e's stays below b_e + 1)."""
    r = moe.router
    if r.bias is None or r.grouped or r.scoring not in ("sigmoid", "softmax"):  # sqrt(softplus) is unbounded
        return []
    b = r.bias.load().double()
    out = []
    for e in range(len(b)):
        others = torch.cat([b[:e], b[e + 1 :]])
        if int((others >= b[e] + 1).sum()) >= r.top_k:
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------- merging
def expert_acts(X: torch.Tensor, e: SwiGLU, act=SILU) -> torch.Tensor:
    """[T, I]: an expert's activations (gate x up, after its biases and activation) on X [T, H], in X's dtype."""
    from ..runtime.moe import activate

    load = lambda t: t.load().to(X.dtype) if t is not None else None  # noqa: E731
    return activate(F.linear(X, load(e.gate), load(e.gate_bias)), F.linear(X, load(e.up), load(e.up_bias)), act)


def expert_out(X: torch.Tensor, e: SwiGLU, act=SILU) -> torch.Tensor:
    """[T, H]: one expert's output on X [T, H]."""
    return F.linear(expert_acts(X, e, act), e.down.load().to(X.dtype), e.down_bias.load().to(X.dtype) if e.down_bias is not None else None)


def expert_outputs(h: torch.Tensor, moe: MoE, dtype=torch.float32) -> torch.Tensor:
    """[E, T, H]: every expert applied to the same tokens h [T, H] (unweighted)."""
    return torch.stack([expert_out(h.to(dtype), e, moe.act) for e in moe.experts])


GROUPINGS = ("dominant", "hierarchical")
CENTRES = ("output", "frequency", "reap")  # the saliencies that may rank experts as cluster centres (grouping dominant)


def group_experts(features: torch.Tensor, n: int, rank: torch.Tensor, grouping: str = "dominant") -> list[list[int]]:
    """n clusters of experts: `dominant` (M-SMoE): the n experts of highest rank [E] (most used, or most routed output)
    are the centres, every other joins the centre whose outputs it is closest to (cosine); `hierarchical` (HC-SMoE):
    average-linkage clustering."""
    if grouping == "hierarchical":
        return cluster_experts(features, n)
    f = F.normalize(features.double().flatten(1), dim=-1)
    centres = sorted(rank.double().argsort(descending=True)[:n].tolist())
    clusters = {c: [c] for c in centres}
    for e in range(features.shape[0]):
        if e not in clusters:
            clusters[centres[int((f[centres] @ f[e]).argmax())]].append(e)
    return [sorted(c) for c in clusters.values()]


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


def _weighted(parts: list[Lazy | None], weights: list[float]) -> Lazy | None:
    if parts[0] is None:
        return None

    def load():
        out = None
        for p, w in zip(parts, weights):
            t = p.load().double() * w
            out = t if out is None else out + t
        return out.to(parts[0].dtype)

    return Lazy(parts[0].shape, parts[0].dtype, load)


def _ridge_fit(X: torch.Tensor, Y: torch.Tensor, ridge: float, intercept: bool, weights: torch.Tensor | None = None):
    """(W [out, in], b [out] | None) minimising sum_t w_t |X_t W^T + b - Y_t|^2 + ridge * mean(diag) |W|^2."""
    if intercept:
        X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1)
    if weights is not None:
        X, Y = X * weights.sqrt()[:, None], Y * weights.sqrt()[:, None]
    A = X.T @ X
    reg = torch.full((A.shape[0],), ridge * float(A.diagonal().mean()) + 1e-12, dtype=A.dtype)
    if intercept:
        reg[-1] = 0
    sol = torch.linalg.solve(A + torch.diag(reg), X.T @ Y).T  # [out, in(+1)]
    return (sol[:, :-1], sol[:, -1]) if intercept else (sol, None)


def select_neurons(moe: MoE, members: list[int], X: torch.Tensor, q: torch.Tensor, s: torch.Tensor, ridge: float) -> tuple[SwiGLU, float]:
    """One expert of the members' width from their neurons: the union holds every member's neurons; the ones that
    carry most of the cluster's output on X [T, H] are kept (each once), and down_proj (and its bias, where the
    experts have one) is refitted by least squares so that s(t) * merged(x_t) matches sum_i q_i(t) member_i(x_t):
    q [T, m] the members' weights per token, s [T] the merged expert's (0 where it is not chosen; every error
    counts times s). Works whether or not the members' neurons correspond (experts split from one dense FFN
    share none)."""
    on = s > 0
    if int(on.sum()) == 0:  # no token will reach it: the members' most used expert, as it is
        return moe.experts[members[int(q.sum(0).argmax())]], 0.0
    X, q, s = X[on], q[on], s[on]
    acts, downs, owner = [], [], []
    want = torch.zeros(X.shape[0], X.shape[1], dtype=torch.float64)
    for i, e in enumerate(members):
        expert = moe.experts[e]
        a = expert_acts(X, expert, moe.act)  # [T, I]
        d = expert.down.load().double()
        want += (q[:, i] / s)[:, None] * F.linear(a, d, expert.down_bias.load().double() if expert.down_bias is not None else None)
        acts.append(a)
        downs.append(d)
        owner.append(torch.full((a.shape[1],), i))
    A, D, owner = torch.cat(acts, 1), torch.cat(downs, 1), torch.cat(owner)  # [T, mI], [H, mI], [mI]
    share = (q / s[:, None])[:, owner]  # [T, mI] each neuron's weight in the mixture
    importance = ((A * share).pow(2) * s.pow(2)[:, None]).sum(0).sqrt() * D.norm(dim=0)  # [mI]
    I = moe.expert_width
    rows = torch.cat([torch.cat([moe.experts[e].gate.load(), moe.experts[e].up.load()], 1) for e in members])
    keep = distinct_top(importance, rows, I)
    biased = moe.experts[members[0]].biased
    d_new, b_new = _ridge_fit(A[:, keep], want, ridge, intercept=biased, weights=s.pow(2))
    fit = F.linear(A[:, keep], d_new, b_new)
    err = float(((fit - want) * s[:, None]).norm() / (want * s[:, None]).norm().clamp(min=1e-30))
    offsets = [0]
    for e in members:
        offsets.append(offsets[-1] + moe.experts[e].width)
    parts: dict[str, list] = {"gate": [], "up": [], "gate_bias": [], "up_bias": []}
    for i, e in enumerate(members):  # the kept neurons of each member, as one row selection per tensor
        mine = keep[(keep >= offsets[i]) & (keep < offsets[i + 1])] - offsets[i]
        if mine.numel():
            for name in parts:
                t = getattr(moe.experts[e], name)
                if t is not None:
                    parts[name].append(t.index_select(0, mine))
    # keep is sorted, so the members' neurons come in the order d_new's columns hold them
    dtype = moe.experts[members[0]].down.dtype
    new = SwiGLU(cat(parts["gate"]), cat(parts["up"]), Lazy.of(d_new.to(dtype).contiguous()))
    if biased:
        new.gate_bias, new.up_bias, new.down_bias = cat(parts["gate_bias"]), cat(parts["up_bias"]), Lazy.of(b_new.to(dtype).contiguous())
    return new, err


def merge_moe(moe: MoE, clusters: list[list[int]], freq: torch.Tensor, h: torch.Tensor, method: str = "frequency",
              ridge: float = 1e-3, router: str = "fit", ids: torch.Tensor | None = None,
              rank: torch.Tensor | None = None) -> tuple[MoE, dict]:
    """One expert per cluster (`select`: see select_neurons; `frequency`: the frequency-weighted average of its
    members' weights; `aligned`: that average with down_proj refitted to the members' frequency-weighted output on
    h [T, H]). The merged router row (and logit bias) is fitted so its logit tracks the cluster's routing mass on h
    (softmax: log-sum-exp of the members' logits; sigmoid: the logit of their summed scores), or (`router="centre"`)
    is the most used member's row, so routing among the kept experts is as before (as pruning keeps it); a selection
    bias is the centre's, or
    the frequency-weighted mean. A hash-routed layer (ids [T]: h's token ids) sends a token's merged experts to their
    cluster's expert (another, closest router row first, where the row already has it). A cluster's centre is its
    member of highest `rank` [E] (default: freq, the most used)."""
    rank = freq if rank is None else rank
    centres = [m[int(rank[m].argmax())] for m in clusters]  # each cluster's member of highest rank
    r = moe.router
    hashed = None
    if r.hash_table is not None:
        if router != "centre":
            raise ValueError("merging a hash-routed layer keeps the centres' router rows (grouping dominant)")
        near = closest_rows(r.weight, centres)
        cluster_of = {e: c for m, c in zip(clusters, centres) for e in m}
        hashed = remap_hash(r.hash_table, {c: [c] for c in centres},
                            {e: [cluster_of[e]] + [c for c in near[e] if c != cluster_of[e]] for e in near})
        hashed = Lazy.of(hashed.load())  # once: routed below and written later ([V, k] ints, a few MB)
    table = r.hash_table.load().long() if r.hash_table is not None else None
    W = r.weight.load().double()  # [E, H]
    X = h.double()  # [T, H]
    lb = r.logit_bias.load().double() if r.logit_bias is not None else None
    logits = F.linear(X, W, lb)  # [T, E]
    rows, row_biases, experts, members_of = [], [], [], []
    errors = []
    routed_before = routed_after = None
    if method == "select":  # who gets which weight, before and (router="centre") after the merge
        from ..runtime.moe import route

        E, T = W.shape[0], X.shape[0]
        sel = r.bias.load().float() if r.bias is not None else None
        idx, w = route(X.float(), r, W.float(), sel, lb.float() if lb is not None else None, ids, table)
        routed_before = torch.zeros(T, E, dtype=torch.float64).scatter_(1, idx, w.double())  # [T, E]
        if router == "centre":
            idx, w = route(X.float(), r, W[centres].float(), sel[centres] if sel is not None else None,
                           lb[centres].float() if lb is not None else None,
                           ids, hashed.load().long() if hashed is not None else None)  # Lazy.of: no recomputation
            routed_after = torch.zeros(T, len(centres), dtype=torch.float64).scatter_(1, idx, w.double())  # [T, clusters]
    for c, members in enumerate(clusters):
        p = freq[members].double()
        p = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1 / len(members))
        members_of.append(members)
        if len(members) == 1:
            rows.append(W[members[0]])
            row_biases.append(lb[members[0]] if lb is not None else None)
            experts.append(moe.experts[members[0]])
            continue
        centre = centres[c]
        if router == "centre":
            rows.append(W[centre])
            row_biases.append(lb[centre] if lb is not None else None)
        else:
            if r.scoring == "softmax":
                target = torch.logsumexp(logits[:, members], dim=-1)  # [T]
            else:
                s = torch.sigmoid(logits[:, members]).sum(-1).clamp(1e-6, 1 - 1e-6)
                target = torch.log(s / (1 - s))
            row, row_bias = _ridge_fit(X, target[:, None], ridge, intercept=lb is not None)
            rows.append(row[0])
            row_biases.append(row_bias[0] if row_bias is not None else None)
        if method == "select":
            if routed_after is not None:  # the members' routed output, on the tokens the merged expert will get
                q, s = routed_before[:, members], routed_after[:, c]
            else:  # the members' routing probabilities; the cluster's mass goes to the merged expert (fitted row)
                probs = logits.softmax(-1) if r.scoring == "softmax" else logits.sigmoid()
                q = probs[:, members]
                s = q.sum(-1)
            expert, err = select_neurons(moe, members, X, q, s, ridge)
            experts.append(expert)
            errors.append(err)
            continue
        ws = p.tolist()
        merged = SwiGLU(*(_weighted([getattr(moe.experts[e], name) for e in members], ws) for name in ("gate", "up", "down")))
        merged.gate_bias, merged.up_bias, merged.down_bias = (_weighted([getattr(moe.experts[e], n) for e in members], ws)
                                                              for n in ("gate_bias", "up_bias", "down_bias"))
        if method == "aligned":  # down_proj fitted so the merged output matches the members' weighted output on h
            want = sum(w * expert_out(X, moe.experts[e], moe.act) for w, e in zip(ws, members))  # [T, H]
            a = expert_acts(X, merged, moe.act)  # [T, I]
            d_new, b_new = _ridge_fit(a, want, ridge, intercept=merged.down_bias is not None)
            errors.append(float((F.linear(a, d_new, b_new) - want).norm() / want.norm().clamp(min=1e-30)))
            merged.down = Lazy.of(d_new.to(moe.experts[members[0]].down.dtype))
            if b_new is not None:
                merged.down_bias = Lazy.of(b_new.to(moe.experts[members[0]].down.dtype))
        experts.append(merged)
    weight = torch.stack(rows).to(r.weight.dtype)
    bias = None
    if r.bias is not None:
        b = r.bias.load().double()
        if router == "centre":
            bias = Lazy.of(torch.stack([b[c] for c in centres]).to(r.bias.dtype))
        else:
            bias = Lazy.of(torch.stack([(b[m] * (freq[m].double() / freq[m].double().sum().clamp(min=1e-30))).sum() if len(m) > 1 else b[m[0]]
                                        for m in members_of]).to(r.bias.dtype))
    logit_bias = Lazy.of(torch.stack(row_biases).to(r.logit_bias.dtype)) if lb is not None else None
    router = replace(r, weight=Lazy.of(weight), bias=bias, logit_bias=logit_bias, hash_table=hashed)
    return replace(moe, router=router, experts=experts), {"clusters": clusters, "aligned_rel_err": errors}
