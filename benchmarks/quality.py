#!/usr/bin/env python
"""Quality of the training-free dense -> MoE split (`split_experts`, moefy) on a real model.

SmolLM2-135M-Instruct (30 layers, FFN 1536) is split into 16 experts of 96 neurons at three active
fractions of FFN neurons (shared experts always on + top-k routed experts):

    75%: 2 shared + top-10 of 14 routed      50%: 2 shared + top-6 of 14      25%: 1 shared + top-3 of 15

for every partition method (contiguous, random, kmeans, coactivation) x router:

- centroid, fitted: the routers `split_experts` writes. The split goes through the library
  (`split_experts(..., to=deepseek)` into a temporary directory) and the written checkpoint runs
  in our runtime (`Runtime` + `ffn_forward`), so the numbers are what a user gets.
- oracle: an evaluation mode, not a checkpoint. On the same written experts, every token picks the
  k routed experts carrying the most activation mass (sum over an expert's neurons of
  |silu(gate.x) * (up.x)|), each with weight 1 on the original neurons (the checkpoint folds k into
  down_proj, so 1/k here). A real (linear) router can only approximate it.

Perplexity is measured on held-out English text (`moesurgery.texts.heldout_text`, topics disjoint
from `calibration_text`), tokenized with the checkpoint's tokenizer.json, for the dense model and
every split; the table gives the ratio split / dense. For the real routers `agree` is the mean
fraction of a token's chosen experts that the oracle would also pick (on the split model's own
hidden states, averaged over layers).

Calibration (`calibration_text`, `--calibration-tokens`) is the same for every split; the FFN
inputs of the dense model are computed once and reused by every `split_experts` call (they depend
only on the source model and the text).

    python benchmarks/quality.py                      # everything: 24 splits, 36 evaluations (~25-30 min on 2 busy CPU cores)
    python benchmarks/quality.py --quick              # 50% only, contiguous + coactivation, small (~8 min)
    python benchmarks/quality.py --fractions 50 --methods coactivation --routers fitted,oracle --json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moesurgery import calibration as _calibration  # noqa: E402
from moesurgery.calibration import tokenize  # noqa: E402
from moesurgery.model_io import open_model  # noqa: E402
from moesurgery.operations import split_experts  # noqa: E402
from moesurgery.runtime.model import Runtime, ffn_forward  # noqa: E402
from moesurgery.runtime.moe import MoEWeights  # noqa: E402
from moesurgery.calibration import calibration_mix  # noqa: E402
from moesurgery.texts import apache_text, heldout_text  # noqa: E402

# active fraction (%) -> (routed experts, top_k, shared); 16 experts of 96 neurons in all
CONFIGS = {75: (14, 10, 2), 50: (14, 6, 2), 25: (15, 3, 1)}
METHODS = ("contiguous", "random", "kmeans", "coactivation")
ROUTERS = ("centroid", "fitted", "oracle")
HELD_OUT = {"pydoc": heldout_text, "apache": apache_text}  # pydoc topics disjoint from the calibration; Apache-2.0: another domain


# ------------------------------------------------------------------------------ calibration reuse
class CachedFFNInputs:
    """Stands in for `moesurgery.calibration.ffn_inputs` during the run: the dense source's FFN
    inputs for a given token batch are computed once and replayed to every `split_experts` call."""

    def __init__(self, original):
        self.original = original
        self.cache: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        self.computed_s = 0.0

    def __call__(self, model, ids, dtype=torch.float32, device="cpu"):
        key = (str(model.arch), tuple(ids.shape), hash(tuple(ids.flatten().tolist())), dtype)
        if key not in self.cache:
            t = time.perf_counter()
            self.cache[key] = list(self.original(model, ids, dtype, device))
            self.computed_s += time.perf_counter() - t
        return iter(self.cache[key])


# ------------------------------------------------------------------------------------ evaluation
def oracle_forward(h: torch.Tensor, m: MoEWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE block with the oracle router: per token the top-k experts by activation mass, each with
    weight 1 on the original neurons (1/k on the checkpoint's experts, which fold k into down)."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    k = m.router.top_k
    I = m.down.shape[-1]
    gu = torch.einsum("th,eih->tei", x, m.gate_up)  # [T, E, 2I]
    act = F.silu(gu[..., :I]) * gu[..., I:]  # [T, E, I]
    idx = act.abs().sum(-1).topk(k, dim=-1).indices  # [T, k]
    keep = torch.zeros(x.shape[0], m.num_experts, dtype=x.dtype).scatter_(1, idx, 1.0 / k)
    out = torch.einsum("tei,ehi->th", act * keep.unsqueeze(-1), m.down)
    if m.shared is not None:
        shared = m.shared(x)
        if m.shared_gate is not None:
            shared = torch.sigmoid(F.linear(x, m.shared_gate)) * shared
        out = out + shared
    return out.reshape(shape), idx


def oracle_choice(h: torch.Tensor, m: MoEWeights) -> torch.Tensor:
    """The oracle's experts [T, k] for FFN inputs h (no output computed)."""
    x = h.reshape(-1, h.shape[-1])
    I = m.down.shape[-1]
    gu = torch.einsum("th,eih->tei", x, m.gate_up)
    return (F.silu(gu[..., :I]) * gu[..., I:]).abs().sum(-1).topk(m.router.top_k, dim=-1).indices


