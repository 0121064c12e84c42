"""Few-row matmuls on CPU at the memory bandwidth.

MKL runs x @ W.T with one row (a decode step) as a GEMV on a single thread, whatever torch's thread
count: about 17 GB/s on the 2-core EPYC of BENCHMARKS.md, where a 2-thread read streams 33 GB/s.
Viewing W [N, K] as P blocks of rows and multiplying them as one batch (torch.bmm parallelises over
the batch with its own OpenMP threads) streams W on every core: about 2x for one row, on par or
better than MKL for up to 8 rows. Elsewhere (more rows, CUDA, one thread, small or odd-shaped
weights) this is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 8  # up to this many rows x @ W.T is GEMV-like
BLOCKS = 8  # row blocks of W, one bmm batch entry each
MIN_BYTES = 256 * 1024  # smaller weights stay in cache: nothing to win


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    N = weight.shape[0]
    return (
        x.device.type == "cpu"
        and torch.get_num_threads() > 1
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and N % BLOCKS == 0
        and weight.is_contiguous()
        and weight.nbytes >= MIN_BYTES
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., K], weight [N, K], bias [N]) -> [..., N]."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    return row_blocks(x, weight, bias)


def row_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) as a bmm over BLOCKS row blocks of weight; the caller checked `applies`."""
    N, K = weight.shape
    rows = x.numel() // K
    xt = x.reshape(rows, K).T.expand(BLOCKS, K, rows)  # [P, K, R] (a view)
    out = torch.bmm(weight.view(BLOCKS, N // BLOCKS, K), xt)  # [P, N/P, R]
    out = out.permute(2, 0, 1).reshape(*x.shape[:-1], N)  # [..., N]
    return out if bias is None else out + bias
