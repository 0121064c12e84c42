"""The `moesurgery` command line: a thin typer layer over the library.

Exit codes: 0 success, 1 unexpected failure, 2 usage error, 3 bad or unsupported input,
4 a verification expectation not met, 5 environment (permissions, read-only, disk full),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Errors are one `error: ...` line on stderr
(and, with --json, a JSON document `{"error", "exit_code"}` on stdout). Nothing here imports torch
at start-up: `--help` and usage errors answer at once; commands import the library when they run.
"""

from __future__ import annotations

import gc
import json
import shlex
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import click
import typer

try:  # typer >= 0.20 vendors click; older typer raises click's own exceptions
    from typer._click import exceptions as _tclick
except ImportError:  # pragma: no cover
    _tclick = click.exceptions
_EXIT = tuple({click.exceptions.Exit, getattr(_tclick, "Exit", click.exceptions.Exit)})
_ABORT = tuple({click.exceptions.Abort, getattr(_tclick, "Abort", click.exceptions.Abort)})
_CLICK_ERROR = tuple({click.ClickException, _tclick.ClickException})
_USAGE = tuple({click.UsageError, _tclick.UsageError})
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import (EXIT_INTERRUPTED, EXIT_UNEXPECTED, EXIT_USAGE, BadInputError, Interrupted, MoeSurgeryError, UsageError,
                     VerificationError, environment_error)
from .units import human_bytes, human_count, parse_size

PRUNE_DEFAULT = "output"  # the best measured saliency (BENCHMARKS.md "pruning"); the library's default too

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Mixture-of-Experts surgery on Hugging Face checkpoints: inspect, convert, split, upcycle, verify, bench.",
)
stdout = Console(soft_wrap=True, emoji=False)  # `tiny:llama` is a name, not :llama:
state: dict = {"debug": False, "argv": None}

SourceArg = typer.Argument(..., help="Local checkpoint directory, Hub repo id `org/name[@revision]`, or `tiny:<family>` (built in).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout and nothing else there.")


def emit_json(report: dict) -> None:
    state["json_emitted"] = True
    sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")


def command_line() -> str:
    argv = state["argv"] if state["argv"] is not None else sys.argv[1:]
    return "moesurgery " + " ".join(shlex.quote(a) for a in argv)


def version_callback(value: bool):
    if value:
        print(f"moesurgery {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(None, "--version", callback=version_callback, is_eager=True, help="Show the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
):
    state["debug"] = debug


# ------------------------------------------------------------------------------------------ inspect
@app.command()
def inspect(
    source: str = SourceArg,
    text: Optional[str] = typer.Option(None, "--text", help="Also run the model on a text file (or `pydoc`, built-in English) and report routing statistics per MoE layer and expert."),
    tokens: int = typer.Option(4096, "--tokens", help="With --text: tokens to run (in sequences of 256)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --text: write a layer x expert heat map of routed tokens to this PNG (needs matplotlib)."),
    json_out: bool = JsonOpt,
):
    """Describe a checkpoint: family, dtypes, size, attention, per-layer FFN, parameters (+ routing statistics with --text)."""
    from .inspection import inspect_model

    if (plot is not None or tokens != 4096) and text is None:
        raise UsageError("--tokens and --plot go with --text")
    if tokens < 1:
        raise UsageError(f"--tokens must be >= 1, not {tokens}")
    report = inspect_model(source)
    if text is not None:
        from .inspection import add_routing

        add_routing(report, source, _calibration(text), tokens, text if text == "pydoc" else Path(text).name)
        if plot is not None:
            from .routing import plot_heatmap

            plot_heatmap({l["index"]: l["routing"] for l in report["layers"] if "routing" in l}, plot)
    if json_out:
        return emit_json(report)
    a = report["attention"]
    head = Table.grid(padding=(0, 2))
    head.add_row("source", report["source"])
    head.add_row("family", f"{report['model_type']} ({report['architecture']})")
    w = report.get("wrapper")
    if w and not w["model_type"]:
        head.add_row("prefix", f"text-only, the tensors under {w['text_prefix']} (kept there)"
                     + (f"; {w['passthrough_tensors']} other tensors pass through" if w["passthrough_tensors"] else ""))
    elif w:
        head.add_row("wrapper", f"{w['model_type']} ({w['architecture']}): the language model is under {w['text_prefix']}; "
                     f"{w['passthrough_tensors']} other tensors ({human_bytes(w['passthrough_bytes'])}: {', '.join(w['passthrough_parts'])}) "
                     "pass through every command byte for byte")
    head.add_row("size", f"{human_bytes(report['bytes'])} in {report['shards']} shard(s); " + ", ".join(f"{k} {human_bytes(v)}" for k, v in report["dtypes"].items()))
    if report["fp8_block_size"]:
        b0, b1 = report["fp8_block_size"]
        head.add_row("fp8", f"{report['fp8_weights']} block-scaled float8 weights ({b0}x{b1} blocks), read dequantized to bfloat16 "
                     f"(sizes above); {human_bytes(report['stored_bytes'])} on disk")
    if report.get("int4_group_size"):
        head.add_row("int4", f"{report['int4_weights']} compressed-tensors INT4 weights (groups of {report['int4_group_size']}), read dequantized "
                     f"to bfloat16 (sizes above); {human_bytes(report['stored_bytes'])} on disk")
    head.add_row("shape", f"{report['num_layers']} layers, hidden {report['hidden_size']}, vocab {report['vocab_size']}" + (", tied embeddings" if report["tie_word_embeddings"] else ""))
    rope = f"rope theta {a['rope_theta']:g}" + (f", scaling {a['rope_scaling'].get('rope_type')}" if a["rope_scaling"] else "")
    head.add_row("attention", f"{a['summary']}; {rope}")
    head.add_row("parameters", f"{human_count(report['params_total'])} total, {human_count(report['params_active'])} active per token")
    stdout.print(head)
    table = Table(title="FFN per layer")
    for col in ("layers", "kind", "experts", "top-k", "expert width", "shared width", "router"):
        table.add_column(col)
    for first, last, row in _group_layers(report["layers"]):
        span = str(first) if first == last else f"{first}-{last}"
        if row["kind"] == "dense":
            table.add_row(span, "dense", "", "", str(row["dense_width"]), "", "")
        else:
            router = row["scoring"] + (" renorm" if row["renormalize"] else "") + (f" x{row['routed_scaling_factor']:g}" if row["routed_scaling_factor"] != 1 else "")
            router += f" groups {row['topk_group']}/{row['n_group']}" if row["n_group"] > 1 else ""
            router += " +bias" if row["correction_bias"] else ""
            shared = str(row["shared_width"] or "") + (" gated" if row["shared_gate"] else "")
            table.add_row(span, "moe", str(row["num_experts"]), str(row["top_k"]), str(row["expert_width"]), shared, router)
    stdout.print(table)
    if report.get("routing"):
        print_routing(report)
    for note in report["notes"]:
        stdout.print(f"note: {note}")


