"""mla_attention matches transformers' DeepseekV2Attention / DeepseekV3Attention (eager), in one
pass and token by token with the cache."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moesurgery.layouts import get_layout  # noqa: E402
from moesurgery.runtime.mla import mla_attention  # noqa: E402

YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
CASES = {
    "v2_q_proj": ("deepseek_v2", dict(q_lora_rank=None)),
    "v2_lora_yarn_bias": ("deepseek_v2", dict(q_lora_rank=24, rope_scaling=YARN, attention_bias=True)),
    "v3_q_proj": ("deepseek_v3", dict(q_lora_rank=None)),
    "v3_lora_yarn_rotate_half": ("deepseek_v3", dict(q_lora_rank=24, rope_scaling=YARN, rope_interleave=False)),
    # rms_norm_eps=0.5 proves q_a/kv_a layernorms use transformers' hard-coded 1e-6, not the config's eps
    "v3_lora_yarn_bias_eps": (
        "deepseek_v3", dict(q_lora_rank=24, rope_scaling=YARN, attention_bias=True, rms_norm_eps=0.5)
    ),
}


def build(family: str, dtype=torch.float32, **overrides):
    cls = {"deepseek_v2": transformers.DeepseekV2Config, "deepseek_v3": transformers.DeepseekV3Config}[family]
    config = cls(**{
        **dict(
            vocab_size=64, hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=12,
            qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            n_group=1, topk_group=1, first_k_dense_replace=0, max_position_embeddings=64, initializer_range=0.3,
            attn_implementation="eager",
        ),
        **overrides,
    })
    torch.manual_seed(0)
    # from_config(dtype=...) like from_pretrained keeps the rotary inv_freq buffer in fp32 (.to(dtype) would not)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    prefix = "model.layers.0."
    w = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix + "self_attn.")}
    arch = get_layout(family).read_arch(config.to_dict())
    return model, w, arch


def capture(model, *args, **kwargs):
    """(input hidden states, output) of layer 0's self_attn during one forward."""
    seen = {}
    attn = model.model.layers[0].self_attn
    pre = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"]), with_kwargs=True)
    post = attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        pre.remove()
        post.remove()
    return seen["x"], seen["out"]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case):
    family, overrides = CASES[case]
    model, w, arch = build(family, **overrides)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    x, want = capture(model, ids)
    got, (k, v) = mla_attention(x, w, arch, torch.arange(11), variant=family)
    assert rel_err(got, want) < 1e-5
    assert k.shape == (2, 4, 11, 20) and v.shape == (2, 4, 11, 10)


@pytest.mark.parametrize("case", list(CASES))
def test_decode_with_cache_matches_one_pass(case):
    family, overrides = CASES[case]
    model, w, arch = build(family, **overrides)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = mla_attention(x, w, arch, torch.arange(9), variant=family)
        out, cache = mla_attention(x[:, :4], w, arch, torch.arange(4), variant=family)  # prefill
        outs = [out]
        for t in range(4, 9):
            out, cache = mla_attention(x[:, t : t + 1], w, arch, torch.tensor([t]), cache=cache, variant=family)
            outs.append(out)
    assert cache[0].shape[2] == 9
    assert rel_err(torch.cat(outs, dim=1), full) < 1e-5


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_decode_matches_transformers_cache(family):
    model, w, arch = build(family, q_lora_rank=24, rope_scaling=YARN)
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(3))
    past = transformers.DynamicCache(config=model.config)
    x, want = capture(model, ids[:, :6], past_key_values=past, use_cache=True)
    got, cache = mla_attention(x, w, arch, torch.arange(6), variant=family)
    assert rel_err(got, want) < 1e-5
    for t in range(6, 10):
        x, want = capture(model, ids[:, t : t + 1], past_key_values=past, use_cache=True)
        got, cache = mla_attention(x, w, arch, torch.tensor([t]), cache=cache, variant=family)
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_follows_transformers_casts(case):
    """Same ops, same casts, same order: bit-identical in bf16 too (a wrong cast shows as ~1e-3)."""
    family, overrides = CASES[case]
    model, w, arch = build(family, dtype=torch.bfloat16, **overrides)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    x, want = capture(model, ids)
    got, _ = mla_attention(x, w, arch, torch.arange(11), variant=family)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want), rel_err(got, want)


def test_variant_defaults():
    _, _, arch = build("deepseek_v3")
    assert arch.mla.get("rope_interleave") is True
    from moesurgery.runtime.mla import resolve_variant

    assert resolve_variant(arch, None) == "deepseek_v3"
    assert resolve_variant(arch, "deepseek_v2") == "deepseek_v2"
    with pytest.raises(ValueError):
        resolve_variant(arch, "llama")


@pytest.mark.parametrize("field", ["v_head_dim", "kv_lora_rank", "qk_rope_head_dim", "q_lora_rank"])
def test_attention_tensors_that_do_not_fit_the_config_are_refused_on_read(field, tmp_path):
    """MLA's attention tensors are checked against the config when the model is read (only GQA's were): a field
    that disagrees with the checkpoint is bad input naming the tensor, not a reshape error in the runtime (exit 1)."""
    import json

    from moesurgery.errors import BadInputError
    from moesurgery.model_io import open_model

    model, _, _ = build("deepseek_v3", q_lora_rank=24)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] += 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInputError, match=r"model\.layers\.0\.self_attn\.\S+: shape \[\d+(, \d+)?\], expected \[\d+(, \d+)?\] from config\.json"):
        open_model(tmp_path)
