"""The `triton` backend: the padded per-expert layout (pure torch, runs everywhere) and the kernels
(CUDA only) against the float64 reference, on shapes that are not multiples of any tile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moesurgery.runtime.moe import moe_forward, triton_available
from moesurgery.runtime.triton_moe import align, block_m_for
from tests.test_backends import TOL, make_moe, reference, rel_err

CUDA = torch.cuda.is_available() and triton_available("cuda")


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 300), E=st.integers(1, 70), k=st.integers(1, 8), block_m=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 9))
def test_align_pads_each_expert_to_whole_blocks(T, E, k, block_m, seed):
    k = min(k, E)
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct per token
    flat = idx.flatten()
    pair, block_expert = align(flat, E, block_m)
    assert pair.numel() == block_expert.numel() * block_m
    valid = pair >= 0
    assert sorted(pair[valid].tolist()) == list(range(T * k))  # every pair exactly once
    blocks = pair.view(-1, block_m)  # [nblocks, block_m]
    for b, e in enumerate(block_expert.tolist()):
        rows = blocks[b][blocks[b] >= 0]
        if e < 0:
            assert rows.numel() == 0  # blocks past the end are empty
        else:
            assert rows.numel() > 0 and (flat[rows.long()] == e).all()  # one expert per block
    used = block_expert[block_expert >= 0]
    counts = torch.bincount(flat, minlength=E)
    assert used.numel() == int(((counts + block_m - 1) // block_m).sum())


def test_block_m_grows_with_rows_per_expert():
    assert block_m_for(2, 8) == 16 and block_m_for(16 * 64, 64) == 16
    assert block_m_for(8192, 8) == 128 and block_m_for(4096 * 16, 64) == 128


def test_unavailable_without_cuda_says_so():
    if CUDA:
        pytest.skip("a CUDA device with Triton is present")
    m = make_moe()
    with pytest.raises(RuntimeError, match="triton"):
        moe_forward(torch.randn(3, 32), m, "triton")


@pytest.mark.skipif(not CUDA, reason="no CUDA device with Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,k,H,I", [(8, 2, 96, 40), (64, 16, 128, 24), (60, 4, 72, 136)])
@pytest.mark.parametrize("T", [1, 3, 17, 200])
def test_cuda_triton_matches_reference(dtype, E, k, H, I, T):
    m = make_moe(E=E, k=k, H=H, I=I, shared=1, dtype=dtype, device="cuda", seed=T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to("cuda", dtype)
    tol = TOL.get(dtype, 3e-2) if dtype != torch.float32 else 1e-5
    assert rel_err(moe_forward(x, m, "triton"), reference(x, m)) < tol


@pytest.mark.skipif(not CUDA, reason="no CUDA device with Triton")
def test_cuda_triton_in_a_cuda_graph():
    """No host sync: the whole MoE block captures into a CUDA graph and replays on new inputs."""
    m = make_moe(E=64, k=8, H=128, I=64, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 128, device="cuda", dtype=torch.bfloat16)
    moe_forward(x, m, "triton")  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_forward(x, m, "triton")
    x.copy_(torch.randn(4, 128, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    assert rel_err(out, reference(x, m)) < TOL[torch.bfloat16]


@pytest.mark.skipif(not CUDA, reason="no CUDA device with Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_swiglu_and_gather_sum(dtype):
    """The grouped-GEMM path's fused elementwise kernels against the unfused torch ops."""
    from moesurgery.runtime.triton_moe import gather_sum, swiglu_scale

    g = torch.Generator(device="cuda").manual_seed(0)
    N, I = 37, 1100
    gu, ws = torch.randn(N, 2 * I, device="cuda", generator=g).to(dtype), torch.rand(N, device="cuda", generator=g).to(dtype)
    want = (torch.nn.functional.silu(gu[:, :I].float()) * gu[:, I:].float() * ws[:, None].float()).to(dtype)
    torch.testing.assert_close(swiglu_scale(gu, ws), want)
    T, k, H = 7, 4, 1500
    ys, order = torch.randn(T * k, H, device="cuda", generator=g).to(dtype), torch.randperm(T * k, device="cuda", generator=g)
    buf = torch.empty_like(ys).index_copy_(0, order, ys)
    torch.testing.assert_close(gather_sum(ys, order, T, k), buf.float().view(T, k, H).sum(1).to(dtype))
