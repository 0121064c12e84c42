#!/usr/bin/env python
"""Making an MoE smaller, measured: prune-experts (reap, frequency, mass, random) and merge-experts on
the only MoEs a package here ships material for.

No trained MoE ships in any package on this machine, so the MoEs are made from SmolLM2-135M-Instruct
(dense, 30 layers, FFN 1536) by the best measured training-free split (BENCHMARKS.md "quality"):
`recipe` is recipes/smollm2-135m-split-50 as written (coactivation partition + fitted router, layer 0 dense,
4 shared + top-4 of 12 routed experts of 96 neurons, glm4_moe), `recipe-fine` its exact 4x finer split (the same 384 shared neurons +
top-16 of 48 routed experts of 24); `coarse` / `fine` are the recipe's settings before 2026-12-02 (2 shared + top-6
of 14, deepseek) and their 4x finer split. Each is reduced by removing 25% and 50% of its routed experts per MoE
layer, by every method; held-out perplexity (pydoc topics disjoint from the calibration text, 8 x 256 tokens)
against the unreduced MoE.

    python benchmarks/prune_quality.py [--json out.json] [--calibration-tokens 4096] [--moe recipe recipe-fine ...] [--methods ...]
        [--train-steps 120] [--expert-lr 3e-5] [--fractions 0.25 0.5] [--workdir DIR]

`balanced`: the coarse split in glm4_moe's layout with its selection biases set for equal loads; `trained`: that
split's routers sharpened, balanced and then trained end to end (next-token loss, DeepSeek-V3's bias updates
keeping the loads even): the nearest to a trained, load-balanced MoE that 2 CPU cores make (`train_router`);
`recipe-trained`: the recipe's split likewise, its experts trained with its routers (`--expert-lr`);
`recipe-trained-fine`: that trained MoE's exact 4x finer split (the fine-grained question on trained experts).

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
from moesurgery.recipes import load_recipe  # noqa: E402
from moesurgery.texts import builtin_text, calibration_text, heldout_text  # noqa: E402
from moesurgery.verify import verify  # noqa: E402

RECIPE = load_recipe("smollm2-135m-split-50", "split-experts")  # 4 shared + top-4 of 12 routed experts of 96, glm4_moe
METHODS = ("reap", "output", "frequency", "random")  # mass ranked exactly as frequency on both MoEs (2026-12-01 run)
MERGES = {"merge": dict(method="select", grouping="dominant"),  # the default: centres ranked as `output` prunes
          "merge-frequency": dict(method="select", grouping="dominant", centres="frequency"),  # the most used experts as centres (M-SMoE; the default until 2026-12-02)
          "merge-reap": dict(method="select", grouping="dominant", centres="reap"),  # centres as REAP prunes
          "merge-hcsmoe": dict(method="frequency", grouping="hierarchical")}  # HC-SMoE: average-linkage, frequency-weighted mean


def held_out_ppl(src: Path, out: Path) -> float:
    v = verify(src, out, text=heldout_text(), batch=8, seq_len=256)
    return v["perplexity"]["candidate"]


def balance(path: Path, out: Path, text: str, tokens: int, steps: int = 400) -> dict:
    """`path` (an MoE with a selection bias: sigmoid scores + e_score_correction_bias) with its biases set so every
    routed expert gets the same share of the calibration tokens, as trained MoEs are kept balanced (DeepSeek-V3's
    auxiliary-loss-free update: b_e += step * sign(mean load - load_e), on each layer's own streamed inputs, the
    balanced layers below feeding the next). Written as a copy of `path` with only the bias tensors changed."""
    from dataclasses import replace

    import torch

    from moesurgery.calibration import chunk, ffn_inputs, tokenize
    from moesurgery.canonical import MoE
    from moesurgery.lazy import Lazy
    from moesurgery.model_io import open_model

    model = open_model(path).model
    ids = chunk(tokenize(path, text, model.arch.vocab_size), 256, tokens)
    biases, spread = {}, []
    stream = ffn_inputs(model, ids)
    step = next(stream, None)
    while step is not None:
        i, h = step
        moe, replacement = model.layers[i].ffn, None
        if isinstance(moe, MoE):
            r = moe.router
            scores = torch.sigmoid(h @ r.weight.load().float().T)  # [T, E]
            E, k = scores.shape[1], r.top_k
            b = r.bias.load().float().clone()
            size = float(scores.std()) * 0.1
            for _ in range(steps):
                load = torch.bincount((scores + b).topk(k, dim=-1).indices.flatten(), minlength=E).float()
                b += size * torch.sign(load.mean() - load)
                size *= 0.99
            load = torch.bincount((scores + b).topk(k, dim=-1).indices.flatten(), minlength=E).float()
            spread.append(float(load.max() / load.mean()))
            biases[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = b
            replacement = replace(moe, router=replace(r, bias=Lazy.of(b)))
        try:
            step = stream.send(replacement)
        except StopIteration:
            step = None
    rewrite(path, out, lambda k, _: biases.get(k))
    return {"max_over_mean_load": max(spread), "layers": len(spread)}


def load_spread(path: Path, text: str, tokens: int) -> dict:
    """How balanced `path`'s routing is on `text` (inspect's routing statistics): busiest expert / mean, over layers."""
    from moesurgery.calibration import chunk, tokenize
    from moesurgery.model_io import open_model
    from moesurgery.routing import routing_statistics

    model = open_model(path).model
    layers = routing_statistics(model, chunk(tokenize(path, text, model.arch.vocab_size), 256, tokens))
    spread = [s["max_over_mean"] for s in layers.values()]
    return {"max_over_mean_load": max(spread), "mean_over_layers": sum(spread) / len(spread)}


def rewrite(path: Path, out: Path, change) -> None:
    """A copy of checkpoint `path` at `out`, every tensor t named k replaced by change(k, t) where that is not None."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(path, out)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        hit = {k: new.to(t.dtype).contiguous() for k, t in tensors.items() if (new := change(k, t)) is not None}
        if hit:
            save_file({**tensors, **hit}, shard, metadata={"format": "pt"})


