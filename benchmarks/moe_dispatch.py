#!/usr/bin/env python
"""MoE dispatch benchmark: 8 experts top-2 against the same weights as 64 experts top-16.

Mixtral-8x7B-shaped MoE layers (`moesurgery.synthetic`, random weights, hidden/width divided by
--scale), the fine-grained layout made exactly with `finer_experts` (m = 8): same bytes and FLOPs per
token, so any slowdown is dispatch overhead. Every backend of the runtime's MoE block is timed on
T tokens (interleaved: one run of each configuration per round, median over rounds), against the
roofline of this device measured in the same run (a large copy, a large matmul; before and after,
the better of the two is used). A full-model decode step (1 layer + head, B = 1) is timed too.

    python benchmarks/moe_dispatch.py                           # CPU, fp32, scale 4, wall clock
    python benchmarks/moe_dispatch.py --threads 1 --clock thread   # CPU time of one thread: robust on a shared machine
    python benchmarks/moe_dispatch.py --device cuda             # GPU, bf16, real Mixtral layer shapes
    python benchmarks/moe_dispatch.py --json out.json --markdown

Targets (issue): CPU: fine/coarse time <= 1.25 at T >= 256 with `sorted`; `sorted` >= 3x faster than
`loop` for 64 experts at T = 4096; decode within 2x of the bandwidth roofline. GPU: >= 0.6 of the HBM
roofline at T <= 16 and >= 0.5 of bf16 peak at T = 4096, for 8x2 and 64x16.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moesurgery.bench as bench  # noqa: E402
from benchmarks.common import add_clock_options, apply_clock_options, machine  # noqa: E402
from moesurgery.bench import BenchOptions, bench_model, device_name, ffn_cost, measure_roofline, measured_row, sync  # noqa: E402
from moesurgery.runtime.model import load_ffn  # noqa: E402
from moesurgery.runtime.moe import grouped_mm_available, moe_forward, route, triton_available  # noqa: E402
from moesurgery.synthetic import layout_candidate, synthetic_model  # noqa: E402

BATCHED_MAX_BYTES = 2**30  # `batched` copies T*k experts' weights: skip it beyond this


def time_round_robin(configs: dict, device: torch.device, repeats: int, budget_s: float, inner: int = 1) -> dict:
    """{name: median seconds}: each round runs every configuration once, so load drifts hit all alike.
    CUDA: device events around `inner` back-to-back calls (GPU time, launch gaps included)."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    clock = bench.CLOCK
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for fn in configs.values():
            fn()  # warmup
        sync(device)
        start = clock()
        items = list(configs.items())
        for r in range(repeats):
            shift = r % len(items)  # rotate the order: no configuration always runs last (clock or thermal drift)
            for name, fn in items[shift:] + items[:shift]:
                if cuda:
                    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t0.record()
                    for _ in range(inner):
                        fn()
                    t1.record()
                    t1.synchronize()
                    times[name].append(t0.elapsed_time(t1) / 1e3 / inner)
                else:
                    t0 = clock()
                    fn()
                    sync(device)
                    times[name].append(clock() - t0)
            if r >= 2 and clock() - start > budget_s:
                break
    return {name: statistics.median(v) for name, v in times.items()}


GRAPHABLE = ("sorted", "grouped", "batched", "triton", "auto")  # no host sync on CUDA (loop/segments read counts)


