"""Block-scaled FP8 checkpoints (DeepSeek-V3 style): read dequantized; written back as FP8 where every
linear weight stays on the block grid, else as plain bf16."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from moesurgery.cli import main
from moesurgery.convert import convert
from moesurgery.errors import BadInputError
from moesurgery.fp8 import dequantize
from moesurgery.model_io import open_model
from moesurgery.operations import split_experts
from tests.fixtures import reference_logits

BLOCK = (16, 16)
QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                       r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")


def quantize(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [o, i] -> (float8_e4m3fn [o, i], scale_inv fp32 [ceil(o/b0), ceil(i/b1)]), DeepSeek's recipe."""
    o, i = w.shape
    so, si = -(-o // block[0]), -(-i // block[1])
    scale = torch.empty(so, si)
    for r in range(so):
        for c in range(si):
            tile = w[r * block[0] : (r + 1) * block[0], c * block[1] : (c + 1) * block[1]].float()
            scale[r, c] = tile.abs().max().clamp_min(1e-12) / 448.0
    full = scale.repeat_interleave(block[0], 0)[:o].repeat_interleave(block[1], 1)[:, :i]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


@pytest.fixture
def fp8_pair(checkpoint, tmp_path) -> tuple[Path, Path]:
    """(fp8 checkpoint, the bf16 checkpoint it encodes) from a tiny DeepSeek-V3."""
    return make_fp8_pair(checkpoint("deepseek_v3"), tmp_path)


def make_fp8_pair(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    fp8_dir, ref_dir = tmp_path / "fp8", tmp_path / "ref"
    shutil.copytree(src, fp8_dir)
    shutil.copytree(src, ref_dir)
    for shard in fp8_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        quantized, reference = {}, {}
        for key, t in tensors.items():
            if QUANTIZED.fullmatch(key):
                w8, s = quantize(t)
                quantized[key], quantized[key + "_scale_inv"] = w8, s
                reference[key] = dequantize(w8, s, BLOCK)
            else:  # as in DeepSeek-V3's release: bf16, the router's correction bias fp32
                keep = key.endswith("e_score_correction_bias") or not t.is_floating_point()
                quantized[key] = reference[key] = t if keep else t.to(torch.bfloat16)
        save_file(quantized, shard, metadata={"format": "pt"})
        save_file(reference, ref_dir / shard.name, metadata={"format": "pt"})
    for name in ("model.safetensors.index.json",):
        for d in (fp8_dir, ref_dir):
            (d / name).unlink(missing_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    ref_cfg = {**cfg, "torch_dtype": "bfloat16"}
    (ref_dir / "config.json").write_text(json.dumps(ref_cfg))
    fp8_cfg = {**ref_cfg, "quantization_config": {"quant_method": "fp8", "weight_block_size": list(BLOCK), "activation_scheme": "dynamic", "fmt": "e4m3"}}
    (fp8_dir / "config.json").write_text(json.dumps(fp8_cfg))
    return fp8_dir, ref_dir


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def test_reader_dequantizes_and_hides_scales(fp8_pair):
    fp8_dir, ref_dir = fp8_pair
    opened = open_model(fp8_dir)
    assert not [k for k in opened.reader.keys() if k.endswith("_scale_inv")]
    assert "quantization_config" not in opened.model.config
    ref = tensors_of(ref_dir)
    key = next(k for k in ref if QUANTIZED.fullmatch(k) and "experts.1." in k)
    got = opened.reader.get(key)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref[key])
    # a slice through get_slice dequantizes with the right blocks (rows and columns off block edges)
    rows, cols = (3, ref[key].shape[0] - 5), (7, ref[key].shape[1] - 2)
    assert torch.equal(opened.reader.get_ranges(key, (rows, cols)), ref[key][rows[0] : rows[1], cols[0] : cols[1]])


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as our reader gives it (FP8 weights dequantized)."""
    reader = open_model(path).reader
    return {k: reader.get(k) for k in reader.keys()}


def test_convert_keeps_fp8(fp8_pair, tmp_path):
    fp8_dir, ref_dir = fp8_pair
    report = convert(fp8_dir, tmp_path / "out", "deepseek_v3")
    assert any("written as block-scaled FP8" in n for n in report["notes"])
    src, out = tensors_of(fp8_dir), tensors_of(tmp_path / "out")
    assert set(out) == set(src)  # weights and their weight_scale_inv, same keys
    same = [torch.equal(out[k].view(torch.uint8), src[k].view(torch.uint8)) if src[k].dtype == torch.float8_e4m3fn else torch.equal(out[k], src[k])
            for k in src]
    assert all(same)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == list(BLOCK)
    ref = tensors_of(ref_dir)
    assert all(torch.equal(t, ref[k]) for k, t in dequantized(tmp_path / "out").items())
    # transformers itself (its FP8 path, dequantizing on CPU) computes the same logits for both
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fp8_logits(tmp_path / "out", ids), fp8_logits(fp8_dir, ids), rtol=0, atol=0)


def fp8_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits of an FP8 checkpoint (bf16 compute: its FP8 layers dequantize to bf16 on CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_exact_finer_split_of_an_fp8_model_in_transformers(checkpoint, tmp_path):
    """DeepSeek-V3 routing without group limits: finer experts are exact; the FP8 output and the FP8
    source agree in transformers to bf16 rounding."""
    fp8_dir, _ = make_fp8_pair(checkpoint("deepseek_v3", n_group=1, topk_group=1), tmp_path)
    report = split_experts(fp8_dir, tmp_path / "out", granularity=2)
    assert report["expected"] == "exact" and any("written as block-scaled FP8" in n for n in report["notes"])
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    got, want = fp8_logits(tmp_path / "out", ids), fp8_logits(fp8_dir, ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_finer_experts_on_the_block_grid_stay_fp8(fp8_pair, tmp_path):
    fp8_dir, ref_dir = fp8_pair
    report = split_experts(fp8_dir, tmp_path / "a", granularity=2, allow_lossy=True)  # 32-wide experts -> 16: on the 16 x 16 grid
    assert any("written as block-scaled FP8" in n for n in report["notes"])
    split_experts(ref_dir, tmp_path / "b", granularity=2, allow_lossy=True)
    a, b = dequantized(tmp_path / "a"), tensors_of(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert any(k.endswith("_scale_inv") for k in tensors_of(tmp_path / "a"))


def test_off_grid_slices_write_bf16_and_transformers_agrees(fp8_pair, tmp_path):
    fp8_dir, ref_dir = fp8_pair
    report = split_experts(fp8_dir, tmp_path / "a", granularity=4, allow_lossy=True)  # 32-wide experts -> 8: off the 16 x 16 grid
    assert any("written in bf16" in n and "cannot stay FP8" in n for n in report["notes"])
    split_experts(ref_dir, tmp_path / "b", granularity=4, allow_lossy=True)
    a, b = tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b")
    assert set(a) == set(b) and [k for k in b if not torch.equal(a[k], b[k])] == []
    assert "quantization_config" not in json.loads((tmp_path / "a" / "config.json").read_text())
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reference_logits(tmp_path / "a", ids), reference_logits(tmp_path / "b", ids), rtol=0, atol=0)


def test_inspect_says_fp8(fp8_pair, capsys):
    code = main(["inspect", str(fp8_pair[0]), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["fp8_block_size"] == list(BLOCK)
    on_disk = sum(t.numel() * t.element_size() for t in tensors_of(fp8_pair[0]).values())
    assert report["stored_bytes"] == on_disk < report["bytes"]


def test_fp8_without_scale_is_refused(fp8_pair, tmp_path):
    fp8_dir = fp8_pair[0]
    shard = next(fp8_dir.glob("*.safetensors"))
    tensors = load_file(shard)
    drop = next(k for k in tensors if k.endswith("_scale_inv"))
    del tensors[drop]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(BadInputError, match="without a 2-D block scale"):
        open_model(fp8_dir)


def test_other_quantizations_are_refused(fp8_pair, capsys):
    fp8_dir = fp8_pair[0]
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    code = main(["inspect", str(fp8_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "awq" in err[0]


def test_verify_fp8_against_its_bf16_model_is_exact(fp8_pair, capsys):
    code = main(["verify", str(fp8_pair[0]), str(fp8_pair[1]), "--expect", "exact", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verdict"] == "exact" and report["untouched"]["changed"] == []


def test_inspect_human_output_names_fp8(fp8_pair, capsys):
    assert main(["inspect", str(fp8_pair[0])]) == 0
    assert "block-scaled float8 weights (16x16 blocks)" in capsys.readouterr().out


def test_float8_without_a_quantization_config_is_refused(fp8_pair):
    fp8_dir = fp8_pair[0]
    cfg = json.loads((fp8_dir / "config.json").read_text())
    del cfg["quantization_config"]
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match="is float8 but config.json has no block-scaled fp8"):
        open_model(fp8_dir)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 70), b0=st.sampled_from([4, 8, 16]), b1=st.sampled_from([4, 8, 16]),
       r=st.tuples(st.integers(0, 70), st.integers(0, 70)), c=st.tuples(st.integers(0, 70), st.integers(0, 70)), factor=st.sampled_from([1.0, 0.5, 3.0]))
def test_fp8_form_survives_slices_on_the_grid_and_dequantizes_to_the_slice(rows, cols, b0, b1, r, c, factor):
    """For any shape, block and slice: the FP8 form exists exactly when the slice is on the block
    grid, and then dequantizes to the slice of the dequantized tensor (times the scale factor)."""
    from moesurgery.lazy import Fp8, Lazy

    g = torch.Generator().manual_seed(rows * 71 + cols)
    w8, s = quantize(torch.randn(rows, cols, generator=g), (b0, b1))
    full = dequantize(w8, s, (b0, b1))
    lazy = Lazy(full.shape, full.dtype, lambda: full, form=Fp8(Lazy.of(w8), Lazy.of(s), (b0, b1)))
    (r0, r1), (c0, c1) = sorted((min(r[0], rows), min(r[1], rows))), sorted((min(c[0], cols), min(c[1], cols)))
    part = lazy[r0:r1, c0:c1].scale(factor)
    on_grid = all(a % b == 0 and (e % b == 0 or e == n) for a, e, b, n in ((r0, r1, b0, rows), (c0, c1, b1, cols)))
    full_slice = (r0, r1) == (0, rows) and (c0, c1) == (0, cols)
    assert (part.form is not None) == (on_grid or full_slice)
    if part.form is not None and r1 > r0 and c1 > c0:
        got = dequantize(part.form.data.load(), part.form.scale_inv.load(), (b0, b1))
        want = (full[r0:r1, c0:c1].float() * factor).to(torch.bfloat16)
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=0)


def test_integer_block_scales_are_refused(fp8_pair, tmp_path):
    """An integer scale_inv (another format's, or a corrupted header) was cast to float by the codec and read."""
    bad = tmp_path / "bad"
    shutil.copytree(fp8_pair[0], bad)
    shard = next(bad.glob("*.safetensors"))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("_scale_inv"))
    tensors[key] = tensors[key].round().to(torch.int32)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(BadInputError, match=rf"its scale {key} has dtype int32, a scale must be floating point"):
        open_model(bad)
