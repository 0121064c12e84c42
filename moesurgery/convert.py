"""`convert`: change layout without surgery, exactly where the math allows."""

from __future__ import annotations

from pathlib import Path

from .card import model_card
from .errors import BadInputError
from .serving import serving_warnings
from .express import express
from .layouts import get_layout
from .model_io import open_model, plan_output, save_model
from .writer import DEFAULT_MAX_SHARD_SIZE, check_output_path


def convert(
    source,
    output: str | Path,
    to: str,
    *,
    allow_lossy: bool = False,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    dry_run: bool = False,
    command: str = "moesurgery convert",
    serve_tp: int = 1,
    serve_ep: int = 1,
    fmt: str = "auto",
) -> dict:
    """Convert `source` to layout `to` at `output`; returns the report (also for --dry-run).
    fmt: auto (the form read: Mistral's format stays Mistral's where the layout has it), hf, native."""
    target = get_layout(to)
    opened = open_model(source)
    check_output_path(Path(output), opened.source.path, overwrite)
    result = express(opened.model, target)
    if result.lossy and not allow_lossy:
        raise BadInputError(f"{opened.layout.name} -> {target.name} is not exact: {'; '.join(result.lossy)} (pass --allow-lossy to convert anyway)")
    config, shards, notes = plan_output(result.model, target, max_shard_size, fmt)
    tensors = [t for s in shards for t in s.tensors]
    report = {
        "source": opened.source.name,
        "source_layout": opened.layout.name,
        "target_layout": target.name,
        "output": str(output),
        "dry_run": dry_run,
        "exact": result.exact,
        "verdict": "exact" if result.exact else "lossy",
        "lossy_reasons": result.lossy,
        "notes": opened.notes + result.notes + notes,
        "tensors": len(tensors),
        "tensors_untouched": sum(t.tensor.origin is not None for t in tensors),
        "bytes": sum(s.nbytes for s in shards),
        "shards": [{"file": s.filename, "bytes": s.nbytes, "tensors": len(s.tensors)} for s in shards],
        "serving": serving_warnings(result.model, target, any(n.startswith("written as") for n in notes), serve_tp, serve_ep,
                                   native=any(n.startswith("written in Mistral's format") for n in notes)),
        "command": command,
    }
    if not dry_run:
        card = model_card(report, source_name=opened.source.name, source_dir=opened.source.path, repo_id=opened.source.repo_id, config=config)
        save_model(result.model, target, Path(output), source=opened.source, command=command, max_shard_size=max_shard_size, overwrite=overwrite,
                   finish=lambda tmp: {"README.md": card}, fmt=fmt)
    return report
