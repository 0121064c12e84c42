"""Serving limits checked at plan time, the model card, the native default targets, and the fixes that
make outputs load in llama.cpp (a non-zero 1/2 gate, the tied head written out, no stale config keys)."""

from __future__ import annotations

import json

import pytest
import torch

from moesurgery.cli import main
from moesurgery.convert import convert
from moesurgery.express import HALF_GATE_BOUND, half_gate, is_half
from moesurgery.lazy import Lazy
from moesurgery.model_io import open_model
from moesurgery.operations import native_target, split_experts, upcycle
from moesurgery.reader import CheckpointReader
from tests.fixtures import reference_logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------ defaults
def test_default_targets_load_natively(checkpoint, tmp_path):
    """The README's main job made DeepSeek v1 (remote code): the defaults are now native layouts."""
    assert native_target(open_model(checkpoint("llama")).model, shared=2) == "glm4_moe"
    assert native_target(open_model(checkpoint("mixtral")).model, shared=1) == "qwen2_moe"
    assert native_target(open_model(checkpoint("qwen3")).model) == "glm4_moe"  # per-head qk-norm fits glm4_moe
    report = upcycle(checkpoint("mixtral"), tmp_path / "a", granularity=2)
    assert report["target_layout"] == "qwen2_moe" and report["verdict"] == "exact"
    report = upcycle(checkpoint("llama"), tmp_path / "b", granularity=2, experts=4, top_k=2, shared=2)
    assert report["target_layout"] == "glm4_moe" and report["verdict"] == "exact"
    assert not any("remote code" in w for w in report["serving"])


def test_a_mistral_window_goes_to_a_layout_with_one(checkpoint):
    model = open_model(checkpoint("mistral", sliding_window=5)).model
    assert native_target(model) == "qwen2_moe"  # glm4_moe has no sliding window


def test_deepseek_v1_says_it_needs_remote_code(checkpoint, tmp_path):
    report = upcycle(checkpoint("mixtral"), tmp_path / "o", granularity=2, to="deepseek", dry_run=True)
    assert any("remote code" in w and "trust_remote_code" in w for w in report["serving"])


# ------------------------------------------------------------------------------------ limits
def test_llama_cpp_renormalisation_warning(checkpoint, tmp_path):
    report = upcycle(checkpoint("mixtral"), tmp_path / "o", granularity=2, to="qwen2_moe", dry_run=True)
    assert any(w.startswith("llama.cpp") and "renormalise" in w for w in report["serving"])
    report = upcycle(checkpoint("mixtral"), tmp_path / "o", granularity=2, to="mixtral", dry_run=True)
    assert not any("renormalise" in w for w in report["serving"])


def test_expert_count_and_parallel_limits(checkpoint, tmp_path, capsys):
    code = main(["split-experts", str(checkpoint("mixtral")), str(tmp_path / "o"), "--granularity", "2", "--dry-run", "--json",
                 "--serve-ep", "3", "--serve-tp", "3"])
    assert code == 0
    warnings = json.loads(capsys.readouterr().out)["serving"]
    assert any("--serve-ep 3" in w for w in warnings) and any("--serve-tp 3" in w for w in warnings)
    assert any("padded to a multiple of 32" in w for w in warnings)  # 48 / 2 = 24-wide experts


def test_vllm_head_dim_warning(checkpoint, tmp_path):
    """vLLM's qwen2_moe / olmoe / deepseek ignore head_dim (it uses hidden / heads)."""
    report = convert(checkpoint("mixtral", head_dim=8), tmp_path / "o", "qwen2_moe", dry_run=True)
    assert any("ignores head_dim" in w for w in report["serving"])


