#!/usr/bin/env python
"""How far can any training-free split go? The per-neuron oracle of the dense model.

    python benchmarks/sparsity_bound.py --fractions 75,50 --eval-texts pydoc,apache --first-k-dense 1 --json

Every token keeps, in every FFN from layer `--first-k-dense` on, the p% of its neurons carrying the most
output mass (|silu(gate.x) * up.x| x ||down column||) and drops the rest: no partition, no router, no
shared/routed boundary, chosen with the token's own activations. Any MoE split with p% of the neurons
active (shared + top-k routed experts) keeps one p% subset per token, constrained to a union of experts and
chosen by a router, so its perplexity is (to the extent that the most massive neurons are the ones that
matter) no better than this one's. The gap between the split's perplexity and this bound is what partitions
and routers can still win; the bound's own ratio to the dense model is what they cannot.

Same model, held-out texts and evaluation as `quality.py` (8 x 256 tokens per text).
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import HELD_OUT, evaluate  # noqa: E402
from moesurgery.calibration import calibration_mix, tokenize  # noqa: E402
from moesurgery.model_io import open_model  # noqa: E402
from moesurgery.runtime.moe import SwiGLUWeights  # noqa: E402


def sparse_ffn(h: torch.Tensor, ffn: SwiGLUWeights, keep: float, shared: torch.Tensor | None = None) -> torch.Tensor:
    """The dense FFN with, per token, only the `keep` fraction of neurons of most output mass (the `shared`
    neurons [S] always among them, the rest the most massive of the others)."""
    a = F.silu(h @ ffn.gate.T) * (h @ ffn.up.T)  # [B, T, I]
    mass = a.abs() * ffn.down.norm(dim=0)  # [B, T, I]
    if shared is not None:
        mass[..., shared] = float("inf")
    n = round(keep * a.shape[-1])
    idx = mass.topk(n, dim=-1).indices
    mask = torch.zeros_like(a).scatter_(-1, idx, 1.0)
    return (a * mask) @ ffn.down.T  # [B, T, H]


def shared_neurons(source: Path, texts: list[str], tokens: int, share: float) -> dict[int, torch.Tensor]:
    """Per layer, the `share` of neurons most often among a token's top-H by |activation| on the calibration
    text (moefy's shared experts: CMoE's frequency)."""
    from moesurgery.calibration import chunk, ffn_inputs
    from moesurgery.surgery.partition import active_mask, shared_by_frequency

    model = open_model(source).model
    ids = chunk(tokenize(source, calibration_mix(texts), model.arch.vocab_size), 256, tokens)
    out = {}
    for i, h in ffn_inputs(model, ids):
        ffn = model.layers[i].ffn
        gate, up = ffn.gate.load().float(), ffn.up.load().float()
        act = F.silu(h.float() @ gate.T) * (h.float() @ up.T)  # [T, I]
        out[i] = shared_by_frequency(active_mask(act, gate.shape[1]), round(share * gate.shape[0]))
    return out


def perplexity(path: Path, ids: torch.Tensor, keep: float | None, first_k_dense: int,
               shared: dict[int, torch.Tensor] | None = None) -> float:
    """quality.py's evaluation, every FFN from layer `first_k_dense` on sparsified to `keep` (None: dense)."""
    def sparse(i, h, ffn):
        return sparse_ffn(h, ffn, keep, (shared or {}).get(i)) if keep is not None and i >= first_k_dense else None

    return evaluate(path, ids, ffn=sparse)["ppl"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", default="75,50", help="kept fractions of FFN neurons, in %%")
    p.add_argument("--eval-texts", default="pydoc,apache")
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--first-k-dense", type=int, default=1)
    p.add_argument("--checkpoint", help="a dense Llama-like checkpoint with tokenizer.json (default: SmolLM2-135M)")
    p.add_argument("--shared", type=float, default=0.0, help="also with this share of neurons always on, chosen on the calibration text as moefy does")
    p.add_argument("--calibration", default="pydoc,manuals")
    p.add_argument("--calibration-tokens", type=int, default=8192)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from tests.real_model import smollm2_checkpoint

    source = Path(args.checkpoint) if args.checkpoint else smollm2_checkpoint()
    if source is None:
        raise SystemExit("no SmolLM2 checkpoint (see DEVELOPERS.md, 'Real model for tests'); or pass --checkpoint")
    vocab = open_model(source).model.arch.vocab_size
    need = args.eval_seqs * args.seq_len
    rows, t0 = [], time.perf_counter()
    fixed = shared_neurons(source, args.calibration.split(","), args.calibration_tokens, args.shared) if args.shared else None
    for name in args.eval_texts.split(","):
        ids = tokenize(source, HELD_OUT[name](), vocab)[:need].view(args.eval_seqs, args.seq_len)
        dense = perplexity(source, ids, None, args.first_k_dense)
        for frac in [int(f) for f in args.fractions.split(",")]:
            ppl = perplexity(source, ids, frac / 100, args.first_k_dense)
            rows.append({"eval_text": name, "kept": frac, "shared": 0.0, "ppl": ppl, "dense_ppl": dense, "ratio": ppl / dense})
            print(f"{name}: {frac}% of neurons per token: ppl {ppl:.2f} (x{ppl / dense:.3f}; dense {dense:.2f})", file=sys.stderr, flush=True)
            if fixed is not None and frac / 100 > args.shared:
                ppl = perplexity(source, ids, frac / 100, args.first_k_dense, shared=fixed)
                rows.append({"eval_text": name, "kept": frac, "shared": args.shared, "calibration": args.calibration, "ppl": ppl,
                             "dense_ppl": dense, "ratio": ppl / dense})
                print(f"{name}: {frac}% with {args.shared:.1%} shared (on {args.calibration}): ppl {ppl:.2f} (x{ppl / dense:.3f})",
                      file=sys.stderr, flush=True)
    result = {"model": source.name, "date": _dt.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
              "command": "python benchmarks/sparsity_bound.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "first_k_dense": args.first_k_dense, "eval": {"sequences": args.eval_seqs, "seq_len": args.seq_len},
              "total_s": time.perf_counter() - t0, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