def print_routing(report: dict) -> None:
    r = report["routing"]
    rows = sorted((l for l in report["layers"] if "routing" in l), key=lambda l: -l["routing"]["max_over_mean"])
    table = Table(title=f"routing on {r['text']} ({r['tokens']} tokens), worst balanced layers first")
    for col in ("layer", "experts", "dead", "max/mean", "CV", "entropy", "busiest expert", "top co-activated pair"):
        table.add_column(col, justify="right")
    for l in rows:
        s = l["routing"]
        busiest = max(range(len(s["counts"])), key=lambda e: s["counts"][e])
        pair = s["coactivation_top_pairs"][0] if s["coactivation_top_pairs"] else None
        table.add_row(str(l["index"]), str(s["experts"]), str(len(s["dead"])), f"{s['max_over_mean']:.2f}", f"{s['cv']:.2f}", f"{s['entropy']:.3f}",
                      f"{busiest} ({s['counts'][busiest]})", f"{pair['experts']} ({pair['tokens']})" if pair else "")
    stdout.print(table)


def _group_layers(layers: list[dict]):
    """Runs of identical layers: (first, last, row)."""
    runs = []
    for row in layers:
        key = {k: v for k, v in row.items() if k not in ("index", "routing")}
        if runs and runs[-1][2] == key:
            runs[-1][1] = row["index"]
        else:
            runs.append([row["index"], row["index"], key])
    return runs


# ------------------------------------------------------------------------------------------ convert
@app.command()
def convert(
    source: str = SourceArg,
    output: Path = typer.Argument(..., help="Output directory (built in a temporary sibling, renamed at the end)."),
    to: str = typer.Option(..., "--to", help="Target layout (see README, Layout support; `inspect` names a checkpoint's): e.g. mixtral, qwen2_moe, qwen3_moe, deepseek_v3, glm4_moe, kimi_k2, mistral4."),
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="Convert even when the target cannot compute the same function."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and print the output; write nothing."),
    serve_tp: int = typer.Option(1, "--serve-tp", help="Tensor-parallel size it will be served with (serving limits are checked against it)."),
    serve_ep: int = typer.Option(1, "--serve-ep", help="Expert-parallel size it will be served with."),
    fmt: str = typer.Option("auto", "--format", help="Checkpoint format: auto (the source's: Mistral's params.json + consolidated*.safetensors stays so where the layout has it), hf (transformers'), native (Mistral's; mistral, mixtral, mistral4)."),
    json_out: bool = JsonOpt,
):
    """Change a checkpoint's layout without surgery (exact where the math allows)."""
    from .convert import convert as run_convert

    _check_serve(serve_tp, serve_ep)
    report = run_convert(
        source, output, to, allow_lossy=allow_lossy, overwrite=overwrite, max_shard_size=parse_size(max_shard_size),
        dry_run=dry_run, command=command_line(), serve_tp=serve_tp, serve_ep=serve_ep, fmt=_format(fmt),
    )
    if json_out:
        return emit_json(report)
    print_conversion(report)


def print_conversion(report: dict) -> None:
    verb = "would write" if report["dry_run"] else "wrote"
    style = "green" if report["exact"] else "yellow"
    stdout.print(f"{report['source_layout']} -> {report['target_layout']}: [{style}]{report['verdict']}[/{style}]")
    for reason in report["lossy_reasons"]:
        stdout.print(f"  [yellow]lossy:[/yellow] {reason}")
    for note in report["notes"]:
        stdout.print(f"  note: {note}")
    for warning in report.get("serving", []):
        stdout.print(f"  [yellow]serving:[/yellow] {warning}")
    stdout.print(
        f"{verb} {report['tensors']} tensors ({report['tensors_untouched']} untouched), {human_bytes(report['bytes'])} "
        f"in {len(report['shards'])} shard(s) to {report['output']}"
    )


# ------------------------------------------------------------------------------------------ planned
def _not_built(name: str):
    raise UsageError(f"`moesurgery {name}` is not built yet (see the issue tracker)")


CommonSurgery = dict(
    to=typer.Option(None, "--to", help="Target layout (default: the best native one that holds the result exactly: glm4_moe for a "
                    "dense source, qwen2_moe for Mixtral-style softmax routers, the source's own for finer experts; "
                    "`deepseek` is DeepSeek's v1 format, which needs its remote code)."),
    serve_tp=typer.Option(1, "--serve-tp", help="Tensor-parallel size it will be served with (serving limits are checked against it)."),
    serve_ep=typer.Option(1, "--serve-ep", help="Expert-parallel size it will be served with."),
    allow_lossy=typer.Option(False, "--allow-lossy", help="Write even when the target layout cannot express the result exactly."),
    dry_run=typer.Option(False, "--dry-run", help="Print the plan (layers, experts, parameters, size, exactness); write nothing."),
    overwrite=typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    max_shard_size=typer.Option("5GB", "--max-shard-size", help="Largest output shard."),
    seed=typer.Option(None, "--seed", help="Seed for router init / random partitions."),
    recipe=typer.Option(None, "--recipe", help="A recipe name (recipes/NAME.toml) or TOML file; flags override it."),
    fmt=typer.Option("auto", "--format", help="Checkpoint format: auto (the source's), hf (transformers'), native (Mistral's params.json + consolidated*.safetensors)."),
    json_out=JsonOpt,
)


