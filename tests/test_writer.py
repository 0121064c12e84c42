"""moesurgery.writer: size parsing, shard planning, the safetensors writer and the staged output dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from moesurgery import __version__
from moesurgery.errors import UsageError
from moesurgery.lazy import Lazy
from moesurgery.reader import INDEX_NAME, SINGLE_NAME, CheckpointReader
from moesurgery.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    PlannedTensor,
    SIDE_FILES,
    parse_size,
    plan_shards,
    provenance,
    staged_output,
    write_checkpoint,
)


def planned(name: str, nbytes: int) -> PlannedTensor:
    return PlannedTensor(name, Lazy.zeros((nbytes,), torch.uint8))


def as_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def leftovers(parent: Path) -> list[str]:
    """Temporary / backup siblings the staged output may leave behind."""
    return sorted(p.name for p in parent.iterdir() if "moesurgery-tmp" in p.name or "moesurgery-old" in p.name)


# ------------------------------------------------------------------------------------ parse_size
@pytest.mark.parametrize(
    "text, expected",
    [
        ("123", 123),
        ("5GB", 5_000_000_000),
        ("5gb", 5_000_000_000),
        ("500MB", 500_000_000),
        ("1MB", 1_000_000),
        ("10kB", 10_000),
        ("10KiB", 10 * 1024),
        ("2GiB", 2 * 2**30),
        ("500MiB", 500 * 2**20),
        ("1TB", 10**12),
        ("1.5GB", 1_500_000_000),
        ("  7 MB ", 7_000_000),
        ("64B", 64),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "5XB", "-1GB", "1.5.5GB", "GB", "0", "0MB", "0.1", "5 G B"])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match="max-shard-size"):
        parse_size(text)


@pytest.mark.parametrize("value", [0, -5])
def test_parse_size_refuses_non_positive_int(value):
    with pytest.raises(UsageError):
        parse_size(value)


def test_default_max_shard_size():
    assert DEFAULT_MAX_SHARD_SIZE == parse_size("5GB")


# ------------------------------------------------------------------------------------ plan_shards
def test_plan_single_shard_named_model_safetensors():
    tensors = [planned(f"t{i}", 10) for i in range(5)]
    shards = plan_shards(tensors, 1000)
    assert [s.filename for s in shards] == [SINGLE_NAME]
    assert [t.name for t in shards[0].tensors] == [f"t{i}" for i in range(5)]
    assert shards[0].nbytes == 50


def test_plan_several_shards_named_n_of_m_in_order():
    tensors = [planned(f"t{i}", 40) for i in range(5)]
    shards = plan_shards(tensors, 100)  # 2 + 2 + 1
    assert [s.filename for s in shards] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert [[t.name for t in s.tensors] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert [s.nbytes for s in shards] == [80, 80, 40]


def test_plan_exact_fit_stays_in_one_shard():
    shards = plan_shards([planned("a", 60), planned("b", 40)], 100)
    assert len(shards) == 1


def test_plan_tensor_bigger_than_limit_gets_its_own_shard():
    tensors = [planned("a", 10), planned("big", 500), planned("b", 10), planned("c", 10)]
    shards = plan_shards(tensors, 100)
    assert [[t.name for t in s.tensors] for s in shards] == [["a"], ["big"], ["b", "c"]]
    assert shards[1].nbytes == 500


def test_plan_big_tensor_first():
    shards = plan_shards([planned("big", 500), planned("a", 10)], 100)
    assert [[t.name for t in s.tensors] for s in shards] == [["big"], ["a"]]


def test_plan_refuses_duplicate_names():
    with pytest.raises(ValueError, match="dup"):
        plan_shards([planned("x", 1), planned("dup", 1), planned("dup", 1)], 100)


def test_plan_counts_dtype_bytes():
    t = PlannedTensor("w", Lazy.zeros((3, 5), torch.bfloat16))
    assert t.nbytes == 30
    assert plan_shards([t])[0].nbytes == 30


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=40),
    max_shard_size=st.integers(min_value=1, max_value=3000),
)
def test_plan_shards_property(sizes, max_shard_size):
    tensors = [planned(f"t{i}", n) for i, n in enumerate(sizes)]
    shards = plan_shards(tensors, max_shard_size)
    # every tensor in exactly one shard, in order
    assert [t.name for s in shards for t in s.tensors] == [t.name for t in tensors]
    for s in shards:
        assert s.tensors, "no empty shard"
        assert s.nbytes <= max_shard_size or len(s.tensors) == 1
    # greedy: a shard is closed only when the next tensor would overflow it
    for a, b in zip(shards, shards[1:]):
        assert a.nbytes + b.tensors[0].nbytes > max_shard_size
    n = len(shards)
    if n == 1:
        assert shards[0].filename == SINGLE_NAME
    else:
        assert [s.filename for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


# ------------------------------------------------------------------------------------ round trip
def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bool": torch.tensor([True, False, True]),  # 3 bytes: what follows is unaligned
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "i64": torch.arange(-3, 6, dtype=torch.int64).reshape(3, 3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.25),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i32": torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "bf16_nonfinite": torch.tensor([float("nan"), float("inf"), -0.0], dtype=torch.bfloat16),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }


def write_sample(out: Path, **kw) -> tuple[dict[str, torch.Tensor], list]:
    tensors = sample_tensors()
    shards = write_checkpoint(
        out,
        [PlannedTensor(k, Lazy.of(v)) for k, v in tensors.items()],
        {"model_type": "test", "b": 2, "a": 1},
        source_name="src:name",
        command="moesurgery convert src out --to x",
        **kw,
    )
    return tensors, shards


def test_round_trip_single_file(tmp_path):
    out = tmp_path / "out"
    tensors, shards = write_sample(out)
    assert len(shards) == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "moesurgery.json"]
    reader = CheckpointReader(out)
    assert reader.keys() == list(tensors)
    loaded = load_file(str(out / "model.safetensors"))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        for got in (reader.get(k), loaded[k]):
            assert got.dtype == v.dtype, k
            assert tuple(got.shape) == tuple(v.shape), k
            assert as_bytes(got) == as_bytes(v), k
        info = reader.info(k)
        assert info.shape == tuple(v.shape) and info.dtype == v.dtype and info.nbytes == v.numel() * v.element_size()
    assert reader.total_bytes == sum(v.numel() * v.element_size() for v in tensors.values())


def test_header_metadata_holds_provenance(tmp_path):
    out = tmp_path / "out"
    write_sample(out, max_shard_size=64)
    expected = provenance("moesurgery convert src out --to x", "src:name")
    assert expected == {
        "format": "pt",
        "moesurgery_version": __version__,
        "moesurgery_command": "moesurgery convert src out --to x",
        "moesurgery_source": "src:name",
    }
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == expected
    assert CheckpointReader(out).metadata == expected
    meta = json.loads((out / "moesurgery.json").read_text())
    assert meta == {**expected, "shards": len(files)}


def test_config_written_sorted(tmp_path):
    out = tmp_path / "out"
    write_sample(out)
    text = (out / "config.json").read_text()
    assert json.loads(text) == {"model_type": "test", "a": 1, "b": 2}
    assert text.index('"a"') < text.index('"b"') < text.index('"model_type"')


def test_round_trip_sharded_with_index(tmp_path):
    out = tmp_path / "out"
    tensors, shards = write_sample(out, max_shard_size=64)
    n = len(shards)
    assert n > 2
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / SINGLE_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(tensors)
    # every key maps to the shard that actually holds it
    for name in names:
        for k in load_file(str(out / name)):
            assert index["weight_map"][k] == name
    reader = CheckpointReader(out)
    assert len(reader.files) == n
    for k, v in tensors.items():
        assert as_bytes(reader.get(k)) == as_bytes(v)
        assert reader.get(k).dtype == v.dtype


def test_big_tensor_on_its_own_shard_on_disk(tmp_path):
    out = tmp_path / "out"
    big = torch.arange(100, dtype=torch.float32)
    items = [PlannedTensor("a", Lazy.of(torch.ones(2))), PlannedTensor("big", Lazy.of(big)), PlannedTensor("b", Lazy.of(torch.ones(2)))]
    shards = write_checkpoint(out, items, {}, max_shard_size=100)
    assert [[t.name for t in s.tensors] for s in shards] == [["a"], ["big"], ["b"]]
    assert list(load_file(str(out / "model-00002-of-00003.safetensors"))) == ["big"]
    assert torch.equal(CheckpointReader(out).get("big"), big)


def test_write_checkpoint_refuses_duplicates_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    items = [PlannedTensor("a", Lazy.of(torch.ones(2))), PlannedTensor("a", Lazy.of(torch.ones(2)))]
    with pytest.raises(ValueError):
        write_checkpoint(out, items, {})
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_failing_tensor_load_leaves_nothing(tmp_path):
    out = tmp_path / "out"

    def boom():
        raise OSError("disk on fire")

    items = [PlannedTensor("a", Lazy.of(torch.ones(2))), PlannedTensor("b", Lazy((2,), torch.float32, boom))]
    with pytest.raises(OSError, match="disk on fire"):
        write_checkpoint(out, items, {})
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_extra_files(tmp_path):
    out = tmp_path / "out"
    write_checkpoint(out, [PlannedTensor("a", Lazy.of(torch.ones(2)))], {}, extra_files={"README.md": "hello\n"})
    assert (out / "README.md").read_text() == "hello\n"


# ------------------------------------------------------------------------------------ side files
def test_side_files_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    side = {
        "tokenizer.json": '{"model": {}}',
        "generation_config.json": '{"bos_token_id": 1}',
        "chat_template.jinja": "{{ messages }}",
        "tokenizer_config.json": "{}",
        "special_tokens_map.json": "{}",
        "cl100k.tiktoken": "abc 0",
    }
    for name, text in side.items():
        (src / name).write_text(text)
    not_copied = {"README.md": "readme", "pytorch_model.bin": "pickle", "config.json": '{"old": true}', "model.safetensors": "x"}
    for name, text in not_copied.items():
        (src / name).write_text(text)
    (src / "tokenizer.json.d").mkdir()  # directories are not side files
    out = tmp_path / "out"
    write_checkpoint(out, [PlannedTensor("a", Lazy.of(torch.ones(2)))], {"new": True}, source_dir=src)
    for name, text in side.items():
        assert (out / name).read_text() == text, name
    for name in ("README.md", "pytorch_model.bin", "tokenizer.json.d"):
        assert not (out / name).exists(), name
    assert json.loads((out / "config.json").read_text()) == {"new": True}
    assert "tokenizer.json" in SIDE_FILES and "chat_template.jinja" in SIDE_FILES


# ------------------------------------------------------------------------------------ staged_output
def test_staged_output_success_renames_into_place(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and tmp.is_dir()
        assert not out.exists()
        (tmp / "f.txt").write_text("new")
    assert (out / "f.txt").read_text() == "new"
    assert not tmp.exists()
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_output_creates_missing_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with staged_output(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x"


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_staged_output_exception_leaves_nothing(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        with staged_output(out) as tmp:
            (tmp / "partial.safetensors").write_bytes(b"x" * 100)
            raise exc
    assert not out.exists()
    assert not tmp.exists()
    assert list(tmp_path.iterdir()) == []


def test_staged_output_exception_keeps_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_staged_output_existing_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UsageError, match="--overwrite"):
        with staged_output(out):
            pytest.fail("body must not run")
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_output_existing_empty_dir_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError):
        with staged_output(out):
            pass


def test_staged_output_existing_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_staged_output_existing_file_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(UsageError, match="not a directory"):
        with staged_output(out, overwrite=True):
            pass
    assert out.read_text() == "a file"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["inside", "same", "nested", "contains"])
def test_staged_output_refuses_output_overlapping_source(tmp_path, where):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    out = {
        "inside": src / "out",
        "same": src,
        "nested": src / "a" / "b",
        "contains": tmp_path,
    }[where]
    with pytest.raises(UsageError, match="source"):
        with staged_output(out, source=src, overwrite=True):
            pytest.fail("body must not run")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_staged_output_refuses_output_inside_source_via_relative_path(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    monkeypatch.chdir(src)
    with pytest.raises(UsageError, match="inside the source"):
        with staged_output(Path("out"), source=Path("."), overwrite=False):
            pass
    assert not (src / "out").exists()


def test_write_checkpoint_refuses_output_inside_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(UsageError):
        write_checkpoint(src / "out", [PlannedTensor("a", Lazy.of(torch.ones(2)))], {}, source_dir=src)
    assert list(src.iterdir()) == []


# ------------------------------------------------------------------------------------ fused tensors
def test_fused_tensor_is_written_one_part_at_a_time(tmp_path):
    """lazy.stack / cat along dim 0 keep their parts: the writer streams each expert's piece, never
    materialising the fused [E, 2I, H] tensor, and the bytes equal the whole tensor's."""
    from safetensors.torch import load_file

    from moesurgery.lazy import Lazy, cat, stack

    loads = []

    def piece(j, rows):
        t = torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4) + 100 * j

        def load():
            loads.append((j, rows))
            return t
        return Lazy((rows, 4), torch.float32, load)

    fused = stack([cat([piece(j, 3), piece(j, 2)]) for j in range(5)])  # [5, 5, 4]
    fused._load = lambda: pytest.fail("the fused tensor was materialised")
    write_checkpoint(tmp_path / "out", [PlannedTensor("experts.gate_up_proj", fused)], {"model_type": "x"})
    got = load_file(str(tmp_path / "out" / SINGLE_NAME))["experts.gate_up_proj"]
    want = torch.stack([torch.cat([torch.arange(12.0).reshape(3, 4) + 100 * j, torch.arange(8.0).reshape(2, 4) + 100 * j]) for j in range(5)])
    assert torch.equal(got, want) and len(loads) == 10


def test_one_expert_of_a_fused_tensor_reads_only_its_slice(tmp_path, monkeypatch):
    """select(j) and the transposed view push their ranges down to get_slice."""
    from safetensors.torch import save_file

    from moesurgery.reader import CheckpointReader

    full = torch.randn(6, 8, 10)  # [E, H, 2I] transposed form
    save_file({"w": full}, str(tmp_path / SINGLE_NAME))
    reader = CheckpointReader(tmp_path)
    calls = []
    original = CheckpointReader.get_ranges
    monkeypatch.setattr(CheckpointReader, "get_ranges", lambda self, key, ranges: (calls.append(ranges), original(self, key, ranges))[1])
    lazy = reader.lazy("w")
    lazy._load = lambda: pytest.fail("read the whole fused tensor")
    gate = lazy.select(4)[:, :5].t()  # expert 4's gate [I, H] from [H, 2I]
    assert torch.equal(gate.load(), full[4, :, :5].T)
    assert calls == [((4, 5), (0, 8), (0, 5))]
