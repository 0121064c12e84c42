#!/usr/bin/env python
"""Which layers of a split cost the perplexity? Each MoE layer alone, the others dense.

    python benchmarks/layer_attribution.py out/smollm2-moe-75 --eval-texts apache --json attribution.json

For a split of SmolLM2-135M (`split-experts`, any recipe), every MoE layer j in turn runs as written (its router
and experts; `--oracle`: the best experts per token as well) while every other layer computes the source's dense
FFN; the perplexity ratio to the dense model is layer j's share of the loss (the shares multiply to about the
whole split's ratio, less their interactions). Same model, held-out texts and evaluation as `quality.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from benchmarks.quality import HELD_OUT, evaluate, oracle_forward  # noqa: E402
from moesurgery.calibration import tokenize  # noqa: E402
from moesurgery.model_io import open_model  # noqa: E402
from moesurgery.runtime.model import load_ffn  # noqa: E402
from moesurgery.runtime.moe import MoEWeights  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("split", type=Path, help="a split of --checkpoint (split-experts output)")
    p.add_argument("--checkpoint", help="the dense source (default: SmolLM2-135M)")
    p.add_argument("--eval-texts", default="apache")
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", help="comma-separated layer indices (default: every MoE layer)")
    p.add_argument("--oracle", action="store_true", help="also with the layer's experts chosen by the oracle")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from tests.real_model import smollm2_checkpoint

    source = Path(args.checkpoint) if args.checkpoint else smollm2_checkpoint()
    dense = open_model(source).model
    dense_ffns = [load_ffn(layer.ffn) for layer in dense.layers]  # the source's FFNs in fp32: 30 x 10.6 MB for SmolLM2
    split = open_model(args.split).model
    layers = [int(i) for i in args.layers.split(",")] if args.layers else [layer.index for layer in split.moe_layers()]

    rows, t0 = [], time.perf_counter()
    for name in args.eval_texts.split(","):
        ids = tokenize(source, HELD_OUT[name](), dense.arch.vocab_size)[: args.eval_seqs * args.seq_len].view(args.eval_seqs, args.seq_len)
        base = evaluate(source, ids)["ppl"]
        for mode in ["model"] + ["oracle"] * args.oracle:
            total = 0.0
            for j in layers:
                def only_j(i, h, weights, j=j, mode=mode):
                    if i != j:
                        return dense_ffns[i](h)
                    return oracle_forward(h, weights)[0] if mode == "oracle" and isinstance(weights, MoEWeights) else None

                ppl = evaluate(args.split, ids, ffn=only_j)["ppl"]
                total += math.log(ppl / base)
                rows.append({"eval_text": name, "router": mode, "layer": j, "ppl": ppl, "dense_ppl": base, "ratio": ppl / base})
                print(f"{name} {mode}: layer {j} alone x{ppl / base:.4f} (product so far x{math.exp(total):.3f})", file=sys.stderr, flush=True)
    result = {"split": str(args.split), "model": source.name, "machine": machine(), "total_s": time.perf_counter() - t0,
              "command": "python benchmarks/layer_attribution.py " + " ".join(sys.argv[1:] if argv is None else argv), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
