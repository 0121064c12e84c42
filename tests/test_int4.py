"""compressed-tensors INT4 "pack-quantized" checkpoints (Kimi K2-Thinking / K2.5 / K2.6): read
dequantized bit for bit as compressed-tensors does, written back packed on the group grid.

The oracle is transformers with compressed-tensors installed (it decompresses the experts to bf16;
its parameters are upcast to fp32 so both sides compute in fp32 on the same weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moesurgery import int4
from moesurgery.convert import convert
from moesurgery.inspection import inspect_model
from moesurgery.model_io import open_model
from moesurgery.operations import split_experts
from moesurgery.reader import CheckpointReader
from moesurgery.runtime import Runtime
from moesurgery.verify import verify
from tests.lineage_fixtures import make_int4, make_lineage

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors (the test extra) is the INT4 oracle")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def kimi_int4(tmp_path_factory) -> Path:
    """Kimi-K2-Thinking in miniature: DeepSeek-V3 (no expert groups), routed experts INT4 in groups of 16."""
    root = tmp_path_factory.mktemp("int4")
    src = make_lineage("kimi_k2", root / "bf16")
    cfg = json.loads((src / "config.json").read_text())  # as deepseek_v3 so transformers maps the per-expert tensors
    cfg.update(model_type="deepseek_v3")
    cfg.pop("auto_map")
    (src / "config.json").write_text(json.dumps(cfg))
    return make_int4(src, root / "int4", group=16)


def hf_logits(path: Path, ids) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():  # the decompressed bf16 experts, computed in fp32 like everything else
            p.data = p.data.float()
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), words=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_unpack_is_compressed_tensors_bit_for_bit(rows, words, seed):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, words * 8), generator=gen, dtype=torch.int8)
    packed = pack_to_int32(q, 4)
    assert torch.equal(int4.unpack(packed, q.shape[1]), q)
    assert torch.equal(int4.unpack(packed, q.shape[1]), unpack_from_int32(packed, 4, q.shape))


def test_reads_as_transformers_decompresses(kimi_int4, ids):
    opened = open_model(kimi_int4)
    assert opened.reader.int4_group == 16 and len(opened.reader.int4) == 3 * 8 * 3
    assert rel_err(Runtime(opened.model).forward(ids), hf_logits(kimi_int4, ids)) < 1e-5


def test_slices_read_only_their_groups(kimi_int4):
    r = CheckpointReader(kimi_int4, int4_group=16)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"  # [64, 32]: two groups per row
    full = r.get(key)
    assert torch.equal(r.get_ranges(key, ((5, 9), (16, 32))), full[5:9, 16:32])
    assert torch.equal(r.get_ranges(key, ((0, 64), (3, 20))), full[:, 3:20])  # off the grid: whole groups read, then cut


def test_same_layout_convert_keeps_the_packed_bytes(kimi_int4, tmp_path):
    report = convert(kimi_int4, tmp_path / "out", "deepseek_v3")
    assert report["exact"] and any("INT4" in n and "like the source" in n for n in report["notes"])
    a, b = CheckpointReader(kimi_int4, int4_group=16), CheckpointReader(tmp_path / "out", int4_group=16)
    assert sorted(a.stored_keys()) == sorted(b.stored_keys())
    for k in a.stored_keys():
        x, y = a.stored(k).load(), b.stored(k).load()
        assert x.dtype == y.dtype and torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"


def test_finer_experts_on_the_group_grid_stay_packed_and_exact(kimi_int4, ids, tmp_path):
    report = split_experts(kimi_int4, tmp_path / "out", granularity=2)  # 32-wide experts -> 16: down_proj keeps whole groups
    assert report["verdict"] == "exact" and any("INT4" in n and "like the source" in n for n in report["notes"])
    keys = CheckpointReader(tmp_path / "out", int4_group=16).stored_keys()
    assert "model.layers.1.mlp.experts.15.down_proj.weight_packed" in keys
    assert rel_err(hf_logits(tmp_path / "out", ids), hf_logits(kimi_int4, ids)) < 1e-5
    assert verify(kimi_int4, tmp_path / "out")["verdict"] == "exact"


def test_off_grid_slices_write_bf16_with_a_note(kimi_int4, ids, tmp_path):
    report = split_experts(kimi_int4, tmp_path / "out", granularity=4)  # 8-wide slices of 16-wide groups
    note = next(n for n in report["notes"] if "written in bf16" in n)
    assert "down_proj" in note and "cannot stay INT4" in note
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert rel_err(hf_logits(tmp_path / "out", ids), hf_logits(kimi_int4, ids)) < 1e-5


def test_inspect_reports_int4(kimi_int4):
    report = inspect_model(kimi_int4)
    assert report["int4_group_size"] == 16 and report["int4_weights"] == 72
    assert report["stored_bytes"] < report["bytes"]


def test_unsupported_compressed_tensors_formats_are_refused(kimi_int4, tmp_path):
    from moesurgery.errors import BadInputError

    bad = tmp_path / "bad"
    shutil.copytree(kimi_int4, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["format"] = "float-quantized"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="float-quantized"):
        open_model(bad)


@pytest.mark.parametrize("part, dtype, match", [("weight_scale", torch.int32, "has dtype int32, a scale must be floating point"),
                                                ("weight_shape", torch.float32, "must hold the weight's \\[rows, columns\\] as 2 integers")])
def test_int4_parts_of_the_wrong_kind_are_refused(kimi_int4, tmp_path, part, dtype, match):
    """Integer scales (or a float weight_shape) were cast by the codec and read as if they were right."""
    from safetensors.torch import load_file, save_file

    from moesurgery.errors import BadInputError

    bad = tmp_path / "bad"
    shutil.copytree(kimi_int4, bad)
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        hit = [k for k in tensors if k.endswith("." + part)]
        if hit:
            tensors[hit[0]] = tensors[hit[0]].to(dtype)
            save_file(tensors, shard, metadata={"format": "pt"})
            break
    with pytest.raises(BadInputError, match=match):
        open_model(bad)
