"""MXFP4 checkpoints (gpt-oss releases: `quant_method: mxfp4`): the fused expert weights stored as OCP
microscaling FP4.

On disk a fused weight X (in memory [E, in, out], transformers' gpt-oss layout) is two uint8 tensors, stored
[out, in] per expert with the input dim grouped by 32:

    X_blocks  uint8 [E, out, in / 32, 16]   two e2m1 codes per byte: element 32g + 2j low nibble, 2j + 1 high
    X_scales  uint8 [E, out, in / 32]       one E8M0 exponent per group: the group is multiplied by 2^(s - 127)

The reader presents X as its dequantized [E, in, out] tensor (bf16: every e2m1 value times a power of two is
exact in bf16) and hides the two; ranges of it (one expert, some rows, group-aligned columns) read only their
bytes. Each such tensor carries its stored form (`Mxfp4`) through the moves surgery makes on one expert (a
transpose, strided or contiguous rows, group-aligned columns, power-of-two scaling); when every fused expert
weight of the output still has one, the output is written in MXFP4 again (the same bytes, E8M0 scales shifted by
any power of two folded in) with the source's quantization_config, else in bf16 with a note.
"""

from __future__ import annotations

import math

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


class Mxfp4:
    """How a Lazy (a dequantized view) is stored in MXFP4: rows `rows` (a range of the stored out dim, maybe
    strided: gpt-oss's interleaved gate / up) and groups `groups` (of the stored in dim) of one expert of the
    stored X_blocks / X_scales, times 2^shift; `transposed`: the view is [in, out] (transformers' orientation)
    rather than [out, in]. Carried through the moves surgery makes (one expert, a transpose, strided or
    contiguous rows, group-aligned columns, power-of-two scaling); `fused_form` stacks expert forms back into
    a fused tensor's, written as X_blocks + X_scales."""

    __slots__ = ("blocks", "scales", "expert", "rows", "groups", "transposed", "shift")

    def __init__(self, blocks, scales, expert, rows: range, groups: tuple[int, int], transposed: bool, shift: int = 0):
        self.blocks, self.scales = blocks, scales  # zero-argument factories of the stored Lazies [E, O, G, 16] / [E, O, G]
        self.expert, self.rows, self.groups, self.transposed, self.shift = expert, rows, groups, transposed, shift

    def _with(self, **changes) -> "Mxfp4":
        out = Mxfp4(self.blocks, self.scales, self.expert, self.rows, self.groups, self.transposed, self.shift)
        for k, v in changes.items():
            setattr(out, k, v)
        return out

    # ---- the moves ---------------------------------------------------------------------------------
    def select(self, j: int) -> "Mxfp4 | None":
        return self._with(expert=j) if self.expert is None else None

    def t(self) -> "Mxfp4 | None":
        return self._with(transposed=not self.transposed) if self.expert is not None else None

    def _cut(self, dim: int, a: int, b: int, step: int = 1) -> "Mxfp4 | None":
        """Logical dim `dim` (of the 2-D view) restricted to range(a, b, step)."""
        out_dim = 1 if self.transposed else 0
        if dim == out_dim:
            return self._with(rows=self.rows[a:b:step])
        if step != 1 or a % GROUP or b % GROUP and b != (self.groups[1] - self.groups[0]) * GROUP:
            return None
        g0 = self.groups[0]
        return self._with(groups=(g0 + a // GROUP, g0 + -(-b // GROUP)))

    def slice(self, ranges, shape) -> "Mxfp4 | None":
        if self.expert is None or len(shape) != 2:
            return None
        form = self
        for dim, (a, b) in enumerate(ranges):
            if (a, b) != (0, shape[dim]):
                form = form._cut(dim, a, b) if form is not None else None
        return form

    def take_range(self, dim: int, index: range) -> "Mxfp4 | None":
        return self._cut(dim, index.start, index.stop, index.step) if self.expert is not None else None

    def scaled(self, factor: float) -> "Mxfp4 | None":
        m, e = math.frexp(factor)
        if m != 0.5:  # not a power of two: the E8M0 scales cannot absorb it
            return None
        return self._with(shift=self.shift + e - 1)

    # ---- the stored bytes ----------------------------------------------------------------------------
    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks [rows, groups, 16], scales [rows, groups]) of this view, as stored (scales shifted)."""
        r = self.rows
        lo, hi = (r.start, r.stop) if r.step > 0 else (r.stop + 1, r.start + 1)
        g0, g1 = self.groups
        blocks = self.blocks()[self.expert : self.expert + 1, min(lo, hi) : max(lo, hi), g0:g1].load()[0]
        scales = self.scales()[self.expert : self.expert + 1, min(lo, hi) : max(lo, hi), g0:g1].load()[0]
        if r.step != 1:
            blocks, scales = blocks[:: r.step], scales[:: r.step]
        if self.shift:
            s = scales.to(torch.int32) + self.shift
            if int(s.min()) < 0 or int(s.max()) > 254:
                raise ValueError("an MXFP4 scale left the E8M0 range")
            scales = s.to(torch.uint8)
        return blocks.contiguous(), scales.contiguous()


class Mxfp4Fused:
    """The form of a fused [E, ...] expert tensor whose every expert (and, interleaved, every gate / up pair) has an
    Mxfp4 form: written as X_blocks [E, O, G, 16] + X_scales [E, O, G]."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[list[Mxfp4]]):
        self.parts = parts  # per expert: its forms, rows interleaved (gate_0, up_0, gate_1...) when there are two

    def _expert(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        loaded = [f.load() for f in self.parts[i]]
        if len(loaded) == 1:
            return loaded[0]
        return tuple(torch.stack([p[k] for p in loaded], dim=1).flatten(0, 1) for k in (0, 1))

    def planned(self, name: str) -> list:
        """X_blocks and X_scales, planned (shapes from the forms: nothing is read until written)."""
        from .lazy import Lazy, stack

        first = self.parts[0]
        rows, groups = sum(len(f.rows) for f in first), first[0].groups[1] - first[0].groups[0]
        shapes = ((rows, groups, GROUP // 2), (rows, groups))
        pieces = [stack([Lazy(shapes[k], torch.uint8, lambda i=i, k=k: self._expert(i)[k]) for i in range(len(self.parts))]) for k in (0, 1)]
        return [(name + BLOCKS, pieces[0]), (name + SCALES, pieces[1])]


def fused_form(parts: list[list]) -> Mxfp4Fused | None:
    """The fused tensor's MXFP4 form, or None unless every part (each a Lazy) carries an Mxfp4 one (untransposed:
    the stored [out, in] rows)."""
    forms = [[getattr(p, "form", None) for p in expert] for expert in parts]
    if not all(isinstance(f, Mxfp4) and not f.transposed for fs in forms for f in fs):
        return None
    return Mxfp4Fused(forms)
