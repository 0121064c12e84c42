"""Fused MoE expert GEMMs in Triton (CUDA), the `triton` dispatch backend.

Two kernels over the (token, slot) pairs sorted by expert and padded per expert to BLOCK_M rows
(the layout of vLLM's fused_moe), no host sync, so a decode step can be captured in a CUDA graph:

    gate_up: h[p]  = silu(x[t] @ gate[e].T) * (x[t] @ up[e].T) * w[t, j]    # [Mp, I], fp32 accumulate
    down:    y[q]  = h[p] @ down[e].T                                       # [T*k, H], row q = t*k + j
    out          = y.view(T, k, H).sum(1)                                   # [T, H]

Each program computes a [BLOCK_M, BLOCK_N] tile for one expert: the weights it reads are read
once per BLOCK_M rows of that expert, so a decode step reads each touched expert's bytes once, the
bandwidth floor. gate and up tiles share the x tile and SwiGLU runs in registers (no [T*k, 2I]
intermediate). Tile sizes come from `tiles` (a heuristic; no autotuning).

Also here: `swiglu_scale` and `gather_sum`, one-pass elementwise kernels that the grouped-GEMM path
(`moe.experts_sorted` on CUDA) uses around torch's `_grouped_mm` instead of four passes for
SwiGLU x routing weight and a scatter + sum for the combine.
"""

from __future__ import annotations

import os

import torch

from .moe import expert_counts

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the backend reports itself unavailable
    triton = None

SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of pipelined tiles per program (H100/A100 allow ~227 KB)


