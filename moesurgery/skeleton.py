"""Checkpoints with the right names and shapes but no data, from a config alone.

`write_skeleton(config, path)` writes config.json and a *sparse* model.safetensors (headers only;
the data region is a hole that takes no disk), so a plan (`--dry-run`) for a 100 GB model can be
made and tested without its weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .canonical import Layer, Model, MoE, SwiGLU
from . import fp8
from .lazy import Fp8, Lazy
from .layouts import layout_for_config
from .reader import SINGLE_NAME
from .writer import _header_bytes, provenance


def _placeholder(shape, dtype) -> Lazy:
    def no_data():
        raise RuntimeError("a skeleton checkpoint has no data")

    return Lazy(shape, dtype, no_data)


def skeleton(config: dict, dtype: torch.dtype = torch.bfloat16) -> Model:
    layout = layout_for_config(config)
    arch = layout.read_arch(config)
    if arch.attention != "gqa":
        raise ValueError("skeletons are built for GQA attention only")
    H, d = arch.hidden_size, arch.head_dim
    block = fp8.block_size(config)  # block-scaled FP8 (config's quantization_config): linear weights carry an FP8 form

    def t(*shape):
        return _placeholder(shape, dtype)

    def w(*shape):  # a linear weight
        if block is None:
            return t(*shape)
        return Lazy(shape, dtype, _placeholder(shape, dtype).load,
                    form=Fp8(_placeholder(shape, torch.float8_e4m3fn), _placeholder(fp8.scale_shape(shape, block), torch.float32), block))

    def swiglu(width):
        return SwiGLU(w(width, H), w(width, H), w(H, width))

    spec = layout.read_moe_spec(config) if layout.moe else None
    layers = []
    for i in range(arch.num_layers):
        attn = {
            "input_layernorm.weight": t(H),
            "post_attention_layernorm.weight": t(H),
            "self_attn.q_proj.weight": w(arch.num_heads * d, H),
            "self_attn.k_proj.weight": w(arch.num_kv_heads * d, H),
            "self_attn.v_proj.weight": w(arch.num_kv_heads * d, H),
            "self_attn.o_proj.weight": w(H, arch.num_heads * d),
        }
        if arch.qkv_bias:
            attn.update({"self_attn.q_proj.bias": t(arch.num_heads * d), "self_attn.k_proj.bias": t(arch.num_kv_heads * d), "self_attn.v_proj.bias": t(arch.num_kv_heads * d)})
        if arch.o_bias:
            attn["self_attn.o_proj.bias"] = t(H)
        if arch.qk_norm == "head":
            attn.update({"self_attn.q_norm.weight": t(d), "self_attn.k_norm.weight": t(d)})
        if spec is not None and layout.is_moe_layer(config, i):
            r = spec.router
            router = type(r)(**{**r.__dict__, "weight": t(spec.num_experts, H), "bias": _placeholder((spec.num_experts,), torch.float32) if layout.has_bias else None})
            shared = swiglu(spec.shared_width) if spec.shared_width else None
            gate = t(1, H) if shared is not None and layout.shared_gate_key else None
            ffn = MoE(router, [swiglu(spec.expert_width) for _ in range(spec.num_experts)], shared, gate)
        else:
            ffn = swiglu(int(config["intermediate_size"]))
        layers.append(Layer(i, attn, ffn))
    lm_head = None if arch.tie_word_embeddings else t(arch.vocab_size, H)
    return Model(layout.name, arch, t(arch.vocab_size, H), t(H), lm_head, layers, dict(config))


def write_skeleton(config: dict, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = skeleton(config, dtype)
    tensors = layout_for_config(config).tensors(model)
    if fp8.block_size(config) is not None:  # stored as the FP8 checkpoint: float8 weights + weight_scale_inv
        tensors, _ = fp8.requantized(tensors, config["quantization_config"])
    header = _header_bytes(tensors, provenance("skeleton", "config"))
    with open(path / SINGLE_NAME, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(p.nbytes for p in tensors))  # a hole: no disk used
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
