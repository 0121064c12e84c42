"""benchmarks/expert_bound.py's simulated MoE: exact when every expert runs, and the oracle runs the experts of most mass."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from expert_bound import expert_moe  # noqa: E402
from moesurgery.runtime.moe import SwiGLUWeights  # noqa: E402
from moesurgery.surgery.moefy import activations, expert_mass  # noqa: E402
from moesurgery.surgery.partition import random_partition  # noqa: E402


def _ffn(H: int, W: int, seed: int) -> SwiGLUWeights:
    g = torch.Generator().manual_seed(seed)
    return SwiGLUWeights(torch.randn(W, H, generator=g), torch.randn(W, H, generator=g), torch.randn(H, W, generator=g))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 3), st.integers(0, 10**6))
def test_every_expert_on_is_the_dense_ffn(n, width, shared_experts, seed):
    W, H = (n + shared_experts) * width, 8
    w = _ffn(H, W, seed)
    shared = torch.arange(shared_experts * width)
    groups = [g + len(shared) for g in random_partition(n * width, n, seed)]
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(seed + 1))
    rows = torch.randn(n, H)
    for router in (None, rows):  # oracle, or a linear router: with k = n both run everything
        torch.testing.assert_close(expert_moe(shared, groups, n, router)(x, w), w(x))


def test_oracle_runs_the_experts_of_most_mass():
    H, n, width, k = 6, 5, 3, 2
    w = _ffn(H, n * width, 0)
    groups = random_partition(n * width, n, 1)
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(2))
    act = activations(x, w.gate, w.up)  # [T, W]
    best = expert_mass(act, groups).topk(k, dim=-1).indices  # [T, k]
    keep = torch.zeros_like(act)
    for t in range(x.shape[0]):
        for e in best[t].tolist():
            keep[t, groups[e]] = 1.0
    torch.testing.assert_close(expert_moe(torch.tensor([], dtype=torch.long), groups, k, None)(x, w), (act * keep) @ w.down.T)
