"""Open a source (local dir or hub id) as a canonical Model, and write a Model as a checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import fp8, int4, mxfp4, native, nesting
from .canonical import Model
from .errors import BadInputError
from .layouts import Layout, layout_for_config
from .reader import CheckpointReader
from .source import ResolvedSource, resolve_source
from .writer import DEFAULT_MAX_SHARD_SIZE, PlannedTensor, Shard, plan_shards, write_checkpoint


@dataclass
class Opened:
    source: ResolvedSource
    reader: CheckpointReader
    config: dict
    layout: Layout
    model: Model
    notes: list[str] = field(default_factory=list)  # how the source was read (stale configs, dequantization)


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{directory}: no config.json") from None
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise BadInputError(f"{path}: not a JSON object")
    return cfg


def resolve(spec: str | Path) -> ResolvedSource:
    """resolve_source, plus the built-in `tiny:<family>` checkpoints."""
    if isinstance(spec, str) and spec.startswith("tiny:"):
        from .tiny import ensure_tiny

        return ResolvedSource(ensure_tiny(spec[5:]), spec)
    return resolve_source(spec)


def open_model(spec: str | Path) -> Opened:
    source = resolve(spec)
    if native.is_native(source.path):
        return _open_native(source)
    cfg = read_config(source.path)
    notes = []
    wrapper_cfg, moved = None, ()
    if nesting.text_config_of(cfg) is not None:  # a multimodal wrapper: read its language model
        wrapper_cfg = cfg
        cfg, moved = nesting.unwrap_config(cfg)
    q = cfg.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "gguf":  # transformers' save after dequantizing a GGUF
        cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
        notes.append("config.json carries a quantization_config of kind gguf, left by dequantizing a GGUF: "
                     "the weights are plain floats and are read as the unquantized model (the output config drops it)")
    mx = mxfp4.is_mxfp4(cfg)
    group = int4.group_size(cfg) if not mx else None
    block = fp8.block_size(cfg) if group is None and not mx else None
    quantization = cfg.get("quantization_config")
    if block is not None or group is not None or mx:  # FP8 / INT4 / MXFP4: read dequantized, as the bf16 model it encodes
        cfg = fp8.unquantized_config(cfg)
    layout = layout_for_config(cfg)
    expert_dtype = (quantization or {}).get("expert_dtype") if isinstance(quantization, dict) else None
    fp4_on = block is not None and (expert_dtype or cfg.get("expert_dtype")) == "fp4"  # DeepSeek-V4: FP4 routed experts
    reader = CheckpointReader(source.path, fp8_block=block, int4_group=group, mxfp4_on=mx, fp4_on=fp4_on)
    stray = next((k for k in reader.keys() if reader.info(k).dtype in fp8.FP8_DTYPES), None)
    if stray is not None:
        raise BadInputError(f"tensor {stray} is float8 but config.json has no block-scaled fp8 quantization_config")
    view, wrapper = reader, None
    form = next((f for f in layout.key_forms if f.matches(reader.keys())), None)  # the family's other names (DeepSeek's own...)
    if form is not None:
        view = form.view(reader)
    elif wrapper_cfg is not None:
        view, wrapper = nesting.open_text(reader, wrapper_cfg, moved)
        cfg["tie_word_embeddings"] = "lm_head.weight" not in view  # the wrapper decides tying; the checkpoint shows it
    elif (prefixed := nesting.open_prefixed(reader)) is not None:  # text-only, saved under a wrapper's prefix
        view, wrapper = prefixed
    try:
        model = layout.read(cfg, view)
        if block is not None or group is not None or mx:
            model = replace(model, quantization=quantization)
        if wrapper is not None:
            model = replace(model, wrapper=wrapper)
        if form is not None:
            model = replace(model, key_form=form)
            notes.append(f"tensors named in the {form.name} form: read as transformers names them, written back in it")
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"config.json: cannot read a {layout.name} config ({e.__class__.__name__}: {e})") from e
    if isinstance(q, dict) and q.get("quant_method") == "gguf":
        non_float = next((k for k in reader.keys() if not reader.info(k).dtype.is_floating_point), None)
        if non_float is not None:
            raise BadInputError(f"config.json says gguf, and tensor {non_float} is {reader.info(non_float).dtype}: quantized GGUF tensors are not supported")
    return Opened(source, reader, cfg, layout, model, notes)


def _open_native(source: ResolvedSource) -> Opened:
    """A checkpoint in Mistral's format (params.json + consolidated*.safetensors), read as the transformers layout
    computing the same function."""
    params = native.read_params(source.path)
    cfg = native.hf_config(params)
    quantization = params.get("quantization") or None
    notes = [f"Mistral's format (params.json, consolidated*.safetensors): read as {cfg['model_type']}"]
    if quantization:
        if not isinstance(quantization, dict) or quantization.get("qformat_weight") != "fp8_e4m3":
            raise BadInputError(f"params.json: quantization {quantization!r} is not supported (only Mistral's per-tensor fp8_e4m3)")
        notes.append("per-tensor FP8 weights (qscale_weight) read dequantized to bf16 (their stored bytes, qscale_act included, are "
                     "kept for an FP8 output in Mistral's format)")
    layout = layout_for_config(cfg)
    reader = CheckpointReader(source.path, stem=native.STEM, fp8_per_tensor=bool(quantization))
    stray = next((k for k in reader.keys() if reader.info(k).dtype in fp8.FP8_DTYPES), None)
    if stray is not None:
        raise BadInputError(f"tensor {stray} is float8 but params.json has no quantization")
    view, form = native.open_native(reader, cfg, params)
    if form.passthrough:
        notes.append(f"{len(form.passthrough)} tensors of the vision encoder carried as stored")
    try:
        model = replace(layout.read(cfg, view), native=form)
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"params.json: cannot read a {layout.name} model ({e.__class__.__name__}: {e})") from e
    return Opened(source, reader, cfg, layout, model, notes)


def output_format(model: Model, layout: Layout, fmt: str = "auto") -> str:
    """'native' (Mistral's format) or 'hf' for writing `model` in `layout`: auto keeps the form read where the layout has it."""
    if fmt == "hf":
        return "hf"
    can = layout.name in native.LAYOUTS
    if fmt == "native":
        if not can:
            raise BadInputError(f"--format native: Mistral's format holds {', '.join(native.LAYOUTS)} models, not {layout.name}")
        return "native"
    return "native" if model.native is not None and can else "hf"


def output_tensors(model: Model, layout: Layout, fmt: str = "auto") -> tuple[dict, list, list[str]]:
    if output_format(model, layout, fmt) == "native":
        config = layout.write_config(model)
        form = model.native or native.NativeForm({})
        tensors, kept_fp8, note = form.tensors(layout.tensors(model, fused=False), config)
        params = native.params_of(config, form.params)
        if kept_fp8:
            params["quantization"] = form.params["quantization"]
        return params, tensors, ["written in Mistral's format (params.json, consolidated*.safetensors)"] + ([note] if note else [])
    if model.native is not None and model.native.passthrough:
        raise BadInputError(f"the vision encoder of a Mistral-format checkpoint ({len(model.native.passthrough)} tensors) is written only in "
                            "Mistral's format: leave --format at auto (or native)")
    return _hf_tensors(model, layout)


def _hf_tensors(model: Model, layout: Layout) -> tuple[dict, list, list[str]]:
    """(config, planned tensors, notes) of `model` written in `layout`: quantized again (FP8, INT4) where
    the source was and every weight the format quantizes kept its stored form, else plain; inside the
    source's multimodal wrapper if it had one."""
    config, tensors, notes = layout.write_config(model), layout.tensors(model), []
    w = model.wrapper
    if w is not None:
        tensors = [PlannedTensor(w.disk_name(t.name), t.tensor) for t in tensors]
    quantized = False
    if model.quantization:
        kind = {"compressed-tensors": "INT4 (compressed-tensors pack-quantized)", "mxfp4": "MXFP4"}.get(model.quantization.get("quant_method"), "block-scaled FP8")
        kept, why = fp8.requantized(tensors, model.quantization, layout.quantized_weights if w is None else None)
        if kept is None:
            notes.append(f"written in bf16 (the {kind} source is dequantized): {why}")

        else:
            tensors, quantized = kept, True
            notes.append(f"written as {kind} like the source (the same stored bytes on exact slices, its quantization_config)")
    if model.key_form is not None and model.key_form in layout.key_forms:  # the names the source was read in
        tensors = model.key_form.to_disk(tensors)
    if w is not None and not w.multimodal:  # text-only under a prefix: the same names, the rest as stored
        config = w.nest(config, tied=model.lm_head is None)
        if quantized:
            config["quantization_config"] = model.quantization
        tensors += [PlannedTensor(k, v) for k, v in w.passthrough.items()]
    elif w is not None:  # the same wrapper around the new language model; the rest passes through as stored
        config = w.nest(config, tied=model.lm_head is None)
        target = config if "quantization_config" in w.moved else config["text_config"]
        config.pop("quantization_config", None)
        config["text_config"].pop("quantization_config", None)
        if quantized:
            target["quantization_config"] = model.quantization
        tensors += [PlannedTensor(k, v) for k, v in w.passthrough.items()]
        notes.append(f"inside its {w.architecture} wrapper: {len(w.passthrough)} tensors outside the language model "
                     f"(vision tower, projector...) carried byte for byte")
    elif quantized:
        config["quantization_config"] = model.quantization
    return config, tensors, notes


def _files(model: Model, layout: Layout, fmt: str) -> tuple[str, str]:
    """(config file, shard stem) of the output."""
    return (native.PARAMS, native.STEM) if output_format(model, layout, fmt) == "native" else ("config.json", "model")


def plan_output(model: Model, layout: Layout, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, fmt: str = "auto") -> tuple[dict, list[Shard], list[str]]:
    """(config, shards, notes) of `model` written in `layout`: the whole output, planned, nothing read."""
    config, tensors, notes = output_tensors(model, layout, fmt)
    return config, plan_shards(tensors, max_shard_size, _files(model, layout, fmt)[1]), notes


def save_model(
    model: Model,
    layout: Layout,
    output: Path,
    *,
    source: ResolvedSource | None,
    command: str,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    finish=None,
    fmt: str = "auto",
) -> list[Shard]:
    config, tensors, _ = output_tensors(model, layout, fmt)
    config_name, stem = _files(model, layout, fmt)
    return write_checkpoint(
        Path(output),
        tensors,
        config,
        source_dir=source.path if source else None,
        source_name=source.name if source else "",
        command=command,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        finish=finish,
        config_name=config_name,
        stem=stem,
    )
