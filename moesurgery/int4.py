"""compressed-tensors INT4 "pack-quantized" checkpoints (Kimi K2-Thinking, K2.5, K2.6 routed experts).

On disk each quantized linear weight W [out, in] is three tensors (group size g, symmetric):

    X.weight_packed  int32 [out, in / 8]   eight int4 values per word, element 8j in bits 0-3
    X.weight_scale   bf16  [out, in / g]   one scale per group of g inputs
    X.weight_shape   int   [2]             [out, in]

with q = nibble - 8 in [-8, 7] and W[r, c] = q[r, c] * scale[r, c // g] (in the scale's dtype). The
reader presents X.weight as that bf16 tensor (rows and group-aligned column ranges read on their
own; q * scale rounded once to the scale's bf16, as compressed-tensors decompresses) and hides the
three; each such tensor carries its packed form (`Int4`) through slices on the
group grid and through power-of-two scaling, and the output is written packed again when every
tensor the quantization_config quantizes still has one (else bf16, with a note naming the weight).

The unpacking is the ten lines below, bit for bit the compressed-tensors package's
`unpack_from_int32` (tests/test_int4.py checks it against the package): the package itself imports
transformers at start-up (6-8 s), so it is a test dependency, not one of the tool's.
"""

from __future__ import annotations

import re

import torch

from .errors import BadInputError
from .lazy import Lazy, StoredForm

PACKED, SCALE, SHAPE = "weight_packed", "weight_scale", "weight_shape"
PACK = 8  # int4 values per int32 word
DEQUANT_DTYPE = torch.bfloat16


def group_size(cfg: dict) -> int | None:
    """g of a compressed-tensors pack-quantized INT4 config; None for any other checkpoint."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        return None
    if q.get("format") != "pack-quantized":
        raise BadInputError(f"config.json: compressed-tensors format {q.get('format')!r} is not supported (only pack-quantized INT4)")
    sizes = set()
    for name, group in (q.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy")) != (4, "int", True, "group") or group.get("input_activations"):
            raise BadInputError(f"config.json: compressed-tensors group {name} is not symmetric INT4 weight-only per group (not supported)")
        sizes.add(int(w.get("group_size") or 0))
    if len(sizes) != 1 or min(sizes) <= 0 or min(sizes) % PACK:
        raise BadInputError(f"config.json: compressed-tensors needs one group_size, a multiple of {PACK} (have {sorted(sizes)})")
    return sizes.pop()


def unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [r, w] -> int8 [r, cols] in [-8, 7] (compressed-tensors' unpack_from_int32, packed_dim 1)."""
    shifts = torch.arange(PACK, dtype=torch.int32) * 4
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [r, w, 8]
    return (nibbles.flatten(-2)[..., :cols] - 8).to(torch.int8)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    """W [r, cols] from packed [r, ceil(cols / 8)] and scale [r, cols / group], both from a group edge: q * scale
    rounded once to the scale's dtype, as compressed-tensors' decompression (and so transformers) computes it."""
    q = unpack(packed, cols)
    s = scale.repeat_interleave(group, dim=-1)[..., :cols]
    return (q.float() * s.float()).to(scale.dtype if scale.dtype.is_floating_point else DEQUANT_DTYPE)


class Int4(StoredForm):
    """How a Lazy (the dequantized view) is stored packed: its packed words, scales and group size."""

    __slots__ = ("group", "shape_dtype")

    def __init__(self, packed, scale, group: int, shape_dtype: torch.dtype = torch.int64, shape: tuple[int, int] | None = None,
                 dtypes: tuple | None = None):
        """packed, scale: the stored tensors (Lazy, or zero-argument factories of them with `shape` [out, in] and
        `dtypes` given)."""
        if shape is None:
            shape = (packed.shape[0], scale.shape[1] * group)
        super().__init__((packed, scale), None, 1.0, tuple(shape), dtypes)
        self.group, self.shape_dtype = group, shape_dtype

    def _copy_from(self, other) -> None:
        self.group, self.shape_dtype = other.group, other.shape_dtype

    def grid(self):
        return (1, self.group)

    def part_ranges(self, i: int) -> tuple:
        (r0, r1), (c0, c1) = self.ranges
        per = PACK if i == 0 else self.group  # packed words / scale groups per input column
        return (r0, r1), (c0 // per, -(-c1 // per))

    def scale_part(self, t: torch.Tensor) -> torch.Tensor:
        return (t.float() * self.factor).to(t.dtype)

    @property
    def packed(self) -> Lazy:
        return self._part(0)

    @property
    def scale(self) -> Lazy:
        return self._part(1)

    def planned(self, name: str) -> list[tuple[str, Lazy]]:
        base = name[: -len(".weight")]
        (r0, r1), (c0, c1) = self.ranges
        shape = torch.tensor([r1 - r0, c1 - c0], dtype=self.shape_dtype)
        return [(f"{base}.{PACKED}", self.packed), (f"{base}.{SCALE}", self.scale), (f"{base}.{SHAPE}", Lazy.of(shape))]


def ignored(name: str, rules: list[str]) -> bool:
    """Whether weight `name` is left unquantized by a compressed-tensors `ignore` list ("re:" regexes or module names)."""
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    for rule in rules:
        if rule.startswith("re:"):
            if re.match(rule[3:], module):
                return True
        elif module == rule or module.endswith("." + rule):
            return True
    return False
