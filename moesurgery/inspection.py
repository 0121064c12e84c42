"""`inspect`: what a checkpoint is, from its config and tensor headers (no weights read)."""

from __future__ import annotations

from .canonical import Model, MoE, SwiGLU, model_params
from .model_io import open_model


def layer_report(layer) -> dict:
    ffn = layer.ffn
    if isinstance(ffn, SwiGLU):
        return {"index": layer.index, "kind": "dense", "num_experts": 0, "top_k": 0, "expert_width": 0, "shared_width": 0, "dense_width": ffn.width}
    r = ffn.router
    return {
        "index": layer.index,
        "kind": "moe",
        "num_experts": len(ffn.experts),
        "top_k": r.top_k,
        "expert_width": ffn.expert_width,
        "shared_width": ffn.shared_width,
        "shared_gate": ffn.shared_gate is not None,
        "scoring": r.scoring,
        "renormalize": r.renormalize,
        "routed_scaling_factor": r.scaling,
        "n_group": r.n_group,
        "topk_group": r.topk_group,
        "correction_bias": r.bias is not None,
    }


def attention_report(model: Model) -> dict:
    a = model.arch
    out = {
        "kind": a.attention,
        "summary": a.describe_attention(),
        "num_heads": a.num_heads,
        "num_kv_heads": a.num_kv_heads,
        "head_dim": a.head_dim,
        "qk_norm": a.qk_norm,
        "qkv_bias": a.qkv_bias,
        "o_bias": a.o_bias,
        "rope_theta": a.rope_theta,
        "rope_scaling": a.rope_scaling,
        "partial_rotary_factor": a.partial_rotary_factor,
        "sliding_window": a.sliding_window,
    }
    if a.attention == "mla":
        out["mla"] = a.mla
    return out


def inspect_model(spec) -> dict:
    opened = open_model(spec)
    model, reader = opened.model, opened.reader
    total, active = model_params(model)
    return {
        "source": opened.source.name,
        "path": str(opened.source.path),
        "model_type": model.family,
        "architecture": (opened.config.get("architectures") or [None])[0],
        "dtypes": reader.dtypes(),  # as read: block-scaled fp8 weights count as the bf16 they decode to
        "bytes": reader.total_bytes,
        "fp8_block_size": list(reader.fp8_block) if reader.fp8_block else None,
        "fp8_weights": len(reader.scales),
        "int4_group_size": reader.int4_group,
        "int4_weights": len(reader.int4),
        "stored_bytes": reader.stored_bytes,
        "shards": len(reader.files),
        "num_layers": model.arch.num_layers,
        "hidden_size": model.arch.hidden_size,
        "vocab_size": model.arch.vocab_size,
        "tie_word_embeddings": model.arch.tie_word_embeddings,
        "attention": attention_report(model),
        "params_total": total,
        "params_active": active,
        "num_moe_layers": sum(isinstance(l.ffn, MoE) for l in model.layers),
        "layers": [layer_report(l) for l in model.layers],
        "extra_tensors": sorted(model.extras),
        "wrapper": wrapper_report(model.wrapper),
        "format": "mistral" if model.native is not None else "transformers",  # mistral: params.json + consolidated*.safetensors
        "native_passthrough_tensors": len(model.native.passthrough) if model.native is not None else 0,
        "notes": opened.notes,
    }


def wrapper_report(w) -> dict | None:
    """The multimodal model around the language model, and what passes through it untouched."""
    if w is None:
        return None
    names = sorted(w.passthrough)
    if not w.multimodal:
        return {"model_type": None, "architecture": None, "text_prefix": w.prefix, "passthrough_tensors": len(names),
                "passthrough_bytes": sum(t.nbytes for t in w.passthrough.values()), "passthrough_parts": [], "passthrough_examples": names[:3]}
    tops = sorted({n.split(".")[0] if not n.startswith("model.") else ".".join(n.split(".")[:2]) for n in names})
    return {
        "model_type": w.model_type,
        "architecture": w.architecture,
        "text_prefix": w.prefix,
        "passthrough_tensors": len(names),
        "passthrough_bytes": sum(t.nbytes for t in w.passthrough.values()),
        "passthrough_parts": tops,
        "passthrough_examples": names[:3],
    }


def add_routing(report: dict, spec, text: str, tokens: int, text_name: str) -> None:
    """Routing statistics on `text` under report["layers"][i]["routing"] (and report["routing"]: what was run)."""
    from .calibration import chunk, tokenize
    from .routing import routing_statistics

    opened = open_model(spec)
    if not opened.model.moe_layers():
        from .errors import BadInputError

        raise BadInputError(f"{opened.model.family} is dense: routing statistics need an MoE")
    ids = chunk(tokenize(opened.source.path, text, opened.model.arch.vocab_size), 256, tokens)
    stats = routing_statistics(opened.model, ids)
    for row in report["layers"]:
        if row["index"] in stats:
            row["routing"] = stats[row["index"]]
    report["routing"] = {"text": text_name, "tokens": int(ids.numel())}
