"""The runtime's rope matches transformers' rope init functions and rotary embedding modules."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402
from transformers.models.glm4_moe import modeling_glm4_moe as hf_glm  # noqa: E402
from transformers.models.llama import modeling_llama as hf_llama  # noqa: E402

from moesurgery.layouts import get_layout  # noqa: E402
from moesurgery.runtime import rope  # noqa: E402

MAX_POS = 64
LLAMA_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_full": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16,
                  "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.8},
    "yarn_legacy_type": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
}


def llama_config(scaling, theta=500000.0):
    return transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=1,
        vocab_size=32, max_position_embeddings=MAX_POS, rope_theta=theta, rope_scaling=scaling,
    )


def arch_of(config):
    return get_layout(config.model_type).read_arch(config.to_dict())


def hf_cos_sin(module, T, dtype=torch.float32):
    x = torch.zeros(1, dtype=dtype)
    return module(x, torch.arange(T)[None])


def assert_close(a, b, tol=1e-6):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(LLAMA_SCALINGS))
def test_llama_inv_freq_and_scale(name):
    config = llama_config(LLAMA_SCALINGS[name])
    arch = arch_of(config)
    kind = config.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(kind, hf_llama.LlamaRotaryEmbedding.compute_default_rope_parameters)
    want_freq, want_scale = init(config)
    got_freq, got_scale = rope.inv_freq_and_scale(arch)
    assert_close(got_freq, want_freq, tol=0)
    assert got_scale == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.parametrize("name", list(LLAMA_SCALINGS))
@pytest.mark.parametrize("T", [7, MAX_POS, 3 * MAX_POS + 5])
def test_llama_cos_sin(name, T):
    config = llama_config(LLAMA_SCALINGS[name])
    cos, sin = hf_cos_sin(hf_llama.LlamaRotaryEmbedding(config), T)  # fresh module: dynamic sees only T
    got_cos, got_sin = rope.cos_sin(arch_of(config), torch.arange(T))
    assert_close(got_cos, cos[0])
    assert_close(got_sin, sin[0])


def test_dynamic_grows_past_max_positions():
    arch = arch_of(llama_config(LLAMA_SCALINGS["dynamic"]))
    short, _ = rope.inv_freq_and_scale(arch, MAX_POS)
    long, _ = rope.inv_freq_and_scale(arch, 2 * MAX_POS)
    assert torch.equal(short, rope.inv_freq_and_scale(arch)[0])
    assert (long[1:] < short[1:]).all()


def test_glm4_moe_partial_rotary():
    config = transformers.Glm4MoeConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5,
        num_hidden_layers=1, vocab_size=32, max_position_embeddings=MAX_POS,
    )
    arch = arch_of(config)
    assert arch.partial_rotary_factor == 0.5
    cos, sin = hf_cos_sin(hf_glm.Glm4MoeRotaryEmbedding(config), 11)
    got_cos, got_sin = rope.cos_sin(arch, torch.arange(11))
    assert got_cos.shape == (11, 16)
    assert_close(got_cos, cos[0])
    assert_close(got_sin, sin[0])
    q, k = torch.randn(2, 4, 11, 32), torch.randn(2, 2, 11, 32)
    want_q, want_k = hf_glm.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rope.apply_rotary(q, got_cos, got_sin), want_q)
    assert torch.equal(rope.apply_rotary(k, got_cos, got_sin), want_k)
    assert torch.equal(want_q[..., 16:], q[..., 16:])


def deepseek_config(cls, scaling):
    return cls(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1, vocab_size=32,
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8,
        max_position_embeddings=4 * MAX_POS, rope_scaling=scaling,
    )


DS_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": MAX_POS, "beta_fast": 32,
           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
DS_SCALINGS = {"default": None, "yarn": DS_YARN, "yarn_mscale": {**DS_YARN, "mscale": 0.707}}


@pytest.mark.parametrize("scaling", list(DS_SCALINGS.values()), ids=list(DS_SCALINGS))
def test_deepseek_v3_cos_sin(scaling):
    config = deepseek_config(transformers.DeepseekV3Config, scaling)
    arch = arch_of(config)
    assert arch.head_dim == 16  # transformers' deepseek configs set head_dim = qk_rope_head_dim
    module = hf_v3.DeepseekV3RotaryEmbedding(config)
    got_freq, got_scale = rope.inv_freq_and_scale(arch)
    assert_close(got_freq, module.inv_freq, tol=0)
    assert got_scale == pytest.approx(module.attention_scaling, rel=1e-12)
    cos, sin = hf_cos_sin(module, 100)
    got_cos, got_sin = rope.cos_sin(arch, torch.arange(100))
    assert_close(got_cos, cos[0])
    assert_close(got_sin, sin[0])


@pytest.mark.parametrize("scaling", [None, DS_YARN], ids=["default", "yarn"])
def test_deepseek_v2_freqs_cis(scaling):
    config = deepseek_config(transformers.DeepseekV2Config, scaling)
    want = hf_v2.DeepseekV2RotaryEmbedding(config)(torch.zeros(1), torch.arange(100)[None])
    got = rope.freqs_cis(arch_of(config), torch.arange(100))
    assert_close(got, want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_variants_match_transformers(dtype):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 16, generator=g).to(dtype), torch.randn(2, 1, 9, 16, generator=g).to(dtype)
    config = deepseek_config(transformers.DeepseekV3Config, DS_YARN)
    arch = arch_of(config)
    cos, sin = hf_cos_sin(hf_v3.DeepseekV3RotaryEmbedding(config), 9, dtype)  # in dtype, like the model
    got_cos, got_sin = rope.cos_sin(arch, torch.arange(9))
    want = hf_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rope.apply_rotary(q, got_cos, got_sin), want[0])
    assert torch.equal(rope.apply_rotary(k, got_cos, got_sin), want[1])
    want = hf_v3.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    assert torch.equal(rope.apply_rotary_interleave(q, got_cos, got_sin), want[0])
    assert torch.equal(rope.apply_rotary_interleave(k, got_cos, got_sin), want[1])
    fc = hf_v2.DeepseekV2RotaryEmbedding(deepseek_config(transformers.DeepseekV2Config, DS_YARN))(
        torch.zeros(1), torch.arange(9)[None]
    )
    want = hf_v2.apply_rotary_emb(q, k, fc)
    got_fc = rope.freqs_cis(arch, torch.arange(9))
    assert torch.equal(rope.apply_rotary_complex(q, got_fc), want[0])
    assert torch.equal(rope.apply_rotary_complex(k, got_fc), want[1])
