"""moesurgery.reader: single-file and sharded checkpoints, lazy slices, index validation, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from moesurgery.errors import BadInputError
from moesurgery.reader import INDEX_NAME, SINGLE_NAME, CheckpointReader


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 12, generator=g).to(torch.float16),
        "experts": torch.randn(4, 6, 5, generator=g),
        "ids": torch.arange(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, True, True]),
        "scalar": torch.tensor(2.5),
        "model.norm.weight": torch.ones(8),
    }


def write_index(directory: Path, weight_map: dict[str, str], total_size: int = 0) -> None:
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}))


def write_raw(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors file with an arbitrary (possibly broken) JSON header."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.fixture
def single(tmp_path) -> tuple[Path, dict]:
    t = tensors()
    save_file(t, str(tmp_path / SINGLE_NAME), metadata={"format": "pt", "origin": "test"})
    return tmp_path, t


SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def split(t: dict) -> tuple[dict, dict]:
    keys = list(t)
    return {k: t[k] for k in keys[:4]}, {k: t[k] for k in keys[4:]}


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, dict]:
    t = tensors()
    a, b = split(t)
    save_file(a, str(tmp_path / SHARD1))
    save_file(b, str(tmp_path / SHARD2))
    write_index(tmp_path, {**{k: SHARD1 for k in a}, **{k: SHARD2 for k in b}})
    return tmp_path, t


# ------------------------------------------------------------------------------------ reading
def check_all(reader: CheckpointReader, t: dict) -> None:
    assert sorted(reader.keys()) == sorted(t)
    for k, v in t.items():
        assert k in reader
        info = reader.info(k)
        assert info.shape == tuple(v.shape) and info.dtype == v.dtype
        assert info.nbytes == v.numel() * v.element_size()
        got = reader.get(k)
        assert got.dtype == v.dtype and torch.equal(got, v), k
        lazy = reader.lazy(k)
        assert lazy.shape == tuple(v.shape) and lazy.dtype == v.dtype and lazy.origin == k
        assert torch.equal(lazy.load(), v)
    assert reader.total_bytes == sum(v.numel() * v.element_size() for v in t.values())
    assert "missing.key" not in reader


def test_single_file(single):
    path, t = single
    reader = CheckpointReader(path)
    assert reader.files == [path / SINGLE_NAME]
    assert reader.metadata == {"format": "pt", "origin": "test"}
    check_all(reader, t)
    dtypes = reader.dtypes()
    assert set(dtypes) == {"F32", "BF16", "F16", "I64", "BOOL"}
    assert sum(dtypes.values()) == reader.total_bytes
    assert dtypes["BF16"] == 12 * 8 * 2


def test_sharded_with_index(sharded):
    path, t = sharded
    reader = CheckpointReader(path)
    assert reader.files == [path / SHARD1, path / SHARD2]
    check_all(reader, t)
    assert reader.info("ids").file == path / SHARD2
    assert reader.info("experts").file == path / SHARD1


def test_sharded_without_index(sharded):
    path, t = sharded
    (path / INDEX_NAME).unlink()
    check_all(CheckpointReader(path), t)


def test_missing_key_is_bad_input(single):
    reader = CheckpointReader(single[0])
    with pytest.raises(BadInputError, match="nope"):
        reader.info("nope")
    with pytest.raises(BadInputError, match="nope"):
        reader.lazy("nope")


def test_reader_reads_headers_only(tmp_path):
    """A shard whose data region is damaged still indexes; reading the tensor is a BadInputError."""
    save_file({"a": torch.ones(4)}, str(tmp_path / SINGLE_NAME))
    reader = CheckpointReader(tmp_path)
    assert reader.info("a").shape == (4,)
    data = (tmp_path / SINGLE_NAME).read_bytes()
    (tmp_path / SINGLE_NAME).write_bytes(data[:-8])
    with pytest.raises(BadInputError, match=SINGLE_NAME):
        reader.get("a")


# ------------------------------------------------------------------------------------ lazy slices
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_lazy_slices_equal_full_slices(layout, request):
    path, t = request.getfixturevalue(layout)
    reader = CheckpointReader(path)
    for key in ("model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        full = t[key]
        lz = reader.lazy(key)
        rows, cols = full.shape
        cases = [
            (slice(2, 5),),
            (slice(0, 1),),
            (slice(rows - 3, rows),),
            (slice(-4, None),),
            (slice(None), slice(1, 4)),
            (slice(None), slice(cols - 2, None)),
            (slice(3, 7), slice(2, 6)),
            (slice(5, 5),),  # empty
            (slice(0, 100),),  # clipped
        ]
        for idx in cases:
            part = lz[idx if len(idx) > 1 else idx[0]]
            want = full[idx]
            assert part.shape == tuple(want.shape), (key, idx)
            got = part.load()
            assert got.dtype == full.dtype and torch.equal(got, want), (key, idx)
            assert got.is_contiguous()
    e = t["experts"]
    part = reader.lazy("experts")[1:3, :, 2:4]
    assert torch.equal(part.load(), e[1:3, :, 2:4])
    # a slice of a slice
    assert torch.equal(reader.lazy("experts")[1:4][1:2, 2:5].load(), e[1:4][1:2, 2:5])
    # the whole range is the tensor itself
    whole = reader.lazy("ids")
    assert whole[:] is whole
    assert torch.equal(reader.lazy("ids")[3:7].load(), t["ids"][3:7])
    assert torch.equal(reader.lazy("mask")[1:3].load(), t["mask"][1:3])


def test_lazy_slice_uses_get_slice_not_full_read(single, monkeypatch):
    path, t = single
    reader = CheckpointReader(path)
    monkeypatch.setattr(reader, "get", lambda key: pytest.fail("slice read the whole tensor"))
    assert torch.equal(reader.lazy("model.embed_tokens.weight")[2:4].load(), t["model.embed_tokens.weight"][2:4])


def test_lazy_refuses_steps(single):
    reader = CheckpointReader(single[0])
    with pytest.raises(TypeError):
        reader.lazy("model.embed_tokens.weight")[::2]


@pytest.fixture(scope="module")
def matrix_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("matrix")
    m = torch.arange(13 * 11, dtype=torch.float32).reshape(13, 11).to(torch.bfloat16)
    save_file({"m": m}, str(path / SINGLE_NAME))
    return CheckpointReader(path), m


@settings(max_examples=150, deadline=None)
@given(a=st.integers(-15, 15), b=st.integers(-15, 15), c=st.integers(-13, 13), d=st.integers(-13, 13))
def test_lazy_slice_property(matrix_file, a, b, c, d):
    reader, m = matrix_file
    part = reader.lazy("m")[a:b, c:d]
    want = m[a:b, c:d]
    assert part.shape == tuple(want.shape)
    assert torch.equal(part.load(), want)


# ------------------------------------------------------------------------------------ index validation
def test_index_shard_listed_but_missing(sharded):
    path, _ = sharded
    (path / SHARD2).unlink()
    with pytest.raises(BadInputError) as e:
        CheckpointReader(path)
    msg = str(e.value)
    assert SHARD2 in msg and "missing" in msg
    assert any(k in msg for k in split(tensors())[1])  # names a key it should hold


def test_index_key_listed_but_absent(sharded):
    path, t = sharded
    a, b = split(t)
    write_index(path, {**{k: SHARD1 for k in a}, **{k: SHARD2 for k in b}, "model.ghost.weight": SHARD1})
    with pytest.raises(BadInputError) as e:
        CheckpointReader(path)
    assert "model.ghost.weight" in str(e.value) and SHARD1 in str(e.value)


def test_index_key_listed_in_wrong_shard(sharded):
    path, t = sharded
    a, b = split(t)
    wm = {**{k: SHARD1 for k in a}, **{k: SHARD2 for k in b}}
    wm["ids"] = SHARD1  # stored in SHARD2
    write_index(path, wm)
    with pytest.raises(BadInputError) as e:
        CheckpointReader(path)
    msg = str(e.value)
    assert "ids" in msg and SHARD1 in msg and SHARD2 in msg


def test_key_in_two_shards(sharded):
    path, t = sharded
    a, b = split(t)
    save_file({**b, "model.norm.weight": torch.zeros(8), "experts": torch.zeros(1)}, str(path / SHARD2))
    with pytest.raises(BadInputError) as e:
        CheckpointReader(path)
    msg = str(e.value)
    assert "experts" in msg and SHARD1 in msg and SHARD2 in msg


def test_key_in_two_shards_without_index(sharded):
    path, t = sharded
    (path / INDEX_NAME).unlink()
    save_file({"model.embed_tokens.weight": torch.zeros(1)}, str(path / "zzz.safetensors"))
    with pytest.raises(BadInputError) as e:
        CheckpointReader(path)
    msg = str(e.value)
    assert "model.embed_tokens.weight" in msg and SHARD1 in msg and "zzz.safetensors" in msg


def test_key_in_shard_but_not_in_index(sharded):
    path, t = sharded
    a, b = split(t)
    save_file({**b, "model.stray.weight": torch.zeros(2)}, str(path / SHARD2))
    with pytest.raises(BadInputError) as e:
        CheckpointReader(path)
    msg = str(e.value)
    assert "model.stray.weight" in msg and SHARD2 in msg and "not listed" in msg


@pytest.mark.parametrize("text", ["not json", "[]", '{"metadata": {}}', '{"weight_map": [1, 2]}'])
def test_invalid_index(sharded, text):
    path, _ = sharded
    (path / INDEX_NAME).write_text(text)
    with pytest.raises(BadInputError, match="index"):
        CheckpointReader(path)


# ------------------------------------------------------------------------------------ bad directories
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickle_only_directory_refused(tmp_path, name):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_bytes(b"\x80\x04 pickle")
    with pytest.raises(BadInputError, match="pickle") as e:
        CheckpointReader(tmp_path)
    assert name in str(e.value)


def test_empty_directory(tmp_path):
    with pytest.raises(BadInputError, match="no safetensors"):
        CheckpointReader(tmp_path)


def test_config_only_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BadInputError, match="no safetensors"):
        CheckpointReader(tmp_path)


# ------------------------------------------------------------------------------------ corrupt files
def corrupt_variants() -> dict:
    good = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw_good = json.dumps(good).encode()
    return {
        "empty file": b"",
        "too short": b"\x01\x02\x03",
        "zero header length": (0).to_bytes(8, "little") + b"{}",
        "huge header length": (2**62).to_bytes(8, "little") + b"{}",
        "header longer than file": (4096).to_bytes(8, "little") + b'{"a": {"dtype": "F32"',
        "truncated header": len(raw_good).to_bytes(8, "little") + raw_good[: len(raw_good) // 2],
        "not json": (16).to_bytes(8, "little") + b"this is not json",
        "not utf-8": (8).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8",
        "json list": (8).to_bytes(8, "little") + b"[1, 2] ",
        "unknown dtype": write_bytes_header({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}),
        "missing data_offsets": write_bytes_header({"a": {"dtype": "F32", "shape": [2]}}),
    }


def write_bytes_header(header) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"\0" * 64


@pytest.mark.parametrize("variant", list(corrupt_variants()))
def test_corrupt_header_is_bad_input_naming_the_file(tmp_path, variant):
    (tmp_path / SINGLE_NAME).write_bytes(corrupt_variants()[variant])
    with pytest.raises(BadInputError) as e:
        CheckpointReader(tmp_path)
    assert SINGLE_NAME in str(e.value)


def test_corrupt_shard_named_in_sharded_checkpoint(sharded):
    path, _ = sharded
    (path / SHARD2).write_bytes(b"garbage garbage garbage")
    with pytest.raises(BadInputError, match=SHARD2):
        CheckpointReader(path)


@pytest.mark.parametrize(
    "header",
    [
        {"a": [1, 2]},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}},
        {"__metadata__": "not a dict", "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    ],
    ids=["entry-not-object", "three-offsets", "string-offsets", "metadata-not-object"],
)
def test_malformed_header_entry_is_bad_input(tmp_path, header):
    write_raw(tmp_path / SINGLE_NAME, header, b"\0" * 8)
    with pytest.raises(BadInputError, match=SINGLE_NAME):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize(
    "header, data",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),  # 16 bytes by shape
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),  # file truncated
        ({"a": {"dtype": "F32", "shape": [2, "x"], "data_offsets": [0, 8]}}, b"\0" * 8),  # bad shape
    ],
    ids=["offsets-vs-shape", "truncated-data", "non-int-shape"],
)
def test_inconsistent_header_is_bad_input(tmp_path, header, data):
    write_raw(tmp_path / SINGLE_NAME, header, data)
    with pytest.raises(BadInputError, match=SINGLE_NAME):
        CheckpointReader(tmp_path)
