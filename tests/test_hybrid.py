"""Qwen3-Next and Qwen3.5 / 3.6 (issue #12): Gated DeltaNet + gated attention hybrids, zero-centred norms,
gated shared experts, the vision-language wrapper, experts per expert or fused on disk.

Proof as for the lineage: tiny checkpoints made with transformers' classes; our runtime equals them (prompts
of 80 tokens: two chunks of the chunked delta rule), decodes incrementally to the same logits, converts to its
own layout byte for byte (fused experts written fused), splits finer and upcycles exactly in transformers.
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
from moesurgery.operations import split_experts, upcycle
from moesurgery.runtime import Runtime
from moesurgery.runtime.gdn import chunk_gated_delta_rule, group_qkv_z_ba, recurrent_gated_delta_rule, split_qkvz_ba
from moesurgery.verify import verify
from tests.hybrid_fixtures import DENSE_HYBRID, HYBRID, VOCAB, hybrid_logits, load_hybrid, make_hybrid
from tests.test_lineage import rel_err, stored


@pytest.fixture(scope="session")
def hybrid(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    made: dict = {}

    def build(family: str) -> Path:
        if family not in made:
            made[family] = make_hybrid(family, root / family)
        return made[family]

    return build


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(1))


def loads_cleanly(path: Path) -> None:
    """Every stored tensor is one the native class expects, and none it expects is missing."""
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    cls = {"qwen3_5_moe": transformers.Qwen3_5MoeForConditionalGeneration, "qwen3_5": transformers.Qwen3_5ForConditionalGeneration}
    _, info = cls.get(cfg["model_type"], transformers.AutoModelForCausalLM).from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


# ------------------------------------------------------------------------------------ runtime
@pytest.mark.parametrize("family", HYBRID + DENSE_HYBRID)
def test_runtime_matches_transformers(hybrid, ids, family):
    path = hybrid(family)
    assert rel_err(Runtime(open_model(path).model).forward(ids), hybrid_logits(path, ids)) < 1e-5


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_incremental_decoding_matches_full_forward(hybrid, ids, family):
    """A 70-token prefill (chunked rule), one-token steps (recurrent rule, conv state), then a 5-token chunk
    on top of the carried state."""
    rt = Runtime(open_model(hybrid(family)).model, resident=True)
    full = rt.forward(ids)
    caches: list = []
    steps = [rt.forward(ids[:, :70], caches)] + [rt.forward(ids[:, t : t + 1], caches) for t in range(70, 75)]
    steps.append(rt.forward(ids[:, 75:], caches))
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("T", [1, 5, 64, 130])
def test_chunked_and_recurrent_delta_rules_agree(T):
    """The two rules are one recurrence (the chunked form over padded 64-token chunks), for any length."""
    g = torch.Generator().manual_seed(T)
    q, k = torch.randn(2, T, 2, 8, generator=g), torch.randn(2, T, 2, 8, generator=g)
    v = torch.randn(2, T, 4, 8, generator=g)
    decay, beta = -torch.rand(2, T, 4, generator=g), torch.rand(2, T, 4, generator=g)
    state = torch.randn(2, 4, 8, 8, generator=g)
    a, sa = chunk_gated_delta_rule(q, k, v, decay, beta, state)
    b, sb = recurrent_gated_delta_rule(q, k, v, decay, beta, state)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-5)


def test_linear_attention_projection_forms_are_a_permutation():
    la = {"nk": 2, "dk": 3, "nv": 6, "dv": 2}
    qkvz, ba = torch.randn(2 * 2 * 3 + 2 * 6 * 2, 5), torch.randn(12, 5)
    flat = split_qkvz_ba(qkvz, ba, la)
    back = group_qkv_z_ba(flat, la)
    assert torch.equal(back[0], qkvz) and torch.equal(back[1], ba)
    rows = torch.cat(list(flat.values()) + [])
    assert sorted(rows.sum(1).tolist()) == sorted(torch.cat([qkvz, ba]).sum(1).tolist())


# ------------------------------------------------------------------------------------ same layout
@pytest.mark.parametrize("family", HYBRID + DENSE_HYBRID)
def test_same_layout_convert_is_byte_identical(hybrid, tmp_path, family):
    """Fused experts stay fused, prefixes stay, the vision tower and the MTP head pass through."""
    path = hybrid(family)
    report = convert(path, tmp_path / "out", open_model(path).layout.name)
    assert report["exact"]
    a, b = stored(path), stored(tmp_path / "out")
    assert sorted(a) == sorted(b)
    assert all(a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]) for k in a)


def test_inspect_names_the_hybrid_and_the_wrapper(hybrid):
    report = inspect_model(hybrid("qwen3_5_moe-fused"))
    assert report["attention"]["kind"] == "hybrid" and "2 Gated DeltaNet layers" in report["attention"]["summary"]
    assert report["attention"]["qk_norm"] == "head" and report["attention"]["partial_rotary_factor"] == 0.25
    assert report["wrapper"]["model_type"] == "qwen3_5_moe" and "model.visual" in report["wrapper"]["passthrough_parts"]
    assert "mtp" in report["wrapper"]["passthrough_parts"]
    text = inspect_model(hybrid("qwen3_5_moe_text-prefixed"))
    assert text["wrapper"]["model_type"] is None and text["wrapper"]["text_prefix"] == "model.language_model."


# ------------------------------------------------------------------------------------ surgery
@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_next-dense", "qwen3_5_moe", "qwen3_5_moe-fused", "qwen3_5_moe_text-prefixed"])
def test_finer_experts_exact_in_transformers(hybrid, ids, tmp_path, family):
    path = hybrid(family)
    report = split_experts(path, tmp_path / "out", granularity=2)
    assert report["verdict"] == "exact", report
    assert rel_err(hybrid_logits(tmp_path / "out", ids), hybrid_logits(path, ids)) < 1e-5
    loads_cleanly(tmp_path / "out")
    assert verify(path, tmp_path / "out")["verdict"] == "exact"
    keys = set(stored(tmp_path / "out"))
    fused = any(k.endswith("experts.gate_up_proj") for k in stored(path))
    assert any(k.endswith("experts.gate_up_proj") for k in keys) == fused  # written in the form read
    assert all(k.startswith(("model.language_model.", "lm_head", "model.visual", "mtp")) for k in keys) == ("qwen3_5_moe" in family)


def test_wider_gated_shared_expert(hybrid, ids, tmp_path):
    """Shared experts where the layout holds them: experts folded into Qwen's gated shared expert."""
    path = hybrid("qwen3_5_moe")
    report = upcycle(path, tmp_path / "out", granularity=2, shared=1, allow_lossy=True)
    assert report["shared_width"] > 48 and "measured" in report
    loads_cleanly(tmp_path / "out")


