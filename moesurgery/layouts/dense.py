"""Shared reading of sliding-window fields for the Qwen families."""

from __future__ import annotations

from ..errors import BadInputError
from .base import get_int


def qwen_sliding_window(cfg: dict, family: str) -> int | None:
    """Qwen2/3 slide from layer `max_window_layers` on when `use_sliding_window`."""
    if not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
        return None
    layers = get_int(cfg, "num_hidden_layers")
    first = get_int(cfg, "max_window_layers", 0)
    if first >= layers:
        return None
    if first > 0:
        raise BadInputError(f"config.json: {family} slides only from layer {first} (max_window_layers): not supported")
    return get_int(cfg, "sliding_window")


def qwen_sliding_config(arch) -> dict:
    win = arch.sliding_window
    return {"use_sliding_window": bool(win), "sliding_window": win, "max_window_layers": 0 if win else arch.num_layers}