@torch.no_grad()
def evaluate(path: Path, ids: torch.Tensor, mode: str = "model", batch: int = 8, ffn=None) -> dict:
    """Perplexity of the checkpoint at `path` on ids [B, T]. mode: `model` (its own router, or the
    dense FFN) or `oracle` (MoE layers routed by the oracle). `ffn(i, h, weights)`: replaces layer i's FFN
    output where it returns a tensor (None: the layer as `mode` says)."""
    model = open_model(path).model
    rt = Runtime(model, "cpu", torch.float32)
    positions = torch.arange(ids.shape[1])
    rope = rt.rope(0, ids.shape[1])
    x = rt.embed(ids)
    agreement = []
    for i in range(len(model.layers)):
        layer = rt.layer(i)
        x, _ = rt.attention(x, layer, positions, rope)
        h = rt.ffn_input(x, layer)
        y = ffn(i, h, layer.ffn) if ffn is not None else None
        if y is None and isinstance(layer.ffn, MoEWeights):
            if mode == "oracle":
                y, _ = oracle_forward(h, layer.ffn)
            else:
                y, idx = ffn_forward(h, layer.ffn, rt.backend, return_routing=True)
                best = oracle_choice(h, layer.ffn)
                agreement.append((idx.unsqueeze(-1) == best.unsqueeze(-2)).any(-1).float().mean().item())
        elif y is None:
            y = ffn_forward(h, layer.ffn, rt.backend)
        x = x + y
        del layer
    nll, count = 0.0, 0
    for start in range(0, ids.shape[0], batch):  # the head in slices: [B, T, V] logits are large
        logits = rt.head(x[start : start + batch])
        target = ids[start : start + batch, 1:]
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    out = {"ppl": math.exp(nll / count)}
    if agreement:
        out["oracle_agreement"] = sum(agreement) / len(agreement)
    return out


