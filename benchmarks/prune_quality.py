#!/usr/bin/env python
"""Making an MoE smaller, measured: prune-experts (reap, frequency, mass, random) and merge-experts on
the only MoEs a package here ships material for.

No trained MoE ships in any package on this machine, so the MoEs are made from SmolLM2-135M-Instruct
(dense, 30 layers, FFN 1536) by the best measured training-free split (BENCHMARKS.md "quality"):
coactivation partition + fitted router, layer 0 dense, 2 shared + top-6 of 14 routed experts of 96 neurons
(recipe smollm2-135m-split-50 before 2026-12-02, which now has 4 shared + top-4 of 12: 50% of the FFN active); and its exact 4x finer split (2 shared + top-24 of
56 routed experts of 24). Each is reduced by removing 25% and 50% of its routed experts per MoE layer
(coarse: 14 -> 10 / 7; fine: 56 -> 42 / 28), by every method; held-out perplexity (pydoc topics disjoint
from the calibration text, 8 x 256 tokens) against the unreduced MoE.

    python benchmarks/prune_quality.py [--json out.json] [--calibration-tokens 4096] [--moe coarse fine] [--methods ...]

Targets (issue #13): REAP beats frequency and random at both fractions; merging beats pruning at 50%.
Rows: prune by reap (REAP's mean), output (REAP summed over tokens), frequency, random; merge (the default:
select / dominant) and merge-hcsmoe (frequency-weighted average / hierarchical clusters, HC-SMoE's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from moesurgery.operations import merge_experts, prune_experts, split_experts  # noqa: E402
from moesurgery.texts import calibration_text, heldout_text  # noqa: E402
from moesurgery.verify import verify  # noqa: E402

METHODS = ("reap", "output", "frequency", "random")  # mass ranked exactly as frequency on both MoEs (2026-12-01 run)
MERGES = {"merge": dict(method="select", grouping="dominant"),  # the default
          "merge-hcsmoe": dict(method="frequency", grouping="hierarchical")}  # HC-SMoE: average-linkage, frequency-weighted mean


def held_out_ppl(src: Path, out: Path) -> float:
    v = verify(src, out, text=heldout_text(), batch=8, seq_len=256)
    return v["perplexity"]["candidate"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--moe", nargs="+", default=["coarse", "fine"], choices=["coarse", "fine"], help="which MoEs to reduce")
    ap.add_argument("--methods", nargs="+", default=[*METHODS, *MERGES], choices=[*METHODS, *MERGES], help="which rows to run")
    args = ap.parse_args()
    from tests.real_model import smollm2_checkpoint

    dense = Path(smollm2_checkpoint())
    cal = calibration_text()
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        coarse, fine = tmp / "coarse", tmp / "fine"
        t = time.time()
        split_experts(dense, coarse, experts=14, top_k=6, shared=2, calibration_text=cal, calibration_tokens=args.calibration_tokens,
                      first_k_dense=1, to="deepseek", allow_lossy=True)
        split_experts(coarse, fine, granularity=4)
        print(f"splits: {time.time() - t:.0f} s", flush=True)
        base = {name: held_out_ppl(path, path) for name, path in (("coarse", coarse), ("fine", fine))}
        dense_ppl = verify(dense, dense, text=heldout_text(), batch=8, seq_len=256)["perplexity"]["reference"]
        print(json.dumps({"dense": dense_ppl, **base}), flush=True)
        for name, path, E, k in (("coarse", coarse, 14, 6), ("fine", fine, 56, 24)):
            if name not in args.moe:
                continue
            for share in (0.25, 0.5):
                keep = max(k, E - round(share * E))
                for method in args.methods:
                    out = tmp / f"{name}-{share}-{method}"
                    t = time.time()
                    if method in MERGES:
                        merge_experts(path, out, into=keep, calibration_text=cal, calibration_tokens=args.calibration_tokens, **MERGES[method])
                    else:
                        prune_experts(path, out, keep=keep, method=method, calibration_text=cal, calibration_tokens=args.calibration_tokens)
                    ppl = held_out_ppl(path, out)
                    row = {"moe": name, "removed": share, "experts": f"{E} -> {keep}", "method": method, "ppl": ppl,
                           "ratio": ppl / base[name], "seconds": time.time() - t}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    import shutil

                    shutil.rmtree(out)
    result = {"machine": machine(), "dense_ppl": dense_ppl, "base_ppl": base, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
