"""Partitions of FFN neurons into equal-size groups, each neuron used exactly once.

contiguous | random (seeded) | kmeans (balanced clusters of normalised gate/up rows) |
coactivation (balanced clusters of activation patterns on calibration tokens), plus the choice of
always-on (shared) neurons by activation frequency (CMoE).
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
    assignment = torch.full((W,), -1, dtype=torch.long)
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
    return assignment


def balanced_kmeans(features: torch.Tensor, n: int, iters: int = 10, seed: int = 0) -> list[torch.Tensor]:
    """Balanced spherical k-means: features [W, D] -> n groups of W/n row indices."""
    W = features.shape[0]
    x = F.normalize(features.float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(W, generator=gen)[:n]].clone()  # [n, D]
    assignment = None
    for _ in range(iters):
        new = balanced_assign(x @ centroids.T, W // n)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        for c in range(n):
            members = x[assignment == c]
            centroids[c] = F.normalize(members.mean(0), dim=0) if len(members) else centroids[c]
    return [torch.nonzero(assignment == c).flatten() for c in range(n)]


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
    else:
        raise ValueError(f"unknown partition method {method!r} (have {', '.join(METHODS)})")
    return [neurons[g].sort().values for g in groups]
