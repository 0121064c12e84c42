"""Lazy tensors: a shape, a dtype and a way to load the values.

Everything the surgery and layout code handles is a `Lazy`; nothing is read until the writer (or the
runtime) asks for it, one tensor at a time. Reader-backed tensors slice with `get_slice`, so a row
range of a projection reads only those rows from disk.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Index = tuple  # a tuple of slices, one per leading dim


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

    __slots__ = ("shape", "dtype", "_load", "_load_slice", "origin")

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        load: Callable[[], torch.Tensor],
        load_slice: Callable[[tuple[tuple[int, int], ...]], torch.Tensor] | None = None,
        origin: str | None = None,
    ):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._load = load
        self._load_slice = load_slice
        self.origin = origin  # "key" when this is an untouched source tensor

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
        if self._load_slice is not None:
            parent_slice = self._load_slice
            return Lazy(shape, self.dtype, lambda: parent_slice(ranges).contiguous(), None)
        parent = self.load
        sl = tuple(slice(a, b) for a, b in ranges)
        return Lazy(shape, self.dtype, lambda: parent()[sl].contiguous())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape=None, dtype=None) -> "Lazy":
        parent = self.load
        return Lazy(shape or self.shape, dtype or self.dtype, lambda: fn(parent()))

    def scale(self, factor: float) -> "Lazy":
        if factor == 1:
            return self
        return self.map(lambda t: (t.float() * factor).to(t.dtype) if t.dtype != torch.float64 else t * factor)

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
    return Lazy(shape, dtype, lambda: torch.cat([p.load() for p in parts], dim=dim))
