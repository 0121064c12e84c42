"""Lazy tensors: a shape, a dtype and a way to load the values.

Everything the surgery and layout code handles is a `Lazy`; nothing is read until the writer (or the
runtime) asks for it, one tensor at a time. Reader-backed tensors slice with `get_slice`, so a row
range of a projection reads only those rows from disk.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Index = tuple  # a tuple of slices, one per leading dim


# Small callables in place of closures: a 1T-parameter plan holds a million of them.
class Call:
    """fn(*args, *more), with fn an unbound function (no bound-method object kept)."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self, *more):
        return self.fn(*self.args, *more)


class _SliceOf:
    __slots__ = ("load_slice", "ranges")

    def __init__(self, load_slice, ranges):
        self.load_slice, self.ranges = load_slice, ranges

    def __call__(self):
        return self.load_slice(self.ranges).contiguous()


class _PartOf:
    """Stored tensor i of a form, restricted to the form's rectangle (its scales: to the blocks / groups)."""

    __slots__ = ("form", "i")

    def __init__(self, form, i):
        self.form, self.i = form, i

    def __call__(self):
        f = self.form
        t = _resolve(f.base[self.i])[tuple(slice(a, b) for a, b in f.part_ranges(self.i))].load()
        return t if f.factor == 1 or self.i == 0 else f.scale_part(t)


class _Scaled:
    __slots__ = ("load", "factor")

    def __init__(self, load, factor):
        self.load, self.factor = load, factor

    def __call__(self):
        t = self.load()
        return (t.float() * self.factor).to(t.dtype) if t.dtype != torch.float64 else t * self.factor


