"""Registry of layouts: one module per model family, keyed by config `model_type`."""

from __future__ import annotations

from ..errors import BadInputError
from . import (
    deepseek,
    deepseek_v2,
    deepseek_v3,
    glm4_moe,
    llama,
    mistral,
    mixtral,
    olmoe,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from .base import Layout

LAYOUTS: dict[str, Layout] = {
    m.LAYOUT.name: m.LAYOUT
    for m in (llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek, deepseek_v2, deepseek_v3, glm4_moe)
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise BadInputError(f"unsupported layout '{name}' (supported: {', '.join(LAYOUTS)})") from None


def layout_for_config(cfg: dict) -> Layout:
    model_type = cfg.get("model_type")
    if not model_type:
        raise BadInputError("config.json has no 'model_type'")
    if model_type not in LAYOUTS:
        raise BadInputError(f"config.json: model_type '{model_type}' is not supported (supported: {', '.join(LAYOUTS)})")
    return LAYOUTS[model_type]
