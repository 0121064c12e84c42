"""Streaming checkpoint reader: lazy per-tensor access over single-file or sharded safetensors.

Each read opens the shard, copies the tensor (or the requested slice via `get_slice`) and closes it
again, so no mapping of a whole shard stays resident: memory is bounded by the tensors in hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from . import fp8, int4, mxfp4
from .errors import BadInputError
from .lazy import Call, Fp4, Fp8, Fp8Tensor, Lazy

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,  # power-of-two scales (DeepSeek-V4's FP8 blocks and FP4 groups)
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _read_header(path: Path) -> tuple[dict, int]:
    """(JSON header, data size) of one safetensors file (8-byte length + JSON), without mapping the data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise BadInputError(f"{path.name}: not a safetensors file (too short)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > 100_000_000:
                raise BadInputError(f"{path.name}: not a safetensors file (bad header length)")
            header = _parse_header(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path.name}: unreadable safetensors header ({e.__class__.__name__})") from e
    if not isinstance(header, dict):
        raise BadInputError(f"{path.name}: unreadable safetensors header")
    return header, path.stat().st_size - 8 - n


# One tensor entry as safetensors writes it ({"dtype", "shape", "data_offsets"} in this order, no spaces):
# matched one at a time, a 140k-tensor header parses without the ~100 MB of dicts json.loads builds.
_ENTRY = re.compile(rb'"((?:[^"\\]|\\.)*)":\{"dtype":"([A-Z0-9_]+)","shape":\[([0-9,]*)\],"data_offsets":\[([0-9]+),([0-9]+)\]\},?')


def _parse_header(raw: bytes) -> dict:
    """The header as {name: entry} (and "__metadata__"), an entry a (dtype, shape, data_offsets) tuple from
    a regex scan of the canonical form, or json.loads' dict for anything else."""
    text = raw.rstrip(b" ")
    if not (text.startswith(b"{") and text.endswith(b"}")):
        return json.loads(raw)
    body, out, pos = text[1:-1], {}, 0
    if body.startswith(b'"__metadata__":{'):
        end = body.find(b"},", 16)
        if end < 0 or b"{" in body[16:end]:
            return json.loads(raw)
        out["__metadata__"] = json.loads(body[15 : end + 1])
        pos = end + 2
    for m in _ENTRY.finditer(body, pos):
        if m.start() != pos:
            return json.loads(raw)  # not the canonical form: the general parser
        key, dtype, shape, a, b = m.groups()
        name = json.loads(b'"' + key + b'"') if b"\\" in key else key.decode()
        if name in out:
            return json.loads(raw)
        out[name] = (dtype.decode(), tuple(int(d) for d in shape.split(b",")) if shape else (), (int(a), int(b)))  # a compact entry
        pos = m.end()
    if pos != len(body):
        return json.loads(raw)
    return out


def _plain_name(name: str) -> bool:
    """A file name of this directory: no directory part, not '.', '..' or hidden tricks."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _regular_file(path: Path) -> None:
    """Refuse FIFOs, devices, directories (a FIFO would block the read forever); links to files are fine."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise BadInputError(f"{path.name}: cannot open ({e.strerror or e.__class__.__name__})") from None
    if not stat.S_ISREG(mode):
        raise BadInputError(f"{path.name}: not a regular file")


class TensorInfo:
    __slots__ = ("key", "file", "shape", "dtype", "nbytes")

    def __init__(self, key: str, file: Path, shape, dtype: torch.dtype, nbytes: int):
        self.key, self.file, self.shape, self.dtype, self.nbytes = key, file, tuple(shape), dtype, nbytes


def _check_scale(where: str, scale: TensorInfo) -> None:
    """A quantized weight's scale is a float (FP8 / INT4) or E8M0 (which torch counts as float); integer scales are
    another format's, or a corrupted header, and the codecs would cast them."""
    if not scale.dtype.is_floating_point:
        raise BadInputError(f"{where}: its scale {scale.key} has dtype {str(scale.dtype).removeprefix('torch.')}, a scale must be floating point")


class CheckpointReader:
    """Index of every tensor of a checkpoint directory; tensors are read on demand.

    fp8_block: the (b0, b1) blocks of a block-scaled FP8 checkpoint (fp8.block_size(config)): its
    float8 weights are then read dequantized to bf16 and their `weight_scale_inv` tensors hidden.
    int4_group: the group size of a compressed-tensors INT4 checkpoint (int4.group_size(config)): each
    X.weight_packed / weight_scale / weight_shape triple is then read as a bf16 X.weight."""

    def __init__(self, directory: str | Path, fp8_block: tuple[int, int] | None = None, int4_group: int | None = None, mxfp4_on: bool = False,
                 stem: str = "model", fp8_per_tensor: bool = False, fp4_on: bool = False):
        self.directory = Path(directory)
        self.index_name = f"{stem}.safetensors.index.json"
        self.files: list[Path] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self.fp8_block = fp8_block
        self.scales: dict[str, TensorInfo] = {}  # fp8 weight key -> its scale_inv (hidden from `tensors`)
        self.fp8_data: dict[str, TensorInfo] = {}  # fp8 weight key -> the stored float8 tensor
        self.int4_group = int4_group
        self.int4: dict[str, tuple[TensorInfo, TensorInfo, TensorInfo]] = {}  # weight key -> (packed, scale, shape) as stored
        self.mxfp4_on = mxfp4_on
        self.mxfp4: dict[str, tuple[TensorInfo, TensorInfo]] = {}  # fused weight key -> (blocks, scales) as stored
        self.fp8_per_tensor = fp8_per_tensor  # Mistral's format: float8 X.weight times the scalar X.qscale_weight
        self.fp4_on = fp4_on  # DeepSeek-V4's FP4 experts: int8 X.weight [N, K/2] + E8M0 X.scale [N, K/32]
        self.fp4: dict[str, tuple[TensorInfo, TensorInfo]] = {}  # weight key -> (data, scale) as stored
        self.act_scales: dict[str, TensorInfo] = {}  # Mistral FP8 weight key -> its X.qscale_act
        index_path = self.directory / self.index_name
        single = self.directory / f"{stem}.safetensors"
        if index_path.exists():
            self._load_index(index_path)
        elif single.exists():
            self._scan([single])
        else:
            shards = sorted(self.directory.glob(f"{stem}*.safetensors" if stem != "model" else "*.safetensors"))
            if stem == "model" and any(not p.name.startswith("consolidated") for p in shards):
                shards = [p for p in shards if not p.name.startswith("consolidated")]  # Mistral's duplicate of the same weights
            if not shards:
                bins = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                    p.name for p in self.directory.glob("*.pt*")
                )
                if bins:
                    raise BadInputError(
                        f"{self.directory}: only pickle checkpoints ({bins[0]}); moesurgery reads "
                        "safetensors only (pickle files can run code): convert them first"
                    )
                raise BadInputError(f"{self.directory}: no safetensors weights found")
            self._scan(shards)
        self._pair_fp8()
        self._pair_fp4()
        self._pair_fp8_per_tensor()
        self._pair_int4()
        self._pair_mxfp4()

    # ---- indexing ------------------------------------------------------------------------------
    def _load_index(self, index_path: Path) -> None:
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
            assert isinstance(weight_map, dict)
        except Exception as e:
            raise BadInputError(f"{index_path.name}: not a valid index (needs a 'weight_map')") from e
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise BadInputError(f"{index_path.name}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        for name in files:  # plain names of regular files in this directory, checked before any open
            key = next(k for k, v in weight_map.items() if v == name)
            if not _plain_name(name):
                raise BadInputError(f"{self.index_name}: shard {name!r} (holding {key}) is not a file name inside the checkpoint")
            if not (self.directory / name).exists():
                raise BadInputError(f"{self.index_name}: shard {name} (holding {key}) is missing")
            _regular_file(self.directory / name)
        self._scan([self.directory / name for name in files])
        for key, name in weight_map.items():
            info = self.tensors.get(key)
            if info is None:
                raise BadInputError(f"{self.index_name}: {key} is listed in {name} but absent from it")
            if info.file.name != name:
                raise BadInputError(f"{self.index_name}: {key} is listed in {name} but stored in {info.file.name}")
        for key, info in self.tensors.items():
            if key not in weight_map:
                raise BadInputError(f"{self.index_name}: {key} in {info.file.name} is not listed in the index")

    def _scan(self, files: list[Path]) -> None:
        for path in files:
            _regular_file(path)
            header, data_size = _read_header(path)
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict):
                raise BadInputError(f"{path.name}: malformed __metadata__ in the safetensors header")
            if not self.metadata:
                self.metadata = dict(meta)
            self.files.append(path)
            spans = []
            for key, entry in header.items():
                if key in self.tensors:
                    raise BadInputError(f"{key} is stored twice: in {self.tensors[key].file.name} and {path.name}")
                self.tensors[key], span = self._entry(path, key, entry, data_size)
                spans.append((*span, key))
            spans.sort()
            for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
                if b1 < e0 and e1 > b1:  # empty tensors overlap nothing
                    raise BadInputError(f"{path.name}: tensors {k0} and {k1} overlap in the file (malformed header)")

    def _pair_fp8(self) -> None:
        """Find each float8 weight's scale_inv; present the weight as bf16 and hide the scale."""
        if self.fp8_block is None:  # float8 tensors, if any, are read as they are
            return
        for key, info in list(self.tensors.items()):
            if info.dtype not in fp8.FP8_DTYPES:
                continue
            scale_key = key + fp8.SCALE_SUFFIX
            if scale_key not in self.tensors and key.endswith(".weight") and key[: -len("weight")] + "scale" in self.tensors:
                scale_key = key[: -len("weight")] + "scale"  # DeepSeek's name (V4: E8M0 scales)
            where = f"{info.file.name}: tensor {key}"
            if scale_key not in self.tensors or len(info.shape) != 2:
                raise BadInputError(f"{where} is float8 without a 2-D block scale {scale_key}")
            want = fp8.scale_shape(info.shape, self.fp8_block)
            if self.tensors[scale_key].shape != want:
                raise BadInputError(f"{where}: {scale_key} has shape {list(self.tensors[scale_key].shape)}, "
                                    f"expected {list(want)} for {self.fp8_block[0]}x{self.fp8_block[1]} blocks")
            _check_scale(where, self.tensors[scale_key])
            self.scales[key] = self.tensors[scale_key]
            self.fp8_data[key] = info
            numel = info.shape[0] * info.shape[1]
            self.tensors[key] = TensorInfo(key, info.file, info.shape, fp8.DEQUANT_DTYPE, numel * fp8.DEQUANT_DTYPE.itemsize)
        for scale in self.scales.values():
            del self.tensors[scale.key]

    def _pair_fp4(self) -> None:
        """Present each FP4 X.weight (int8 [N, K/2]) with its E8M0 X.scale [N, K/32] as the bf16 [N, K] it encodes."""
        if not self.fp4_on:
            return
        G = mxfp4.GROUP
        for key, info in list(self.tensors.items()):
            if info.dtype not in (torch.int8, torch.uint8) or not key.endswith(".weight"):
                continue
            scale = self.tensors.get(key[: -len("weight")] + "scale")
            if scale is None:
                continue
            N, half = info.shape if len(info.shape) == 2 else (0, 0)
            if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8) or tuple(scale.shape) != (N, 2 * half // G) or (2 * half) % G:
                raise BadInputError(f"{info.file.name}: tensor {key} {list(info.shape)} with scale {list(scale.shape)} {scale.dtype} is not "
                                    f"FP4 (int8 [N, K/2] and E8M0 [N, K/{G}])")
            self.fp4[key] = (info, scale)
            self.tensors[key] = TensorInfo(key, info.file, (N, 2 * half), mxfp4.DEQUANT_DTYPE, N * 2 * half * 2)
            del self.tensors[scale.key]

    def _fp4_ranges(self, key: str, ranges) -> torch.Tensor:
        """Rows r0:r1, columns c0:c1 of an FP4 weight, reading whole groups of 32 columns."""
        d, sc = self.fp4[key]
        rows, cols = self.tensors[key].shape
        (r0, r1), (c0, c1) = (tuple(ranges) + ((0, rows), (0, cols)))[:2]
        G = mxfp4.GROUP
        g0, g1 = c0 // G, -(-c1 // G)
        codes = self._read(d.key, d.file, (slice(r0, r1), slice(g0 * G // 2, g1 * G // 2))).view(torch.uint8)
        exps = self._read(sc.key, sc.file, (slice(r0, r1), slice(g0, g1))).view(torch.uint8)
        w = mxfp4.dequantize(codes.reshape(r1 - r0, g1 - g0, G // 2), exps)  # [r, (g1 - g0) * 32]
        return w[:, c0 - g0 * G : c1 - g0 * G].contiguous()

    def _pair_fp8_per_tensor(self) -> None:
        """Present each float8 X.weight with its scalar X.qscale_weight (Mistral's FP8) as bf16 and hide the scale."""
        if not self.fp8_per_tensor:
            return
        for key, info in list(self.tensors.items()):
            if info.dtype not in fp8.FP8_DTYPES:
                continue
            scale_key = key[: -len("weight")] + "qscale_weight" if key.endswith("weight") else None
            scale = self.tensors.get(scale_key)
            if scale is None or (len(info.shape) != 2) or scale.shape not in ((), (1,), (info.shape[0],), (info.shape[0], 1)):
                raise BadInputError(f"{info.file.name}: tensor {key} is float8 without a per-tensor (or per-row) scale {scale_key}")
            _check_scale(f"{info.file.name}: tensor {key}", scale)
            self.scales[key] = scale
            self.fp8_data[key] = info
            self.tensors[key] = TensorInfo(key, info.file, info.shape, fp8.DEQUANT_DTYPE, info.shape[0] * info.shape[1] * fp8.DEQUANT_DTYPE.itemsize)
            del self.tensors[scale_key]
            act = self.tensors.get(key[: -len("weight")] + "qscale_act")
            if act is not None:  # static activation FP8: kept with the weight's stored form
                _check_scale(f"{info.file.name}: tensor {key}", act)
                self.act_scales[key] = act

    def _dequantize(self, key: str, w8: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
        if self.fp8_per_tensor:
            s = self._read_scale(key).float()  # [] / [1]: one scale; [rows] / [rows, 1]: one per row
            if s.numel() > 1:
                s = s.reshape(-1, 1)[slice(*rows) if rows is not None else slice(None)]
            return (w8.float() * s).to(fp8.DEQUANT_DTYPE)
        return fp8.dequantize(w8, self._read_scale(key), self.fp8_block, rows, cols)

    def _pair_int4(self) -> None:
        """Present each INT4 triple X.weight_packed / weight_scale / weight_shape as a bf16 X.weight."""
        packed = [k for k in self.tensors if k.endswith("." + int4.PACKED)]
        if self.int4_group is None:
            if packed:
                raise BadInputError(f"tensor {packed[0]} is INT4-packed but config.json has no compressed-tensors quantization_config")
            return
        g = self.int4_group
        for key in packed:
            base = key[: -len(int4.PACKED)]
            parts = [self.tensors.get(base + n) for n in (int4.PACKED, int4.SCALE, int4.SHAPE)]
            where = f"{parts[0].file.name}: tensor {key}"
            if None in parts:
                raise BadInputError(f"{where} has no {base}{int4.SCALE} / {base}{int4.SHAPE} beside it")
            p, sc, sh = parts
            rows, cols = sc.shape[0], sc.shape[1] * g if len(sc.shape) == 2 else -1
            if p.dtype != torch.int32 or len(p.shape) != 2 or p.shape[0] != rows or p.shape[1] != -(-cols // int4.PACK):
                raise BadInputError(f"{where}: shape {list(p.shape)} {p.dtype} does not pack {base}{int4.SCALE} {list(sc.shape)} in groups of {g}")
            _check_scale(where, sc)
            if sh.dtype.is_floating_point or sh.shape != (2,):
                raise BadInputError(f"{where}: {sh.key} must hold the weight's [rows, columns] as 2 integers, not {list(sh.shape)} {str(sh.dtype).removeprefix('torch.')}")
            weight = base + "weight"
            self.int4[weight] = (p, sc, sh)
            self.tensors[weight] = TensorInfo(weight, p.file, (rows, cols), int4.DEQUANT_DTYPE, rows * cols * int4.DEQUANT_DTYPE.itemsize)
            for info in parts:
                del self.tensors[info.key]

    def _pair_mxfp4(self) -> None:
        """Present each MXFP4 pair X_blocks / X_scales as the bf16 X [E, in, out] it encodes."""
        blocks = [k for k in self.tensors if k.endswith(mxfp4.BLOCKS)]
        if not self.mxfp4_on:
            if blocks and self.tensors[blocks[0]].dtype == torch.uint8:
                raise BadInputError(f"tensor {blocks[0]} is MXFP4 but config.json has no mxfp4 quantization_config")
            return
        for key in blocks:
            base = key[: -len(mxfp4.BLOCKS)]
            b, s = self.tensors[key], self.tensors.get(base + mxfp4.SCALES)
            where = f"{b.file.name}: tensor {key}"
            if s is None:
                raise BadInputError(f"{where} has no {base}{mxfp4.SCALES} beside it")
            if b.dtype != torch.uint8 or s.dtype != torch.uint8 or len(b.shape) != 4 or b.shape[-1] != mxfp4.GROUP // 2 or tuple(s.shape) != b.shape[:3]:
                raise BadInputError(f"{where}: shapes {list(b.shape)} / {list(s.shape)} are not MXFP4 blocks [E, out, in/32, 16] and scales [E, out, in/32]")
            E, out, groups, _ = b.shape
            shape = (E, groups * mxfp4.GROUP, out)  # transformers' in-memory [E, in, out]
            self.mxfp4[base] = (b, s)
            self.tensors[base] = TensorInfo(base, b.file, shape, mxfp4.DEQUANT_DTYPE, E * groups * mxfp4.GROUP * out * 2)
            del self.tensors[key], self.tensors[s.key]

    def _mxfp4_ranges(self, key: str, ranges) -> torch.Tensor:
        """Experts e0:e1, inputs i0:i1, outputs o0:o1 of a fused MXFP4 weight, reading whole groups only."""
        b, s = self.mxfp4[key]
        E, cols, out = self.tensors[key].shape
        (e0, e1), (i0, i1), (o0, o1) = (tuple(ranges) + ((0, E), (0, cols), (0, out)))[:3]
        g0, g1 = i0 // mxfp4.GROUP, -(-i1 // mxfp4.GROUP)
        codes = self._read(b.key, b.file, (slice(e0, e1), slice(o0, o1), slice(g0, g1)))
        exps = self._read(s.key, s.file, (slice(e0, e1), slice(o0, o1), slice(g0, g1)))
        w = mxfp4.dequantize(codes, exps)  # [e, o, (g1 - g0) * 32]
        return w[..., i0 - g0 * mxfp4.GROUP : i1 - g0 * mxfp4.GROUP].transpose(1, 2).contiguous()

    @staticmethod
    def _entry(path: Path, key: str, entry, data_size: int) -> TensorInfo:
        """Validate one header entry against its dtype, shape and the file's size."""
        try:
            if isinstance(entry, tuple):  # the canonical form, already parsed to ints
                name, shape, (begin, end) = entry
                dtype = DTYPES[name]
            else:
                dtype = DTYPES[entry["dtype"]]
                begin, end = (int(x) for x in entry["data_offsets"])
                shape = [int(d) for d in entry["shape"]]
                if not isinstance(entry["data_offsets"], list) or not isinstance(entry["shape"], list):
                    raise TypeError
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"{path.name}: tensor {key} has an unsupported or malformed header entry") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise BadInputError(f"{path.name}: tensor {key} has a negative dimension")
            numel *= d
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise BadInputError(f"{path.name}: tensor {key} has data offsets that do not match its shape and dtype")
        if end > data_size:
            raise BadInputError(f"{path.name}: tensor {key} lies beyond the end of the file (truncated?)")
        return TensorInfo(key, path, shape, dtype, end - begin), (begin, end)

    # ---- access --------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise BadInputError(f"{self.directory.name}: tensor {key} is missing") from None

    def _read(self, key: str, file: Path, sl: tuple[slice, ...] | None = None) -> torch.Tensor:
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(key) if sl is None else f.get_slice(key)[sl]
        except Exception as e:
            raise BadInputError(f"{file.name}: cannot read tensor {key} ({e})") from e

    def _read_scale(self, key: str) -> torch.Tensor:
        scale = self.scales[key]
        return self._read(scale.key, scale.file)

    def get(self, key: str) -> torch.Tensor:
        info = self.info(key)
        if key in self.scales:
            return self._dequantize(key, self._read(key, info.file))
        if key in self.int4:
            return self.get_ranges(key, ((0, info.shape[0]),))
        if key in self.mxfp4:
            return self._mxfp4_ranges(key, ())
        if key in self.fp4:
            return self._fp4_ranges(key, ())
        return self._read(key, info.file)

    def get_ranges(self, key: str, ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Read only `ranges` (one (start, stop) per leading dim) of `key` with `get_slice`."""
        info = self.info(key)
        sl = tuple(slice(a, b) for a, b in ranges)
        if key in self.scales:
            w8 = self._read(key, info.file, sl)
            rows = ranges[0] if ranges else None
            cols = ranges[1] if len(ranges) > 1 else None
            return self._dequantize(key, w8, rows, cols)
        if key in self.int4:
            return self._int4_ranges(key, ranges)
        if key in self.mxfp4:
            return self._mxfp4_ranges(key, ranges)
        if key in self.fp4:
            return self._fp4_ranges(key, ranges)
        return self._read(key, info.file, sl)

    def _int4_ranges(self, key: str, ranges) -> torch.Tensor:
        """Rows r0:r1, columns c0:c1 of an INT4 weight: packed words and scales of whole groups, unpacked."""
        p, sc, sh = self.int4[key]
        g = self.int4_group
        rows, cols = self.tensors[key].shape
        (r0, r1), (c0, c1) = (tuple(ranges) + ((0, cols),))[:2]
        stored = [int(v) for v in self._read(sh.key, sh.file).tolist()]
        if stored != [rows, cols]:
            raise BadInputError(f"{sh.file.name}: {sh.key} says {stored}, the packed tensors hold [{rows}, {cols}]")
        a = c0 - c0 % g  # read from the group edge below c0
        words = self._read(p.key, p.file, (slice(r0, r1), slice(a // int4.PACK, -(-c1 // int4.PACK))))
        scale = self._read(sc.key, sc.file, (slice(r0, r1), slice(a // g, -(-c1 // g))))
        return int4.dequantize(words, scale, c1 - a, g)[:, c0 - a :].contiguous()

    def lazy(self, key: str) -> Lazy:
        info = self.info(key)
        return Lazy(
            info.shape,
            info.dtype,
            Call(CheckpointReader.get, self, key),
            Call(CheckpointReader.get_ranges, self, key),
            origin=key,
            form=self._fp8_form(key),
        )

    def _fp8_form(self, key: str):
        """The stored form of a dequantized weight (so it can be written back quantized): the raw float8
        data and scale_inv (FP8), or packed words and scales (INT4); None for any other tensor."""
        if key in self.fp4:
            d, sc = self.fp4[key]
            return Fp4((Call(CheckpointReader._stored, self, d), Call(CheckpointReader._stored, self, sc)), None, 1.0, self.tensors[key].shape,
                       (d.dtype, sc.dtype))
        if key in self.mxfp4:
            b, s = self.mxfp4[key]
            E, cols, out = self.tensors[key].shape
            return mxfp4.Mxfp4(Call(CheckpointReader._stored, self, b), Call(CheckpointReader._stored, self, s), None, range(out),
                               (0, cols // mxfp4.GROUP), transposed=True)
        if key in self.int4:
            p, sc, sh = self.int4[key]
            return int4.Int4(Call(CheckpointReader._stored, self, p), Call(CheckpointReader._stored, self, sc), self.int4_group, sh.dtype, self.tensors[key].shape,
                             (p.dtype, sc.dtype))
        if key in self.scales and self.fp8_per_tensor:  # Mistral's: float8 data, its scale(s), the activation scale
            data, scale = self.fp8_data[key], self.scales[key]
            base = [Call(CheckpointReader._stored, self, data), Call(CheckpointReader._stored, self, scale)]
            dtypes = [data.dtype, scale.dtype]
            if key in self.act_scales:
                base.append(Call(CheckpointReader._stored, self, self.act_scales[key]))
                dtypes.append(self.act_scales[key].dtype)
            return Fp8Tensor(tuple(base), data.shape, tuple(dtypes), scale.shape)
        if key not in self.scales:
            return None
        data, scale = self.fp8_data[key], self.scales[key]
        return Fp8.stored(Call(CheckpointReader._stored, self, data), Call(CheckpointReader._stored, self, scale), self.fp8_block, data.shape,
                          (data.dtype, scale.dtype))

    def _stored(self, info: TensorInfo) -> Lazy:
        """A tensor exactly as stored (no dequantization), sliced with get_slice."""
        return Lazy(info.shape, info.dtype, Call(CheckpointReader._read, self, info.key, info.file),
                    Call(CheckpointReader._read_ranges, self, info.key, info.file), origin=info.key)

    def _read_ranges(self, key: str, file: Path, ranges) -> torch.Tensor:
        return self._read(key, file, tuple(slice(a, b) for a, b in ranges))

    # ---- tensors exactly as stored (pass-through of parts we do not interpret) -------------------
    def _stored_infos(self) -> dict[str, TensorInfo]:
        """name -> TensorInfo of every tensor exactly as stored (made once)."""
        if getattr(self, "_stored_cache", None) is not None:
            return self._stored_cache
        out = {k: v for k, v in self.tensors.items() if k not in self.int4 and k not in self.mxfp4 and k not in self.fp4}
        out.update({info.key: info for parts in self.fp4.values() for info in parts})
        out.update({info.key: info for parts in self.mxfp4.values() for info in parts})
        out.update({info.key: info for info in self.scales.values()})
        out.update(self.fp8_data)
        out.update({info.key: info for parts in self.int4.values() for info in parts})
        self._stored_cache = out
        return out

    def stored_keys(self) -> list[str]:
        """Every tensor name in the files, FP8 scales and INT4 parts included."""
        return list(self._stored_infos())

    def stored(self, key: str) -> Lazy:
        """`key` exactly as stored: float8 data for an FP8 weight, a scale or packed part itself."""
        info = self._stored_infos().get(key)
        if info is None:
            raise BadInputError(f"{self.directory.name}: tensor {key} is missing")
        return self._stored(info)

    def stored_owner(self, key: str) -> str:
        """The weight a stored scale or packed part belongs to (itself for any other tensor)."""
        if key.endswith(fp8.SCALE_SUFFIX) and key[: -len(fp8.SCALE_SUFFIX)] in self.scales:
            return key[: -len(fp8.SCALE_SUFFIX)]
        if key.endswith(".scale") and (key[: -len("scale")] + "weight" in self.scales or key[: -len("scale")] + "weight" in self.fp4):
            return key[: -len("scale")] + "weight"
        for part in (int4.PACKED, int4.SCALE, int4.SHAPE):
            if key.endswith("." + part) and key[: -len(part)] + "weight" in self.int4:
                return key[: -len(part)] + "weight"
        for part in (mxfp4.BLOCKS, mxfp4.SCALES):
            if key.endswith(part) and key[: -len(part)] in self.mxfp4:
                return key[: -len(part)]
        return key

    @property
    def total_bytes(self) -> int:
        """Bytes of the tensors as read (block-scaled FP8 weights count as the bf16 they decode to)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data on disk (quantized weights and their scales as stored)."""
        return sum(t.nbytes for t in self._stored_infos().values())

    def dtypes(self) -> dict[str, int]:
        """bytes per dtype name"""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            name = DTYPE_NAMES.get(t.dtype, str(t.dtype))
            out[name] = out.get(name, 0) + t.nbytes
        return out
