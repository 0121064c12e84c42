"""Few-row CPU matmuls as a batch of W's row blocks compute what F.linear computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moesurgery.runtime import cpu_gemv
from moesurgery.runtime.moe import moe_forward
from tests.test_backends import make_moe, reference, rel_err


@pytest.fixture
def small_weights_too(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "MIN_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (2, 4, 64), (8, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(small_weights_too, shape, bias):
    g = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(shape, generator=g), torch.randn(296, 64, generator=g)
    b = torch.randn(296, generator=g) if bias else None
    assert cpu_gemv.applies(x, w)
    torch.testing.assert_close(cpu_gemv.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x,w",
    [
        (torch.randn(9, 64), torch.randn(296, 64)),  # too many rows
        (torch.randn(1, 64), torch.randn(297, 64)),  # rows not divisible into blocks
        (torch.randn(1, 64), torch.randn(64, 296).T),  # not contiguous
    ],
    ids=["rows", "odd", "strided"],
)
def test_other_shapes_go_to_torch(small_weights_too, x, w):
    assert not cpu_gemv.applies(x, w)
    torch.testing.assert_close(cpu_gemv.linear(x, w), F.linear(x, w))


def test_one_thread_and_small_weights_go_to_torch(monkeypatch):
    x, w = torch.randn(1, 64), torch.randn(296, 64)
    assert not cpu_gemv.applies(x, w)  # 75 KB < MIN_BYTES
    monkeypatch.setattr(cpu_gemv, "MIN_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not cpu_gemv.applies(x, w)


@pytest.mark.parametrize("T", [1, 4, 16])
@pytest.mark.parametrize("case", [dict(E=8, k=2), dict(E=64, k=16, I=8), dict(E=16, k=4, shared=48, shared_gate=True)])
def test_moe_block_with_row_blocks_matches_reference(small_weights_too, T, case):
    m = make_moe(**case)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(T))
    for backend in ("sorted", "auto", "segments"):
        assert rel_err(moe_forward(x, m, backend), reference(x, m)) < 1e-5