class StoredForm:
    """How a Lazy (the dequantized view) is stored quantized: a rectangle (`ranges`) of a stored tensor,
    times `factor`. Carried through slices that keep whole blocks / groups and through scaling (the
    scales absorb the factor); its tensors are made only when written (`planned`), so the form of each
    of a 1T model's 100k weights costs a few tuples. Subclasses say the grid and the stored tensors."""

    __slots__ = ("base", "ranges", "factor", "full", "dtypes")

    def __init__(self, base, ranges: tuple[tuple[int, int], ...] | None = None, factor: float = 1.0, full: tuple[int, int] | None = None,
                 dtypes: tuple | None = None):
        self.base = base  # what `planned` reads from (Lazies, or factories of them, resolved when written)
        self.full = full  # the stored tensor's (rows, cols)
        self.ranges = ranges if ranges is not None else tuple((0, n) for n in full)
        self.factor = factor
        self.dtypes = dtypes if dtypes is not None else tuple(b.dtype for b in base)  # of the stored tensors

    def grid(self) -> tuple[int, int]:
        raise NotImplementedError

    def slice(self, ranges: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> "StoredForm | None":
        """The form of rows/cols `ranges` (relative to this view), or None unless every range starts on the
        grid and ends on it (or at the end of the stored tensor)."""
        new = []
        grid = self.grid()
        for dim, (r0, _) in enumerate(self.ranges):
            a, b = ranges[dim] if dim < len(ranges) else (0, shape[dim])
            a, b = r0 + a, r0 + b  # absolute in the stored tensor
            g = grid[dim]
            if a % g or (b % g and b != self.full[dim]):
                return None
            new.append((a, b))
        new = tuple(new)
        return self._with(ranges if new == ranges else new, self.factor)  # the caller's tuple when equal: one less per slice

    def scaled(self, factor: float) -> "StoredForm | None":
        if torch.float8_e8m0fnu in self.dtypes and math.frexp(factor)[0] != 0.5:  # E8M0 scales hold powers of two only
            return None
        return self._with(self.ranges, self.factor * factor)

    def _with(self, ranges, factor) -> "StoredForm":
        out = type(self).__new__(type(self))
        out.base, out.ranges, out.factor, out.full, out.dtypes = self.base, ranges, factor, self.full, self.dtypes
        out._copy_from(self)
        return out

    def _part(self, i: int) -> "Lazy":
        """Stored tensor i restricted to this form's rectangle, without reading or slicing anything until loaded."""
        return Lazy(tuple(b - a for a, b in self.part_ranges(i)), self.dtypes[i], _PartOf(self, i))

    def part_ranges(self, i: int) -> tuple:
        raise NotImplementedError

    def scale_part(self, t: torch.Tensor) -> torch.Tensor:
        """The scales of stored tensor t, times the factor."""
        return t * self.factor

    def _copy_from(self, other) -> None:
        pass


class Fp8(StoredForm):
    """Block-scaled FP8: float8 data [rows, cols] and a float32 scale_inv per b0 x b1 block."""

    __slots__ = ("block",)

    def __init__(self, data: "Lazy", scale_inv: "Lazy", block: tuple[int, int]):
        super().__init__((data, scale_inv), None, 1.0, tuple(data.shape))
        self.block = block

    @classmethod
    def stored(cls, data, scale_inv, block, shape: tuple[int, int], dtypes: tuple) -> "Fp8":
        """The form of a whole stored weight; data, scale_inv: zero-argument factories of its stored tensors."""
        out = cls.__new__(cls)
        StoredForm.__init__(out, (data, scale_inv), None, 1.0, tuple(shape), dtypes)
        out.block = block
        return out

    def _copy_from(self, other) -> None:
        self.block = other.block

    def grid(self):
        return self.block

    def part_ranges(self, i: int) -> tuple:
        if i == 0:
            return self.ranges
        return tuple((a // blk, -(-b // blk)) for (a, b), blk in zip(self.ranges, self.block))

    @property
    def data(self) -> "Lazy":
        return self._part(0)

    @property
    def scale_inv(self) -> "Lazy":
        return self._part(1)

    def planned(self, name: str) -> list[tuple[str, "Lazy"]]:
        """The stored tensors of weight `name`: its float8 data and block scale_inv."""
        return [(name, self.data), (name + "_scale_inv", self.scale_inv)]


class Fp8Tensor(StoredForm):
    """Mistral's FP8: float8 data [rows, cols] with one float32 scale for the whole tensor (or one per row) and,
    for static activation FP8, the input's scale: any row / column slice keeps it (the same scales)."""

    __slots__ = ("scale_shape",)

    def __init__(self, base, shape: tuple[int, int], dtypes: tuple, scale_shape: tuple):
        super().__init__(base, None, 1.0, tuple(shape), dtypes)
        self.scale_shape = tuple(scale_shape)

    def _copy_from(self, other) -> None:
        self.scale_shape = other.scale_shape

    def grid(self):
        return (1, 1)

    def part_ranges(self, i: int) -> tuple:
        if i == 0:
            return self.ranges
        shape = self.scale_shape if i == 1 else ()
        if i == 1 and len(shape) and shape[0] == self.full[0] and self.full[0] > 1:  # one scale per row
            return ((self.ranges[0]),) + tuple((0, n) for n in shape[1:])
        return tuple((0, n) for n in shape)

    def scale_part(self, t: torch.Tensor) -> torch.Tensor:
        return (t.float() * self.factor).to(t.dtype)

    def planned(self, name: str) -> list[tuple[str, "Lazy"]]:
        """Mistral's names: X.weight (float8), X.qscale_weight, X.qscale_act (when the source had it)."""
        base = name[: -len("weight")]
        out = [(name, self._part(0)), (base + "qscale_weight", self._part(1))]
        if len(self.base) > 2:
            act = _resolve(self.base[2])
            out.append((base + "qscale_act", act))
        return out

    def _part(self, i: int) -> "Lazy":
        if i == 2:
            return _resolve(self.base[2])
        return super()._part(i)


class Fp4(StoredForm):
    """FP4 e2m1 rows (DeepSeek-V4's routed experts): int8 data [rows, cols / 2], two values a byte (the even column in
    the low nibble), and an E8M0 scale per row per 32 columns [rows, cols / 32]."""

    GROUP = 32

    def grid(self):
        return (1, self.GROUP)

    def part_ranges(self, i: int) -> tuple:
        (r0, r1), (c0, c1) = self.ranges
        per = 2 if i == 0 else self.GROUP
        return (r0, r1), (c0 // per, -(-c1 // per))

    def scale_part(self, t: torch.Tensor) -> torch.Tensor:
        return (t.float() * self.factor).to(t.dtype)

    def planned(self, name: str) -> list[tuple[str, "Lazy"]]:
        return [(name, self._part(0)), (name + "_scale_inv", self._part(1))]


def _resolve(base) -> "Lazy":
    return base if isinstance(base, Lazy) else base()


def _norm_slices(idx, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    if not isinstance(idx, tuple):
        idx = (idx,)
    out = []
    for dim, size in enumerate(shape):
        s = idx[dim] if dim < len(idx) else None
        if s is None:
            out.append((0, size))
            continue
        if type(s) is not slice or s.step not in (None, 1):
            raise TypeError("Lazy supports contiguous slices only")
        a, b = s.start, s.stop
        if type(a) is int and type(b) is int and 0 <= a <= b <= size:  # the common case, without slice.indices
            out.append((a, b))
            continue
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
        self.shape = shape if type(shape) is tuple else tuple(int(s) for s in shape)
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
            return Lazy(shape, self.dtype, _SliceOf(parent_slice, ranges), None, form=form)
        parent = self.load
        sl = tuple(slice(a, b) for a, b in ranges)
        return Lazy(shape, self.dtype, lambda: parent()[sl].contiguous(), form=form)

    def _moved(self, move: str, *args):
        """The stored form after a move only some forms follow (select, t, take_range: MXFP4's), else None."""
        f = getattr(self.form, move, None) if self.form is not None else None
        return f(*args) if f is not None else None

    def select(self, j: int) -> "Lazy":
        """self[j] without its leading dim: one expert of a fused [E, ...] tensor, read as a slice."""
        shape = self.shape[1:]
        if self._load_slice is not None:
            parent_slice = self._load_slice
            full = tuple((0, s) for s in shape)
            return Lazy(shape, self.dtype, lambda: parent_slice(((j, j + 1),) + full)[0].contiguous(),
                        lambda ranges: parent_slice(((j, j + 1),) + tuple(ranges))[0].contiguous(), form=self._moved("select", j))
        parent = self.load
        return Lazy(shape, self.dtype, lambda: parent()[j].contiguous(), form=self._moved("select", j))

    def t(self) -> "Lazy":
        """The 2-D transpose; slices of it still read only their part (transposed form on disk)."""
        assert len(self.shape) == 2
        shape = (self.shape[1], self.shape[0])
        if self._load_slice is not None:
            parent_slice = self._load_slice

            def load_slice(ranges):
                rows, cols = (tuple(ranges) + ((0, shape[1]),))[:2]
                return parent_slice((cols, rows)).T.contiguous()

            return Lazy(shape, self.dtype, lambda: load_slice(((0, shape[0]), (0, shape[1]))), load_slice, form=self._moved("t"))
        parent = self.load
        return Lazy(shape, self.dtype, lambda: parent().T.contiguous(), form=self._moved("t"))

    def reshape(self, *shape: int) -> "Lazy":
        parent = self.load
        return Lazy(shape, self.dtype, lambda: parent().reshape(shape))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape=None, dtype=None) -> "Lazy":
        parent = self.load
        return Lazy(shape or self.shape, dtype or self.dtype, lambda: fn(parent()))

    def scale(self, factor: float) -> "Lazy":
        if factor == 1:
            return self
        out = Lazy(self.shape, self.dtype, _Scaled(self.load, factor))
        if self.form is not None:
            out.form = self.form.scaled(factor)
        return out

    def to(self, dtype: torch.dtype) -> "Lazy":
        if dtype == self.dtype:
            return self
        return self.map(lambda t: t.to(dtype), dtype=dtype)

    def index_select(self, dim: int, index) -> "Lazy":
        if isinstance(index, range) and index.step == 1:  # contiguous neurons: a slice (no torch work)
            return self[index.start : index.stop] if dim == 0 else self[:, index.start : index.stop]
        if isinstance(index, range):  # strided rows (gpt-oss's interleaved gate / up): forms that can, follow
            shape = list(self.shape)
            shape[dim] = len(index)
            sl = (slice(None),) * dim + (slice(index.start, index.stop, index.step),)
            parent = self.load
            return Lazy(shape, self.dtype, lambda: parent()[sl].contiguous(), form=self._moved("take_range", dim, index))
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