def tiles(block_m: int, swiglu: bool, element_size: int) -> dict:
    """Tile sizes and pipeline depth for one launch (no autotuning: it costs seconds per shape).

    Few rows per expert (decode): narrow N tiles and long K steps, many programs streaming weights;
    many rows (prefill): 128-wide N tiles for tensor-core reuse. Stages fill the shared-memory budget.
    MOESURGERY_TRITON_TILE="BLOCK_N,BLOCK_K,num_warps,num_stages" overrides (for tuning sweeps)."""
    override = os.environ.get("MOESURGERY_TRITON_TILE")
    if override:
        n, k, warps, stages = (int(v) for v in override.split(","))
        return {"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}
    n, k, warps = (64, 128, 4) if block_m <= 32 else (128, 64, 8)
    per_stage = (block_m * k + (2 if swiglu else 1) * k * n) * element_size
    return {"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": max(1, min(4, SHARED_MEMORY_BUDGET // per_stage))}


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton.jit when it decorates


def available(device: torch.device | str) -> bool:
    """Triton importable and a CUDA device (or Triton's CPU interpreter, for tests)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or _INTERPRET


if triton is not None:

    @triton.jit
    def _moe_gemm(
        a_ptr, w_ptr, out_ptr, pair_ptr, block_expert_ptr, route_w_ptr,
        N, K, up_offset,
        stride_am, stride_we, stride_wn, stride_om,
        top_k, SWIGLU: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m)
        if e < 0:  # past the last padded block
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of the padded layout
        pair = tl.load(pair_ptr + offs_m)  # [BM] pair id t*k + j, -1 for padding
        valid = pair >= 0
        if SWIGLU:
            a_row = pair // top_k  # token of each pair
        else:
            a_row = offs_m  # h is in padded order
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_row[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BM, BK]
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:  # fp32 weights: full fp32 products, not tf32
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
            if SWIGLU:
                wu = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if IEEE:
                    acc_up = tl.dot(a, wu, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(a, wu, acc_up)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SWIGLU:
            rw = tl.load(route_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # [BM]
            result = acc * tl.sigmoid(acc) * acc_up * rw[:, None]
            out_row = offs_m
        else:
            result = acc
            out_row = pair
        out_ptrs = out_ptr + out_row[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])



def _launch(nblocks: int, n: int, *args, SWIGLU: bool, BLOCK_M: int, **kwargs) -> None:
    if _INTERPRET:  # Triton's CPU interpreter (tests): small tiles
        t = {"BLOCK_N": 32, "BLOCK_K": 32}
    else:
        t = tiles(BLOCK_M, SWIGLU, args[0].element_size())
    _moe_gemm[(nblocks, triton.cdiv(n, t["BLOCK_N"]))](*args, SWIGLU=SWIGLU, BLOCK_M=BLOCK_M, **kwargs, **t)


if triton is not None:

    @triton.jit
    def _swiglu_scale(gu_ptr, ws_ptr, h_ptr, I, BLOCK: tl.constexpr):
        """h[r] = silu(gu[r, :I]) * gu[r, I:] * ws[r], in fp32, one rounding."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < I
        g = tl.load(gu_ptr + row * 2 * I + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * I + I + offs, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(ws_ptr + row).to(tl.float32)
        tl.store(h_ptr + row * I + offs, (g * tl.sigmoid(g) * u * w).to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gather_sum(ys_ptr, pos_ptr, out_ptr, H, top_k, BLOCK: tl.constexpr):
        """out[t] = sum_j ys[pos[t*k + j]], accumulated in fp32."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, top_k):
            r = tl.load(pos_ptr + t * top_k + j).to(tl.int64)
            acc += tl.load(ys_ptr + r * H + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


ELEMENTWISE_BLOCK = 1024


def swiglu_scale(gu: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """gu [N, 2I] (gate | up), ws [N] -> silu(gate) * up * ws [N, I]: one pass instead of four."""
    N, I = gu.shape[0], gu.shape[1] // 2
    h = gu.new_empty(N, I)
    _swiglu_scale[(N, triton.cdiv(I, ELEMENTWISE_BLOCK))](gu, ws.contiguous(), h, I, BLOCK=ELEMENTWISE_BLOCK)
    return h


def gather_sum(ys: torch.Tensor, order: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """ys [N, H] in sorted order (row i is pair order[i]) -> [T, H], the sum over each token's k pairs:
    one read of ys instead of a scatter into pair order and a sum."""
    N, H = ys.shape
    pos = torch.empty_like(order)
    pos[order] = torch.arange(N, device=order.device)  # [N] sorted row of each pair
    out = ys.new_empty(T, H)
    _gather_sum[(T, triton.cdiv(H, ELEMENTWISE_BLOCK))](ys, pos, out, H, k, BLOCK=ELEMENTWISE_BLOCK)
    return out


def block_m_for(pairs: int, experts: int) -> int:
    """Rows per tile: about the mean rows per expert, 16 (tl.dot's minimum) to 128."""
    mean = pairs / max(experts, 1)
    for bm in (16, 32, 64):
        if mean <= bm:
            return bm
    return 128


def align(flat: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to a multiple of block_m; on the device.

    flat [N] expert of each pair -> pair [nblocks * block_m] (pair id or -1), block_expert [nblocks]
    (expert of each block, -1 past the end). nblocks is an upper bound known on the host
    (cdiv(N, block_m) + min(E, N)), so nothing waits for the device."""
    N = flat.numel()
    order = flat.argsort(stable=True)  # [N]
    counts = expert_counts(flat, experts)  # [E], no host sync
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    pad_start = padded.cumsum(0) - padded  # [E]
    sort_start = counts.cumsum(0) - counts  # [E]
    sorted_expert = flat.index_select(0, order)  # [N]
    pos = pad_start[sorted_expert] + torch.arange(N, device=flat.device) - sort_start[sorted_expert]  # [N]
    nblocks = -(-N // block_m) + min(experts, N)
    pair = torch.full((nblocks * block_m,), -1, dtype=torch.int32, device=flat.device)
    pair[pos] = order.to(torch.int32)
    block_expert = torch.full((nblocks,), -1, dtype=torch.int32, device=flat.device)
    block_expert[pos // block_m] = sorted_expert.to(torch.int32)
    return pair, block_expert


def experts_triton(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """x [T, H], idx/w [T, k], gate_up [E, 2I, H], down [E, H, I] -> [T, H]."""
    if not available(x.device):
        raise RuntimeError("the triton backend needs Triton and a CUDA device")
    T, k = idx.shape
    E, H, I = down.shape
    N = T * k
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    bm = block_m_for(N, E)
    ieee = x.dtype == torch.float32
    pair, block_expert = align(idx.flatten(), E, bm)
    route_w = w.reshape(-1).contiguous()  # [N]
    nblocks = block_expert.numel()
    h = x.new_empty(nblocks * bm, I)  # [Mp, I] padded order
    _launch(
        nblocks, I, x, gate_up, h, pair, block_expert, route_w, I, H, I,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0), k,
        SWIGLU=True, IEEE=ieee, BLOCK_M=bm,
    )
    ys = x.new_empty(N, H)  # [T*k, H] pair order
    _launch(
        nblocks, H, h, down, ys, pair, block_expert, route_w, H, I, 0,
        h.stride(0), down.stride(0), down.stride(1), ys.stride(0), k,
        SWIGLU=False, IEEE=ieee, BLOCK_M=bm,
    )
    return ys.view(T, k, H).sum(dim=1)
