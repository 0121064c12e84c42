"""Registry of layouts: one module per model family, keyed by config `model_type`."""

from __future__ import annotations

from ..errors import BadInputError
from . import (
    deepseek,
    deepseek_v2,
    deepseek_v3,
    deepseek_v32,
    deepseek_v4,
    dots1,
    ernie4_5_moe,
    glm4_moe,
    glm_moe_dsa,
    gpt_oss,
    hy_v3,
    kimi_k2,
    llama4,
    llama,
    minimax_m2,
    ministral3,
    mistral,
    mistral4,
    mixtral,
    olmoe,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_5,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
    solar_open,
)
from .base import Layout

LAYOUTS: dict[str, Layout] = {
    m.LAYOUT.name: m.LAYOUT
    for m in (
        llama, mistral, ministral3, qwen2, qwen3,  # dense
        mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek, deepseek_v2, deepseek_v3, glm4_moe,  # 2024-25 MoE
        kimi_k2, deepseek_v32, glm_moe_dsa, mistral4, minimax_m2, dots1, hy_v3, solar_open, ernie4_5_moe,  # the 2025-26 lineage
        qwen3_5, qwen3_next, qwen3_5_moe,  # hybrid linear attention
        gpt_oss, llama4,  # 2026's most used outside the DeepSeek template
        deepseek_v4,  # the newest of the lineage
    )
}
ALIASES = {alias: layout for layout in LAYOUTS.values() for alias in layout.aliases}


def get_layout(name: str) -> Layout:
    layout = LAYOUTS.get(name) or ALIASES.get(name)
    if layout is None:
        raise BadInputError(f"unsupported layout '{name}' (supported: {', '.join(LAYOUTS)})")
    return layout


def layout_for_config(cfg: dict) -> Layout:
    model_type = cfg.get("model_type")
    if not model_type:
        raise BadInputError("config.json has no 'model_type'")
    layout = LAYOUTS.get(model_type) or ALIASES.get(model_type)
    if layout is None:
        raise BadInputError(f"config.json: model_type '{model_type}' is not supported (supported: {', '.join(LAYOUTS)})")
    return layout
