"""`--dry-run` at the scale of 2026's largest MoEs: time and peak memory of planning a surgery on a
weightless skeleton with the real dimensions (the plan a real conversion makes before it reads a byte).

    python benchmarks/plan_scale.py [--recipe kimi-k2-finer] [--runs 3] [--json out.json]

Each run is a fresh `moesurgery ... --recipe R --dry-run --json` process (so the peak RSS is the
command's own, torch and all), timed by wall clock; the medians are reported next to the target
(issue #9: Kimi-K2-sized block-FP8 skeleton split 2x, 61 layers, 768 experts, 1.03T parameters:
<= 10 s and <= 600 MB on a 2-core, 24 GB machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine  # noqa: E402
from moesurgery.recipes import RECIPE_DIR, tomllib  # noqa: E402
from moesurgery.skeleton import write_skeleton  # noqa: E402

TARGET_S, TARGET_MB = 10.0, 600.0


def run_once(recipe: dict, name: str, src: Path, out: Path) -> dict:
    code = ("import resource, sys, time; from moesurgery.cli import main; t = time.perf_counter(); "
            f"rc = main([{recipe['command']!r}, {str(src)!r}, {str(out)!r}, '--recipe', {name!r}, '--dry-run', '--json']); "
            "sys.stderr.write(f'@@ {rc} {time.perf_counter() - t} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n')")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    tag = [l for l in proc.stderr.splitlines() if l.startswith("@@ ")]
    if proc.returncode or not tag:
        raise SystemExit(f"run failed: {proc.stderr[-2000:]}")
    rc, inside, rss_kb = tag[-1].split()[1:]
    report = json.loads(proc.stdout)
    return {"wall_s": wall, "command_s": float(inside), "peak_rss_mb": int(rss_kb) / 1024, "rc": int(rc),
            "params_total": report["params_total"], "experts": report["experts"], "tensors": sum(s["tensors"] for s in report["shards"]),
            "bytes": report["bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="kimi-k2-finer")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    recipe = tomllib.loads((RECIPE_DIR / f"{args.recipe}.toml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        src = write_skeleton(recipe["model_config"], Path(tmp) / "src")
        skeleton_s = time.perf_counter() - t
        runs = [run_once(recipe, args.recipe, src, Path(tmp) / "out") for _ in range(args.runs)]
    result = {
        "machine": machine(), "recipe": args.recipe, "skeleton_s": skeleton_s, "runs": runs,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "target": {"wall_s": TARGET_S, "peak_rss_mb": TARGET_MB},
    }
    r = runs[0]
    print(f"{args.recipe}: {r['params_total'] / 1e12:.2f}T parameters, {r['experts']} experts, {r['tensors']:,} output tensors, "
          f"{r['bytes'] / 1e12:.2f} TB planned")
    for i, run in enumerate(runs):
        print(f"  run {i + 1}: {run['wall_s']:.2f} s wall ({run['command_s']:.2f} s in the command), peak RSS {run['peak_rss_mb']:.0f} MB")
    ok = result["median_wall_s"] <= TARGET_S and result["median_peak_rss_mb"] <= TARGET_MB
    print(f"median: {result['median_wall_s']:.2f} s, {result['median_peak_rss_mb']:.0f} MB "
          f"(target <= {TARGET_S:g} s, <= {TARGET_MB:g} MB: {'met' if ok else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
