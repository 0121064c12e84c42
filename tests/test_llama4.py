"""Llama 4 (issue #12): top-k sigmoid router whose weight scales the expert input, fused transposed experts, an
ungated shared expert of the experts' width, interleaved dense / MoE layers, NoPE layers with temperature tuning,
weightless L2 qk-norm, chunked attention, rope on adjacent pairs; the llama4 wrapper (language_model.model.*).

Proof: tiny checkpoints made with transformers' classes; our runtime equals them (12-token prompts: chunks of 4,
the temperature acting from position 2), decodes incrementally to the same logits, converts to its own layout
byte for byte (the vision tower passes through), prunes and merges into checkpoints transformers loads; finer
experts are refused with the reason (Llama 4 holds one width for experts and the shared expert).
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
from moesurgery.operations import merge_experts, prune_experts, split_experts
from moesurgery.runtime import Runtime
from tests.llama4_fixtures import LLAMA4, VOCAB, llama4_logits, make_llama4
from tests.test_lineage import rel_err, stored


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama4")
    made: dict = {}

    def build(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = make_llama4(family, root / (family + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))), **overrides)
        return made[key]

    return build


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", LLAMA4)
def test_runtime_matches_transformers(llama4, ids, family):
    path = llama4(family)
    model = open_model(path).model
    assert model.arch.rope_layers == [True, True, True, False] and model.arch.attention_chunk == 4
    assert rel_err(Runtime(model).forward(ids), llama4_logits(path, ids)) < 1e-5


@pytest.mark.parametrize("overrides", [dict(use_qk_norm=False), dict(attention_chunk_size=None), dict(attn_temperature_tuning=False)])
def test_variants_match_transformers(llama4, ids, overrides):
    path = llama4("llama4_text", **overrides)
    assert rel_err(Runtime(open_model(path).model).forward(ids), llama4_logits(path, ids)) < 1e-5


def test_input_side_weight_acts(llama4, ids):
    """e(w x) is not w e(x): weighting the output instead moves the logits."""
    path = llama4("llama4_text")
    m = open_model(path).model
    full = Runtime(m).forward(ids)
    for layer in m.moe_layers():
        layer.ffn.router.weight_on_input = False
    assert rel_err(Runtime(m).forward(ids), full) > 1e-3


def test_incremental_decoding_matches_full_forward(llama4, ids):
    rt = Runtime(open_model(llama4("llama4_text")).model, resident=True)
    full = rt.forward(ids)
    caches: list = []
    steps = [rt.forward(ids[:, :5], caches)] + [rt.forward(ids[:, t : t + 1], caches) for t in range(5, ids.shape[1])]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("family", LLAMA4)
def test_same_layout_convert_is_byte_identical(llama4, tmp_path, family):
    path = llama4(family)
    assert convert(path, tmp_path / "out", open_model(path).layout.name)["exact"]
    a, b = stored(path), stored(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)
    src, out = (json.loads((p / "config.json").read_text()) for p in (path, tmp_path / "out"))
    assert src.get("text_config", src)["no_rope_layers"] == out.get("text_config", out)["no_rope_layers"]


def test_wrapper_is_named_and_passes_its_vision_tower(llama4):
    w = inspect_model(llama4("llama4"))["wrapper"]
    assert w["model_type"] == "llama4" and w["text_prefix"] == "language_model.model." and "vision_model" in w["passthrough_parts"]


def test_hub_temperature_tuning_flag_is_read_and_written_as_bool(llama4, tmp_path):
    """The released Scout / Maverick configs say attn_temperature_tuning: 4, which transformers 5.24 refuses."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama4("llama4_text"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["attn_temperature_tuning"] = 4
    (src / "config.json").write_text(json.dumps(cfg))
    assert open_model(src).model.arch.attn_temperature == (3.0, 0.1)
    prune_experts(src, tmp_path / "out", keep=6, calibration_tokens=128)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attn_temperature_tuning"] is True


def test_finer_experts_refused_with_the_reason(llama4, tmp_path):
    with pytest.raises(BadInputError, match="shared expert has the experts' width"):
        split_experts(llama4("llama4_text"), tmp_path / "out", granularity=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama4_text-top2", "llama4"])
def test_prune_and_merge_load_in_transformers(llama4, ids, tmp_path, family):
    path = llama4(family)
    prune_experts(path, tmp_path / "p", keep=6, calibration_tokens=256)
    merge_experts(path, tmp_path / "m", into=6, calibration_tokens=256)
    for out in ("p", "m"):
        got = llama4_logits(tmp_path / out, ids)
        assert rel_err(Runtime(open_model(tmp_path / out).model).forward(ids), got) < 1e-5


@pytest.mark.parametrize("dst", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_other_layouts_refused(llama4, tmp_path, dst):
    with pytest.raises(BadInputError):
        convert(llama4("llama4_text"), tmp_path / "out", dst, allow_lossy=True)
    assert not (tmp_path / "out").exists()
