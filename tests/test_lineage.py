"""The DeepSeek-V3 lineage of 2025-26 (issue #9): Kimi K2 / K2.5, DeepSeek-V3.2, GLM-5, Mistral Small 4
(and the mistral3 wrapper), Ministral 3, MiniMax-M2, dots1, Hy3, Solar-Open, ERNIE-4.5.

Proof as for the 2024-25 families: tiny checkpoints made with each family's transformers classes;
our runtime's logits equal transformers' (fp32, prompts longer than index_topk so the indexer
prunes, past original_max_position_embeddings so Llama-4 query scaling is on); same-layout convert is
byte-identical (wrappers: vision tower and projector too); exact surgery outputs load back in the
native class (the wrapper's class for nested models) with equal logits; verify says exact.
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
from moesurgery.reader import CheckpointReader
from moesurgery.runtime import Runtime
from moesurgery.verify import verify
from tests.lineage_fixtures import LINEAGE, VOCAB, lineage_logits, make_lineage


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="session")
def lineage(tmp_path_factory):
    """lineage(family, **overrides) -> a cached tiny checkpoint directory."""
    root = tmp_path_factory.mktemp("lineage")
    made: dict = {}

    def build(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in made:
            name = family + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            made[key] = make_lineage(family, root / name, **overrides)
        return made[key]

    return build


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1234))


def stored(path: Path) -> dict[str, tuple]:
    """name -> (dtype, shape, bytes) of every stored tensor."""
    r = CheckpointReader(path)
    return {k: (r.info(k).dtype, r.info(k).shape, r.stored(k).load().contiguous().view(-1).view(torch.uint8).clone()) for k in r.stored_keys()}


# ------------------------------------------------------------------------------------ runtime
@pytest.mark.parametrize("family", LINEAGE)
def test_runtime_matches_transformers(lineage, ids, family):
    path = lineage(family)
    assert rel_err(Runtime(open_model(path).model).forward(ids), lineage_logits(path, ids)) < 1e-5


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa", "mistral4", "ministral3", "ernie4_5_moe"])
def test_incremental_decoding_matches_full_forward(lineage, ids, family):
    """Decode steps carry the indexer's key cache (and GLM-5's shared choice) and the query scale's positions.
    (16 indexer heads: with 2, keys often tie at an index score of exactly 0 (relu), and which of them
    top-k keeps depends on how many keys it sees, in transformers too.)"""
    overrides = {"index_n_heads": 16} if family in ("deepseek_v32", "glm_moe_dsa") else {}
    rt = Runtime(open_model(lineage(family, **overrides)).model, resident=True)
    full = rt.forward(ids)
    caches: list = []
    steps = [rt.forward(ids[:, :5], caches)] + [rt.forward(ids[:, t : t + 1], caches) for t in range(5, ids.shape[1])]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_indexer_prunes_and_query_scaling_acts(lineage, ids):
    """The tiny prompts exercise the features (else the tests above would pass on dense attention)."""
    model = open_model(lineage("glm_moe_dsa")).model
    dense = open_model(lineage("glm_moe_dsa")).model
    dense.arch.indexer = dict(dense.arch.indexer, topk=10_000)
    assert rel_err(Runtime(model).forward(ids), Runtime(dense).forward(ids)) > 1e-3
    assert model.arch.indexer["types"] == ["full", "full", "shared", "full"]
    m4 = open_model(lineage("mistral4")).model
    plain = open_model(lineage("mistral4")).model
    plain.arch.rope_scaling = {k: v for k, v in plain.arch.rope_scaling.items() if k != "llama_4_scaling_beta"}
    assert rel_err(Runtime(m4).forward(ids), Runtime(plain).forward(ids)) > 1e-4


# ------------------------------------------------------------------------------------ same layout
@pytest.mark.parametrize("family", LINEAGE)
def test_same_layout_convert_is_byte_identical(lineage, tmp_path, family):
    path = lineage(family)
    layout = open_model(path).layout.name
    report = convert(path, tmp_path / "out", layout)
    assert report["exact"]
    a, b = stored(path), stored(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][:2] == b[k][:2] and torch.equal(a[k][2], b[k][2]), k
    src_cfg = json.loads((path / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["model_type"] == src_cfg["model_type"] and out_cfg.get("architectures") == src_cfg.get("architectures")
    if "text_config" in src_cfg:
        assert out_cfg["text_config"]["model_type"] == src_cfg["text_config"]["model_type"]
        assert {k: v for k, v in out_cfg.items() if k != "text_config"} == {k: v for k, v in src_cfg.items() if k != "text_config"}


# ------------------------------------------------------------------------------------ wrappers
@pytest.mark.parametrize("family", ["mistral3-mistral4", "kimi_k25", "kimi_k25-legacy"])
def test_inspect_names_the_wrapper_and_what_passes_through(lineage, family):
    report = inspect_model(lineage(family))
    w = report["wrapper"]
    assert w["model_type"] in ("mistral3", "kimi_k25") and w["passthrough_tensors"] > 0
    assert w["text_prefix"] in ("model.language_model.", "language_model.model.")
    assert any("vision" in k for k in w["passthrough_parts"])


# ------------------------------------------------------------------------------------ surgery
FINER = {  # family -> overrides that make the router group-free (finer experts are then exact)
    "kimi_k2": {}, "glm_moe_dsa": {}, "minimax_m2": {}, "hy_v3": {}, "solar_open": {}, "ernie4_5_moe": {},
    "deepseek_v32": {"n_group": 1, "topk_group": 1}, "mistral4": {"n_group": 1, "topk_group": 1}, "dots1": {"n_group": 1, "topk_group": 1},
    "kimi_k25": {}, "kimi_k25-legacy": {}, "mistral3-mistral4": {"n_group": 1, "topk_group": 1},
}


@pytest.mark.parametrize("family", list(FINER))
def test_finer_experts_exact_in_transformers(lineage, ids, tmp_path, family):
    path = lineage(family, **FINER[family])
    report = split_experts(path, tmp_path / "out", granularity=2)
    assert report["verdict"] == "exact", report
    want = lineage_logits(path, ids)
    assert rel_err(lineage_logits(tmp_path / "out", ids), want) < 1e-5
    assert verify(path, tmp_path / "out")["verdict"] == "exact"
    moe = next(layer for layer in open_model(tmp_path / "out").model.layers if hasattr(layer.ffn, "router"))
    assert len(moe.ffn.experts) == 16 and moe.ffn.router.top_k == 4


@pytest.mark.parametrize("family", ["deepseek_v32", "mistral4", "dots1"])
def test_group_limited_routers_refused_without_allow_lossy(lineage, tmp_path, family):
    path = lineage(family)  # 2 groups of 4 experts, 1 kept: a group's score (its top-2 sum) changes when experts split
    with pytest.raises(BadInputError, match="2 expert groups, 1 kept"):
        split_experts(path, tmp_path / "out", granularity=2)
    assert not (tmp_path / "out").exists()


def test_kimi_k2_finer_dimensions(lineage, tmp_path):
    report = split_experts(lineage("kimi_k2"), tmp_path / "out", granularity=2)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k2" and cfg["auto_map"]["AutoModelForCausalLM"].endswith("DeepseekV3ForCausalLM")
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"]) == (16, 4) and report["verdict"] == "exact"


def test_wrapper_surgery_keeps_the_vision_tower(lineage, tmp_path):
    path = lineage("kimi_k25")
    split_experts(path, tmp_path / "out", granularity=2)
    a, b = stored(path), stored(tmp_path / "out")
    vision = [k for k in a if not k.startswith(("model.language_model.", "lm_head"))]
    assert vision and all(torch.equal(a[k][2], b[k][2]) for k in vision)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "kimi_k25" and cfg["text_config"]["n_routed_experts"] == 16
    assert cfg["vision_config"] == json.loads((path / "config.json").read_text())["vision_config"]


def test_dense_upcycle_into_solar_open(checkpoint, input_ids, tmp_path):
    """A Llama upcycled into a 2025-26 layout (GQA, sigmoid router, shared experts), exact at init."""
    from tests.fixtures import reference_logits

    src = checkpoint("llama")
    report = upcycle(src, tmp_path / "out", granularity=2, experts=8, top_k=4, shared=2, to="solar_open")
    assert report["verdict"] == "exact"
    assert rel_err(reference_logits(tmp_path / "out", input_ids), reference_logits(src, input_ids)) < 1e-5


# ------------------------------------------------------------------------------------ conversions
def test_kimi_k2_to_deepseek_v3_changes_only_the_config(lineage, ids, tmp_path):
    path = lineage("kimi_k2")
    report = convert(path, tmp_path / "v3", "deepseek_v3")
    assert report["exact"]
    a, b = stored(path), stored(tmp_path / "v3")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k][2], b[k][2]) for k in a)
    cfg = json.loads((tmp_path / "v3" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and "auto_map" not in cfg
    assert rel_err(lineage_logits(tmp_path / "v3", ids), lineage_logits(path, ids)) < 1e-5
    convert(tmp_path / "v3", tmp_path / "k2", "kimi_k2")
    assert json.loads((tmp_path / "k2" / "config.json").read_text())["model_type"] == "kimi_k2"


@pytest.mark.parametrize("src,dst,reason", [
    ("deepseek_v32", "deepseek_v3", "indexer"),
    ("glm_moe_dsa", "deepseek_v3", "indexer"),
    ("mistral4", "deepseek_v3", "sigmoid"),
])
def test_lossy_conversions_say_why(lineage, tmp_path, src, dst, reason):
    with pytest.raises(BadInputError, match=reason):
        convert(lineage(src), tmp_path / "out", dst)
    report = convert(lineage(src), tmp_path / "out", dst, allow_lossy=True)
    assert report["verdict"] == "lossy" and any(reason in r for r in report["lossy_reasons"])


@pytest.mark.parametrize("src,dst,reason", [
    ("glm_moe_dsa", "deepseek_v32", "interleaved pairs"),
    ("deepseek_v32", "glm_moe_dsa", "half split"),
    ("ernie4_5_moe", "qwen2_moe", "interleaved"),
    ("kimi_k2", "glm4_moe", "MLA"),
    ("minimax_m2", "mixtral", "whole projection"),
])
def test_refused_conversions(lineage, tmp_path, src, dst, reason):
    with pytest.raises(BadInputError, match=reason):
        convert(lineage(src), tmp_path / "out", dst, allow_lossy=True)


def test_solar_open_to_glm4_moe_is_exact(lineage, ids, tmp_path):
    path = lineage("solar_open")
    assert convert(path, tmp_path / "out", "glm4_moe")["exact"]
    assert rel_err(lineage_logits(tmp_path / "out", ids), lineage_logits(path, ids)) < 1e-5


def test_deepseek_v32_as_deepseek_v3_is_exact_within_index_topk(lineage, tmp_path):
    """Dense MLA equals DSA while a sequence has at most index_topk keys."""
    path = lineage("deepseek_v32")
    convert(path, tmp_path / "out", "deepseek_v3", allow_lossy=True)
    short = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    assert rel_err(lineage_logits(tmp_path / "out", short), lineage_logits(path, short)) < 1e-5


def test_shared_experts_extracted_where_the_target_holds_them(lineage, tmp_path):
    """Mixtral-style extraction on the lineage: Hy3 holds shared experts (an ungated shared_mlp); MiniMax-M2
    has no slot and is refused up front, naming the layouts that have one."""
    report = upcycle(lineage("hy_v3"), tmp_path / "hy", granularity=2, shared=1, allow_lossy=True)
    assert report["target_layout"] == "hy_v3" and report["shared_width"] > 0 and "measured" in report
    with pytest.raises(BadInputError, match="has no shared experts"):
        upcycle(lineage("minimax_m2"), tmp_path / "mm", granularity=2, shared=1, to="minimax_m2", allow_lossy=True)
    assert not (tmp_path / "mm").exists()