def sharpen(path: Path, out: Path, factor: float) -> None:
    """`path` with its router rows times `factor`. A split's router logits are squeezed into +-0.02 so the chosen
    experts get equal weights; a trained router's are not, and its selection biases need scores that differ."""
    rewrite(path, out, lambda k, t: t.float() * factor if k.endswith("mlp.gate.weight") else None)


def train_router(path: Path, out: Path, text: str, steps: int = 120, batch: int = 4, lr: float = 1e-4, gamma: float = 1e-3,
                 expert_lr: float | None = None) -> dict:
    """`path` (glm4_moe) with its routers trained end to end: next-token loss on `text` (256-token sequences,
    `batch` per step, Adam, in transformers' own class), while the selection biases follow DeepSeek-V3's
    auxiliary-loss-free update (b_e += gamma * sign(mean load - load_e) after every step). A trained, load-balanced
    MoE, as far as 2 CPU cores allow. Only the router rows train, unless `expert_lr` is given: then every MoE
    layer's experts and shared experts train too (at that rate), so they adapt to the tokens the balance sends them."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from moesurgery.calibration import chunk, tokenize

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    gates = {n: m for n, m in model.named_modules() if hasattr(m, "e_score_correction_bias")}
    model.requires_grad_(False)
    loads = {}
    for name, gate in gates.items():
        gate.weight.requires_grad_(True)  # the router returns (logits, weights, indices [T, k])
        gate.register_forward_hook(lambda mod, _, out, name=name: loads.__setitem__(name, torch.bincount(out[2].flatten(), minlength=mod.num_experts)))
    groups = [{"params": [g.weight for g in gates.values()], "lr": lr}]
    if expert_lr is not None:  # the MoE layers' experts and shared experts (not their routers: above)
        experts = [t for n, t in model.named_parameters() if ".mlp.experts." in n or ".mlp.shared_experts." in n]
        for t in experts:
            t.requires_grad_(True)
        groups.append({"params": experts, "lr": expert_lr})
    ids = chunk(tokenize(path, text, model.config.vocab_size), 256, 10**9)  # [S, 256]: all of it
    opt = torch.optim.Adam(groups)
    losses = []
    for _ in range(steps):
        x = ids[torch.randint(0, ids.shape[0], (batch,))]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        with torch.no_grad():
            for name, gate in gates.items():
                load = loads[name].float()
                gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
    if expert_lr is None:
        state = {f"{n}.{k}": t.detach() for n, g in gates.items() for k, t in (("weight", g.weight), ("e_score_correction_bias", g.e_score_correction_bias))}
        rewrite(path, out, lambda k, _: state.get(k))
    else:  # most tensors changed: transformers writes the checkpoint, tokenizer files copied beside it
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        for f in path.iterdir():
            if f.is_file() and (f.suffix not in (".safetensors", ".json") or f.name.startswith(("tokenizer", "special_tokens"))):
                shutil.copy(f, out / f.name)
    return {"steps": steps, "tokens_per_step": batch * 256, "expert_lr": expert_lr,
            "loss_first_10": sum(losses[:10]) / 10, "loss_last_10": sum(losses[-10:]) / 10}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--moe", nargs="+", default=["recipe", "recipe-fine"], choices=["recipe", "recipe-fine", "recipe-trained", "recipe-trained-fine", "coarse", "fine", "balanced", "trained"],
                    help="which MoEs to reduce (recipe: SmolLM2 split by recipes/smollm2-135m-split-50, recipe-fine: its exact 4x finer split; "
                         "coarse / fine: the recipe's settings before 2026-12-02 and their 4x finer split; "
                         "balanced: the coarse split in glm4_moe's layout, its selection biases set for equal loads; "
                         "trained: that split's routers trained end to end with balancing biases, see train_router; "
                         "recipe-trained: the recipe's split, balanced, its routers and experts trained end to end; "
                         "recipe-trained-fine: its exact 4x finer split)")
    ap.add_argument("--train-steps", type=int, default=120, help="router training steps of the trained MoE (4 x 256 tokens each)")
    ap.add_argument("--expert-lr", type=float, default=3e-5, help="the recipe-trained MoE's expert learning rate (Adam; routers 1e-4)")
    ap.add_argument("--workdir", type=Path, help="build the MoEs here and reuse those built there before (default: a temporary directory)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5], help="shares of the routed experts removed")
    ap.add_argument("--methods", nargs="+", default=[*METHODS, *MERGES], choices=[*METHODS, *MERGES], help="which rows to run")
    args = ap.parse_args()
    from tests.real_model import smollm2_checkpoint

    dense = Path(smollm2_checkpoint())
    cal = calibration_text()
    rows, built_report = [], {}
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        tmp = args.workdir or Path(scratch)  # with --workdir the MoEs built there before are reused
        tmp.mkdir(parents=True, exist_ok=True)
        built = lambda p: (p / "config.json").exists()  # noqa: E731
        coarse, fine = tmp / "coarse", tmp / "fine"
        moes = []
        if {"coarse", "fine"} & set(args.moe) and not built(fine):  # the fine MoE is the coarse one's exact 4x finer split
            t = time.time()
            split_experts(dense, coarse, experts=14, top_k=6, shared=2, calibration_text=cal, calibration_tokens=args.calibration_tokens,
                          first_k_dense=1, to="deepseek", allow_lossy=True)
            split_experts(coarse, fine, granularity=4)
            print(f"splits: {time.time() - t:.0f} s", flush=True)
        if {"coarse", "fine"} & set(args.moe):
            moes = [("coarse", coarse, 14, 6), ("fine", fine, 56, 24)]
        recipe, recipe_fine = tmp / "recipe", tmp / "recipe-fine"
        if {"recipe", "recipe-fine"} & set(args.moe) and not built(recipe_fine):  # the recipe as written, then 4x finer (exact)
            options = load_recipe("smollm2-135m-split-50", "split-experts")
            text = builtin_text(options.pop("calibration"))  # pydoc
            t = time.time()
            split_experts(dense, recipe, **options, calibration_text=text, calibration_tokens=args.calibration_tokens, allow_lossy=True)
            split_experts(recipe, recipe_fine, granularity=4)
            print(f"recipe splits: {time.time() - t:.0f} s", flush=True)
        if {"recipe", "recipe-fine"} & set(args.moe):
            E, k = RECIPE["experts"], RECIPE["top_k"]
            moes += [("recipe", recipe, E, k), ("recipe-fine", recipe_fine, 4 * E, 4 * k)]
        biased, trained = tmp / "biased", tmp / f"trained-{args.train_steps}"
        if {"balanced", "trained"} & set(args.moe) and not built(biased):  # a trained MoE's loads are balanced; the fitted router's are not
            split_experts(dense, biased, experts=14, top_k=6, shared=2, calibration_text=cal, calibration_tokens=args.calibration_tokens,
                          first_k_dense=1, to="glm4_moe", allow_lossy=True)
        if "balanced" in args.moe and not built(tmp / "balanced"):
            print(json.dumps({"balanced": balance(biased, tmp / "balanced", cal, args.calibration_tokens)}), flush=True)
        if "balanced" in args.moe:
            moes.append(("balanced", tmp / "balanced", 14, 6))
        if "trained" in args.moe and not built(trained):  # the biased split's routers sharpened, balanced, then trained end to end
            sharpen(biased, tmp / "sharp", 50.0)  # (sharp-balanced is rebuilt: a few minutes)
            print(json.dumps({"trained, balanced first": balance(tmp / "sharp", tmp / "sharp-balanced", cal, args.calibration_tokens)}), flush=True)
            t = time.time()
            print(json.dumps({"trained": train_router(tmp / "sharp-balanced", trained, cal, steps=args.train_steps), "seconds": time.time() - t}), flush=True)
            print(json.dumps({"trained, loads": load_spread(trained, cal, args.calibration_tokens),
                              "coarse split, loads": load_spread(biased, cal, args.calibration_tokens)}), flush=True)
        if "trained" in args.moe:
            moes.append(("trained", trained, 14, 6))
        recipe_trained = tmp / f"recipe-trained-{args.train_steps}"
        recipe_trained_fine = tmp / f"recipe-trained-{args.train_steps}-fine"
        wants_trained = bool({"recipe-trained", "recipe-trained-fine"} & set(args.moe))
        if wants_trained and not built(recipe_trained):  # the recipe's split sharpened, balanced, then trained
            if not built(recipe):
                options = load_recipe("smollm2-135m-split-50", "split-experts")
                text = builtin_text(options.pop("calibration"))
                split_experts(dense, recipe, **options, calibration_text=text, calibration_tokens=args.calibration_tokens, allow_lossy=True)
            sharpen(recipe, tmp / "recipe-sharp", 50.0)
            print(json.dumps({"recipe-trained, balanced first": balance(tmp / "recipe-sharp", tmp / "recipe-sharp-balanced", cal, args.calibration_tokens)}), flush=True)
            t = time.time()
            trained_report = train_router(tmp / "recipe-sharp-balanced", recipe_trained, cal, steps=args.train_steps, expert_lr=args.expert_lr)
            built_report["recipe-trained"] = {**trained_report, "seconds": time.time() - t}
            print(json.dumps(built_report), flush=True)
            print(json.dumps({"recipe-trained, loads": load_spread(recipe_trained, cal, args.calibration_tokens),
                              "recipe split, loads": load_spread(recipe, cal, args.calibration_tokens)}), flush=True)
        if "recipe-trained-fine" in args.moe and not built(recipe_trained_fine):
            split_experts(recipe_trained, recipe_trained_fine, granularity=4)
        if wants_trained:
            E, k = RECIPE["experts"], RECIPE["top_k"]
            moes += [("recipe-trained", recipe_trained, E, k), ("recipe-trained-fine", recipe_trained_fine, 4 * E, 4 * k)]
        base = {name: held_out_ppl(path, path) for name, path, _, _ in moes if name in args.moe}
        dense_ppl = verify(dense, dense, text=heldout_text(), batch=8, seq_len=256)["perplexity"]["reference"]
        print(json.dumps({"dense": dense_ppl, **base}), flush=True)
        for name, path, E, k in moes:
            if name not in args.moe:
                continue
            for share in args.fractions:
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
    result = {"machine": machine(), "built": built_report, "dense_ppl": dense_ppl, "base_ppl": base, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