# ------------------------------------------------------------------------------------------ run
def run(args) -> dict:
    from tests.real_model import smollm2_checkpoint

    source = Path(args.checkpoint) if args.checkpoint else smollm2_checkpoint()
    if source is None:
        raise SystemExit("no SmolLM2 checkpoint (see DEVELOPERS.md, 'Real model for tests'); or pass --checkpoint")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    vocab = open_model(source).model.arch.vocab_size
    need = args.eval_seqs * args.seq_len
    evals = {}
    for name in args.eval_texts:  # held-out texts: pydoc topics disjoint from the calibration, and another domain
        held = tokenize(source, HELD_OUT[name](), vocab)
        if held.numel() < need:
            raise SystemExit(f"held-out text {name} has {held.numel()} tokens, fewer than {need}")
        evals[name] = held[:need].view(args.eval_seqs, args.seq_len)
    cal_text = calibration_mix(args.calibration)

    cache = CachedFFNInputs(_calibration.ffn_inputs)
    if not args.sequential:  # sequential calibration depends on each split: nothing to reuse
        _calibration.ffn_inputs = cache  # split_experts imports it at call time
    t0 = time.perf_counter()
    denses = {name: evaluate(source, e) for name, e in evals.items()}
    dense = denses[args.eval_texts[0]]
    shown = ", ".join(f"{n} {d['ppl']:.3f}" for n, d in denses.items())
    log(f"dense: ppl {shown} ({time.perf_counter() - t0:.0f}s)", args)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="moesurgery-quality-", dir=args.workdir))
    try:
        for frac in args.fractions:
            N, K, S = CONFIGS[frac]
            for method in args.methods:
                oracle_done = False
                real = [r for r in args.routers if r != "oracle"] or ["centroid"]  # the oracle needs a split's experts
                if method == "default":  # the command a user types without --method / --router: its defaults
                    real = ["default"]
                for router in real:
                    out = scratch / f"{frac}-{method}-{router}"
                    t = time.perf_counter()
                    target = {} if method == "default" else {"to": "deepseek"}  # the default row: whatever the command picks
                    report = split_experts(source, out, experts=N, top_k=K, shared=S, method=None if method == "default" else method,
                                           router=None if router == "default" else router, **target,
                                           calibration_text=cal_text, calibration_tokens=args.calibration_tokens, seed=args.seed,
                                           sequential=args.sequential, first_k_dense=args.first_k_dense)
                    split_s = time.perf_counter() - t
                    measured = report["measured"]
                    cal = {key: sum(m[key] for m in measured) / len(measured) for key in ("rel_err", "oracle_rel_err", "router_oracle_agreement")}
                    if router in args.routers or router == "default":
                        label = ((f"default ({report['method']}, {report['target_layout']})", f"default ({report['router']})") if method == "default"
                                 else (method, router))
                        for name, e in evals.items():
                            t = time.perf_counter()
                            res = evaluate(out, e)
                            rows.append(row(frac, N, K, S, *label, res, denses[name], cal, split_s, time.perf_counter() - t, args) | {"eval_text": name})
                    if "oracle" in args.routers and not oracle_done:
                        for name, e in evals.items():
                            t = time.perf_counter()
                            res = evaluate(out, e, mode="oracle")
                            rows.append(row(frac, N, K, S, method, "oracle", res, denses[name], {"rel_err": cal["oracle_rel_err"]}, split_s,
                                            time.perf_counter() - t, args) | {"eval_text": name})
                        oracle_done = True
                    for f in out.iterdir():
                        f.unlink()
                    out.rmdir()
    finally:
        for p in sorted(scratch.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        scratch.rmdir()
    _calibration.ffn_inputs = cache.original
    return {
        "model": source.name,
        "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        "calibration_tokens": args.calibration_tokens,
        "calibration": args.calibration,
        "sequential": args.sequential,
        "first_k_dense": args.first_k_dense,
        "eval": {"sequences": args.eval_seqs, "seq_len": args.seq_len, "tokens": need},
        "dense_ppl": dense["ppl"],
        "dense_ppl_by_text": {n: d["ppl"] for n, d in denses.items()},
        "eval_texts": list(args.eval_texts),
        "calibration_s": cache.computed_s,
        "total_s": time.perf_counter() - t0,
        "rows": rows,
    }


def row(frac, N, K, S, method, router, res, dense, cal, split_s, eval_s, args) -> dict:
    r = {
        "active": frac, "experts": N + S, "shared": S, "routed": N, "top_k": K, "method": method, "router": router,
        "ppl": res["ppl"], "ratio": res["ppl"] / dense["ppl"], "oracle_agreement": res.get("oracle_agreement"),
        "calibration_rel_err": cal["rel_err"], "split_s": split_s, "eval_s": eval_s,
    }
    agree = f", agree {r['oracle_agreement']:.2f}" if r["oracle_agreement"] is not None else ""
    log(f"{frac}% {method:12s} {router:8s}: ppl {r['ppl']:8.2f} x{r['ratio']:.2f}{agree}, cal rel_err {r['calibration_rel_err']:.3f} "
        f"(split {split_s:.0f}s, eval {eval_s:.0f}s)", args)
    return r


def log(msg: str, args) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def table(result: dict) -> str:
    """Markdown: one row per (active fraction, method), ppl ratio per router."""
    routers = [r for r in ROUTERS if any(x["router"] == r for x in result["rows"])]
    head = ("| active | experts (shared + top-k of routed) | method | held-out text | " + " | ".join(f"{r} ppl (x dense)" for r in routers)
            + " | fitted/centroid agree w/ oracle |")
    lines = [head, "|" + "---|" * (5 + len(routers))]
    keys = []
    for x in result["rows"]:
        key = (x["active"], x["method"], x.get("eval_text", "pydoc"))
        if key not in keys:
            keys.append(key)
    for frac, method, text in keys:
        got = {x["router"]: x for x in result["rows"] if (x["active"], x["method"], x.get("eval_text", "pydoc")) == (frac, method, text)}
        any_row = next(iter(got.values()))
        cells = [f"{got[r]['ppl']:.2f} (x{got[r]['ratio']:.2f})" if r in got else "" for r in routers]
        agree = " / ".join(f"{got[r]['oracle_agreement']:.2f}" for r in ("fitted", "centroid") if r in got and got[r]["oracle_agreement"] is not None)
        lines.append(f"| {frac}% | {any_row['shared']} + {any_row['top_k']} of {any_row['routed']} | {method} | {text} | " + " | ".join(cells) + f" | {agree} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", default="75,50,25", help="active fractions in %% (of 75, 50, 25)")
    p.add_argument("--methods", default=",".join(METHODS), help="partition methods, and `default`: the command without --method / --router")
    p.add_argument("--routers", default=",".join(ROUTERS), help="centroid, fitted, oracle (the oracle is evaluated on the first split's experts)")
    p.add_argument("--calibration-tokens", type=int, default=4096)
    p.add_argument("--calibration", default="pydoc", help="calibration texts, comma-separated: pydoc, manuals (built-in) or files; several are interleaved")
    p.add_argument("--split", action="append", default=[], metavar="FRAC:ROUTED:TOPK:SHARED",
                   help="the split measured at an active fraction (default: %s)" % ", ".join(f"{f}:{n}:{k}:{s}" for f, (n, k, s) in CONFIGS.items()))
    p.add_argument("--eval-seqs", type=int, default=8, help="held-out sequences of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-texts", default="pydoc", help="held-out texts: pydoc (topics disjoint from the calibration), apache (Debian's Apache-2.0 licence: another domain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="a dense Llama-like checkpoint with tokenizer.json and FFN width divisible by 16 (default: SmolLM2-135M)")
    p.add_argument("--workdir", help="where the temporary splits go (default: the system temp dir)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--first-k-dense", type=int, default=0, help="keep the first K layers dense (split_experts(first_k_dense=K))")
    p.add_argument("--sequential", action="store_true", help="calibrate each layer on the already-split layers' outputs (split_experts(sequential=True))")
    p.add_argument("--quick", action="store_true", help="50%% only, contiguous + coactivation, 2048 calibration tokens, 4 held-out sequences")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    args = p.parse_args(argv)
    if args.quick:
        args.fractions, args.methods, args.calibration_tokens, args.eval_seqs = "50", "contiguous,coactivation", 2048, 4
    for spec in args.split:
        try:
            frac, n, k, s_ = (int(v) for v in spec.split(":"))
        except ValueError:
            p.error(f"--split {spec}: expected FRAC:ROUTED:TOPK:SHARED")
        CONFIGS[frac] = (n, k, s_)
    args.calibration = [c for c in args.calibration.split(",") if c]
    args.fractions = [int(f) for f in str(args.fractions).split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    args.routers = [r for r in args.routers.split(",") if r]
    args.eval_texts = [t for t in args.eval_texts.split(",") if t]
    bad = [f for f in args.fractions if f not in CONFIGS] + [m for m in args.methods if m not in METHODS and m != "default"] + [r for r in args.routers if r not in ROUTERS] + [t for t in args.eval_texts if t not in ("pydoc", "apache")]
    if bad:
        p.error(f"unknown {bad} (fractions {list(CONFIGS)}, methods {METHODS}, routers {ROUTERS})")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        print(f"{result['model']}: dense perplexity {result['dense_ppl']:.3f} on {result['eval']['tokens']} held-out tokens "
              f"({result['eval']['sequences']} x {result['eval']['seq_len']}); calibration {result['calibration_tokens']} tokens of {'+'.join(result['calibration'])}; "
              f"{result['total_s'] / 60:.1f} min")
        print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