@pytest.mark.parametrize("family", DENSE_HYBRID)
def test_dense_qwen35_upcycled_exactly(hybrid, ids, tmp_path, family):
    """Dense Qwen3.5 -> qwen3_5_moe at init (the wrapper follows: qwen3_5 -> qwen3_5_moe, vision unchanged)."""
    path = hybrid(family)
    report = upcycle(path, tmp_path / "out", granularity=2, experts=4, top_k=2)
    assert report["verdict"] == "exact" and report["target_layout"] == "qwen3_5_moe_text"
    assert rel_err(hybrid_logits(tmp_path / "out", ids), hybrid_logits(path, ids)) < 1e-5
    loads_cleanly(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == ("qwen3_5_moe" if family == "qwen3_5" else "qwen3_5_moe_text")
    if family == "qwen3_5":
        a, b = stored(path), stored(tmp_path / "out")
        assert all(torch.equal(a[k][2], b[k][2]) for k in a if k.startswith("model.visual"))


# ------------------------------------------------------------------------------------ conversions
def test_qwen3_next_and_qwen35_convert_exactly_both_ways(hybrid, ids, tmp_path):
    path = hybrid("qwen3_next")
    assert convert(path, tmp_path / "q35", "qwen3_5_moe")["exact"]
    assert json.loads((tmp_path / "q35" / "config.json").read_text())["model_type"] == "qwen3_5_moe_text"
    assert rel_err(hybrid_logits(tmp_path / "q35", ids), hybrid_logits(path, ids)) < 1e-5
    assert convert(tmp_path / "q35", tmp_path / "back", "qwen3_next")["exact"]
    a, b = stored(path), stored(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k][2], b[k][2]) for k in a)


@pytest.mark.parametrize("src,dst,reason", [
    ("qwen3_next", "qwen3_moe", "HYBRID attention"),
    ("qwen3_next-dense", "qwen3_5_moe_text", "no dense layers"),
    ("qwen3_5_moe", "qwen3_next", "holds only a qwen3_5_moe_text"),
])
def test_refused_conversions(hybrid, tmp_path, src, dst, reason):
    with pytest.raises(BadInputError, match=reason):
        convert(hybrid(src), tmp_path / "out", dst, allow_lossy=True)
    assert not (tmp_path / "out").exists()


def test_gqa_models_do_not_become_hybrids(checkpoint, tmp_path):
    with pytest.raises(BadInputError, match="attention cannot be converted"):
        upcycle(checkpoint("llama"), tmp_path / "out", granularity=2, experts=4, top_k=2, to="qwen3_5_moe")


def test_native_class_loads_what_transformers_saved(hybrid):
    load_hybrid(hybrid("qwen3_5_moe-fused"))  # the fixture itself is valid (fused experts + MTP head)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5_moe"])
def test_head_dim_the_attention_tensors_do_not_have_is_refused(hybrid, tmp_path, family):
    """head_dim one more than the gated attention's tensors: inspect and convert accepted it, verify crashed (exit 1)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hybrid(family), src)
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    text["head_dim"] += 1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match=r"layers\.1\.self_attn\.q_proj\.weight: shape \[256, 64\], expected \[264, 64\]"):
        open_model(src)
