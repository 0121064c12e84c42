"""Partitions of FFN neurons into equal-size groups, each neuron used exactly once.

contiguous | random (seeded) | kmeans (balanced clusters of normalised gate/up rows) |
coactivation (balanced clusters of activation patterns on calibration tokens, CMoE; then, given the
neurons' activation mass and top-k, refined so each token's top-k experts carry as much of its mass
as possible, see `refine_by_mass`), plus the choice of always-on (shared) neurons by activation
frequency (CMoE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("contiguous", "random", "kmeans", "coactivation")


def contiguous(width: int, n: int) -> list[torch.Tensor]:
    size = width // n
    return [torch.arange(i * size, (i + 1) * size) for i in range(n)]


def random_partition(width: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in perm.view(n, width // n)]


def balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row (item) to one column (cluster), at most `capacity` per cluster, greedily by
    descending similarity. sim [W, N] -> assignment [W]."""
    W, N = sim.shape
    order = sim.flatten().argsort(descending=True)
    assignment = [-1] * W  # plain lists: per-element tensor indexing would dominate the loop
    load = [0] * N
    remaining = W
    items, clusters = (order // N).tolist(), (order % N).tolist()
    for i, c in zip(items, clusters):
        if assignment[i] < 0 and load[c] < capacity:
            assignment[i] = c
            load[c] += 1
            remaining -= 1
            if remaining == 0:
                break
    return torch.tensor(assignment, dtype=torch.long)


def balanced_kmeans(features: torch.Tensor, n: int, iters: int = 10, seed: int = 0) -> list[torch.Tensor]:
    """Balanced spherical k-means: features [W, D] -> n groups of W/n row indices."""
    W = features.shape[0]
    x = F.normalize(features.float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(W, generator=gen)[:n]].clone()  # [n, D]
    assignment = None
    for _ in range(iters):
        new = balanced_assign(x @ centroids.T, -(-W // n))
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        sums = F.one_hot(assignment, n).to(x.dtype).T @ x  # [n, D]
        centroids = torch.where(sums.abs().sum(-1, keepdim=True) > 0, F.normalize(sums, dim=-1), centroids)
    return [torch.nonzero(assignment == c).flatten() for c in range(n)]


def refine_by_mass(groups: list[torch.Tensor], mass: torch.Tensor, top_k: int, iters: int = 10) -> list[torch.Tensor]:
    """Local search for the partition an oracle top-k router serves best.

    mass [T, W] >= 0: what each neuron contributes per token (e.g. |activation| x |down column|);
    groups: equal-size groups of neuron ids (columns of `mass`). Alternates (i) every token picks the
    top_k groups carrying the most of its mass, (ii) every neuron moves to the group whose chosen
    tokens it gives the most mass (balanced: equal sizes kept), until nothing moves. Step (ii)
    maximises the captured mass for fixed choices, so it is k-means-like with token sets as centroids.
    """
    n = len(groups)
    if top_k >= n or n == 1:
        return groups
    neurons = torch.cat(groups)
    m = mass[:, neurons].float()  # [T, W']
    assignment = torch.repeat_interleave(torch.arange(n), torch.tensor([len(g) for g in groups]))
    for _ in range(iters):
        em = m @ F.one_hot(assignment, n).to(m.dtype)  # [T, n] mass per group
        chosen = torch.zeros_like(em).scatter_(1, em.topk(top_k, dim=-1).indices, 1.0)
        new = balanced_assign(m.T @ chosen, len(neurons) // n)  # [W', n]: mass on the tokens choosing each group
        if torch.equal(new, assignment):
            break
        assignment = new
    return [neurons[assignment == c] for c in range(n)]


def active_mask(activations: torch.Tensor, per_token: int) -> torch.Tensor:
    """CMoE: a neuron is active for a token when its |activation| is in the token's top `per_token`.
    activations [T, W] -> bool [T, W]."""
    k = min(per_token, activations.shape[1])
    top = activations.abs().topk(k, dim=-1).indices
    return torch.zeros_like(activations, dtype=torch.bool).scatter_(1, top, True)


def shared_by_frequency(active: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` neurons active for the most tokens (sorted indices)."""
    freq = active.float().mean(0)  # [W]
    return freq.topk(count).indices.sort().values


def partition(
    method: str,
    neurons: torch.Tensor,  # [W'] the neuron ids to partition
    n: int,
    *,
    gate: torch.Tensor | None = None,  # [W, H]
    up: torch.Tensor | None = None,
    active: torch.Tensor | None = None,  # [T, W] bool, calibration
    seed: int = 0,
    mass: torch.Tensor | None = None,  # [T, W] >= 0, calibration: coactivation refines with it ...
    top_k: int | None = None,  # ... for this many routed experts per token
) -> list[torch.Tensor]:
    """Split `neurons` into n equal groups by `method`; returns groups of neuron ids."""
    W = neurons.numel()
    if W % n:
        raise ValueError(f"{W} neurons do not split into {n} equal experts")
    if method == "contiguous":
        groups = contiguous(W, n)
    elif method == "random":
        groups = random_partition(W, n, seed)
    elif method == "kmeans":
        feats = torch.cat([F.normalize(gate[neurons].float(), dim=-1), F.normalize(up[neurons].float(), dim=-1)], dim=-1)
        groups = balanced_kmeans(feats, n, seed=seed)
    elif method == "coactivation":
        if active is None:
            raise ValueError("coactivation needs calibration activations")
        groups = balanced_kmeans(active[:, neurons].T.float(), n, seed=seed)
        if mass is not None and top_k is not None:
            groups = refine_by_mass(groups, mass[:, neurons], top_k)
    else:
        raise ValueError(f"unknown partition method {method!r} (have {', '.join(METHODS)})")
    return [neurons[g].sort().values for g in groups]
