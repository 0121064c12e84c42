"""MXFP4 checkpoints (gpt-oss releases: `quant_method: mxfp4`): the fused expert weights stored as OCP
microscaling FP4.

On disk a fused weight X (in memory [E, in, out], transformers' gpt-oss layout) is two uint8 tensors, stored
[out, in] per expert with the input dim grouped by 32:

    X_blocks  uint8 [E, out, in / 32, 16]   two e2m1 codes per byte: element 32g + 2j low nibble, 2j + 1 high
    X_scales  uint8 [E, out, in / 32]       one E8M0 exponent per group: the group is multiplied by 2^(s - 127)

The reader presents X as its dequantized [E, in, out] tensor (bf16: every e2m1 value times a power of two is
exact in bf16) and hides the two; ranges of it (one expert, some rows, group-aligned columns) read only their
bytes. The output is written in bf16 (with a note): MXFP4 is not written back yet.
"""

from __future__ import annotations

import torch

BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32  # inputs per scale
DEQUANT_DTYPE = torch.bfloat16
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1, bit 3 the sign


def is_mxfp4(cfg: dict) -> bool:
    q = cfg.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., out, G, 16] uint8 codes + [..., out, G] uint8 exponents -> [..., out, G * 32] bf16 (transformers'
    `_convert_moe_packed_tensors`, bit for bit)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., out, G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).to(DEQUANT_DTYPE)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] -> (blocks, scales): round to nearest e2m1 with the smallest exponent that fits the group's
    largest magnitude in +-6 (for tests and fixtures; releases are quantized by their makers)."""
    *lead, out, cols = w.shape
    groups = w.float().reshape(*lead, out, cols // GROUP, GROUP)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(2.0**-126) / 6.0))
    scales = (exp + 127).clamp(0, 254).to(torch.uint8)
    scaled = groups / torch.pow(2.0, exp)[..., None]
    codes = (scaled[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), scales
