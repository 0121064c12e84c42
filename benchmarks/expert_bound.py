#!/usr/bin/env python
"""How wide may experts be? The training-free split's bounds by expert width, in-domain and off-domain.

    python benchmarks/expert_bound.py --json > bound.json        # 75% and 50%, widths 2-32 (~8 min on 2 cores)
    python benchmarks/expert_bound.py --fractions 50 --widths 8 --calibration pydoc,manuals,licences,apache

`split_experts` keeps every FFN neuron as it is and only chooses, per token, which neurons run: S
shared (always on) + the top-k of N routed experts (equal groups of neurons). Three levels of the
same choice, each an upper bound on the next, are measured here with perplexity on held-out pydoc
topics and on Debian's Apache-2.0 licence (another domain), as ratios to the dense model:

- neuron oracle: no experts at all (`sparsity_bound.sparse_ffn`); every token runs the shared
  neurons plus the neurons of most output mass |silu(gate.x) (up.x)| |down_i| up to the active
  fraction. Any partition, with any router, runs one of these subsets per token.
- expert oracle: the split's partition (coactivation clusters refined for the top-k, the library's
  best) of experts `--widths` neurons wide; every token runs the k experts carrying the most
  activation mass (the oracle of benchmarks/quality.py).
- fitted: the same experts with the library's fitted linear router (`--router fitted`).

The MoE is simulated in memory over the dense model's FFN weights (quality.evaluate's FFN
override), so no checkpoint is written; the experts, shared neurons and routers are computed by
the library's own functions (moefy.activations / expert_mass / build_router, partition.partition,
shared_by_frequency) on calibration FFN inputs of the dense model, as `split_experts` computes them.

Calibration: built-in `pydoc`, `manuals`; `licences` (Debian's common licences other than
Apache-2.0, concatenated: legal English that leaves the held-out licence unseen); `apache` (the
held-out licence itself: no longer a held-out domain, an upper bound on what calibration can buy);
or file paths. The first layer stays dense (`--first-k-dense 1`, as the recipes do).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402
from sparsity_bound import sparse_ffn  # noqa: E402
from moesurgery import calibration as _calibration  # noqa: E402
from moesurgery.model_io import open_model  # noqa: E402
from moesurgery.surgery.moefy import activations, build_router, expert_mass  # noqa: E402
from moesurgery.surgery.partition import active_mask, partition, shared_by_frequency  # noqa: E402
from moesurgery.texts import APACHE, apache_text, interleave  # noqa: E402

LICENCES = ("GPL-2", "LGPL-2.1", "MPL-2.0", "Artistic", "BSD", "GFDL-1.3", "CC0-1.0")  # no Apache-2.0
SHARED = {75: 0.25, 50: 0.25}  # share of the FFN's neurons always on, per active fraction (%)


def licences_text() -> str:
    """Debian's common licences other than Apache-2.0, concatenated."""
    folder = Path(APACHE).parent
    return "".join((folder / name).read_text() for name in LICENCES)


def calibration_text(names: list[str]) -> str:
    """calibration_mix's texts (built-in names, files) and this benchmark's `licences` / `apache`, interleaved."""
    extra = {"licences": licences_text, "apache": apache_text}
    return interleave([extra[n]() if n in extra else _calibration.calibration_mix([n]) for n in names])


# ------------------------------------------------------------------------------ the three levels
def expert_moe(shared_ids: torch.Tensor, groups: list[torch.Tensor], k: int, rows: torch.Tensor | None):
    """Shared neurons always on + the top-k groups by `rows` (a linear router [N, H]), or by
    activation mass (rows None: the oracle); every neuron keeps weight 1."""
    width = sum(len(g) for g in groups) + len(shared_ids)
    owner = torch.full((width,), -1, dtype=torch.long)
    for e, g in enumerate(groups):
        owner[g] = e
    routed = owner >= 0

    def ffn(x, w):  # x [T, H], w: the layer's SwiGLUWeights
        act = activations(x, w.gate, w.up)  # [T, W]
        score = expert_mass(act, groups) if rows is None else x @ rows.T  # [T, N]
        chosen = torch.zeros(x.shape[0], len(groups)).scatter_(1, score.topk(k, dim=-1).indices, 1.0)
        keep = torch.ones_like(act)
        keep[:, routed] = chosen[:, owner[routed]]
        return (act * keep) @ w.down.T

    return ffn


