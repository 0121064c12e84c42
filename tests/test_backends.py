"""MoE dispatch backends (loop, sorted, batched, auto, grouped, segments) against a per-token
float64 reference of the MoE math, and against each other."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moesurgery.canonical import Router
from moesurgery.lazy import Lazy
from moesurgery.model_io import open_model
from moesurgery.runtime import Runtime
from moesurgery.runtime.moe import (
    BACKEND_NAMES,
    BACKENDS,
    MoEWeights,
    SwiGLUWeights,
    choose_backend,
    grouped_mm_available,
    moe_forward,
    route,
    triton_available,
)

CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


pytestmark = pytest.mark.usefixtures("one_thread")


def backends_here(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    usable = {"grouped": grouped_mm_available(torch.device(device), dtype), "triton": triton_available(device)}
    return [b for b in BACKEND_NAMES if usable.get(b, True)]


def make_moe(E=8, k=2, H=32, I=24, shared=0, shared_gate=False, scoring="softmax", renormalize=True, groups=1, bias=False,
             scaling=1.0, seed=0, dtype=torch.float32, device="cpu") -> MoEWeights:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return (torch.randn(shape, generator=g) * std).to(device, dtype)

    router = Router(Lazy.zeros((E, H), dtype), top_k=k, scoring=scoring, renormalize=renormalize, scaling=scaling,
                    n_group=groups, topk_group=max(1, groups // 2))
    return MoEWeights(
        router=router,
        router_weight=r(E, H, std=0.5),
        bias=(torch.randn(E, generator=g) * 0.1).to(device) if bias else None,
        gate_up=r(E, 2 * I, H),
        down=r(E, H, I),
        shared=SwiGLUWeights(r(shared, H), r(shared, H), r(H, shared)) if shared else None,
        shared_gate=r(1, H) if shared_gate else None,
    )


def reference(x: torch.Tensor, m: MoEWeights) -> torch.Tensor:
    """Token by token, slot by slot, in float64: sum_j w[t, j] * expert_idx[t, j](x[t]) (+ shared)."""
    idx, w = route(x, m.router, m.router_weight, m.bias)
    xd, gu, dn = x.double(), m.gate_up.double(), m.down.double()
    I = dn.shape[-1]
    out = torch.zeros_like(xd)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            a = gu[e] @ xd[t]
            out[t] += w[t, j].double() * (dn[e] @ (torch.nn.functional.silu(a[:I]) * a[I:]))
    if m.shared is not None:
        s = SwiGLUWeights(m.shared.gate.double(), m.shared.up.double(), m.shared.down.double())(xd)
        if m.shared_gate is not None:
            s = torch.sigmoid(xd @ m.shared_gate.double().T) * s
        out += s
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


CASES = {
    "mixtral": dict(E=8, k=2),
    "fine": dict(E=64, k=16, I=8),
    "qwen2moe": dict(E=16, k=4, shared=48, shared_gate=True, renormalize=False),
    "deepseek-v3": dict(E=16, k=4, shared=24, scoring="sigmoid", groups=4, bias=True, scaling=2.5),
    "top1": dict(E=4, k=1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("backend", backends_here())
def test_backend_matches_reference(case, T, backend):
    m = make_moe(**CASES[case])
    x = torch.randn(T, m.gate_up.shape[-1], generator=torch.Generator().manual_seed(T))
    assert rel_err(moe_forward(x, m, backend), reference(x, m)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", backends_here("cpu", torch.bfloat16))
def test_backends_bf16(backend):
    m = make_moe(E=16, k=4, dtype=torch.bfloat16)
    x = torch.randn(33, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert rel_err(moe_forward(x, m, backend), reference(x, m)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("chain_bytes", [0, 2**40])
@pytest.mark.parametrize("weight_major_rows", [0, 2**20])
def test_sorted_cpu_paths(monkeypatch, chain_bytes, weight_major_rows):
    """Both CPU segment strategies (whole batch / per-segment chain) in both matmul orientations."""
    import moesurgery.runtime.moe as moe

    monkeypatch.setattr(moe, "CHAIN_BYTES", chain_bytes)
    monkeypatch.setattr(moe, "WEIGHT_MAJOR_ROWS", weight_major_rows)
    for case in ("mixtral", "fine", "qwen2moe"):
        m = make_moe(**CASES[case])
        for T in (1, 7, 64):
            x = torch.randn(T, 32, generator=torch.Generator().manual_seed(T))
            assert rel_err(moe_forward(x, m, "segments"), reference(x, m)) < 1e-5, (case, T)


def test_unused_experts_and_uneven_segments():
    """Every token to the same two experts: one long segment, the others empty."""
    m = make_moe(E=8, k=2)
    m.router_weight.zero_()
    m.router_weight[3] = 5.0
    m.router_weight[6] = 4.0
    x = torch.rand(50, 32) + 0.1  # positive: experts 3 and 6 win every token
    want = reference(x, m)
    for backend in backends_here():
        out, idx = moe_forward(x, m, backend, return_routing=True)
        assert set(idx.flatten().tolist()) == {3, 6}
        assert rel_err(out, want) < 1e-5, backend


def test_leading_dims_and_routing_returned():
    m = make_moe()
    x = torch.randn(2, 5, 32)
    want, want_idx = moe_forward(x, m, "loop", return_routing=True)
    for backend in backends_here():
        got, idx = moe_forward(x, m, backend, return_routing=True)
        assert got.shape == x.shape and torch.equal(idx, want_idx)
        assert rel_err(got, want) < 1e-5


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown MoE backend"):
        moe_forward(torch.randn(2, 32), make_moe(), "fast")


def test_auto_choice():
    m = make_moe()
    assert choose_backend(1, 2, m.gate_up, m.down) == "sorted"  # CPU: gathering weights never pays
    assert choose_backend(4096, 2, m.gate_up, m.down) == "sorted"
    assert set(BACKENDS) >= {"loop", "sorted", "batched", "auto"}


def test_grouped_probe_is_cached_and_boolean():
    a = grouped_mm_available(torch.device("cpu"), torch.float32)
    assert isinstance(a, bool) and grouped_mm_available(torch.device("cpu"), torch.float32) is a


@settings(max_examples=25, deadline=None)
@given(
    E=st.sampled_from([2, 4, 8, 32]),
    k_frac=st.floats(0.0, 1.0),
    T=st.integers(1, 24),
    I=st.sampled_from([4, 16]),
    seed=st.integers(0, 2**16),
)
def test_backends_agree_property(E, k_frac, T, I, seed):
    k = max(1, round(k_frac * E))
    m = make_moe(E=E, k=k, I=I, seed=seed)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(seed))
    want = reference(x, m)
    for backend in backends_here():
        assert rel_err(moe_forward(x, m, backend), want) < 1e-5, backend


@pytest.mark.parametrize("backend", ["sorted", "batched", "auto"])
def test_runtime_backends_agree(checkpoint, input_ids, backend):
    model = open_model(checkpoint("qwen2_moe")).model
    a = Runtime(model, backend=backend, resident=True).forward(input_ids)
    b = Runtime(model, backend="loop", resident=True).forward(input_ids)
    assert rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 8, 300])
def test_cuda_backends_match_reference(dtype, T):
    m = make_moe(E=64, k=8, H=128, I=64, dtype=dtype, device="cuda")
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(T)).to("cuda", dtype)
    want = reference(x, m)
    for backend in backends_here("cuda", dtype):
        assert rel_err(moe_forward(x, m, backend), want) < TOL[dtype], backend


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_auto_picks_batched_for_a_handful_of_small_pairs():
    m = make_moe(E=8, k=2, device="cuda")
    assert choose_backend(1, 2, m.gate_up, m.down) == "batched"
    assert choose_backend(64, 2, m.gate_up, m.down) == ("triton" if triton_available("cuda") else "sorted")
    assert choose_backend(256, 2, m.gate_up, m.down) == "sorted"  # 64 pairs per expert: grouped GEMM
