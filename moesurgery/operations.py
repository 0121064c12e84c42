"""The surgery commands as library calls: plan, apply per layer, express in the target layout,
write (streaming), then check the written blocks against the source.

    split_experts(source, output, granularity=M)                       MoE -> finer experts (exact)
    split_experts(source, output, experts=N, top_k=K, shared=S, ...)   dense -> MoE, training-free
    upcycle(source, output, granularity=G, experts=N, top_k=K, shared=S) dense -> MoE, exact at init
    upcycle(source, output, granularity=M, shared=S)                   Mixtral -> DeepSeek-style
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .canonical import Model, MoE, SwiGLU, model_params
from .errors import BadInputError, UsageError
from .express import express
from .layouts import Layout, get_layout
from .model_io import Opened, open_model, plan_output, save_model
from .surgery.check import pick_layers, quick_check
from .surgery.finer import finer_experts
from .surgery.moefy import MoefySpec, moefy
from .surgery.upcycle import UpcycleSpec, extract_shared, upcycle_dense
from .card import model_card
from .serving import serving_warnings
from .writer import DEFAULT_MAX_SHARD_SIZE, check_output_path


# Targets that load natively (no remote code) in transformers and vLLM, best first (BENCHMARKS.md "serving"):
# dense sources -> glm4_moe (sigmoid router with routed_scaling_factor: virtual groups exact; renormalises in
# llama.cpp too); MoE sources (softmax routers, Mixtral) -> qwen2_moe (softmax, fine-grained + a gated shared
# expert, exact). Each is taken only if it holds the source's attention exactly.
NATIVE_FOR_DENSE = ("glm4_moe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "qwen3_5_moe_text")
NATIVE_FOR_MOE = ("qwen2_moe", "qwen3_moe", "glm4_moe", "deepseek_v3", "deepseek_v2", "mistral4")


def native_target(model: Model, shared: int = 0) -> str:
    """The default target layout: the first native one that holds `model`'s attention (and router kind, for an
    MoE source) exactly, and shared experts if asked for."""
    from .express import Expressed, express_attention

    moe = model.moe_layers()
    for name in NATIVE_FOR_MOE if moe else NATIVE_FOR_DENSE:
        layout = get_layout(name)
        if shared and not layout.shared:
            continue
        if moe and moe[0].ffn.router.scoring not in layout.scorings:
            continue
        probe = Expressed(model)
        try:
            express_attention(model, layout, probe)
        except BadInputError:
            continue
        if not probe.lossy:
            return name
    return model.family if moe else "qwen2_moe"


def _scoring(target: Layout) -> str:
    return "softmax" if "softmax" in target.scorings else "sigmoid"


def _moe_only(model: Model, what: str) -> None:
    if not model.moe_layers():
        raise BadInputError(f"{model.family} is dense: {what} needs an MoE source")


def _dense_only(model: Model, what: str) -> None:
    if model.moe_layers():
        raise BadInputError(f"{model.family} is already an MoE: {what} needs a dense source (use --granularity to split experts)")


def _once(items: list[str], text: str) -> None:
    if text not in items:
        items.append(text)


def mean_of_experts(moe: MoE) -> SwiGLU:
    """A dense FFN computing the uniform average of all experts (+ shared): every expert's neurons
    side by side, down_proj / E. Equals the MoE only when routing is uniform over all experts."""
    from .surgery.slicing import concat_neurons

    E = len(moe.experts)
    parts = [replace(e, down=e.down.scale(1.0 / E)) for e in moe.experts]
    if moe.shared is not None and moe.shared_gate is None:
        parts.append(moe.shared)
    return concat_neurons(parts)


def _finish(
    opened: Opened, model: Model, target: Layout, output, *, operation: str, surgery_lossy: list[str], measured: list[dict],
    allow_lossy: bool, dry_run: bool, overwrite: bool, max_shard_size: int, command: str, expect_exact: bool,
    check_inputs: dict | None = None, serve_tp: int = 1, serve_ep: int = 1, fmt: str = "auto", calibration: dict | None = None,
) -> dict:
    """Express in the target, plan, write, check; the report of every surgery command."""
    mtp = [k for k in model.extras if k.startswith("model.layers.")]
    if mtp:  # multi-token-prediction layers keep the old expert layout: they cannot follow the surgery
        model = replace(model, extras={k: v for k, v in model.extras.items() if k not in mtp}, config={**model.config, "num_nextn_predict_layers": 0})
    result = express(model, target)
    if mtp:
        result.notes.append(f"{len(mtp)} tensors of multi-token-prediction layers dropped (num_nextn_predict_layers = 0)")
    if result.lossy and not allow_lossy:
        raise BadInputError(f"{target.name} cannot express the result exactly: {'; '.join(result.lossy)} (pass --allow-lossy, or choose another --to)")
    config, shards, output_notes = plan_output(result.model, target, max_shard_size, fmt)
    total, active = model_params(result.model)
    src_total, src_active = model_params(opened.model)
    moe = result.model.moe_layers()
    first = moe[0].ffn if moe else None
    src_moe = opened.model.moe_layers()
    src_first = src_moe[0].ffn if src_moe else None
    report = {
        "operation": operation,
        "command": command,
        "source": opened.source.name,
        "source_layout": opened.layout.name,
        "target_layout": target.name,
        "output": str(output),
        "dry_run": dry_run,
        "layers": len(result.model.layers),
        "moe_layers": len(moe),
        "experts": len(first.experts) if first else 0,
        "top_k": first.router.top_k if first else 0,
        "expert_width": first.expert_width if first else 0,
        "shared_width": first.shared_width if first else 0,
        "params_total": total,
        "params_active": active,
        "source_params_total": src_total,
        "source_params_active": src_active,
        "bytes": sum(s.nbytes for s in shards),
        "shards": [{"file": s.filename, "bytes": s.nbytes, "tensors": len(s.tensors)} for s in shards],
        "expected": "exact" if expect_exact and not surgery_lossy and result.exact else "lossy",
        "lossy_reasons": surgery_lossy + result.lossy,
        "notes": opened.notes + result.notes + output_notes,
        "source_experts": f"{len(src_first.experts)} x {src_first.expert_width}, top-{src_first.router.top_k}" if src_first else None,
        "source_shared_width": src_first.shared_width if src_first else 0,
        "serving": serving_warnings(result.model, target, any(n.startswith("written as") for n in output_notes), serve_tp, serve_ep,
                                   native=any(n.startswith("written in Mistral's format") for n in output_notes)),
    }
    if measured:
        report["measured"] = measured
    if calibration:
        report["calibration"] = calibration
    if dry_run:
        return report

    def check(tmp: Path) -> dict:
        """The quick check on the complete output before it is renamed into place (if it fails, nothing is left);
        then the model card, which reports it."""
        report["check"] = quick_check(opened.model, open_model(tmp).model, inputs=check_inputs)
        # measured exact on a sample is not proven exact: a plan with reasons to differ stays lossy (its error
        # below the tolerance there); without any (donors all equal to the base) the measurement decides
        report["verdict"] = "lossy" if report.get("lossy_reasons") else report["check"]["verdict"]
        return {"README.md": model_card(report, source_name=opened.source.name, source_dir=opened.source.path,
                                        repo_id=opened.source.repo_id, config=config)}

    save_model(result.model, target, Path(output), source=opened.source, command=command, max_shard_size=max_shard_size,
               overwrite=overwrite, finish=check, fmt=fmt)
    return report


def _prepare(source, output, to: str, dry_run: bool, overwrite: bool, opened: Opened | None = None,
             recipe_model: dict | None = None) -> tuple[Opened, Layout]:
    target = get_layout(to)
    if not target.moe:
        raise BadInputError(f"--to {to} is a dense layout: surgery makes MoE checkpoints")
    opened = opened or open_model(source)
    check_recipe_model(recipe_model, opened)
    check_output_path(Path(output), opened.source.path, overwrite)
    return opened, target


def check_recipe_model(recipe_model: dict | None, opened: Opened) -> None:
    """A recipe's [model_config] (the model it was written for) must agree with the source's config."""
    if not recipe_model:
        return
    cfg = opened.config
    if "dim" in recipe_model and "n_layers" in recipe_model:  # written for a checkpoint in Mistral's format: its params.json
        from .native import hf_config

        recipe_model = hf_config(recipe_model)
    wrapper = opened.model.wrapper
    if wrapper is not None and wrapper.multimodal:  # a wrapper recipe: its model_type against the wrapper, its text_config against the language model
        if recipe_model.get("model_type", wrapper.model_type) != wrapper.model_type:
            raise UsageError(f"--recipe is written for a {recipe_model['model_type']} model; the source is a {wrapper.model_type}")
        recipe_model = recipe_model.get("text_config", {})
    for key, want in recipe_model.items():  # the model's identity and dimensions (rope and other settings vary in form)
        if not (key == "model_type" or (isinstance(want, int) and not isinstance(want, bool))):
            continue
        have = cfg.get(key)
        if key in cfg and have != want:
            raise UsageError(f"--recipe is written for a model with {key} = {want!r}; the source has {key} = {have!r} "
                             "(pass the flags yourself, or a recipe for this model)")


def split_experts(
    source, output, *, granularity: int | None = None, experts: int | None = None, top_k: int | None = None, shared: int = 0,
    method: str | None = None, router: str | None = None, calibration_text: str | None = None, calibration_tokens: int = 4096,
    first_k_dense: int = 0, to: str | None = None, allow_lossy: bool = False, dry_run: bool = False, overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, seed: int = 0, command: str = "moesurgery split-experts", sequential: bool = False,
    device: str = "cpu", recipe_model: dict | None = None, serve_tp: int = 1, serve_ep: int = 1, fmt: str = "auto", calibration_name: str | None = None,
) -> dict:
    """MoE source + granularity: m-times finer experts (exact). Dense source + experts/top_k:
    training-free split into routed (+ shared) experts (lossy, measured). `sequential`: calibrate
    each layer on the inputs the already-split layers before it produce (else the dense model's)."""
    if calibration_tokens < 1:
        raise UsageError(f"--calibration-tokens must be >= 1, not {calibration_tokens}")
    # defaults are the best measured settings (BENCHMARKS.md, quality): with calibration text a
    # co-activation partition and a fitted router; weight-only, k-means and centroid routers
    method = method or ("coactivation" if calibration_text is not None else "kmeans")
    router = router or ("fitted" if calibration_text is not None else "centroid")
    opened = open_model(source)
    is_moe = bool(opened.model.moe_layers())
    if to is None:  # finer experts stay in their layout; a dense split goes to the best native MoE layout
        to = opened.layout.name if is_moe else native_target(opened.model, shared)
    opened, target = _prepare(source, output, to, dry_run, overwrite, opened, recipe_model)
    model = opened.model
    if is_moe:
        if granularity is None or experts is not None or top_k is not None:
            raise UsageError("an MoE source is split with --granularity M only (--experts/--top-k are for dense sources)")
        if granularity < 1:
            raise UsageError("--granularity must be >= 1")
        layers, lossy = [], []
        for layer in model.layers:
            if isinstance(layer.ffn, MoE):
                if layer.ffn.expert_width % granularity:
                    raise UsageError(f"--granularity {granularity} does not divide the expert width {layer.ffn.expert_width}")
                ffn, why = finer_experts(layer.ffn, granularity)
                lossy += [w for w in why if w not in lossy]
                layer = replace(layer, ffn=ffn)
            layers.append(layer)
        if lossy and not allow_lossy:  # finer experts promise the same function: say where they cannot keep it
            r = next(l.ffn.router for l in model.layers if isinstance(l.ffn, MoE))
            raise BadInputError(f"finer experts of {model.family} are not exact: {'; '.join(lossy)} ({r.n_group} expert groups, "
                                f"{r.topk_group} kept per token: n_group / topk_group); pass --allow-lossy to split anyway")
        return _finish(opened, model.with_layers(layers), target, output, operation="finer-experts", surgery_lossy=lossy, measured=[],
                       allow_lossy=allow_lossy, dry_run=dry_run, overwrite=overwrite, max_shard_size=max_shard_size, command=command, expect_exact=True, serve_tp=serve_tp, serve_ep=serve_ep, fmt=fmt)

    if experts is None or top_k is None:
        raise UsageError("a dense source is split with --experts N --top-k K [--shared S]")
    if granularity is not None:
        raise UsageError("--granularity is for MoE sources; for a dense source use --experts/--top-k (or `upcycle`)")
    spec = MoefySpec(experts, top_k, shared, method, router, _scoring(target), seed)
    try:
        for layer in model.layers:
            spec.check(layer.ffn.width, calibration_text is not None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 0 <= first_k_dense < len(model.layers):
        raise UsageError(f"--first-k-dense {first_k_dense} must be between 0 and {len(model.layers) - 1}")
    if dry_run:
        # plan with placeholder routing (nothing is read): shapes only
        layers = [layer if layer.index < first_k_dense else replace(layer, ffn=_plan_moefy(layer.ffn, spec)) for layer in model.layers]
        return _weight_only_hint(calibration_text, _finish(opened, model.with_layers(layers), target, output, operation="moefy", surgery_lossy=[_moefy_reason(spec)],
                       measured=[], allow_lossy=allow_lossy, dry_run=True, overwrite=overwrite, max_shard_size=max_shard_size, command=command, expect_exact=False, serve_tp=serve_tp, serve_ep=serve_ep, fmt=fmt), spec)
    inputs, calibration = None, None
    if calibration_text is not None:
        from .calibration import chunk, ffn_inputs, tokenize

        ids = chunk(tokenize(opened.source.path, calibration_text, model.arch.vocab_size), 256, calibration_tokens)
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
        if not (device == "cpu" or device.startswith("cuda")):
            raise UsageError(f"--device must be cpu or cuda, not {device!r}")
        inputs = ffn_inputs(model, ids, device=device)
        calibration = {"name": calibration_name or "given text", "tokens": int(ids.numel())}
    layers, measured, check_inputs = [], [], {}
    checked = set(pick_layers(len(model.layers)))
    pending = next(inputs) if inputs is not None else None
    for layer in model.layers:
        x = pending[1] if pending is not None else None
        if x is not None and layer.index in checked:
            check_inputs[layer.index] = x[:: max(1, len(x) // 64)][:64].clone()  # the quick check feeds these, not N(0, 1) noise
        if layer.index < first_k_dense:
            layers.append(layer)
        else:
            ffn, stats = moefy(layer.ffn, spec, x, layer.index)
            measured.append({"index": layer.index, **stats})
            layers.append(replace(layer, ffn=ffn))
        if inputs is not None and layer.index + 1 < len(model.layers):  # the next layer's inputs, through this layer's new FFN if sequential
            pending = inputs.send(layers[-1].ffn) if sequential else next(inputs)
    return _weight_only_hint(calibration_text, _finish(
        opened, model.with_layers(layers), target, output, operation="moefy", surgery_lossy=[_moefy_reason(spec)], measured=measured,
        allow_lossy=allow_lossy, dry_run=False, overwrite=overwrite, max_shard_size=max_shard_size, command=command, expect_exact=False,
        check_inputs=check_inputs or None, serve_tp=serve_tp, serve_ep=serve_ep, fmt=fmt, calibration=calibration), spec)


def _weight_only_hint(calibration_text: str | None, report: dict, spec: MoefySpec | None = None) -> dict:
    if spec is not None:
        report["method"], report["router"] = spec.method, spec.router
    if calibration_text is None:
        report["notes"].append("weight-only split (no calibration text): on SmolLM2-135M, --method coactivation --router fitted "
                               "--calibration pydoc cut the perplexity increase at 75% active from 1.75x (kmeans + centroid) to 1.22x, "
                               "and 1.14x with --first-k-dense 1 (BENCHMARKS.md, quality)")
    return report


def _moefy_reason(spec: MoefySpec) -> str:
    return f"training-free split: {spec.top_k} of {spec.experts} routed experts run per token" + (f" (+{spec.shared} shared)" if spec.shared else "")


def _plan_moefy(ffn: SwiGLU, spec: MoefySpec) -> MoE:
    """Shapes of the moefy result without reading weights (for --dry-run)."""
    from .canonical import Router
    from .lazy import Lazy
    from .surgery.slicing import chunks, concat_neurons, take_neurons

    parts = [take_neurons(ffn, idx) for idx in chunks(ffn.width, spec.experts + spec.shared)]
    H = ffn.gate.shape[1]
    router = Router(Lazy.zeros((spec.experts, H), ffn.gate.dtype), spec.top_k, spec.scoring)
    shared = concat_neurons(parts[: spec.shared]) if spec.shared else None
    return MoE(router, parts[spec.shared :], shared)


def upcycle(
    source, output, *, granularity: int, experts: int | None = None, top_k: int | None = None, shared: int = 0,
    first_k_dense: int = 0, router_noise: float = 0.0, reinit_fraction: float = 0.0, shared_match: float = 1.0,
    to: str | None = None, allow_lossy: bool = False, dry_run: bool = False, overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, seed: int = 0, command: str = "moesurgery upcycle", recipe_model: dict | None = None,
    serve_tp: int = 1, serve_ep: int = 1, fmt: str = "auto",
) -> dict:
    """Dense source: MoE exact at init with virtual groups (+ shared experts). MoE source (Mixtral):
    DeepSeek-style: `shared` fine-grained experts extracted from what experts share, the rest split
    into granularity - shared finer experts each (exact when the shared neurons are identical)."""
    if granularity is None or granularity < 1:
        raise UsageError("--granularity must be >= 1")
    if not 0.0 <= reinit_fraction <= 1.0:
        raise UsageError(f"--reinit-fraction must be between 0 and 1, not {reinit_fraction}")
    if not router_noise >= 0.0:
        raise UsageError(f"--router-noise must be >= 0 (a standard deviation), not {router_noise}")
    opened = open_model(source)
    if to is None:
        to = native_target(opened.model, shared)
    opened, target = _prepare(source, output, to, dry_run, overwrite, opened, recipe_model)
    model = opened.model
    layers, lossy, measured = [], [], []
    if shared and target.shared is None:  # refused before any work, naming layouts that hold them
        raise BadInputError(f"{target.name} has no shared experts: the result's shared experts have no place in it "
                            "(choose a --to layout that holds them, e.g. glm4_moe, deepseek_v3, qwen2_moe)")
    if model.moe_layers():
        if experts is not None or top_k is not None:
            raise UsageError("an MoE source is upcycled with --granularity M [--shared S]; experts and top-k follow from them")
        if shared >= granularity:
            raise UsageError(f"--shared {shared} must be smaller than --granularity {granularity}")
        if not 0 <= first_k_dense < len(model.layers):
            raise UsageError(f"--first-k-dense {first_k_dense} must be between 0 and {len(model.layers) - 1}")
        for layer in model.layers:
            ffn = layer.ffn
            if isinstance(ffn, MoE) and layer.index < first_k_dense:
                ffn = mean_of_experts(ffn)
                _once(lossy, "first layers made dense as the mean of their experts (first_k_dense_replace)")
            elif isinstance(ffn, MoE):
                f = ffn.expert_width
                if f % granularity:
                    raise UsageError(f"--granularity {granularity} does not divide the expert width {f}")
                if shared:
                    try:
                        ffn, why, stats = extract_shared(ffn, shared * (f // granularity), shared_match)
                    except ValueError as e:
                        raise BadInputError(f"layer {layer.index}: {e}") from None
                    lossy += [w for w in why if w not in lossy]
                    measured.append({"index": layer.index, **stats})
                ffn, why = finer_experts(ffn, granularity - shared)
                lossy += [w for w in why if w not in lossy]
            layers.append(replace(layer, ffn=ffn))
        operation = "mixtral-to-deepseek"
    else:
        if experts is None or top_k is None:
            raise UsageError("a dense source is upcycled with --granularity G --experts N --top-k K [--shared S]")
        if not 0 <= first_k_dense < len(model.layers):
            raise UsageError(f"--first-k-dense {first_k_dense} must be between 0 and {len(model.layers) - 1}")
        spec = UpcycleSpec(granularity, experts, top_k, shared, _scoring(target), fold_into_scaling=target.scaling and not float(granularity).is_integer(),
                           router_noise=router_noise, reinit_fraction=reinit_fraction, seed=seed)
        for layer in model.layers:
            if layer.index < first_k_dense:
                layers.append(layer)
                continue
            try:
                ffn, why = upcycle_dense(layer.ffn, spec, layer.index)
            except ValueError as e:
                raise UsageError(str(e)) from None
            lossy += [w for w in why if w not in lossy]
            layers.append(replace(layer, ffn=ffn))
        operation = "dense-upcycle"
    return _finish(opened, model.with_layers(layers), target, output, operation=operation, surgery_lossy=lossy, measured=measured,
                   allow_lossy=allow_lossy, dry_run=dry_run, overwrite=overwrite, max_shard_size=max_shard_size, command=command, expect_exact=True, serve_tp=serve_tp, serve_ep=serve_ep, fmt=fmt)


# ---------------------------------------------------------------------------------------- pruning / merging
def _moe_stats(model: Model, calibration_text: str, source_dir, tokens: int, device: str = "cpu"):
    """(per MoE layer: (stats, a sample of its FFN inputs [<=256, H]), calibration summary) from one streamed pass."""
    from .calibration import chunk, ffn_inputs, tokenize
    from .routing import expert_stats

    ids = chunk(tokenize(source_dir, calibration_text, model.arch.vocab_size), 256, tokens)
    out = {}
    for i, h in ffn_inputs(model, ids, device=device):
        layer = model.layers[i]
        if isinstance(layer.ffn, MoE):
            out[i] = (expert_stats(h, layer.ffn, ids=ids.reshape(-1)), h[:: max(1, len(h) // 256)][:256].clone())
    return out, {"tokens": int(ids.numel())}


def _reduce_checks(model: Model, what: str, keep: int) -> tuple[int, int]:
    moe = model.moe_layers()
    if not moe:
        raise BadInputError(f"{model.family} is dense: {what} needs an MoE source")
    E, k = len(moe[0].ffn.experts), moe[0].ffn.router.top_k
    if any(l.ffn.router.grouped for l in moe):
        raise BadInputError(f"{what} of a group-limited router (n_group > 1) is not supported: the groups would lose experts unevenly")
    if keep < 1:
        raise UsageError(f"{what}: keep at least 1 expert, not {keep}")
    if keep >= E:
        raise UsageError(f"{what}: keeping {keep} of {E} experts removes nothing")
    if keep < k:
        raise UsageError(f"{what}: {keep} experts are fewer than the router's top-{k}")
    return E, k


def _eval_perplexity(report: dict, source, output, text: str | None) -> None:
    if text is None:
        return
    from .verify import verify

    v = verify(source, output, text=text)
    report["perplexity"] = {**v["perplexity"], "ratio": v["perplexity"]["candidate"] / v["perplexity"]["reference"], "tokens": v["inputs"]["tokens_scored"]}


def prune_experts(
    source, output, *, keep: int | None = None, fraction: float | None = None, method: str = "output", calibration_text: str | None = None,
    calibration_name: str | None = None, calibration_tokens: int = 4096, per_layer: bool = True, eval_text: str | None = None,
    to: str | None = None, allow_lossy: bool = True, dry_run: bool = False, overwrite: bool = False, seed: int = 0,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, command: str = "moesurgery prune-experts", serve_tp: int = 1, serve_ep: int = 1, fmt: str = "auto",
    recipe_model: dict | None = None,
) -> dict:
    """Drop the least salient experts of every MoE layer (the same number per layer: layouts hold one expert
    count); router rows, correction bias and stored forms follow; top-k and shared experts unchanged. Exact only
    where every dropped expert is one no input can select."""
    from .surgery.prune import METHODS, keep_top, prune_moe, saliency, unselectable

    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if (keep is None) == (fraction is None):
        raise UsageError("give --keep N or --fraction F (the share of experts to remove), one of them")
    if not per_layer:
        raise UsageError("--global pruning keeps a different number of experts per layer, and every supported layout holds one "
                         "expert count for all its layers: use --per-layer")
    opened = open_model(source)
    check_recipe_model(recipe_model, opened)
    model = opened.model
    E = len(model.moe_layers()[0].ffn.experts) if model.moe_layers() else 0
    if fraction is not None:
        if not 0 < fraction < 1:
            raise UsageError(f"--fraction must be between 0 and 1 (the share of experts removed), not {fraction}")
        keep = E - round(fraction * E) if E else 0
    _reduce_checks(model, "prune-experts", keep)
    to = to or opened.layout.name
    opened, target = _prepare(source, output, to, dry_run, overwrite, opened)
    stats, calibration = {}, None
    if method != "random" and not dry_run:
        if calibration_text is None:
            from .texts import calibration_text as builtin

            calibration_text, calibration_name = builtin(), "pydoc (built-in Python documentation, the default)"
        stats, calibration = _moe_stats(model, calibration_text, opened.source.path, calibration_tokens)
        calibration["name"] = calibration_name or "given text"
    layers, kept, proven = [], {}, True
    for layer in model.layers:
        if isinstance(layer.ffn, MoE):
            never = set(unselectable(layer.ffn))
            if dry_run and method != "random":
                chosen = list(range(keep))  # the plan's shapes only: nothing is read
            else:
                scores = saliency(stats[layer.index][0] if layer.index in stats else {}, method, E, seed + layer.index)
                scores = torch.where(torch.tensor([e in never for e in range(E)]), torch.full_like(scores, -float("inf")), scores)
                chosen = keep_top(scores, keep)
            proven &= set(range(E)) - set(chosen) <= never
            kept[layer.index] = chosen
            layer = replace(layer, ffn=prune_moe(layer.ffn, chosen))
        layers.append(layer)
    lossy = [] if proven else [f"{E - keep} of {E} experts removed per MoE layer by {method} saliency: tokens routed to them go elsewhere"]
    check_inputs = {i: s[1][:64] for i, s in stats.items() if i in pick_layers_of(model)} or None
    report = _finish(opened, model.with_layers(layers), target, output, operation="prune-experts", surgery_lossy=lossy, measured=[],
                     allow_lossy=True, dry_run=dry_run, overwrite=overwrite, max_shard_size=max_shard_size, command=command,
                     expect_exact=proven, check_inputs=check_inputs, serve_tp=serve_tp, serve_ep=serve_ep, fmt=fmt, calibration=calibration)
    report.update(method=method, kept={str(i): v for i, v in kept.items()}, removed_per_layer=E - keep)
    if stats:
        report["removed_share"] = {key: _removed_share(stats, kept, key) for key in ("counts", "mass", "reap")}
    if not dry_run:
        _eval_perplexity(report, source, output, eval_text)
    return report


def pick_layers_of(model: Model) -> set[int]:
    return set(pick_layers(len(model.layers)))


def _removed_share(stats: dict, kept: dict, key: str) -> float:
    """The share of the calibration routing (`key`) that went to the removed experts, over all MoE layers."""
    total = removed = 0.0
    for i, (s, _) in stats.items():
        v = s[key].double()
        total += float(v.sum())
        removed += float(v.sum() - v[kept[i]].sum())
    return removed / total if total else 0.0


def merge_experts(
    source, output, *, into: int, method: str = "select", grouping: str = "dominant", centres: str = "output",
    calibration_text: str | None = None, calibration_name: str | None = None,
    calibration_tokens: int = 4096, eval_text: str | None = None, to: str | None = None, dry_run: bool = False, overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, command: str = "moesurgery merge-experts", serve_tp: int = 1, serve_ep: int = 1, fmt: str = "auto",
) -> dict:
    """Cluster each MoE layer's experts by their outputs on calibration hidden states (HC-SMoE), merge each cluster
    into one expert (`select`: the union's strongest neurons with down_proj refitted; `frequency`: frequency-weighted
    average; `aligned`: that average with down_proj refitted) and fit its router row to the cluster's routing mass,
    layer after layer in one streamed pass. Lossy; measured."""
    from .surgery.prune import CENTRES, GROUPINGS, MERGE_METHODS, MERGE_WHAT, expert_outputs, group_experts, merge_moe, saliency

    if method not in MERGE_METHODS:
        raise UsageError(f"--method must be one of {', '.join(MERGE_METHODS)}, not {method!r}")
    if grouping not in GROUPINGS:
        raise UsageError(f"--grouping must be one of {', '.join(GROUPINGS)}, not {grouping!r}")
    if centres not in CENTRES:
        raise UsageError(f"--centres must be one of {', '.join(CENTRES)}, not {centres!r}")
    opened = open_model(source)
    model = opened.model
    E, _ = _reduce_checks(model, "merge-experts", into)
    to = to or opened.layout.name
    opened, target = _prepare(source, output, to, dry_run, overwrite, opened)
    layers, calibration, clusters_of, fit_errors, samples = [], None, {}, [], {}
    if dry_run:
        from .surgery.prune import prune_moe

        layers = [replace(l, ffn=prune_moe(l.ffn, list(range(into)))) if isinstance(l.ffn, MoE) else l for l in model.layers]
    else:
        if calibration_text is None:
            from .texts import calibration_text as builtin

            calibration_text, calibration_name = builtin(), "pydoc (built-in Python documentation, the default)"
        from .calibration import chunk, ffn_inputs, tokenize
        from .routing import expert_stats

        # one streamed pass, merging as it goes: each layer is merged on all its calibration inputs (given by the
        # already merged layers before it), then the stream continues through the merged block
        ids = chunk(tokenize(opened.source.path, calibration_text, model.arch.vocab_size), 256, calibration_tokens)
        calibration = {"tokens": int(ids.numel()), "name": calibration_name or "given text"}
        merged, samples = {}, {}
        stream = ffn_inputs(model, ids)
        step = next(stream, None)
        while step is not None:
            i, h = step
            ffn = model.layers[i].ffn
            replacement = None
            if isinstance(ffn, MoE):
                flat_ids = ids.reshape(-1)  # h's token ids (hash-routed layers)
                stats = expert_stats(h, ffn, ids=flat_ids)
                counts, rank = stats["counts"], saliency(stats, centres, len(ffn.experts))
                feats = expert_outputs(h[:: max(1, len(h) // 128)][:128], ffn)  # [E, 128, H]
                clusters = group_experts(feats, into, rank, grouping)
                if ffn.router.hash_table is not None and grouping != "dominant":
                    raise UsageError("merge-experts of a hash-routed layer (DeepSeek-V4) keeps the centres' router rows: use --grouping dominant")
                replacement, info = merge_moe(ffn, clusters, counts, h, method, router="centre" if grouping == "dominant" else "fit", ids=flat_ids,
                                               rank=rank)
                merged[i], clusters_of[i] = replacement, clusters
                fit_errors += info["aligned_rel_err"]
                samples[i] = h[:: max(1, len(h) // 64)][:64].clone()
            try:
                step = stream.send(replacement)
            except StopIteration:
                step = None
        layers = [replace(l, ffn=merged[l.index]) if l.index in merged else l for l in model.layers]
    check_inputs = {i: h for i, h in samples.items() if i in pick_layers_of(model)} or None
    report = _finish(opened, model.with_layers(layers), target, output, operation="merge-experts",
                     surgery_lossy=[f"{E} experts merged into {into} per MoE layer ({MERGE_WHAT[method]}, router rows fitted)"], measured=[],
                     allow_lossy=True, dry_run=dry_run, overwrite=overwrite, max_shard_size=max_shard_size, command=command,
                     expect_exact=False, check_inputs=check_inputs, serve_tp=serve_tp, serve_ep=serve_ep, fmt=fmt, calibration=calibration)
    report.update(method=method, grouping=grouping, centres=centres, clusters={str(i): c for i, c in clusters_of.items()})
    if fit_errors:
        report["aligned_fit_rel_err"] = sum(fit_errors) / len(fit_errors)
    if not dry_run:
        _eval_perplexity(report, source, output, eval_text)
    return report


# ---------------------------------------------------------------------------------------- donors
def _check_donor(base: Model, donor: Model, name: str) -> None:
    """Every tensor the MoE takes from BASE must have the donor's shape (one-line error naming it)."""
    if donor.moe_layers():
        raise BadInputError(f"donor {name} is an MoE: donors are dense fine-tunes of the base")
    if len(donor.layers) != len(base.layers):
        raise BadInputError(f"donor {name} has {len(donor.layers)} layers, the base {len(base.layers)}")
    pairs = [("model.embed_tokens.weight", base.embed, donor.embed)]
    for lb, ld in zip(base.layers, donor.layers):
        for k, t in lb.attn.items():
            other = ld.attn.get(k)
            pairs.append((f"model.layers.{lb.index}.{k}", t, other))
        for p in ("gate", "up", "down"):
            pairs.append((f"model.layers.{lb.index}.mlp.{p}_proj.weight", getattr(lb.ffn, p), getattr(ld.ffn, p)))
    for key, a, b in pairs:
        if b is None:
            raise BadInputError(f"donor {name} has no {key}")
        if a.shape != b.shape:
            raise BadInputError(f"donor {name}: {key} has shape {list(b.shape)}, the base {list(a.shape)}")


def upcycle_donors(
    base_source, output, *, donors: list, prompts: list | None = None, granularity: int = 1, top_k: int | None = None, shared: int = 0,
    shared_from: str = "base", router: str | None = None, to: str | None = None, allow_lossy: bool = True, dry_run: bool = False,
    overwrite: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, seed: int = 0, command: str = "moesurgery upcycle",
    serve_tp: int = 1, serve_ep: int = 1, fmt: str = "auto", diagnose: bool = True,
) -> dict:
    """An MoE from BASE and several fine-tuned donors (see surgery/donors.py): attention, embeddings and norms from
    BASE; donor d's FFN as a virtual group of `granularity` experts; `shared` experts from BASE (or the donors' mean);
    router rows from each donor's prompts (hidden), their activation mass (calibration) or random. With every donor
    equal to BASE it computes BASE exactly; otherwise the report measures, per donor, how close the MoE is to that
    donor on its own prompts."""
    from .calibration import ffn_inputs, tokenize
    from .surgery.donors import ROUTER_MODES, SHARED_FROM, activation_mass, donor_moe, router_rows, separability

    prompts = list(prompts or [])
    if not donors:
        raise UsageError("--donor: give at least one donor model")
    if prompts and len(prompts) != len(donors):
        raise UsageError(f"{len(prompts)} prompt sets for {len(donors)} donors: give one --prompts per --donor, in the same order")
    router = router or ("hidden" if prompts else "random")
    if router not in ROUTER_MODES:
        raise UsageError(f"--router for donors must be one of {', '.join(ROUTER_MODES)}, not {router!r}")
    if router != "random" and not prompts:
        raise UsageError(f"--router {router} needs prompts (or calibration text) for every donor: --prompts FILE per --donor")
    if shared_from not in SHARED_FROM:
        raise UsageError(f"--shared-from must be base or mean, not {shared_from!r}")
    top_k = top_k if top_k is not None else granularity * min(2, len(donors))
    opened = open_model(base_source)
    base = opened.model
    if base.moe_layers():
        raise BadInputError(f"base {opened.source.name} is an MoE: donors are stacked on a dense base")
    donor_opened = [open_model(d) for d in donors]  # headers only: nothing is read yet
    for d in donor_opened:
        _check_donor(base, d.model, d.source.name)
    if to is None:
        to = native_target(base, shared)
    opened, target = _prepare(base_source, output, to, dry_run, overwrite, opened)
    D, H = len(donors), base.arch.hidden_size
    for layer in base.layers:
        from .surgery.donors import slices

        try:
            slices(layer.ffn.width, granularity, shared)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if top_k % granularity or not 0 < top_k <= D * granularity:
        raise UsageError(f"--top-k {top_k} must be a multiple of --granularity {granularity} and at most {D * granularity}")
    means = {i: [] for i in range(len(base.layers))}
    hs = {i: [] for i in range(len(base.layers))}
    if router != "random" and not dry_run:
        for d, (text, donor) in enumerate(zip(prompts, donor_opened)):
            ids = tokenize(opened.source.path, text, base.arch.vocab_size)[None, :1024]
            for i, h in ffn_inputs(base, ids):
                if router == "calibration":
                    w = activation_mass(h, donor.model.layers[i].ffn)
                    means[i].append((h * w[:, None]).sum(0) / w.sum().clamp(min=1e-12))
                else:
                    means[i].append(h.mean(0))
                hs[i].append(h[:256])
    scoring = _scoring(target)
    fold = target.scaling and scoring == "sigmoid"
    layers, per_layer = [], []
    for layer in base.layers:
        i = layer.index
        rows = router_rows(means[i], router, D, H, seed, i)  # (a dry run has no means: placeholder rows, nothing read)
        moe = donor_moe(layer.ffn, [dm.model.layers[i].ffn for dm in donor_opened], rows, granularity=granularity, top_k=top_k,
                        shared=shared, shared_from=shared_from, scoring=scoring, fold_into_scaling=fold)
        if means[i]:
            per_layer.append({"index": i, **separability(rows, hs[i], means[i])})
        layers.append(replace(layer, ffn=moe))
    report = _finish(opened, base.with_layers(layers), target, output, operation="donor-upcycle", surgery_lossy=[], measured=per_layer,
                     allow_lossy=True, dry_run=dry_run, overwrite=overwrite, max_shard_size=max_shard_size, command=command,
                     expect_exact=False, serve_tp=serve_tp, serve_ep=serve_ep, fmt=fmt)
    report["donors"] = [{"source": d.source.name} for d in donor_opened]
    report["router_init"] = router
    if per_layer:
        report["separability"] = {"max_mean_cosine": max(l["max_mean_cosine"] or 0 for l in per_layer),
                                  "own_group_first": [sum(l["own_group_first"][d] for l in per_layer) / len(per_layer) for d in range(D)]}
    if not dry_run and diagnose and prompts:
        from .verify import verify

        for d, (text, donor) in enumerate(zip(prompts, donor_opened)):
            v = verify(donor.source.path, output, text=text)
            errs = [l["rel_err"] for l in v["layers"]]
            report["donors"][d].update(block_rel_err_mean=sum(errs) / len(errs), logits_rel_err=v["logits"]["rel_err"],
                                       top1_agreement=v["logits"]["top1_agreement"], perplexity=v["perplexity"])
    return report
