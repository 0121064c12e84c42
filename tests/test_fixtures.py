"""The tiny checkpoints and reference-logit helpers that the rest of the suite relies on."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures import (
    DENSE_FAMILIES,
    FAMILIES,
    MOE_FAMILIES,
    checkpoint_keys,
    deepseek_v1_config,
    deepseek_v1_reference_logits,
    reference_logits,
    write_deepseek_v1_checkpoint,
)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# Expected Hub keys (a sample) per family: first a dense-FFN layer if the family has one, then MoE.
EXPECTED_KEYS = {
    "llama": ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.self_attn.q_proj.weight"],
    "mistral": ["model.layers.1.mlp.up_proj.weight"],
    "qwen2": ["model.layers.1.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.weight"],
    "qwen3": ["model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"],
    "mixtral": [
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.0.w1.weight",
        "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        "model.layers.1.block_sparse_moe.experts.3.w3.weight",
    ],
    "qwen2_moe": [
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.experts.3.gate_proj.weight",
        "model.layers.1.mlp.shared_expert.up_proj.weight",
        "model.layers.1.mlp.shared_expert_gate.weight",
        "model.layers.1.self_attn.k_proj.bias",
    ],
    "qwen3_moe": ["model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.self_attn.q_norm.weight"],
    "olmoe": ["model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.self_attn.q_norm.weight"],
    "deepseek": [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.2.mlp.experts.7.down_proj.weight",
        "model.layers.2.mlp.shared_experts.gate_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ],
    "deepseek_v2": [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.experts.7.gate_proj.weight",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ],
    "deepseek_v3": [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.2.mlp.experts.7.up_proj.weight",
        "model.layers.1.self_attn.q_a_proj.weight",
    ],
    "glm4_moe": [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.2.mlp.experts.0.gate_proj.weight",
        "model.layers.2.mlp.shared_experts.up_proj.weight",
        "model.layers.1.self_attn.q_proj.bias",
    ],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_builds_with_hub_keys(checkpoint, family):
    path = checkpoint(family)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "generation_config.json").is_file()
    keys = checkpoint_keys(path)
    for k in EXPECTED_KEYS[family]:
        assert k in keys, k
    assert not [k for k in keys if "gate_up_proj" in k]
    assert not [k for k in keys if re.search(r"\.experts\.(down_proj|gate_proj|up_proj)$", k)]
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    cfg = _config(path)
    assert cfg["model_type"] == family
    assert cfg["tie_word_embeddings"] is False
    if family in ("deepseek", "deepseek_v2", "deepseek_v3", "glm4_moe"):
        assert cfg["first_k_dense_replace"] == 1
        assert "model.layers.0.mlp.gate.weight" not in keys
    tensors = load_file(str(path / "model.safetensors"))
    norm = tensors["model.layers.0.input_layernorm.weight"]
    assert (norm - 1).abs().max() > 0.1  # not an identity norm


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deepseek"])
def test_checkpoint_loads_in_transformers(checkpoint, input_ids, family):
    from transformers import AutoModelForCausalLM

    path = checkpoint(family)
    _, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    logits = reference_logits(path, input_ids)
    assert logits.dtype == torch.float32
    assert logits.shape == (*input_ids.shape, 128)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1


@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f != "deepseek"])
def test_hub_expert_keys_mean_what_transformers_means(checkpoint, family):
    """transformers fuses [gate; up] rows on load: the Hub gate/w1 key is the first half."""
    from tests.fixtures import load_reference_model

    path = checkpoint(family)
    disk = load_file(str(path / "model.safetensors"))
    sd = load_reference_model(path).state_dict()
    L = 1
    if family == "mixtral":
        names = lambda j: [f"model.layers.{L}.block_sparse_moe.experts.{j}.{w}.weight" for w in ("w1", "w3", "w2")]
    else:
        names = lambda j: [f"model.layers.{L}.mlp.experts.{j}.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")]
    gate_up = sd[f"model.layers.{L}.mlp.experts.gate_up_proj"]
    down = sd[f"model.layers.{L}.mlp.experts.down_proj"]
    for j in range(gate_up.shape[0]):
        g, u, d = (disk[n] for n in names(j))
        torch.testing.assert_close(gate_up[j], torch.cat([g, u], dim=0), rtol=0, atol=0)
        torch.testing.assert_close(down[j], d, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_score_correction_bias_nonzero_fp32(checkpoint, family):
    for dtype in (torch.float32, torch.bfloat16):
        path = checkpoint(family, dtype=dtype)
        t = load_file(str(path / "model.safetensors"))
        b = t["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert b.dtype == torch.float32
        assert b.abs().min() > 0
        assert t["model.layers.1.mlp.gate.weight"].dtype == dtype


def test_deepseek_v1_has_no_native_class(checkpoint, input_ids):
    path = checkpoint("deepseek")
    cfg = _config(path)
    assert cfg["architectures"] == ["DeepseekForCausalLM"]
    assert cfg["auto_map"]["AutoConfig"].endswith("configuration_deepseek.DeepseekConfig")
    assert cfg["scoring_func"] == "softmax" and cfg["moe_layer_freq"] == 1
    with pytest.raises(ValueError, match="deepseek_v1_reference_logits"):
        reference_logits(path, input_ids)
    logits = deepseek_v1_reference_logits(path, input_ids)
    assert logits.shape == (*input_ids.shape, 128)
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_checkpoints_are_seeded_and_cached(checkpoint, tmp_path):
    from tests.fixtures import make_checkpoint

    a = checkpoint("mixtral")
    assert checkpoint("mixtral") is a
    assert checkpoint("mixtral", seed=1) != a
    b = make_checkpoint("mixtral", tmp_path / "again")
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    tc = load_file(str(checkpoint("mixtral", seed=1) / "model.safetensors"))
    assert not torch.equal(ta["lm_head.weight"], tc["lm_head.weight"])


def test_tokenizer_loads(checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint("llama")))
    ids = tok("w5 w6 w127")["input_ids"]
    assert ids[-3:] == [5, 6, 127]


# ------------------------------------------------------------------------------------------
# Cross-checks of the independent DeepSeekMoE v1 forward against transformers
# ------------------------------------------------------------------------------------------


def test_deepseek_v1_forward_matches_mixtral(checkpoint, input_ids, tmp_path):
    """Mixtral weights rewritten as DeepSeekMoE v1 (no shared expert, no dense layer, renormalised
    top-k) must give transformers' Mixtral logits."""
    src = checkpoint("mixtral")
    mcfg = _config(src)
    tensors = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        k = k.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        k = re.sub(r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj.", k)
        k = re.sub(r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj.", k)
        k = re.sub(r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj.", k)
        tensors[k] = v
    assert not [k for k in tensors if "block_sparse_moe" in k]
    cfg = deepseek_v1_config(
        num_hidden_layers=mcfg["num_hidden_layers"],
        n_routed_experts=mcfg["num_local_experts"],
        n_shared_experts=None,
        num_experts_per_tok=mcfg["num_experts_per_tok"],
        moe_intermediate_size=mcfg["intermediate_size"],
        intermediate_size=mcfg["intermediate_size"],
        first_k_dense_replace=0,
        norm_topk_prob=True,
        rope_theta=mcfg["rope_parameters"]["rope_theta"],
        rms_norm_eps=mcfg["rms_norm_eps"],
        num_key_value_heads=mcfg["num_key_value_heads"],
    )
    dst = write_deepseek_v1_checkpoint(tmp_path / "ds", cfg, tensors)
    want = reference_logits(src, input_ids)
    got = deepseek_v1_reference_logits(dst, input_ids)
    assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_deepseek_v1_forward_matches_qwen2_moe(checkpoint, input_ids, tmp_path, norm_topk_prob):
    """Qwen2-MoE with a dense layer 0, zero attention biases and shared_expert_gate = 0
    (sigmoid = 1/2, folded into the shared down_proj) is exactly a DeepSeekMoE v1 model with
    first_k_dense_replace=1 and an ungated shared expert of width 2*moe_intermediate_size."""
    src = checkpoint(
        "qwen2_moe", num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=norm_topk_prob
    )
    qcfg = _config(src)
    assert qcfg["shared_expert_intermediate_size"] == 2 * qcfg["moe_intermediate_size"]
    qt = load_file(str(src / "model.safetensors"))
    # 1. a Qwen2-MoE that transformers can run: biases and shared gate zeroed, shared down x2
    mod = {}
    for k, v in qt.items():
        if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias", "shared_expert_gate.weight")):
            v = torch.zeros_like(v)
        if ".shared_expert.down_proj." in k:
            v = v * 2
        mod[k] = v
    qdir = tmp_path / "qwen_mod"
    shutil.copytree(src, qdir)
    save_file(mod, str(qdir / "model.safetensors"), metadata={"format": "pt"})
    # 2. the same weights as DeepSeekMoE v1 (original shared down_proj: the ungated expert has weight 1)
    ds = {
        k.replace(".mlp.shared_expert.", ".mlp.shared_experts."): v
        for k, v in qt.items()
        if not k.endswith(("_proj.bias", "shared_expert_gate.weight"))
    }
    cfg = deepseek_v1_config(
        num_hidden_layers=qcfg["num_hidden_layers"],
        n_routed_experts=qcfg["num_experts"],
        n_shared_experts=2,
        num_experts_per_tok=qcfg["num_experts_per_tok"],
        moe_intermediate_size=qcfg["moe_intermediate_size"],
        intermediate_size=qcfg["intermediate_size"],
        first_k_dense_replace=1,
        norm_topk_prob=norm_topk_prob,
        rope_theta=qcfg["rope_parameters"]["rope_theta"],
        rms_norm_eps=qcfg["rms_norm_eps"],
        num_key_value_heads=qcfg["num_key_value_heads"],
    )
    dst = write_deepseek_v1_checkpoint(tmp_path / "ds", cfg, ds)
    assert set(checkpoint_keys(dst)) == set(ds)
    want = reference_logits(qdir, input_ids)
    got = deepseek_v1_reference_logits(dst, input_ids)
    assert _rel_err(got, want) < 1e-5
    # and the unmodified Qwen2-MoE really differs (the check is not vacuous)
    assert _rel_err(reference_logits(src, input_ids), want) > 1e-3


def test_dense_families_listed():
    assert set(DENSE_FAMILIES) | set(MOE_FAMILIES) == set(FAMILIES)
