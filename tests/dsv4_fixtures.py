"""Tiny DeepSeek-V4 checkpoints made with transformers' own classes, in the two forms the weights
circulate in: what save_pretrained writes (``saved``) and DeepSeek's release names (``hub``: this
fixture strips the ``model.`` prefix and renames embed / norm / hc_head itself; transformers loads both).

* ``make_dsv4(path, form="saved", seed=0, **config_overrides) -> Path``
* ``dsv4_logits(path, input_ids) -> Tensor``: transformers' DeepseekV4ForCausalLM (fp32, eager, no cache)
* ``dsv4_model(path)``: that model

Every layer kind is present (sliding, CSA, HCA; hash and learned routing), and parameters transformers
initialises to constants (sinks, position biases, norm weights, hyper-connection base / scale) are
randomised, so each of them matters in the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.fixtures import _save_generation_config, _save_tokenizer

VOCAB = 64
CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=5, num_attention_heads=4, head_dim=32,
    q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4, o_groups=2, o_lora_rank=8, index_n_heads=16, index_head_dim=16,
    index_topk=4, sliding_window=8, hc_mult=4, swiglu_limit=1.5, max_position_embeddings=512,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention", "compressed_sparse_attention",
                 "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    partial_rotary_factor=0.25,
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1},
)


def build_dsv4(seed: int = 0, **overrides):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(**{**CONFIG, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.split(".")[-1]
            if any(s in name for s in ("sinks", "position_bias", ".base", "hc_base")) or "norm.weight" in name or "layernorm.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name else 0.0))
            elif last == "scale" or last == "hc_scale":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif last in ("fn", "hc_fn"):
                p.mul_(20)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 3 else 0.05))
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                                                for _ in range(cfg.vocab_size)]))
            else:
                gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.1)
    return model


def _hub_name(name: str) -> str:
    """save_pretrained's name -> DeepSeek's release name."""
    top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "model.hc_head.hc_fn": "hc_head_fn",
           "model.hc_head.hc_base": "hc_head_base", "model.hc_head.hc_scale": "hc_head_scale"}
    return top.get(name, name.removeprefix("model."))


def make_dsv4(path: Path, form: str = "saved", seed: int = 0, **overrides) -> Path:
    path = Path(path)
    model = build_dsv4(seed, **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    if form == "hub":
        (shard,) = sorted(path.glob("*.safetensors"))
        state = load_file(str(shard))
        shard.unlink()
        save_file({_hub_name(k): v for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
        index = path / "model.safetensors.index.json"
        if index.exists():
            index.unlink()
    _save_generation_config(path)
    _save_tokenizer(path, VOCAB)
    return path


def dsv4_model(path: Path):
    from transformers import DeepseekV4ForCausalLM

    return DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def dsv4_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = dsv4_model(path)
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def config_of(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
_BF16_KEPT = ("compressor.wkv", "compressor.wgate", "weights_proj")  # V4 releases keep these in bf16


def _fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 data and one E8M0 (power of two) scale per 128 x 128 block."""
    N, K = w.shape
    pad = torch.zeros(-(-N // 128) * 128, -(-K // 128) * 128)
    pad[:N, :K] = w.float()
    blocks = pad.view(pad.shape[0] // 128, 128, pad.shape[1] // 128, 128)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [N/128, K/128]
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / 448.0)))
    data = (w.float() / scale.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]).to(torch.float8_e4m3fn)
    return data, scale.to(torch.float8_e8m0fnu)


def make_dsv4_quantized(path: Path, seed: int = 0, **overrides) -> Path:
    """The tiny model in DeepSeek's release form and formats: FP8 e4m3 attention / shared MLP (E8M0 128-blocks),
    FP4 e2m1 routed experts (int8 [N, K/2], E8M0 per 32 inputs), `X.scale` beside each."""
    from moesurgery.mxfp4 import quantize

    path = Path(path)
    make_dsv4(path, "hub", seed, **overrides)
    state = load_file(str(path / "model.safetensors"))
    out = {}
    for k, v in state.items():
        if ".ffn.experts." in k and k.endswith(".weight"):
            codes, exps = quantize(v)  # [N, K/32, 16] uint8, [N, K/32] uint8
            out[k], out[k[: -len("weight")] + "scale"] = codes.reshape(v.shape[0], -1).view(torch.int8), exps.view(torch.float8_e8m0fnu)
        elif k.endswith(".weight") and v.dim() == 2 and ".attn." in k or ".shared_experts." in k:
            if any(s in k for s in _BF16_KEPT):
                out[k] = v.to(torch.bfloat16)
                continue
            out[k], out[k[: -len("weight")] + "scale"] = _fp8_blocks(v)
        else:
            out[k] = v
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(quantization_config=dict(QUANTIZATION), expert_dtype="fp4")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
