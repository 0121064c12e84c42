"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1, Qwen3 "-FP8", GLM-4.5-FP8: `quant_method: fp8`).

On disk each quantized linear weight W [out, in] is float8_e4m3fn with a float32
`weight_scale_inv` [ceil(out / b0), ceil(in / b1)] for blocks of b0 x b1 (`weight_block_size`,
usually 128 x 128); the real weight is W * scale_inv of its block (DeepSeek's `weight_dequant`).
The reader dequantizes such weights as it reads them (to bfloat16) and hides the scales, so every
layout, surgery and verify sees ordinary bf16 tensors. Each such tensor also carries its FP8 form
(`lazy.Fp8`) through slices on the block grid and through scaling; when every layer `*_proj.weight`
of the output still has one, the output is written as FP8 again (data + scale_inv, the source's
quantization_config), else all in bf16 without it.
"""

from __future__ import annotations

import re

import torch

from .errors import BadInputError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"
DEQUANT_DTYPE = torch.bfloat16


def block_size(cfg: dict) -> tuple[int, int] | None:
    """(b0, b1) of a block-scaled FP8 config, None for any other checkpoint; refuses other quantizations."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise BadInputError(f"config.json: quantization {method!r} is not supported (only block-scaled fp8, or unquantized weights)")
    size = q.get("weight_block_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(b, int) and b > 0 for b in size)):
        raise BadInputError("config.json: fp8 quantization without a weight_block_size [b0, b1] (per-tensor fp8 is not supported)")
    return size[0], size[1]


def unquantized_config(cfg: dict) -> dict:
    """The config of the dequantized model: no quantization_config, bfloat16."""
    out = {k: v for k, v in cfg.items() if k != "quantization_config"}
    for key in ("torch_dtype", "dtype"):
        if key in out:
            out[key] = "bfloat16"
    return out


LINEAR_WEIGHT = re.compile(r"(.+\.)?layers\.\d+\..*_proj(_with_mqa)?\.weight")  # linear weights FP8 checkpoints quantize


def quantized_names(quantization: dict, pattern=None):
    """Which output tensors a checkpoint of `quantization` (its quantization_config) stores quantized:
    (predicate on the tensor name, what to call the format); `pattern`: the layout's own rule (DeepSeek-V4)."""
    if pattern is not None:
        return (lambda name: bool(pattern.fullmatch(name))), "FP8"
    if quantization.get("quant_method") == "mxfp4":  # not written back yet: every fused expert weight has no form
        return (lambda name: name.endswith(("experts.gate_up_proj", "experts.down_proj"))), "MXFP4"
    if quantization.get("quant_method") == "compressed-tensors":
        from .int4 import ignored

        rules = list(quantization.get("ignore") or [])
        return (lambda name: name.endswith("_proj.weight") and not ignored(name, rules)), "INT4"
    return (lambda name: bool(LINEAR_WEIGHT.fullmatch(name))), "FP8"


def requantized(tensors: list, quantization: dict, pattern=None) -> tuple[list | None, str | None]:
    """The planned tensors (writer.PlannedTensor) with every tensor the format quantizes written in its
    stored form (FP8: float8 data + `weight_scale_inv`; INT4: weight_packed + weight_scale +
    weight_shape), or (None, why not) when one of them has none any more (a slice off the block or
    group grid, a computed tensor): then the whole output stays bf16, as a loader expects every such
    weight of the checkpoint quantized."""
    from .writer import PlannedTensor

    must, kind = quantized_names(quantization, pattern)
    lost = [t.name for t in tensors if must(t.name) and t.tensor.form is None]
    if lost:
        more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
        if kind == "MXFP4":
            return None, f"{lost[0]}{more} cannot stay MXFP4 (not a group-aligned slice of its experts' stored blocks)"
        return None, f"{lost[0]}{more} cannot stay {kind} (not a {'block' if kind == 'FP8' else 'group'}-aligned slice of a quantized weight)"
    out = []
    for t in tensors:
        if t.tensor.form is not None and must(t.name):
            (name, stored), *more = t.tensor.form.planned(t.name)
            t.name, t.tensor = name, stored  # the planned entry becomes the stored tensor (fewer objects at 1M tensors)
            out.append(t)
            out += [PlannedTensor(n, v) for n, v in more]
        else:
            out.append(t)
    return out, None


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantize(w8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], rows: tuple[int, int] | None = None,
               cols: tuple[int, int] | None = None) -> torch.Tensor:
    """w8 [r, c] (the rows/cols slice of the full weight) * its blocks' scale_inv -> bf16 [r, c]."""
    r0 = rows[0] if rows else 0
    c0 = cols[0] if cols else 0
    r = torch.arange(r0, r0 + w8.shape[0]) // block[0]  # [r] block row of each row
    c = torch.arange(c0, c0 + w8.shape[1]) // block[1]  # [c]
    scale = scale_inv.float()[r][:, c]  # [r, c]
    return (w8.float() * scale).to(DEQUANT_DTYPE)
