"""Mistral's own format (issue #11, part 2): params.json + consolidated*.safetensors read into the
canonical form, written back natively or as the transformers layout computing the same function.

Proof: tiny native checkpoints written by tests/mistral_native_fixtures.py from transformers models
(its own inverse key map and q/k permutation) read back with logits equal to transformers' on the
source model (fp32, rel err < 1e-5); converted to the transformers layout they load in transformers'
class with equal logits; the same-layout native round trip is byte-identical; a transformers checkpoint
written natively is the fixture's own native file, byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moesurgery.convert import convert
from moesurgery.errors import BadInputError
from moesurgery.inspection import inspect_model
from moesurgery.model_io import open_model
from moesurgery.native import hf_config, pair_to_half
from moesurgery.operations import split_experts
from moesurgery.reader import CheckpointReader
from moesurgery.runtime import Runtime
from moesurgery.verify import verify
from tests.mistral_native_fixtures import VISION, hf_logits, make_native

KINDS = ["mistral", "mixtral", "large3"]
LAYOUT = {"mistral": "mistral", "mixtral": "mixtral", "large3": "mistral4"}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    made: dict = {}

    def build(kind: str, **kw) -> tuple[Path, Path]:
        key = (kind, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_native(kind, root / ("-".join([kind, *map(str, kw)]) or kind), **kw)
        return made[key]

    return build


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def stored(path: Path, stem: str) -> dict[str, bytes]:
    r = CheckpointReader(path, stem=stem)
    return {k: (r.info(k).dtype, r.info(k).shape, r.stored(k).load().contiguous().view(-1).view(torch.uint8).clone()) for k in r.stored_keys()}


@pytest.mark.parametrize("kind", KINDS)
def test_read_equals_transformers(native, ids, kind):
    path, hf = native(kind)
    opened = open_model(path)
    assert opened.layout.name == LAYOUT[kind]
    assert rel_err(Runtime(opened.model).forward(ids), hf_logits(hf, ids)) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_config_matches_the_transformers_one(native, kind):
    path, hf = native(kind)
    ours = hf_config(json.loads((path / "params.json").read_text()))
    theirs = json.loads((hf / "config.json").read_text())
    for key, value in ours.items():
        if key in theirs and key not in ("torch_dtype", "architectures", "rope_parameters", "max_position_embeddings"):
            assert theirs[key] == value, key
    if kind == "large3":
        for key, value in ours["rope_parameters"].items():
            assert theirs["rope_parameters"][key] == pytest.approx(value), key


@pytest.mark.parametrize("kind", KINDS)
def test_to_transformers_layout(native, ids, tmp_path, kind):
    path, hf = native(kind)
    report = convert(path, tmp_path / "out", LAYOUT[kind], fmt="hf")
    assert report["exact"] and (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "params.json").exists()
    assert rel_err(hf_logits(tmp_path / "out", ids), hf_logits(hf, ids)) < 1e-5
    assert (tmp_path / "out" / "tekken.json").is_file()  # Mistral's tokenizer travels


@pytest.mark.parametrize("kind", KINDS)
def test_same_layout_native_round_trip_is_byte_identical(native, tmp_path, kind):
    path, _ = native(kind)
    report = convert(path, tmp_path / "out", LAYOUT[kind])
    assert report["exact"] and (tmp_path / "out" / "params.json").is_file() and not (tmp_path / "out" / "config.json").exists()
    a, b = stored(path, "consolidated"), stored(tmp_path / "out", "consolidated")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]), k
    assert json.loads((tmp_path / "out" / "params.json").read_text()) == json.loads((path / "params.json").read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_checkpoint_written_natively_is_the_native_one(native, tmp_path, kind):
    path, hf = native(kind)
    convert(hf, tmp_path / "out", LAYOUT[kind], fmt="native")
    a, b = stored(path, "consolidated"), stored(tmp_path / "out", "consolidated")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k][2], b[k][2]), k


def test_finer_experts_of_large3_exact(native, ids, tmp_path):
    path, hf = native("large3")
    report = split_experts(path, tmp_path / "fine", granularity=2)
    assert report["verdict"] == "exact" and (tmp_path / "fine" / "params.json").is_file()
    params = json.loads((tmp_path / "fine" / "params.json").read_text())
    assert params["moe"]["num_experts"] == 16 and params["moe"]["expert_hidden_dim"] == 16 and params["moe"]["num_experts_per_tok"] == 4
    assert verify(path, tmp_path / "fine")["verdict"] == "exact"
    convert(tmp_path / "fine", tmp_path / "fine-hf", "mistral4", fmt="hf")
    assert rel_err(hf_logits(tmp_path / "fine-hf", ids), hf_logits(hf, ids)) < 1e-5


def test_mixtral_native_to_qwen2_moe_finer(native, ids, tmp_path):
    path, hf = native("mixtral")
    split_experts(path, tmp_path / "out", granularity=2, to="qwen2_moe")
    assert (tmp_path / "out" / "config.json").is_file()  # Mistral's format holds no qwen2_moe
    assert rel_err(hf_logits(tmp_path / "out", ids), hf_logits(hf, ids)) < 1e-5


@pytest.mark.parametrize("kind", ["mistral", "mixtral", "large3"])
def test_per_tensor_fp8_read_dequantized(native, ids, tmp_path, kind):
    path, hf = native(kind, fp8=True)
    opened = open_model(path)
    assert any("FP8" in n for n in opened.notes)
    assert rel_err(Runtime(opened.model).forward(ids), hf_logits(hf, ids)) < 1e-5
    convert(path, tmp_path / "out", LAYOUT[kind], fmt="hf")
    assert rel_err(hf_logits(tmp_path / "out", ids), hf_logits(hf, ids)) < 1e-5
    assert not any(k.endswith(("qscale_weight", "qscale_act")) for k in CheckpointReader(tmp_path / "out").keys())


def test_vision_encoder_passes_through_natively_and_refuses_hf(native, tmp_path):
    path, _ = native("large3", vision=True)
    report = inspect_model(path)
    assert any("vision" in n for n in report["notes"])
    convert(path, tmp_path / "out", "mistral4")
    a, b = stored(path, "consolidated"), stored(tmp_path / "out", "consolidated")
    for k in VISION:
        assert torch.equal(a[k][2], b[k][2]), k
    assert json.loads((tmp_path / "out" / "params.json").read_text())["vision_encoder"]["patch_size"] == 4
    with pytest.raises(BadInputError, match="vision encoder"):
        convert(path, tmp_path / "hf", "mistral4", fmt="hf")
    assert not (tmp_path / "hf").exists()


def test_pair_order_permutation():
    """Mistral's rows (per head: pairs (x0, x1), (x2, x3)...) taken at pair_to_half are transformers' halves."""
    rows = pair_to_half(8, 4)  # 2 heads of 4: transformers row (h, half p, j) <- Mistral row h*4 + 2j + p
    assert rows.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("bad, match", [
    ({"dim": "64"}, "dim must be an integer"),
    ({"moe": [1]}, "moe must be an object"),
    ({"n_layers": None}, "n_layers must be an integer"),
])
def test_bad_params_named(native, tmp_path, bad, match):
    path, _ = native("mixtral")
    import shutil

    shutil.copytree(path, tmp_path / "bad")
    params = json.loads((path / "params.json").read_text())
    params.update(bad)
    (tmp_path / "bad" / "params.json").write_text(json.dumps(params))
    with pytest.raises(BadInputError, match=match):
        open_model(tmp_path / "bad")


def test_format_native_refused_for_other_layouts(native, tmp_path):
    path, _ = native("mixtral")
    with pytest.raises(BadInputError, match="Mistral's format holds"):
        convert(path, tmp_path / "out", "qwen2_moe", fmt="native")


def test_surgery_written_as_transformers_with_format_hf(native, ids, tmp_path):
    path, hf = native("large3")
    split_experts(path, tmp_path / "out", granularity=2, fmt="hf")
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "params.json").exists()
    assert rel_err(hf_logits(tmp_path / "out", ids), hf_logits(hf, ids)) < 1e-5


def test_cli_format_flag(native, tmp_path, capsys):
    from moesurgery.cli import main

    path, _ = native("mixtral")
    assert main(["convert", str(path), str(tmp_path / "x"), "--to", "mixtral", "--format", "gguf"]) == 2
    assert "--format gguf" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "y"), "--to", "mixtral", "--format", "hf", "--json"]) == 0
    assert (tmp_path / "y" / "config.json").is_file()
    capsys.readouterr()
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "mistral"


def test_serving_warnings_name_the_format(native, tmp_path):
    path, _ = native("mixtral")
    report = convert(path, tmp_path / "out", "mixtral", dry_run=True)
    assert any("Mistral's format" in w for w in report["serving"]) and any("--format hf" in w for w in report["serving"])
    assert not any("Mistral's format" in w for w in convert(path, tmp_path / "out", "mixtral", fmt="hf", dry_run=True)["serving"])


def test_large3_fp8_kept_natively_byte_for_byte(native, tmp_path):
    path, _ = native("large3", fp8=True)
    report = convert(path, tmp_path / "out", "mistral4")
    assert any("written as per-tensor FP8 like the source" in n for n in report["notes"]), report["notes"]
    a, b = stored(path, "consolidated"), stored(tmp_path / "out", "consolidated")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]), k
    assert json.loads((tmp_path / "out" / "params.json").read_text())["quantization"]["qformat_weight"] == "fp8_e4m3"


def test_large3_fp8_finer_experts_stay_fp8_and_exact(native, ids, tmp_path):
    path, hf = native("large3", fp8=True)
    report = split_experts(path, tmp_path / "fine", granularity=2)
    assert report["verdict"] == "exact" and any("per-tensor FP8 like the source" in n for n in report["notes"]), report["notes"]
    r = CheckpointReader(tmp_path / "fine", stem="consolidated")
    assert r.info("layers.1.experts.15.w1.weight").dtype == torch.float8_e4m3fn and "layers.1.experts.15.w1.qscale_weight" in r
    assert rel_err(Runtime(open_model(tmp_path / "fine").model).forward(ids), hf_logits(hf, ids)) < 1e-5


def test_gqa_fp8_written_natively_in_bf16_with_the_reason(native, tmp_path):
    path, _ = native("mixtral", fp8=True)
    report = convert(path, tmp_path / "out", "mixtral")
    assert any("written in bf16" in n and "permuted" in n for n in report["notes"]), report["notes"]
    assert "quantization" not in json.loads((tmp_path / "out" / "params.json").read_text())


def test_per_tensor_fp8_integer_scale_is_refused(native, tmp_path):
    """Mistral's qscale_weight of an integer dtype was cast and read; it is no scale this format writes."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = native("large3", fp8=True)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    shard = next(bad.glob("consolidated*.safetensors"))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("qscale_weight"))
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(BadInputError, match=rf"its scale {key} has dtype int64, a scale must be floating point"):
        open_model(bad)