# ------------------------------------------------------------------------------------ model card
def test_every_output_has_a_model_card(checkpoint, tmp_path):
    src = checkpoint("mixtral")
    (src / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# the source's own card\nsecret text\n")
    try:
        upcycle(src, tmp_path / "o", granularity=2, shared=1, allow_lossy=True)
    finally:
        (src / "README.md").unlink()
    card = (tmp_path / "o" / "README.md").read_text()
    front = card.split("---")[1]
    for field in ("base_model:", "base_model_relation:", "library_name: \"transformers\"", "pipeline_tag:", "license: \"apache-2.0\""):
        assert field in front, field
    assert '"moe"' in front and '"moesurgery"' in front
    assert "secret text" not in card  # credited, not copied
    assert "Verdict" in card and "Quick check" in card and "from_pretrained" in card and "vllm serve" in card
    assert "8 x 48, top-2" in card or "4 x 48, top-2" in card


def test_convert_writes_a_card(checkpoint, tmp_path):
    convert(checkpoint("mixtral"), tmp_path / "o", "qwen2_moe")
    assert "mixtral" in (tmp_path / "o" / "README.md").read_text()


# ------------------------------------------------------------------------------------ llama.cpp fixes
@pytest.mark.parametrize("hidden,w", [(64, 1.0), (4096, 3.5), (7168, 0.05)])
def test_half_gate_is_exactly_one_half_and_not_zero(hidden, w):
    norm = Lazy.of(torch.full((hidden,), w))
    gate = half_gate(hidden, norm, torch.bfloat16).load()
    assert bool(gate.any()) and is_half(Lazy.of(gate), norm)
    x = torch.randn(1000, hidden).sign() * w * 1.0  # worst case: |x_i| = max|w| (rms-normalised inputs times the weight)
    z = x.to(gate.dtype).float() @ gate.float().T
    assert float(z.abs().max()) <= HALF_GATE_BOUND
    assert torch.equal(torch.sigmoid(z), torch.full_like(z, 0.5))
    assert torch.equal(torch.sigmoid(z.bfloat16()), torch.full_like(z, 0.5).bfloat16())


def test_ungated_shared_into_qwen2_moe_gets_the_half_gate_and_stays_exact(checkpoint, input_ids, tmp_path):
    src = checkpoint("llama")
    upcycle(src, tmp_path / "o", granularity=2, experts=4, top_k=2, shared=2, to="qwen2_moe")
    gate = CheckpointReader(tmp_path / "o").get("model.layers.0.mlp.shared_expert_gate.weight")
    assert bool(gate.any()) and float(gate.abs().max()) < 1e-6
    assert rel_err(reference_logits(tmp_path / "o", input_ids), reference_logits(src, input_ids)) < 1e-5
    # and back: a 1/2 gate folds into an ungated layout exactly (the router kind is what differs)
    report = convert(tmp_path / "o", tmp_path / "back", "glm4_moe", dry_run=True, allow_lossy=True)
    assert any("sigmoid of 1/2 folded" in n for n in report["notes"])
    assert not any("gate" in r for r in report["lossy_reasons"])


@pytest.mark.parametrize("family,to", [("llama", "qwen2_moe"), ("llama", "glm4_moe"), ("deepseek_v3", "deepseek_v3")])
def test_tied_head_is_written_out_where_the_engine_does_not_tie(checkpoint, input_ids, tmp_path, family, to):
    """vLLM 0.32's models of these families never tie lm_head (a tied SmolLM2 split into glm4_moe served all-zero
    logits); llama.cpp's qwen2moe graph needs output.weight: the head is written out, the config untied."""
    src = checkpoint(family, tie_word_embeddings=True)
    if family == "llama":
        upcycle(src, tmp_path / "o", granularity=2, experts=4, top_k=4, to=to)
    else:
        convert(src, tmp_path / "o", to)
    assert_head_written_out(tmp_path / "o", src, input_ids, reference_logits)


def assert_head_written_out(out, src, input_ids, logits):
    """`out` carries the tied head as its own tensor with the config untied, and computes `src`'s logits in
    transformers (`logits`, the family's own class) and in our runtime."""
    from moesurgery.runtime.model import Runtime

    cfg = json.loads((out / "config.json").read_text())
    r = CheckpointReader(out)
    assert cfg["tie_word_embeddings"] is False and torch.equal(r.get("lm_head.weight"), r.get("model.embed_tokens.weight"))
    expected = logits(src, input_ids)
    assert rel_err(logits(out, input_ids), expected) < 1e-5
    assert rel_err(Runtime(open_model(out).model).forward(input_ids), expected) < 1e-5


def test_no_stale_expert_count_in_the_config(checkpoint, tmp_path):
    """qwen3_moe split left `num_local_experts: 4` beside `num_experts: 8`: transformers and vLLM refused it."""
    src = checkpoint("qwen3_moe")  # transformers 5 saves num_local_experts
    assert json.loads((src / "config.json").read_text())["num_local_experts"] == 4
    split_experts(src, tmp_path / "o", granularity=2)
    out = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out["num_experts"] == 8 and "num_local_experts" not in out


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_next"])
def test_tied_head_is_written_out_for_gpt_oss_and_qwen3_next(tmp_path, input_ids, family):
    from tests.gpt_oss_fixtures import gpt_oss_logits, make_gpt_oss
    from tests.hybrid_fixtures import hybrid_logits, make_hybrid

    src = tmp_path / "src"
    make_gpt_oss(src, tie_word_embeddings=True) if family == "gpt_oss" else make_hybrid(family, src, tie_word_embeddings=True)
    convert(src, tmp_path / "o", family)
    assert_head_written_out(tmp_path / "o", src, input_ids, gpt_oss_logits if family == "gpt_oss" else hybrid_logits)
