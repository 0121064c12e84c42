"""Neuron-level slicing of SwiGLU blocks (FFN(x) = sum_i down[:, i] * silu(gate_i . x) * (up_i . x))."""

from __future__ import annotations

import torch

from ..canonical import SwiGLU
from ..lazy import cat


def take_neurons(ffn: SwiGLU, index: torch.Tensor, down_scale: float = 1.0, bias_scale: float = 1.0) -> SwiGLU:
    """The sub-FFN made of neurons `index` (rows of gate/up and their biases, columns of down), down scaled; a down
    bias (gpt-oss) scaled by `bias_scale` (the slices' outputs add up: each keeps its share of it)."""
    return SwiGLU(
        ffn.gate.index_select(0, index),
        ffn.up.index_select(0, index),
        ffn.down.index_select(1, index).scale(down_scale),
        ffn.gate_bias.index_select(0, index) if ffn.gate_bias is not None else None,
        ffn.up_bias.index_select(0, index) if ffn.up_bias is not None else None,
        ffn.down_bias.scale(bias_scale) if ffn.down_bias is not None else None,
    )


def concat_neurons(parts: list[SwiGLU]) -> SwiGLU:
    """One SwiGLU holding all neurons of `parts` (their outputs sum)."""
    return SwiGLU(cat([p.gate for p in parts]), cat([p.up for p in parts]), cat([p.down for p in parts], dim=1))


def chunks(width: int, n: int) -> list[range]:
    """[0, width) cut into n contiguous equal index ranges."""
    if n <= 0 or width % n:
        raise ValueError(f"width {width} does not split into {n} equal parts")
    size = width // n
    return [range(i * size, (i + 1) * size) for i in range(n)]
