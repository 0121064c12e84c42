"""The pure-torch runtime computes what transformers computes, for every family."""

from __future__ import annotations

import pytest
import torch

from moesurgery.model_io import open_model
from moesurgery.runtime import Runtime
from tests.fixtures import FAMILIES, deepseek_v1_reference_logits, reference_logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_matches_transformers(checkpoint, input_ids, family):
    path = checkpoint(family)
    want = deepseek_v1_reference_logits(path, input_ids) if family == "deepseek" else reference_logits(path, input_ids)
    got = Runtime(open_model(path).model).forward(input_ids)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 8}),
        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}}),
        ("llama", {"attention_bias": True, "tie_word_embeddings": True}),
        ("mistral", {"sliding_window": 5}),
        ("glm4_moe", {"partial_rotary_factor": 1.0, "use_qk_norm": False, "attention_bias": False}),
        ("deepseek_v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}),
    ],
    ids=["llama3", "linear", "dynamic", "yarn", "bias-tied", "sliding", "glm-llama-attn", "v3-plain"],
)
def test_runtime_variants_match_transformers(checkpoint, input_ids, family, overrides):
    path = checkpoint(family, **overrides)
    got = Runtime(open_model(path).model).forward(input_ids)
    assert rel_err(got, reference_logits(path, input_ids)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_incremental_decoding_matches_full_forward(checkpoint, input_ids, family):
    rt = Runtime(open_model(checkpoint(family)).model, resident=True)
    full = rt.forward(input_ids)
    caches: list = []
    steps = [rt.forward(input_ids[:, :5], caches)] + [rt.forward(input_ids[:, t : t + 1], caches) for t in range(5, input_ids.shape[1])]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("backend", ["loop", "sorted"])
def test_streaming_and_resident_agree(checkpoint, input_ids, backend):
    model = open_model(checkpoint("qwen2_moe")).model
    a = Runtime(model, backend=backend).forward(input_ids)
    b = Runtime(model, backend="loop", resident=True).forward(input_ids)
    assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize(
    "family,overrides",
    [("llama", {}), ("qwen3", {}), ("mistral", {"sliding_window": 5}), ("mixtral", {}), ("glm4_moe", {})],
    ids=["llama", "qwen3", "sliding", "mixtral", "glm4_moe"],
)
def test_sdpa_attention_matches_transformers(monkeypatch, checkpoint, input_ids, family, overrides):
    """The fused-attention path (CUDA's default) run on CPU: prefill and step-by-step decode,
    including a chunk after a cache (mask path) and a sliding window shorter than the sequence."""
    from moesurgery.runtime import attention

    monkeypatch.setattr(attention, "SDPA_DEVICES", ("cpu", "cuda"))
    path = checkpoint(family, **overrides)
    want = reference_logits(path, input_ids)
    rt = Runtime(open_model(path).model, resident=True)
    assert rel_err(rt.forward(input_ids), want) < 1e-5
    caches: list = []
    steps = [rt.forward(input_ids[:, :4], caches), rt.forward(input_ids[:, 4:7], caches)]
    steps += [rt.forward(input_ids[:, t : t + 1], caches) for t in range(7, input_ids.shape[1])]
    assert rel_err(torch.cat(steps, dim=1), want) < 1e-5
