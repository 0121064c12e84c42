"""convert: exact conversions give the same logits in transformers; refusals say why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moesurgery.convert import convert
from moesurgery.errors import BadInputError
from moesurgery.reader import CheckpointReader
from tests.fixtures import FAMILIES, deepseek_v1_reference_logits, reference_logits

GLM_LLAMA_ATTN = dict(partial_rotary_factor=1.0, use_qk_norm=False, attention_bias=False)

EXACT = [
    ("llama", "mistral"),
    ("llama", "qwen2"),
    ("mistral", "llama"),
    ("mistral", "qwen2"),
    ("qwen2", "llama"),
    ("mixtral", "qwen2_moe"),
    ("mixtral", "deepseek"),
    ("deepseek", "qwen2_moe"),
]
REFUSED = {
    ("llama", "mixtral"): "dense",
    ("llama", "qwen3"): "qk-norm",
    ("qwen2", "mistral"): "bias",
    ("qwen3", "llama"): "qk-norm",
    ("mixtral", "llama"): "dense layout",
    ("mixtral", "qwen3_moe"): "qk-norm",
    ("mixtral", "deepseek_v3"): "MLA",
    ("olmoe", "mixtral"): "whole projection",
    ("deepseek", "mixtral"): "dense",
    ("deepseek_v2", "deepseek"): "MLA",
}
LOSSY = [("mixtral", "glm4_moe"), ("deepseek_v2", "deepseek_v3"), ("glm4_moe", "deepseek"), ("qwen2_moe", "glm4_moe")]


def logits_of(path: Path, ids: torch.Tensor) -> torch.Tensor:
    family = json.loads((path / "config.json").read_text())["model_type"]
    return deepseek_v1_reference_logits(path, ids) if family == "deepseek" else reference_logits(path, ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def source(checkpoint, family: str) -> Path:
    return checkpoint(family, **(GLM_LLAMA_ATTN if family == "glm4_moe" else {}))


@pytest.mark.parametrize("src,dst", EXACT, ids=[f"{a}-to-{b}" for a, b in EXACT])
def test_exact_conversion_same_logits(checkpoint, input_ids, tmp_path, src, dst):
    path = source(checkpoint, src)
    report = convert(path, tmp_path / "out", dst)
    assert report["verdict"] == "exact"
    assert rel_err(logits_of(tmp_path / "out", input_ids), logits_of(path, input_ids)) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_same_layout_is_byte_identical(checkpoint, tmp_path, family):
    path = source(checkpoint, family)
    report = convert(path, tmp_path / "out", family)
    assert report["exact"] and report["tensors_untouched"] == report["tensors"]
    src, out = CheckpointReader(path), CheckpointReader(tmp_path / "out")
    assert sorted(src.keys()) == sorted(out.keys())
    for key in src.keys():
        a, b = src.get(key), out.get(key)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a, b.view(torch.uint8) if b.dtype != torch.bool else b), key


@pytest.mark.parametrize("src,dst", list(REFUSED), ids=[f"{a}-to-{b}" for a, b in REFUSED])
def test_refused_with_reason(checkpoint, tmp_path, src, dst):
    with pytest.raises(BadInputError, match=REFUSED[(src, dst)]):
        convert(source(checkpoint, src), tmp_path / "out", dst)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("src,dst", LOSSY, ids=[f"{a}-to-{b}" for a, b in LOSSY])
def test_lossy_needs_flag_and_then_loads(checkpoint, input_ids, tmp_path, src, dst):
    path = source(checkpoint, src)
    with pytest.raises(BadInputError, match="not exact.*--allow-lossy"):
        convert(path, tmp_path / "out", dst)
    report = convert(path, tmp_path / "out", dst, allow_lossy=True)
    assert report["verdict"] == "lossy" and report["lossy_reasons"]
    assert torch.isfinite(logits_of(tmp_path / "out", input_ids)).all()


def zeroed_copy(path: Path, dest: Path, suffixes: tuple[str, ...]) -> Path:
    """A copy of `path` with every tensor whose key ends with one of `suffixes` set to zero."""
    shutil.copytree(path, dest)
    tensors = load_file(dest / "model.safetensors")
    for k in tensors:
        if k.endswith(suffixes):
            tensors[k] = torch.zeros_like(tensors[k])
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_qwen2_moe_with_zero_bias_and_gate_to_deepseek_is_exact(checkpoint, input_ids, tmp_path):
    """A zero shared_expert_gate is a constant 1/2: folded into the shared down_proj, exact."""
    path = zeroed_copy(checkpoint("qwen2_moe"), tmp_path / "src", ("_proj.bias", "shared_expert_gate.weight"))
    report = convert(path, tmp_path / "out", "deepseek")
    assert report["verdict"] == "exact", report
    assert any("1/2" in n for n in report["notes"])
    assert rel_err(logits_of(tmp_path / "out", input_ids), logits_of(path, input_ids)) < 1e-5


def test_qwen2_moe_shared_expert_to_mixtral_is_lossy(checkpoint, tmp_path):
    path = zeroed_copy(checkpoint("qwen2_moe"), tmp_path / "src", ("_proj.bias",))
    with pytest.raises(BadInputError, match="shared"):
        convert(path, tmp_path / "out", "mixtral")


def test_round_trip_mixtral_qwen2_moe_mixtral(checkpoint, input_ids, tmp_path):
    """mixtral -> qwen2_moe (zero shared expert) -> mixtral drops the zero expert exactly."""
    path = checkpoint("mixtral")
    convert(path, tmp_path / "q", "qwen2_moe")
    report = convert(tmp_path / "q", tmp_path / "m", "mixtral")
    assert report["verdict"] == "exact"
    src, out = CheckpointReader(path), CheckpointReader(tmp_path / "m")
    assert sorted(src.keys()) == sorted(out.keys())
    for key in src.keys():
        assert torch.equal(src.get(key), out.get(key)), key


def test_written_config_is_native(checkpoint, tmp_path):
    convert(checkpoint("mixtral"), tmp_path / "ds", "deepseek")
    cfg = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("deepseek-ai/deepseek-moe-16b-base--")
    assert cfg["scoring_func"] == "softmax" and cfg["norm_topk_prob"] is True
    assert "n_group" not in cfg or cfg["n_group"] in (None, 1)


def test_sharded_output_and_provenance(checkpoint, tmp_path):
    convert(checkpoint("mixtral"), tmp_path / "out", "qwen2_moe", max_shard_size=50_000, command="moesurgery convert x")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    reader = CheckpointReader(tmp_path / "out")
    assert index["metadata"]["total_size"] == reader.total_bytes
    assert reader.metadata["moesurgery_command"] == "moesurgery convert x"
    assert (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "generation_config.json").exists()
