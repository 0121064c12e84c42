#!/usr/bin/env python
"""Tile sweep for the `triton` MoE backend on CUDA (Mixtral-8x7B layer shapes, bf16, random weights
made on the GPU): each tile setting against torch's grouped GEMM (`grouped`), CUDA-graph replays
timed with device events, the fraction of the HBM copy roofline (T <= 16) or bf16 matmul peak.

    python benchmarks/triton_tiles.py            # needs a CUDA GPU and Triton
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesurgery.bench import cuda_graph_replay  # noqa: E402
from moesurgery.runtime.moe import BACKENDS, grouped_mm_available  # noqa: E402

DECODE = ["32,256,4,4", "64,128,4,4", "64,256,4,3", "128,128,4,3", "32,128,4,6", "64,64,4,6"]
PREFILL = ["128,64,8,3", "128,64,4,4", "256,64,8,3", "128,128,8,2", "64,128,4,3"]


def graph_time(fn, reps: int = 20) -> float:
    """Median seconds of one replay of fn captured in a CUDA graph (device events over `reps` replays)."""
    replay = cuda_graph_replay(fn)
    if replay is None:
        raise RuntimeError("the call does not capture in a CUDA graph")
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times)


def main() -> int:
    dev, dt = torch.device("cuda"), torch.bfloat16
    src = torch.ones(2**30, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        dst.copy_(src)
    b.record()
    b.synchronize()
    bw = 2 * src.nbytes * 5 / (a.elapsed_time(b) / 1e3)
    del src, dst
    m = torch.randn(8192, 8192, device=dev, dtype=dt)
    peak = 2 * 8192**3 / graph_time(lambda: m @ m, 5)
    del m
    print(f"roofline: {bw / 1e9:.0f} GB/s, {peak / 1e12:.0f} TFLOP/s", flush=True)
    H, I0 = 4096, 14336
    gen = torch.Generator(device=dev).manual_seed(0)
    for E, k in ((8, 2), (64, 16)):
        I = I0 * 8 // E
        gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=dt, generator=gen) * 0.02
        down = torch.randn(E, H, I, device=dev, dtype=dt, generator=gen) * 0.02
        for T in (1, 16, 256, 4096):
            x = torch.randn(T, H, device=dev, dtype=dt, generator=gen)
            idx = torch.stack([torch.randperm(E, device=dev, generator=gen)[:k] for _ in range(T)])
            w = torch.rand(T, k, device=dev, dtype=dt, generator=gen)
            touched = int(idx.unique().numel())
            nbytes = touched * 3 * H * I * 2 + 2 * T * H * 2
            flops = 6 * T * k * H * I
            want = BACKENDS["grouped"](x, idx, w, gate_up, down).float() if grouped_mm_available(dev, dt) else None

            def frac(s):
                return (nbytes / s) / bw if T <= 16 else (flops / s) / peak

            res = {}
            if want is not None:
                res["grouped"] = graph_time(lambda: BACKENDS["grouped"](x, idx, w, gate_up, down))
            for tile in [None, *(DECODE if T <= 256 else PREFILL)]:
                if tile:
                    os.environ["MOESURGERY_TRITON_TILE"] = tile
                else:
                    os.environ.pop("MOESURGERY_TRITON_TILE", None)
                try:
                    got = BACKENDS["triton"](x, idx, w, gate_up, down).float()
                    err = ((got - want).abs().max() / want.abs().max()).item() if want is not None else float("nan")
                    res[f"triton {tile or 'default'} (err {err:.1e})"] = graph_time(lambda: BACKENDS["triton"](x, idx, w, gate_up, down))
                except Exception as e:  # noqa: BLE001 - a tile that does not fit is reported and skipped
                    print(f"  {E}x{k} T={T} tile {tile}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            os.environ.pop("MOESURGERY_TRITON_TILE", None)
            for name, s in sorted(res.items(), key=lambda kv: kv[1]):
                print(f"{E}x{k} T={T:5d} {name:40s} {s * 1e3:8.3f} ms  {frac(s):.2f} of {'HBM' if T <= 16 else 'peak'}", flush=True)
        del gate_up, down
    return 0


if __name__ == "__main__":
    sys.exit(main())
