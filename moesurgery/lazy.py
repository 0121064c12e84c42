"""Lazy tensors: a shape, a dtype and a way to load the values.

Everything the surgery and layout code handles is a `Lazy`; nothing is read until the writer (or the
runtime) asks for it, one tensor at a time. Reader-backed tensors slice with `get_slice`, so a row
range of a projection reads only those rows from disk.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Index = tuple  # a tuple of slices, one per leading dim


class Fp8:
    """How a Lazy (the dequantized bf16 view) is stored as block-scaled FP8: the float8 data, its
    scale_inv and the block size. Carried through row/column slices on block boundaries and through
    scaling (the scale absorbs the factor), so such tensors can be written back as FP8."""

    __slots__ = ("data", "scale_inv", "block")

    def __init__(self, data: "Lazy", scale_inv: "Lazy", block: tuple[int, int]):
        self.data, self.scale_inv, self.block = data, scale_inv, block

    def slice(self, ranges: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> "Fp8 | None":
        """The FP8 form of rows/cols `ranges`, or None unless every range starts on a block edge and
        ends on one (or at the end of the tensor)."""
        scale_ranges = []
        for (a, b), size, blk in zip(ranges, shape, self.block):
            if a % blk or (b % blk and b != size):
                return None
            scale_ranges.append((a // blk, -(-b // blk)))
        ranges2 = tuple(ranges) + tuple((0, s) for s in shape[len(ranges):])
        sl = tuple(slice(a, b) for a, b in ranges2)
        return Fp8(self.data[sl], self.scale_inv[tuple(slice(a, b) for a, b in scale_ranges)], self.block)

    def scaled(self, factor: float) -> "Fp8":
        return Fp8(self.data, self.scale_inv.map(lambda s: s * factor), self.block)

    def planned(self, name: str) -> list[tuple[str, "Lazy"]]:
        """The stored tensors of weight `name`: its float8 data and block scale_inv."""
        return [(name, self.data), (name + "_scale_inv", self.scale_inv)]


def _norm_slices(idx, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    if not isinstance(idx, tuple):
        idx = (idx,)
    out = []
    for dim, size in enumerate(shape):
        s = idx[dim] if dim < len(idx) else slice(None)
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("Lazy supports contiguous slices only")
        start, stop, _ = s.indices(size)
        out.append((start, max(start, stop)))
    return tuple(out)


class Lazy:
    """A tensor not yet read: `shape`, `dtype`, and `load()` to get it."""

    __slots__ = ("shape", "dtype", "_load", "_load_slice", "origin", "form", "parts")

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        load: Callable[[], torch.Tensor],
        load_slice: Callable[[tuple[tuple[int, int], ...]], torch.Tensor] | None = None,
        origin: str | None = None,
        form=None,
    ):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._load = load
        self._load_slice = load_slice
        self.origin = origin  # "key" when this is an untouched source tensor
        self.form = form  # how it is stored quantized (fp8.Fp8 / int4.Int4), where it still can be
        self.parts: list[Lazy] | None = None  # pieces along dim 0 the writer streams one at a time (a fused tensor)

    def __repr__(self) -> str:
        return f"Lazy({list(self.shape)}, {self.dtype}, origin={self.origin})"

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        t = self._load()
        assert tuple(t.shape) == self.shape and t.dtype == self.dtype, (t.shape, t.dtype, self)
        return t

    # ---- constructors -------------------------------------------------------------------------
    @staticmethod
    def of(tensor: torch.Tensor) -> "Lazy":
        return Lazy(tensor.shape, tensor.dtype, lambda: tensor)

    @staticmethod
    def zeros(shape: Sequence[int], dtype: torch.dtype) -> "Lazy":
        return Lazy(shape, dtype, lambda: torch.zeros(tuple(shape), dtype=dtype))

    @staticmethod
    def full(shape: Sequence[int], value: float, dtype: torch.dtype) -> "Lazy":
        return Lazy(shape, dtype, lambda: torch.full(tuple(shape), value, dtype=dtype))

    # ---- transforms (all lazy) ----------------------------------------------------------------
    def __getitem__(self, idx) -> "Lazy":
        ranges = _norm_slices(idx, self.shape)
        if all(r == (0, s) for r, s in zip(ranges, self.shape)):
            return self
        shape = [b - a for a, b in ranges]
        form = self.form.slice(ranges, self.shape) if self.form is not None else None
        if self._load_slice is not None:
            parent_slice = self._load_slice
            return Lazy(shape, self.dtype, lambda: parent_slice(ranges).contiguous(), None, form=form)
        parent = self.load
        sl = tuple(slice(a, b) for a, b in ranges)
        return Lazy(shape, self.dtype, lambda: parent()[sl].contiguous(), form=form)

    def select(self, j: int) -> "Lazy":
        """self[j] without its leading dim: one expert of a fused [E, ...] tensor, read as a slice."""
        shape = self.shape[1:]
        if self._load_slice is not None:
            parent_slice = self._load_slice
            full = tuple((0, s) for s in shape)
            return Lazy(shape, self.dtype, lambda: parent_slice(((j, j + 1),) + full)[0].contiguous(),
                        lambda ranges: parent_slice(((j, j + 1),) + tuple(ranges))[0].contiguous())
        parent = self.load
        return Lazy(shape, self.dtype, lambda: parent()[j].contiguous())

    def t(self) -> "Lazy":
        """The 2-D transpose; slices of it still read only their part (transposed form on disk)."""
        assert len(self.shape) == 2
        shape = (self.shape[1], self.shape[0])
        if self._load_slice is not None:
            parent_slice = self._load_slice

            def load_slice(ranges):
                rows, cols = (tuple(ranges) + ((0, shape[1]),))[:2]
                return parent_slice((cols, rows)).T.contiguous()

            return Lazy(shape, self.dtype, lambda: load_slice(((0, shape[0]), (0, shape[1]))), load_slice)
        parent = self.load
        return Lazy(shape, self.dtype, lambda: parent().T.contiguous())

    def reshape(self, *shape: int) -> "Lazy":
        parent = self.load
        return Lazy(shape, self.dtype, lambda: parent().reshape(shape))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape=None, dtype=None) -> "Lazy":
        parent = self.load
        return Lazy(shape or self.shape, dtype or self.dtype, lambda: fn(parent()))

    def scale(self, factor: float) -> "Lazy":
        if factor == 1:
            return self
        out = self.map(lambda t: (t.float() * factor).to(t.dtype) if t.dtype != torch.float64 else t * factor)
        if self.form is not None:
            out.form = self.form.scaled(factor)
        return out

    def to(self, dtype: torch.dtype) -> "Lazy":
        if dtype == self.dtype:
            return self
        return self.map(lambda t: t.to(dtype), dtype=dtype)

    def index_select(self, dim: int, index: torch.Tensor) -> "Lazy":
        index = torch.as_tensor(index, dtype=torch.long)
        if dim == 0 and index.numel() and bool((index[1:] - index[:-1] == 1).all()):
            return self[int(index[0]) : int(index[-1]) + 1]
        if dim == 1 and index.numel() and bool((index[1:] - index[:-1] == 1).all()):
            return self[:, int(index[0]) : int(index[-1]) + 1]
        shape = list(self.shape)
        shape[dim] = index.numel()
        return self.map(lambda t: t.index_select(dim, index).contiguous(), shape=shape)


def cat(parts: Sequence[Lazy], dim: int = 0) -> Lazy:
    """Concatenate lazily along `dim`."""
    if len(parts) == 1:
        return parts[0]
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    dtype = parts[0].dtype
    out = Lazy(shape, dtype, lambda: torch.cat([p.load() for p in parts], dim=dim))
    if dim == 0:
        out.parts = list(parts)
    return out


def stack(parts: Sequence[Lazy]) -> Lazy:
    """[E, ...] from E tensors of one shape: a fused expert tensor, written one expert at a time."""
    shape = (len(parts), *parts[0].shape)
    out = Lazy(shape, parts[0].dtype, lambda: torch.stack([p.load() for p in parts]))
    out.parts = [p.reshape(1, *p.shape) for p in parts]
    return out