# ------------------------------------------------------------------------------------------ run
def run(args) -> dict:
    from tests.real_model import smollm2_checkpoint

    source = smollm2_checkpoint()
    if source is None:
        raise SystemExit("no SmolLM2 checkpoint (see DEVELOPERS.md, 'Real model for tests')")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = open_model(source).model
    vocab = model.arch.vocab_size
    evals = {n: _calibration.tokenize(source, quality.HELD_OUT[n](), vocab)[: args.eval_seqs * args.seq_len].view(args.eval_seqs, args.seq_len)
             for n in ("pydoc", "apache")}
    t0 = time.perf_counter()
    dense = {n: quality.evaluate(source, e)["ppl"] for n, e in evals.items()}
    ids = _calibration.chunk(_calibration.tokenize(source, calibration_text(args.calibration), vocab), 256, args.calibration_tokens)
    cal = {i: h for i, h in _calibration.ffn_inputs(model, ids)}  # layer -> [T, H]
    stats = {}  # layer -> (gate [W, H], activations [T, W], active [T, W], mass [T, W]) on the calibration tokens
    for i in range(args.first_k_dense, len(model.layers)):
        ffn = model.layers[i].ffn
        gate, up, down = ffn.gate.load().float(), ffn.up.load().float(), ffn.down.load().float()
        act = activations(cal[i], gate, up)
        stats[i] = (gate, act, active_mask(act, cal[i].shape[1]), act.abs() * down.norm(dim=0))

    def measure(level: str, frac: int, width: int | None, make) -> dict:
        ffns = {i: make(i) for i in stats}
        override = lambda i, h, w: ffns[i](h.reshape(-1, h.shape[-1]), w).reshape(h.shape) if i in ffns else None  # noqa: E731
        t = time.perf_counter()
        ratios = {n: quality.evaluate(source, e, ffn=override)["ppl"] / dense[n] for n, e in evals.items()}
        r = {"active": frac, "level": level, "expert_width": width, "pydoc": ratios["pydoc"], "apache": ratios["apache"], "eval_s": time.perf_counter() - t}
        print(f"{frac}% {level:14s} width {width or '-':>3}: pydoc x{r['pydoc']:.3f}  apache x{r['apache']:.3f}", file=sys.stderr, flush=True)
        return r

    rows = []
    W = stats[len(model.layers) - 1][0].shape[0]  # FFN width
    for frac in args.fractions:
        S = int(round(SHARED[frac] * W))
        shared = {i: shared_by_frequency(stats[i][2], S) for i in stats}
        everyone = torch.arange(W)
        routed_ids = {i: everyone[~torch.isin(everyone, shared[i])] for i in stats}
        rows.append(measure("neuron oracle", frac, None, lambda i: lambda x, w: sparse_ffn(x, w, frac / 100, shared[i])))
        for width in args.widths:
            if (W - S) % width or (int(frac * W / 100) - S) % width:
                raise SystemExit(f"--widths {width}: does not divide the {W - S} routed neurons into experts with whole experts active at {frac}%")
            N, K = (W - S) // width, (int(frac * W / 100) - S) // width
            groups = {i: partition("coactivation", routed_ids[i], N, active=stats[i][2], mass=stats[i][3], top_k=K, seed=args.seed + i) for i in stats}
            rows.append(measure("expert oracle", frac, width, lambda i: expert_moe(shared[i], groups[i], K, None)))
            routers = {i: build_router("fitted", groups[i], stats[i][0], cal[i], stats[i][1], args.seed + i) for i in stats}
            rows.append(measure("fitted", frac, width, lambda i: expert_moe(shared[i], groups[i], K, routers[i])))
    return {
        "model": source.name,
        "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "command": "python benchmarks/expert_bound.py " + " ".join(sys.argv[1:]),
        "calibration": args.calibration,
        "calibration_tokens": int(ids.numel()),
        "first_k_dense": args.first_k_dense,
        "shared_share": {f: SHARED[f] for f in args.fractions},
        "eval": {"sequences": args.eval_seqs, "seq_len": args.seq_len},
        "dense_ppl": dense,
        "total_s": time.perf_counter() - t0,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = ["| active | level | expert width | pydoc (x dense) | Apache-2.0 (x dense) |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['active']}% | {r['level']} | {r['expert_width'] or '-'} | x{r['pydoc']:.3f} | x{r['apache']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="75,50", help="active fractions in %% (75, 50)")
    p.add_argument("--widths", default="2,4,8,16,32", help="expert widths in neurons (each divides the routed neurons)")
    p.add_argument("--calibration", default="pydoc,manuals,licences", help="pydoc, manuals, licences, apache or files, comma-separated")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--first-k-dense", type=int, default=1)
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    args = p.parse_args(argv)
    args.fractions = [int(f) for f in args.fractions.split(",")]
    args.widths = [int(w) for w in args.widths.split(",")]
    args.calibration = [c for c in args.calibration.split(",") if c]
    if bad := [f for f in args.fractions if f not in SHARED]:
        p.error(f"unknown fractions {bad} (have {list(SHARED)})")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']}: dense perplexity pydoc {result['dense_ppl']['pydoc']:.3f}, Apache-2.0 {result['dense_ppl']['apache']:.3f}; "
              f"calibration {result['calibration_tokens']} tokens of {'+'.join(result['calibration'])}; {result['total_s'] / 60:.1f} min")
        print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