def profile(fn, label: str, rows: int = 12) -> None:
    """Print the CUDA kernels of one call (torch.profiler), most time first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
    print(f"--- profile: {label} (5 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--shape", default="mixtral-8x7b")
    p.add_argument("--scale", type=int, default=None, help="default: 4 on CPU, 1 on CUDA")
    p.add_argument("--granularity", type=int, default=8)
    p.add_argument("--tokens", default="1,16,256,4096")
    p.add_argument("--backends", default="loop,sorted,segments,grouped,batched,triton,auto")
    p.add_argument("--no-graph", action="store_true", help="CUDA: skip the CUDA-graph replays of the sync-free backends")
    p.add_argument("--profile", default="", help="CUDA: comma-separated backends to profile at the smallest T")
    p.add_argument("--inner", type=int, default=None, help="CUDA: calls per timed sample (default 10)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0, help="seconds per T before stopping repeats (after 3 rounds)")
    p.add_argument("--no-decode", action="store_true")
    add_clock_options(p)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    a = p.parse_args()

    device = torch.device(a.device)
    problem = apply_clock_options(a, a.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    scale = a.scale or (1 if device.type == "cuda" else 4)
    tokens = [int(t) for t in a.tokens.split(",")]
    usable = {"grouped": grouped_mm_available(device, dtype), "triton": triton_available(device)}
    backends = [b for b in a.backends.split(",") if usable.get(b, True)]
    graph = device.type == "cuda" and not a.no_graph
    inner = a.inner or (10 if device.type == "cuda" else 1)
    info = machine()
    info["device_name"] = device_name(device)
    info["clock"] = a.clock
    print(f"# {a.shape}/{scale}, {dtype}, {device} ({info['device_name']}), clock {a.clock}, {_dt.datetime.now().isoformat(timespec='seconds')}", flush=True)

    big = 1 << 30
    roof_n = 8192 if device.type == "cuda" else 4096
    roof_a = measure_roofline(device, dtype, (4 if device.type == "cuda" else 1) * big, roof_n)
    print(f"roofline (before): {roof_a['bandwidth_gbps']:.1f} GB/s, {roof_a['peak_tflops']:.3f} TFLOP/s", flush=True)

    src = synthetic_model(a.shape, scale, layers=1, dtype=dtype)
    fine, _ = layout_candidate(src, a.granularity)
    layouts = {}
    for name, model in (("coarse", src), ("fine", fine)):
        w = load_ffn(model.layers[0].ffn, device, dtype)
        layouts[f"{w.num_experts}x{w.router.top_k}"] = (model, w)
    H = src.arch.hidden_size
    gen = torch.Generator().manual_seed(0)

    raw = []
    for T in tokens:
        x = torch.randn(T, H, generator=gen).to(device, dtype)
        configs, costs = {}, {}
        for lname, (_, w) in layouts.items():
            with torch.inference_mode():
                idx, _ = route(x, w.router, w.router_weight, w.bias)
            touched = int(idx.unique().numel())
            costs[lname] = (ffn_cost(w, T, touched), touched)
            for b in backends:
                pair_bytes = (w.gate_up[0].numel() + w.down[0].numel()) * w.gate_up.element_size()
                if b == "batched" and T * w.router.top_k * pair_bytes > BATCHED_MAX_BYTES:
                    continue
                configs[(lname, b)] = (lambda x=x, w=w, b=b: moe_forward(x, w, b))
                if a.profile and T == tokens[0] and b in a.profile.split(","):
                    profile(configs[(lname, b)], f"{lname}/{b} T={T}")
        if graph:
            for (lname, b), fn in list(configs.items()):
                if b in GRAPHABLE:
                    replay = bench.cuda_graph_replay(fn)
                    if replay is None:
                        print(f"no CUDA graph for {lname}/{b}", flush=True)
                    else:
                        configs[(lname, b + "+graph")] = replay
        medians = time_round_robin({f"{l}/{b}": fn for (l, b), fn in configs.items()}, device, a.repeats, a.budget, inner)
        for (lname, b) in configs:
            cost, touched = costs[lname]
            raw.append({"layout": lname, "backend": b, "T": T, "seconds": medians[f"{lname}/{b}"], "cost": cost, "touched": touched})
        print(f"T={T}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in medians.items()), flush=True)

    decode = []
    if not a.no_decode:
        o = BenchOptions(batches=(1,), context=128, device=str(device), dtype=dtype, backend="auto", parts=("decode",), repeats=a.repeats)
        for lname, (model, _) in layouts.items():
            decode.append((lname, bench_model(lname, model, o, roof_a)["decode"][0]))
            print(f"decode B=1 {lname}: {decode[-1][1]['seconds'] * 1e3:.2f} ms", flush=True)

    roof_b = measure_roofline(device, dtype, (4 if device.type == "cuda" else 1) * big, roof_n)
    print(f"roofline (after): {roof_b['bandwidth_gbps']:.1f} GB/s, {roof_b['peak_tflops']:.3f} TFLOP/s", flush=True)
    roof = {"bandwidth_gbps": max(roof_a["bandwidth_gbps"], roof_b["bandwidth_gbps"]), "peak_tflops": max(roof_a["peak_tflops"], roof_b["peak_tflops"])}
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass

    rows = []
    for r in raw:
        row = measured_row("tokens", r["T"], r["seconds"], r["T"], r["cost"], roof)
        rows.append({"layout": r["layout"], "backend": r["backend"], "experts_touched": r["touched"], **row})
    dec_rows = []
    for lname, d in decode:  # recompute the fraction against the final roofline
        nbytes, flops = d["bytes"], d["flops"]
        dec_rows.append({"layout": lname, **measured_row("batch", 1, d["seconds"], 1, (nbytes, flops), roof), "context": d["context"]})

    def sec(layout, backend, T):
        return next((r["seconds"] for r in rows if (r["layout"], r["backend"], r["tokens"]) == (layout, backend, T)), None)

    coarse, fine_name = list(layouts)
    targets = {}
    if device.type == "cpu":
        ratios = {T: sec(fine_name, "sorted", T) / sec(coarse, "sorted", T) for T in tokens if T >= 256 and sec(coarse, "sorted", T)}
        targets["fine/coarse sorted, T>=256 (<= 1.25)"] = {"values": ratios, "met": all(v <= 1.25 for v in ratios.values()) if ratios else None}
        if 4096 in tokens and sec(fine_name, "loop", 4096):
            speed = sec(fine_name, "loop", 4096) / sec(fine_name, "sorted", 4096)
            targets["sorted vs loop, 64x16, T=4096 (>= 3x)"] = {"values": speed, "met": speed >= 3}
        fr = {f"block T=1 {r['layout']}": r["roofline_fraction"] for r in rows if r["tokens"] == 1 and r["backend"] == "sorted"}
        fr |= {f"model decode B=1 {r['layout']}": r["roofline_fraction"] for r in dec_rows}
        targets["decode within 2x of bandwidth roofline (fraction >= 0.5)"] = {"values": fr, "met": all(v >= 0.5 for v in fr.values())}
    else:  # the `auto` backend as a serving engine runs it (CUDA graph where it has one), and the best backend
        def fraction(T, measure):
            out = {}
            for lname in layouts:
                cands = [r for r in rows if r["layout"] == lname and r["tokens"] == T]
                pick = next((r for b in ("auto+graph", "auto") for r in cands if r["backend"] == b), None)
                best = min(cands, key=lambda r: r["seconds"], default=None)
                for tag, r in (("auto", pick), ("best", best)):
                    if r is not None:
                        out[f"{lname} T={T} {tag} ({r['backend']})"] = measure(r)
            return out

        hbm = lambda r: r["gbps"] / roof["bandwidth_gbps"]  # noqa: E731
        peak = lambda r: r["tflops"] / roof["peak_tflops"]  # noqa: E731
        small = {k: v for T in tokens if T <= 16 for k, v in fraction(T, hbm).items()}
        big_t = fraction(4096, peak) if 4096 in tokens else {}
        targets["HBM fraction at T<=16 (>= 0.6)"] = {"values": small, "met": all(v >= 0.6 for k, v in small.items() if " auto " in k)}
        targets["bf16 peak fraction at T=4096 (>= 0.5)"] = {"values": big_t, "met": all(v >= 0.5 for k, v in big_t.items() if " auto " in k)}

    report = {"date": _dt.date.today().isoformat(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": info,
              "device": str(device), "dtype": str(dtype).removeprefix("torch."), "shape": a.shape, "scale": scale,
              "hidden": H, "expert_width": {k: int(w.down.shape[-1]) for k, (_, w) in layouts.items()},
              "grouped_mm": grouped_mm_available(device, dtype), "roofline": roof, "roofline_before": roof_a, "roofline_after": roof_b,
              "block": rows, "decode": dec_rows, "targets": targets}
    if a.json:
        a.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_tables(report, markdown=a.markdown)
    return 0


def print_tables(r: dict, markdown: bool = False) -> None:
    print()
    print(f"roofline: {r['roofline']['bandwidth_gbps']:.1f} GB/s copy, {r['roofline']['peak_tflops']:.3f} TFLOP/s matmul ({r['dtype']})")
    head = ["T", "layout", "backend", "time", "tok/s", "GB/s", "TFLOP/s", "roofline"]
    lines = [head]
    for row in r["block"]:
        lines.append([str(row["tokens"]), row["layout"], row["backend"], f"{row['seconds'] * 1e3:.2f} ms", f"{row['tokens_per_s']:,.0f}",
                      f"{row['gbps']:.1f}", f"{row['tflops']:.3f}", f"{row['roofline_fraction']:.2f} ({row['bound'][:3]})"])
    for row in r["decode"]:
        lines.append([f"B={row['batch']}", row["layout"], "decode (model)", f"{row['seconds'] * 1e3:.2f} ms", f"{row['tokens_per_s']:,.0f}",
                      f"{row['gbps']:.1f}", f"{row['tflops']:.3f}", f"{row['roofline_fraction']:.2f} ({row['bound'][:3]})"])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
        for line in lines:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    print()
    for name, t in r["targets"].items():
        vals = t["values"]
        shown = ", ".join(f"{k}: {v:.2f}" for k, v in vals.items()) if isinstance(vals, dict) else f"{vals:.2f}"
        print(f"{'MET ' if t['met'] else 'MISSED'} {name}: {shown}")


if __name__ == "__main__":
    sys.exit(main())
