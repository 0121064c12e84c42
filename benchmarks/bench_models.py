#!/usr/bin/env python
"""`moesurgery bench --synthetic` over the built-in shapes: each real layout (random weights, scaled)
against its m-times finer split (exact, same weights), MoE block + full-model decode, one table.

    python benchmarks/bench_models.py                       # CPU fp32, shapes scaled to ~100-700 MB a layer
    python benchmarks/bench_models.py --threads 1 --clock thread   # CPU time of one thread (shared machine)
    python benchmarks/bench_models.py --device cuda --scale-div 1 --json out.json

Prints, per shape: coarse and fine layout, block time ratio fine/coarse per T, block roofline
fraction (coarse, fine), decode B=1 roofline fraction, and the spot check verdict.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path


import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_clock_options, apply_clock_options  # noqa: E402
from moesurgery.bench import BenchOptions, run_bench  # noqa: E402

# shape: (scale on CPU, granularity): scales keep one fp32 layer at roughly 100-700 MB
PLAN = {
    "mixtral-8x7b": (4, 8),
    "mixtral-8x22b": (6, 8),
    "deepseek-v3": (8, 4),
    "qwen1.5-moe": (2, 2),
    "qwen3-30b-a3b": (2, 2),
    "olmoe": (2, 4),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--shapes", default=",".join(PLAN))
    p.add_argument("--scale-div", type=float, default=None, help="divide the CPU scales by this (default: 1 on CPU, all scales 1 on CUDA)")
    p.add_argument("--tokens", default="1,16,256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", type=Path, default=None)
    add_clock_options(p)
    a = p.parse_args()
    problem = apply_clock_options(a, a.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print("| shape/scale | layout | block time fine/coarse | block roofline fraction coarse/fine | decode B=1 fraction coarse/fine | check |")
    print("|---|---|---|---|---|---|")
    cuda = a.device.startswith("cuda")
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    tokens = tuple(int(t) for t in a.tokens.split(","))
    results = []
    for shape in a.shapes.split(","):
        scale, m = PLAN[shape]
        if cuda and a.scale_div is None:
            scale = 1
        elif a.scale_div:
            scale = max(1, round(scale / a.scale_div))
        o = BenchOptions(tokens=tokens, batches=(1,), context=128, device=a.device, dtype=dtype, backend=a.backend,
                         parts=("block", "decode"), repeats=a.repeats, layers=1)
        r = run_bench(None, synthetic=shape, scale=scale, granularity=m, options=o)
        results.append(r)
        src, cand = r["models"]
        ratio = ", ".join(f"T={x['tokens']}: {x['time_ratio']:.2f}" for x in r["ratios"][0]["block"])
        frac = ", ".join(f"{a_['roofline_fraction']:.2f}/{b['roofline_fraction']:.2f}" for a_, b in zip(src["block"], cand["block"]))
        dec = f"{src['decode'][0]['roofline_fraction']:.2f}/{cand['decode'][0]['roofline_fraction']:.2f}"
        print(f"| {shape}/{scale} | {src['experts']}x{src['top_k']} -> {cand['experts']}x{cand['top_k']} | {ratio} | {frac} | {dec} | "
              f"{r['check'][0]['verdict']} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"date": _dt.date.today().isoformat(), "runs": results}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