def _format(fmt: str) -> str:
    if fmt not in ("auto", "hf", "native"):
        raise UsageError(f"--format {fmt}: expected auto, hf or native")
    return fmt


def _check_serve(tp: int, ep: int) -> None:
    if tp < 1 or ep < 1:
        raise UsageError("--serve-tp and --serve-ep must be >= 1")


def _calibration(value: str | list[str] | None) -> str | None:
    """--calibration: a file or `pydoc`; given more than once (a list in a recipe), the texts are interleaved
    in pieces so the calibration tokens hold about equal shares of each (texts.interleave)."""
    if not value:
        return None
    from .calibration import calibration_mix

    return calibration_mix([value] if isinstance(value, str) else list(value))


@app.command("split-experts")
def split_experts(
    source: str = SourceArg,
    output: Path = typer.Argument(..., help="Output directory."),
    granularity: Optional[int] = typer.Option(None, "--granularity", "-m", help="MoE source: split every expert into M finer experts (exact)."),
    experts: Optional[int] = typer.Option(None, "--experts", "-n", help="Dense source: routed experts."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Dense source: routed experts per token."),
    shared: Optional[int] = typer.Option(None, "--shared", "-s", help="Dense source: always-on experts (same width as routed ones)."),
    method: Optional[str] = typer.Option(None, "--method", help="Neuron partition: contiguous, random, kmeans, coactivation (default: coactivation with --calibration, else kmeans: the best measured)."),
    router: Optional[str] = typer.Option(None, "--router", help="Router: centroid, fitted (needs --calibration), random (default: fitted with --calibration, else centroid)."),
    calibration: Optional[List[str]] = typer.Option(None, "--calibration", help="Calibration text file, or built-in text: `pydoc` (Python's documentation), `manuals` (GNU info manuals, where installed); repeat to mix texts of several domains (interleaved, about equal shares: generalises better, BENCHMARKS.md quality)."),
    calibration_tokens: Optional[int] = typer.Option(None, "--calibration-tokens", help="Calibration tokens to use (default 4096)."),
    first_k_dense: Optional[int] = typer.Option(None, "--first-k-dense", help="Keep the first K layers dense."),
    device: str = typer.Option("cpu", "--device", help="With --calibration: where the calibration forward passes run (cpu or cuda)."),
    sequential: Optional[bool] = typer.Option(None, "--sequential/--no-sequential", help="With --calibration: calibrate each layer on the inputs the already-split layers give it (default: the dense model's; on SmolLM2 it did not help, BENCHMARKS.md)."),
    to: Optional[str] = CommonSurgery["to"], allow_lossy: bool = CommonSurgery["allow_lossy"], dry_run: bool = CommonSurgery["dry_run"],
    overwrite: bool = CommonSurgery["overwrite"], max_shard_size: str = CommonSurgery["max_shard_size"], seed: Optional[int] = CommonSurgery["seed"],
    recipe: Optional[str] = CommonSurgery["recipe"], json_out: bool = CommonSurgery["json_out"],
    serve_tp: int = CommonSurgery["serve_tp"], serve_ep: int = CommonSurgery["serve_ep"], fmt: str = CommonSurgery["fmt"],
):
    """Fine-grained experts: split each expert of an MoE (exact), or a dense FFN into routed + shared experts."""
    from .operations import split_experts as run
    from .recipes import load_recipe, merge

    from .recipes import load_model_config

    defaults = dict(granularity=None, experts=None, top_k=None, shared=0, method=None, router=None, calibration=None,
                    calibration_tokens=4096, first_k_dense=0, sequential=False, to=None, seed=0)
    types = dict(granularity=int, experts=int, top_k=int, method=str, router=str, calibration=list, to=str)
    flags = dict(granularity=granularity, experts=experts, top_k=top_k, shared=shared, method=method, router=router, calibration=calibration or None,
                 calibration_tokens=calibration_tokens, first_k_dense=first_k_dense, sequential=sequential, to=to, seed=seed)
    o = merge(load_recipe(recipe, "split-experts") if recipe else {}, flags, defaults, types)
    calibration_name = o["calibration"]
    text = _calibration(o.pop("calibration"))
    _check_serve(serve_tp, serve_ep)
    report = run(source, output, calibration_text=text, allow_lossy=allow_lossy, dry_run=dry_run, overwrite=overwrite,
                 max_shard_size=parse_size(max_shard_size), command=command_line(), device=device,
                 recipe_model=load_model_config(recipe) if recipe else None, serve_tp=serve_tp, serve_ep=serve_ep, fmt=_format(fmt),
                 calibration_name=_cal_name(calibration_name),
                 **o)
    emit_json(report) if json_out else print_surgery(report)


@app.command()
def upcycle(
    source: str = SourceArg,
    output: Path = typer.Argument(..., help="Output directory."),
    granularity: Optional[int] = typer.Option(None, "--granularity", "-g", help="Dense: routed slices G of the FFN. Mixtral: finer experts per expert M."),
    experts: Optional[int] = typer.Option(None, "--experts", "-n", help="Dense source: routed experts N (a multiple of G)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Dense source: routed experts per token (a multiple of G)."),
    shared: Optional[int] = typer.Option(None, "--shared", "-s", help="Always-on experts: carved from the FFN (dense) or extracted from what experts share (MoE)."),
    first_k_dense: Optional[int] = typer.Option(None, "--first-k-dense", help="First K layers dense: kept as they are (dense source) or the mean of their experts (MoE source, lossy)."),
    donor: Optional[list[str]] = typer.Option(None, "--donor", help="A fine-tuned model of SOURCE (repeat): each donor's FFN becomes a virtual group of --granularity experts; attention, embeddings and norms come from SOURCE."),
    prompts: Optional[list[str]] = typer.Option(None, "--prompts", help="With --donor: a text file of what the donor is good at (repeat, one per --donor, same order); initialises its router rows."),
    shared_from: str = typer.Option("base", "--shared-from", help="With --donor: shared experts carved from SOURCE's FFN (base) or from the donors' mean (mean)."),
    donor_router: Optional[str] = typer.Option(None, "--router", help="With --donor: router init: hidden (mean hidden states of the prompts, mergekit's), calibration (weighted by each donor's activation mass), random (default: hidden with --prompts)."),
    router_noise: Optional[float] = typer.Option(None, "--router-noise", help="Symmetry breaking: std of noise on router rows (lossy)."),
    reinit_fraction: Optional[float] = typer.Option(None, "--reinit-fraction", help="Drop-Upcycling: re-initialise this fraction of each expert (lossy)."),
    to: Optional[str] = CommonSurgery["to"], allow_lossy: bool = CommonSurgery["allow_lossy"], dry_run: bool = CommonSurgery["dry_run"],
    overwrite: bool = CommonSurgery["overwrite"], max_shard_size: str = CommonSurgery["max_shard_size"], seed: Optional[int] = CommonSurgery["seed"],
    recipe: Optional[str] = CommonSurgery["recipe"], json_out: bool = CommonSurgery["json_out"],
    serve_tp: int = CommonSurgery["serve_tp"], serve_ep: int = CommonSurgery["serve_ep"], fmt: str = CommonSurgery["fmt"],
):
    """Upcycle: dense -> MoE exact at init (virtual groups + shared experts); Mixtral -> DeepSeek-style; several
    fine-tuned donors of one base -> an MoE of their FFNs (--donor)."""
    from .operations import upcycle as run
    from .recipes import load_donors, load_recipe, merge

    recipe_donors, recipe_prompts = load_donors(recipe) if recipe else ([], [])
    if donor or recipe_donors:
        from .operations import upcycle_donors

        options = load_recipe(recipe, "upcycle") if recipe else {}
        _check_serve(serve_tp, serve_ep)
        texts = [_eval_text_file(p) for p in prompts] if prompts else recipe_prompts
        g = granularity if granularity is not None else options.get("granularity", 1)
        report = upcycle_donors(source, output, donors=list(donor) if donor else recipe_donors, prompts=texts, granularity=g,
                                top_k=top_k if top_k is not None else options.get("top_k"), shared=shared if shared is not None else options.get("shared", 0),
                                shared_from=shared_from, router=donor_router, to=to or options.get("to"), dry_run=dry_run, overwrite=overwrite,
                                max_shard_size=parse_size(max_shard_size), seed=seed or 0, command=command_line(), serve_tp=serve_tp, serve_ep=serve_ep, fmt=_format(fmt))
        return emit_json(report) if json_out else print_donors(report)
    if prompts or donor_router is not None:
        raise UsageError("--prompts and --router go with --donor")

    defaults = dict(granularity=None, experts=None, top_k=None, shared=0, first_k_dense=0, router_noise=0.0, reinit_fraction=0.0, to=None, seed=0)
    flags = dict(granularity=granularity, experts=experts, top_k=top_k, shared=shared, first_k_dense=first_k_dense, router_noise=router_noise,
                 reinit_fraction=reinit_fraction, to=to, seed=seed)
    from .recipes import load_model_config

    o = merge(load_recipe(recipe, "upcycle") if recipe else {}, flags, defaults, dict(granularity=int, experts=int, top_k=int, to=str))
    if o["granularity"] is None:
        raise UsageError("upcycle needs --granularity (or a --recipe that sets it)")
    _check_serve(serve_tp, serve_ep)
    report = run(source, output, allow_lossy=allow_lossy, dry_run=dry_run, overwrite=overwrite, max_shard_size=parse_size(max_shard_size),
                 command=command_line(), recipe_model=load_model_config(recipe) if recipe else None, serve_tp=serve_tp, serve_ep=serve_ep, fmt=_format(fmt), **o)
    emit_json(report) if json_out else print_surgery(report)


def print_surgery(r: dict) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_row("operation", f"{r['operation']}: {r['source']} ({r['source_layout']}) -> {r['target_layout']}")
    moe = f"{r['moe_layers']} of {r['layers']} layers MoE: {r['experts']} experts x {r['expert_width']}, top-{r['top_k']}"
    head.add_row("plan", moe + (f", shared width {r['shared_width']}" if r["shared_width"] else ""))
    head.add_row("parameters", f"{human_count(r['params_total'])} total, {human_count(r['params_active'])} active "
                 f"(source {human_count(r['source_params_total'])} / {human_count(r['source_params_active'])})")
    head.add_row("output", f"{human_bytes(r['bytes'])} in {len(r['shards'])} shard(s) -> {r['output']}" + (" (dry run: nothing written)" if r["dry_run"] else ""))
    head.add_row("expected", r["expected"])
    stdout.print(head)
    for reason in r["lossy_reasons"]:
        stdout.print(f"  [yellow]lossy:[/yellow] {reason}")
    for note in r["notes"]:
        stdout.print(f"  note: {note}")
    for warning in r.get("serving", []):
        stdout.print(f"  [yellow]serving:[/yellow] {warning}")
    if r.get("measured") and "rel_err" in r["measured"][0]:
        m = r["measured"]
        mean = sum(x["rel_err"] for x in m) / len(m)
        oracle = sum(x["oracle_rel_err"] for x in m) / len(m)
        stdout.print(f"measured on {'calibration' if m[0].get('calibration') else 'random'} inputs: FFN rel err {mean:.3f} mean over layers (oracle router {oracle:.3f})")
    if "check" in r:
        c = r["check"]
        style = "green" if c["verdict"] == "exact" else "yellow"
        stdout.print(f"check ({c['inputs']}, layers {[l['index'] for l in c['layers']]}): [{style}]{c['verdict']}[/{style}], max rel err {c['rel_err']:.2e}")
        if c.get("nonfinite"):
            stdout.print(f"  [yellow]NaN/Inf[/yellow] in {', '.join(c['nonfinite'])}")


@app.command("prune-experts")
def prune_experts(
    source: str = SourceArg,
    output: Path = typer.Argument(..., help="Output directory."),
    keep: Optional[int] = typer.Option(None, "--keep", help="Experts to keep in every MoE layer."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Share of each layer's experts to remove (0-1)."),
    method: Optional[str] = typer.Option(None, "--method", help=f"Saliency: reap (REAP: mean over an expert's tokens of weight x output norm), output (that summed over its tokens: the routed output pruning removes), frequency, mass, random (default: {PRUNE_DEFAULT}, the best measured)."),
    calibration: Optional[List[str]] = typer.Option(None, "--calibration", help="Text the saliencies are measured on (a file, or `pydoc`; default pydoc; repeat to mix texts)."),
    calibration_tokens: int = typer.Option(4096, "--calibration-tokens", help="Calibration tokens."),
    per_layer: bool = typer.Option(True, "--per-layer/--global", help="Rank experts within each layer (layouts hold one expert count per model)."),
    text: Optional[str] = typer.Option(None, "--text", help="Also measure perplexity against the source on this text (a file, or `pydoc` held-out)."),
    to: Optional[str] = CommonSurgery["to"], dry_run: bool = CommonSurgery["dry_run"], overwrite: bool = CommonSurgery["overwrite"],
    max_shard_size: str = CommonSurgery["max_shard_size"], seed: Optional[int] = CommonSurgery["seed"], json_out: bool = CommonSurgery["json_out"],
    serve_tp: int = CommonSurgery["serve_tp"], serve_ep: int = CommonSurgery["serve_ep"], fmt: str = CommonSurgery["fmt"], recipe: Optional[str] = CommonSurgery["recipe"],
):
    """Make an MoE smaller: drop the least salient experts of every layer (by routed output by default), router kept consistent."""
    from .operations import prune_experts as run

    _check_serve(serve_tp, serve_ep)
    if calibration_tokens < 1:
        raise UsageError(f"--calibration-tokens must be >= 1, not {calibration_tokens}")
    from .recipes import load_model_config, load_recipe, merge

    o = merge(load_recipe(recipe, "prune-experts") if recipe else {}, dict(keep=keep, fraction=fraction, method=method, to=to),
              dict(keep=None, fraction=None, method=PRUNE_DEFAULT, to=None), dict(keep=int, fraction=float, method=str, to=str))
    report = run(source, output, calibration_text=_calibration(calibration),
                 calibration_name=_cal_name(calibration), calibration_tokens=calibration_tokens, per_layer=per_layer, eval_text=_eval_text(text),
                 dry_run=dry_run, overwrite=overwrite, seed=seed or 0, max_shard_size=parse_size(max_shard_size), command=command_line(),
                 serve_tp=serve_tp, serve_ep=serve_ep, fmt=_format(fmt), recipe_model=load_model_config(recipe) if recipe else None, **o)
    emit_json(report) if json_out else print_reduction(report)


@app.command("merge-experts")
def merge_experts(
    source: str = SourceArg,
    output: Path = typer.Argument(..., help="Output directory."),
    into: int = typer.Option(..., "--into", help="Experts per MoE layer after merging."),
    method: str = typer.Option("select", "--method", help="Merged weights: select (the members' strongest neurons, down_proj refitted to their routed output; the best measured), frequency (frequency-weighted average, HC-SMoE's), aligned (that average, down_proj refitted)."),
    grouping: str = typer.Option("dominant", "--grouping", help="Clusters: dominant (N centre experts (--centres) absorb the rest, by output similarity; M-SMoE's, the best measured) or hierarchical (average-linkage on outputs, HC-SMoE's)."),
    centres: str = typer.Option("output", "--centres", help="With --grouping dominant, the experts that absorb the rest: output (the most routed output, as prune-experts' default ranks them; the best measured), frequency (the most used, M-SMoE's) or reap (REAP's mean saliency)."),
    calibration: Optional[List[str]] = typer.Option(None, "--calibration", help="Text the expert outputs and frequencies are measured on (default pydoc; repeat to mix texts)."),
    calibration_tokens: int = typer.Option(4096, "--calibration-tokens", help="Calibration tokens."),
    text: Optional[str] = typer.Option(None, "--text", help="Also measure perplexity against the source on this text (a file, or `pydoc` held-out)."),
    to: Optional[str] = CommonSurgery["to"], dry_run: bool = CommonSurgery["dry_run"], overwrite: bool = CommonSurgery["overwrite"],
    max_shard_size: str = CommonSurgery["max_shard_size"], json_out: bool = CommonSurgery["json_out"],
    serve_tp: int = CommonSurgery["serve_tp"], serve_ep: int = CommonSurgery["serve_ep"], fmt: str = CommonSurgery["fmt"],
):
    """Make an MoE smaller: group experts by their outputs and merge each group into one, layer after layer."""
    from .operations import merge_experts as run

    _check_serve(serve_tp, serve_ep)
    if calibration_tokens < 1:
        raise UsageError(f"--calibration-tokens must be >= 1, not {calibration_tokens}")
    report = run(source, output, into=into, method=method, grouping=grouping, centres=centres, calibration_text=_calibration(calibration), calibration_name=_cal_name(calibration),
                 calibration_tokens=calibration_tokens, eval_text=_eval_text(text), to=to, dry_run=dry_run, overwrite=overwrite,
                 max_shard_size=parse_size(max_shard_size), command=command_line(), serve_tp=serve_tp, serve_ep=serve_ep, fmt=_format(fmt))
    emit_json(report) if json_out else print_reduction(report)


def _eval_text_file(value: str) -> str:
    path = Path(value)
    if not path.is_file():
        raise BadInputError(f"--prompts: no such file {value}")
    return path.read_text(errors="replace")


def print_donors(r: dict) -> None:
    print_surgery(r)
    sep = r.get("separability")
    if sep:
        stdout.print(f"router rows ({r['router_init']}): largest cosine between donors' mean hidden states {sep['max_mean_cosine']:.3f} "
                     "(1 = indistinguishable); share of each donor's prompt tokens routed first to its own experts: "
                     + ", ".join(f"{x:.0%}" for x in sep["own_group_first"]))
    for d in r["donors"]:
        if "perplexity" in d:
            p = d["perplexity"]
            stdout.print(f"donor {d['source']}: on its prompts, MoE vs donor FFN blocks rel err {d['block_rel_err_mean']:.3f} (mean over layers), "
                         f"top-1 agreement {d['top1_agreement']:.3f}, perplexity donor {p['reference']:.2f} / MoE {p['candidate']:.2f}")


def _cal_name(value: str | list[str] | None) -> str | None:
    if not value:
        return None
    from .texts import BUILTIN

    values = [value] if isinstance(value, str) else list(value)
    names = [BUILTIN.get(v) or Path(v).name for v in values]
    return names[0] if len(names) == 1 else " + ".join(names) + " (interleaved)"


def print_reduction(r: dict) -> None:
    print_surgery(r)
    if r.get("removed_share"):
        s = r["removed_share"]
        stdout.print(f"removed experts carried {s['counts']:.1%} of the routed tokens, {s['mass']:.1%} of the routing weight and "
                     f"{s['reap']:.1%} of the REAP saliency on the calibration text")
    if r.get("perplexity"):
        p = r["perplexity"]
        stdout.print(f"perplexity: source {p['reference']:.3f}, output {p['candidate']:.3f} (x{p['ratio']:.3f}) over {p['tokens']} tokens")


def _eval_text(value: str | None) -> str | None:
    """--text: a file, or `pydoc` (the held-out half of the built-in text)."""
    if value is None:
        return None
    if value == "pydoc":
        from .texts import heldout_text

        return heldout_text()
    path = Path(value)
    if not path.is_file():
        raise BadInputError(f"--text: no such file {value}")
    return path.read_text(errors="replace")


@app.command()
def verify(
    reference: str = typer.Argument(..., help="The reference checkpoint (local dir, org/name[@rev], tiny:<family>)."),
    candidate: str = typer.Argument(..., help="The checkpoint that should compute the same function."),
    text: Optional[str] = typer.Option(None, "--text", help="A UTF-8 text file, or `pydoc` for built-in English text (held out from `--calibration pydoc`): tokenized with the reference's tokenizer; adds perplexity."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Explicit token ids (comma separated) or a file of them."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per sequence (default 64; with --text: windows of min(2048, the model's positions))."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Sequences (default 2; with --text: as many windows as cover the text, up to 8192 tokens)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random tokens."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (default, tolerance 1e-5 relative) or bfloat16."),
    expect: Optional[str] = typer.Option(None, "--expect", help="exact: exit 4 unless the verdict is exact; lossy: report only."),
    json_out: bool = JsonOpt,
):
    """Compare two checkpoints: untouched tensors, every FFN/MoE block, logits; verdict exact or lossy."""
    from .verify import parse_dtype, read_tokens, verify as run_verify

    if expect not in (None, "exact", "lossy"):
        raise UsageError(f"--expect must be exact or lossy, not {expect!r}")
    if text is not None and tokens is not None:
        raise UsageError("give --text or --tokens, not both")
    report = run_verify(
        reference, candidate, text=_eval_text(text),
        tokens=read_tokens(tokens) if tokens is not None else None, batch=batch, seq_len=seq_len, seed=seed,
        device=device, dtype=parse_dtype(dtype),
    )
    if json_out:
        emit_json(report)
    else:
        print_verification(report)
    if expect == "exact" and report["verdict"] != "exact":
        raise VerificationError(f"expected exact, got lossy (logits rel err {report['logits']['rel_err']:.2e}, worst layer {report['worst_layer']})")


def print_verification(r: dict) -> None:
    style = "green" if r["verdict"] == "exact" else "yellow"
    stdout.print(f"{r['reference']} ({r['reference_layout']}) vs {r['candidate']} ({r['candidate_layout']}): [{style}]{r['verdict']}[/{style}]")
    i = r["inputs"]
    stdout.print(f"inputs: {i['kind']}, {i['batch']} x {i['seq_len']} tokens ({i['tokens_scored']} scored), {r['dtype']} on {r['device']}, tolerance {r['tolerance']:g}")
    u = r["untouched"]
    stdout.print(f"untouched tensors: {u['identical']} identical" + (f", [yellow]{len(u['changed'])} changed[/yellow] (e.g. {u['changed'][0]})" if u["changed"] else ""))
    table = Table(title="FFN / MoE blocks on the reference's hidden states")
    for col in ("layer", "blocks", "max abs err", "rel err", "routing agreement"):
        table.add_column(col)
    for l in r["layers"]:
        worst = l["index"] == r["worst_layer"] and l["rel_err"] > r["tolerance"]
        agree = "" if l["routing_agreement"] is None else f"{l['routing_agreement']:.3f}"
        row = [str(l["index"]), f"{l['reference_kind']} -> {l['candidate_kind']}", f"{l['max_abs_err']:.2e}", f"{l['rel_err']:.2e}", agree]
        table.add_row(*row, style="bold red" if worst else None)
    stdout.print(table)
    g = r["logits"]
    stdout.print(f"logits: max abs err {g['max_abs_err']:.2e}, rel err {g['rel_err']:.2e}, top-1 agreement {g['top1_agreement']:.4f}, KL {g['kl']:.2e}")
    if "perplexity" in r:
        p = r["perplexity"]
        stdout.print(f"perplexity: reference {p['reference']:.3f}, candidate {p['candidate']:.3f} (x{p['candidate'] / p['reference']:.3f}) "
                     f"over {i['tokens_scored']} tokens")
    for note in r.get("notes", []):
        stdout.print(f"note: {note}")


@app.command()
def bench(
    models: Optional[list[str]] = typer.Argument(None, metavar="SOURCE [CANDIDATE]", help="Checkpoints (local dir, Hub org/name, tiny:<family>): the source, then candidates; none with --synthetic."),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Random weights with real shapes: mixtral-8x7b, mixtral-8x22b, deepseek-v3, qwen1.5-moe, qwen3-30b-a3b, olmoe."),
    scale: int = typer.Option(1, "--scale", help="--synthetic: divide hidden size, expert/shared widths, vocabulary and heads by this."),
    granularity: Optional[int] = typer.Option(None, "--granularity", "-m", help="Add a candidate: SOURCE with every expert split into M finer experts (exact, in memory)."),
    shared: int = typer.Option(0, "--shared", "-s", help="With --granularity: S of the M slices become shared experts (as `upcycle`)."),
    tokens: str = typer.Option("1,16,256,4096", "--tokens", help="Prefill / block token counts T."),
    batch: str = typer.Option("1,16", "--batch", help="Decode batch sizes B (one new token per sequence)."),
    context: int = typer.Option(128, "--context", help="Decode: tokens already in the KV cache."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Bench only the first N decoder layers (synthetic default: 1)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 (CPU default), bfloat16 (CUDA default), float16."),
    backend: str = typer.Option("auto", "--backend", help="MoE dispatch: auto, sorted, loop, batched, grouped, segments, triton (CUDA)."),
    measure: str = typer.Option("block,prefill,decode", "--measure", help="What to time: block, prefill, decode (comma separated)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs per point (median; fewer when one run takes > 3 s)."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights (synthetic) and inputs."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the spot check that candidates compute the source's function."),
    quick: bool = typer.Option(False, "--quick", help="Small roofline probes and single runs (smoke tests)."),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="CUDA: time CUDA-graph replays of each step where it captures (as serving engines decode); rows say which."),
    json_out: bool = JsonOpt,
):
    """Throughput of SOURCE and CANDIDATEs (MoE block, prefill, decode) against this device's roofline.

    Each point reports tokens/s, achieved GB/s and TFLOP/s and the fraction of the roofline
    max(bytes / bandwidth, FLOPs / peak), with bandwidth (large copy) and peak (large matmul) measured
    in the same run; candidates get time ratios candidate/source and a spot check (verify's block
    check on random hidden states): exact or lossy.

    \b
    Examples:
      moesurgery bench tiny:mixtral --granularity 8 --tokens 1,64 --batch 1
      moesurgery bench --synthetic mixtral-8x7b --scale 4 --granularity 8 --measure block
      moesurgery bench mistralai/Mixtral-8x7B-v0.1 ./mixtral-fine --layers 2 --device cuda

    \b
    --json schema:
      {"device", "device_name", "torch", "dtype", "backend", "grouped_mm": bool, "sorted_path", "settings": {...},
       "roofline": {"bandwidth_gbps", "peak_tflops", "copy_bytes", "matmul_n"},
       "models": [{"name", "layout", "experts", "top_k", "expert_width", "shared_width", "layers",
                   "block":   [{"tokens", "seconds", "tokens_per_s", "gbps", "tflops", "roofline_seconds",
                                "roofline_fraction", "bound", "bytes", "flops", "experts_touched", "cuda_graph": bool}],
                   "prefill": [{"tokens", ...same fields}],
                   "decode":  [{"batch", "context", ...same fields}], "backend_rel_err"}],
       "ratios": [{"candidate", "block": [{"tokens", "time_ratio"}], "prefill": [...], "decode": [{"batch", "time_ratio"}]}],
       "check":  [{"candidate", "verdict": "exact"|"lossy"|"skipped", "rel_err", "layers"}], "notes": [...]}
    """
    from .bench import PARTS, BenchOptions, parse_ints, run_bench
    from .verify import parse_dtype

    models = models or []
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    parts = tuple(p.strip() for p in measure.split(",") if p.strip())
    if not parts or set(parts) - set(PARTS):
        raise UsageError(f"--measure: choose from {', '.join(PARTS)} (comma separated), not {measure!r}")
    if repeats < 1:
        raise UsageError("--repeats must be >= 1")
    options = BenchOptions(
        tokens=parse_ints("--tokens", tokens), batches=parse_ints("--batch", batch), context=context, device=device, dtype=parse_dtype(dtype),
        backend=backend, layers=layers, parts=parts, repeats=repeats, seed=seed, check=not no_check, quick=quick, cuda_graph=cuda_graph,
    )
    report = run_bench(models[0] if models else None, models[1:], synthetic=synthetic, scale=scale, granularity=granularity, shared=shared, options=options)
    if json_out:
        return emit_json(report)
    print_bench(report)


BACKEND_WARN = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2}  # backend vs loop: rounding differences expected below these


def print_bench(r: dict) -> None:
    from .bench import fmt_seconds

    roof = r["roofline"]
    via = "torch grouped_mm" if r["sorted_path"] == "grouped_mm" else "a matmul per expert segment"
    stdout.print(f"{r['device']} ({r['device_name']}), {r['dtype']}, backend {r['backend']}" + (f" (sorted runs {via})" if r["backend"] in ("auto", "sorted") else ""))
    stdout.print(f"roofline measured now: {roof['bandwidth_gbps']:.1f} GB/s (copy of {human_bytes(roof['copy_bytes'])}), "
                 f"{roof['peak_tflops']:.3f} TFLOP/s ({roof['matmul_n']}^2 matmul)")
    models = r["models"]
    for i, m in enumerate(models):
        role = "src" if i == 0 else f"c{i}"
        moe = f"{m['experts']} experts x {m['expert_width']}, top-{m['top_k']}" + (f", shared width {m['shared_width']}" if m["shared_width"] else "") if m["experts"] else "dense"
        stdout.print(f"{role}: {m['name']} ({m['layout']}, {m['layers']} layer{'s' if m['layers'] != 1 else ''}): {moe}")
    sections = (("block", "tokens", "MoE block" + (f" (layer {models[0].get('block_layer')})" if models[0].get("block_layer") is not None else "")),
                ("prefill", "tokens", "prefill (1 sequence of T tokens)"), ("decode", "batch", f"decode (B sequences, 1 token each, context {r['settings']['context']})"))
    for part, key, title in sections:
        if not models[0][part]:
            continue
        table = Table(title=title)
        for col in ("T" if key == "tokens" else "B", "model", "time", "tok/s", "GB/s", "TFLOP/s", "roofline", "vs src"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for j, row0 in enumerate(models[0][part]):
            for i, m in enumerate(models):
                row = m[part][j]
                ratio = "" if i == 0 else f"{row['seconds'] / row0['seconds']:.2f}x"
                table.add_row(str(row0[key]) if i == 0 else "", "src" if i == 0 else f"c{i}", fmt_seconds(row["seconds"]),
                              f"{row['tokens_per_s']:,.0f}", f"{row['gbps']:.1f}", f"{row['tflops']:.3f}",
                              f"{row['roofline_fraction']:.0%} {row['bound'][:3]}" + (" g" if row.get("cuda_graph") else ""), ratio, end_section=i == len(models) - 1 and len(models) > 1)
        stdout.print(table)
    if any(row.get("cuda_graph") for m in models for part in ("block", "prefill", "decode") for row in m[part]):
        stdout.print("g: timed as a CUDA graph replay (--no-cuda-graph for eager launches)")
    for m in models:
        if m.get("backend_rel_err") is not None and m["backend_rel_err"] > BACKEND_WARN.get(r["dtype"], 1e-3):
            stdout.print(f"[yellow]warning:[/yellow] {m['name']}: backend {r['backend']} differs from the loop by {m['backend_rel_err']:.2e} (relative)")
    for c in r["check"]:
        if c["verdict"] == "skipped":
            stdout.print(f"check {c['candidate']}: skipped ({c['reason']})")
        else:
            exact = c["verdict"] == "exact"
            what = "[green]exact[/green]: computes the source's function" if exact else "[yellow]lossy[/yellow]: not the source's function"
            stdout.print(f"check {c['candidate']}: {what} (max rel err {c['rel_err']:.2e}; FFN blocks of layers {c['layers']}, {c['inputs']})")
    for note in r["notes"]:
        stdout.print(f"note: {note}")


# ------------------------------------------------------------------------------------------ entry
def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def install_signal_handlers() -> dict:
    """SIGINT and SIGTERM raise Interrupted (a BaseException: cleanup runs, nothing swallows it).
    Returns the previous handlers; a no-op outside the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, _raise_interrupted)
    return old


def _restore(handlers: dict) -> None:
    import signal

    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _fail(code: int, message: str, json_mode: bool) -> int:
    print(f"error: {message}", file=sys.stderr)
    if json_mode and not state.get("json_emitted"):  # one JSON document on stdout: the report, else the error
        try:
            emit_json({"error": message, "exit_code": code})
        except (OSError, ValueError):
            pass
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure becomes one `error:` line and a documented exit code."""
    state["argv"] = list(argv) if argv is not None else None
    args = list(argv) if argv is not None else sys.argv[1:]
    json_mode = "--json" in args
    state["json_emitted"] = False
    gc_thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 1000)  # a 1T-model plan holds ~1M small objects, none cyclic: no full collection every few 100k

    handlers = install_signal_handlers()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="moesurgery")
        if isinstance(rv, int) and rv == EXIT_INTERRUPTED:  # typer turns a bare KeyboardInterrupt into Exit(130)
            return _fail(EXIT_INTERRUPTED, "interrupted", json_mode)
        return 0
    except Interrupted as e:
        return _fail(e.exit_code, e.message, json_mode)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted", json_mode)
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        return _fail(EXIT_INTERRUPTED, "interrupted", json_mode)
    except _CLICK_ERROR as e:
        if not e.format_message():  # no arguments: the help was printed
            return EXIT_USAGE
        return _fail(EXIT_USAGE if isinstance(e, _USAGE) else e.exit_code, e.format_message(), json_mode)
    except MoeSurgeryError as e:
        if state["debug"]:
            traceback.print_exc()
        return _fail(e.exit_code, str(e), json_mode)
    except OSError as e:  # the machine's refusal (permissions, read-only, no space) outside a staged output
        if state["debug"]:
            traceback.print_exc()
        err = environment_error(e, e.filename or "a file")
        return _fail(err.exit_code, str(err).replace("cannot write", "cannot use") if e.filename is None else str(err), json_mode)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if state["debug"]:
            traceback.print_exc()
        return _fail(EXIT_UNEXPECTED, f"unexpected {e.__class__.__name__}: {e} (rerun with --debug for the traceback)", json_mode)
    finally:
        _restore(handlers)
        gc.set_threshold(*gc_thresholds)


def entry() -> None:
    from .entry import entry as run

    run()
