"""Checkpoints with the right names and shapes but no data, from a config alone.

`write_skeleton(config, path)` writes config.json and a *sparse* model.safetensors (headers only;
the data region is a hole that takes no disk), so a plan (`--dry-run`) for a 1T-parameter model can
be made and tested without its weights. Every layout's tensors come from its own writer; the
skeleton supplies the shapes: GQA or MLA attention (with the sparse-attention indexer), dense and
MoE FFNs, FP8 (block scales) or INT4 (packed words + group scales) where the config says so, and a
multimodal wrapper (the language model under its prefix, a placeholder vision tower beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import fp8, int4, nesting
from .attention_shapes import attention_shapes
from .canonical import Layer, Model, MoE, SwiGLU
from .lazy import Fp8, Lazy
from .layouts import layout_for_config
from .reader import SINGLE_NAME
from .writer import PlannedTensor, _header_bytes, provenance


def _placeholder(shape, dtype) -> Lazy:
    def no_data():
        raise RuntimeError("a skeleton checkpoint has no data")

    return Lazy(shape, dtype, no_data)


def mxfp4_forms(experts: list[SwiGLU], I: int, H: int) -> None:
    """Give every expert the MXFP4 forms of gpt-oss's stored gate_up_proj [E, 2I, H/32, 16] (gate / up rows
    interleaved) and down_proj [E, H, I/32, 16] (placeholders: a skeleton has no data)."""
    from .mxfp4 import GROUP, Mxfp4

    E = len(experts)

    def stored(shape):
        return lambda: _placeholder(shape, torch.uint8)

    gu = (stored((E, 2 * I, H // GROUP, GROUP // 2)), stored((E, 2 * I, H // GROUP)))
    dn = (stored((E, H, I // GROUP, GROUP // 2)), stored((E, H, I // GROUP)))
    for j, e in enumerate(experts):
        e.gate.form = Mxfp4(*gu, j, range(0, 2 * I, 2), (0, H // GROUP), transposed=False)
        e.up.form = Mxfp4(*gu, j, range(1, 2 * I, 2), (0, H // GROUP), transposed=False)
        e.down.form = Mxfp4(*dn, j, range(H), (0, I // GROUP), transposed=False)


def skeleton(config: dict, dtype: torch.dtype = torch.bfloat16) -> Model:
    """The weightless canonical model of `config` (a wrapper config reads its text_config)."""
    text = nesting.unwrap_config(config)[0] if nesting.text_config_of(config) else config
    quant = text.get("quantization_config")
    block = fp8.block_size(text) if quant and quant.get("quant_method") == "fp8" else None
    group = int4.group_size(text)
    text = fp8.unquantized_config(text) if quant else text
    layout = layout_for_config(text)
    arch = layout.read_arch(text)
    H = arch.hidden_size

    def t(*shape):
        return _placeholder(shape, dtype)

    pattern = layout.quantized_weights
    fp4 = (quant or {}).get("expert_dtype", text.get("expert_dtype")) == "fp4" if quant else False

    def w(*shape, name: str | None = None, expert: bool = False):  # a linear weight: with the stored form a quantized checkpoint gives it
        out = t(*shape)
        if pattern is not None and name is not None and not pattern.fullmatch(name):  # the layout's releases keep this one unquantized
            return out
        if expert and fp4:  # DeepSeek-V4: FP4 e2m1 rows, E8M0 per 32 inputs
            from .lazy import Fp4

            out.form = Fp4((lambda: _placeholder((shape[0], shape[1] // 2), torch.int8), lambda: _placeholder((shape[0], shape[1] // 32), torch.float8_e8m0fnu)),
                           None, 1.0, shape, (torch.int8, torch.float8_e8m0fnu))
        elif block is not None:
            scale_dtype = torch.float8_e8m0fnu if (quant or {}).get("scale_fmt") == "ue8m0" else torch.float32
            out.form = Fp8.stored(lambda: _placeholder(shape, torch.float8_e4m3fn), lambda: _placeholder(fp8.scale_shape(shape, block), scale_dtype),
                                  block, shape, (torch.float8_e4m3fn, scale_dtype))
        elif group is not None and shape[1] % group == 0:
            out.form = int4.Int4(lambda: _placeholder((shape[0], -(-shape[1] // int4.PACK)), torch.int32),
                                 lambda: _placeholder((shape[0], shape[1] // group), dtype), group, shape=shape, dtypes=(torch.int32, dtype))
        return out

    def swiglu(width, prefix: str | None = None, expert: bool = False):
        name = (lambda p: f"{prefix}{p}_proj.weight") if prefix else (lambda p: None)
        return SwiGLU(w(width, H, name=name("gate"), expert=expert), w(width, H, name=name("up"), expert=expert), w(H, width, name=name("down"), expert=expert))

    spec = layout.read_moe_spec(text) if layout.moe else None
    layers = []
    for i in range(arch.num_layers):
        attn = {k: (w(*s, name=f"model.layers.{i}.{k}") if len(s) == 2 and not k.endswith("_hc.fn") else t(*s))
                for k, s in attention_shapes(arch, i, layout.linear_attn_form).items()}
        if spec is not None and layout.is_moe_layer(text, i):
            r = spec.router
            mlp = f"model.layers.{i}.{layout.ffn_prefix}."
            hashed = arch.dsv4.get("mlp_layer_types", [None] * arch.num_layers)[i] == "hash_moe"
            router = type(r)(**{**r.__dict__, "weight": t(spec.num_experts, H),
                                "bias": _placeholder((spec.num_experts,), torch.float32) if layout.has_bias and not hashed else None,
                                "hash_table": _placeholder((arch.vocab_size, spec.top_k), torch.int64) if hashed else None})
            shared = swiglu(spec.shared_width, f"{mlp}{layout.shared_key}.") if spec.shared_width else None
            gate = t(1, H) if shared is not None and layout.shared_gate_key else None
            experts = [swiglu(spec.expert_width, f"{mlp}experts.{j}.", expert=True) for j in range(spec.num_experts)]
            if quant and quant.get("quant_method") == "mxfp4":  # the release's fused MXFP4 experts (gpt-oss)
                mxfp4_forms(experts, spec.expert_width, H)
            ffn = MoE(router, experts, shared, gate, spec.act, spec.shared_act)
        else:
            ffn = swiglu(int(text[layout.dense_width_key]))
        layers.append(Layer(i, attn, ffn))
    lm_head = None if arch.tie_word_embeddings else t(arch.vocab_size, H)
    extras = {}
    if arch.attention == "dsv4":  # the final hyper-connection collapse
        N = arch.dsv4["hc_mult"]
        extras = {"model.hc_head.hc_fn": t(N, N * H), "model.hc_head.hc_base": t(N), "model.hc_head.hc_scale": t(1)}
    return Model(layout.name, arch, t(arch.vocab_size, H), t(H), lm_head, layers, dict(text), extras=extras, quantization=quant,
                 experts_stored=layout.hub_experts, key_form=layout.key_forms[0] if layout.key_forms else None)


def write_native_skeleton(params: dict, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A skeleton in Mistral's format from its params.json: consolidated.safetensors (native names, per-tensor FP8
    where params.json says so, a placeholder vision encoder where it has one) and params.json."""
    from . import native

    cfg = native.hf_config(params)
    model = skeleton(cfg, dtype)
    tensors, _, _ = native.NativeForm({}).tensors(layout_for_config(cfg).tensors(model, fused=False), cfg)
    if params.get("quantization"):  # float8 weights, one scale per tensor
        out = []
        for p in tensors:
            if len(p.tensor.shape) == 2 and not p.name.endswith(("gate.weight", "tok_embeddings.weight", "output.weight")):
                base = p.name[: -len("weight")]
                out += [PlannedTensor(p.name, _placeholder(p.tensor.shape, torch.float8_e4m3fn)), PlannedTensor(base + "qscale_weight", _placeholder((), torch.float32)),
                        PlannedTensor(base + "qscale_act", _placeholder((), torch.float32))]
            else:
                out.append(p)
        tensors = out
    if params.get("vision_encoder"):
        tensors.append(PlannedTensor("vision_encoder.patch_conv.weight", _placeholder((params["vision_encoder"].get("hidden_size", 1024), 3, 14, 14), dtype)))
    header = _header_bytes(tensors, provenance("skeleton", "params"))
    with open(path / f"{native.STEM}.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(p.nbytes for p in tensors))
    (path / native.PARAMS).write_text(json.dumps(params, indent=2))
    return path


def write_skeleton(config: dict, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """config.json (or a Mistral params.json: the skeleton is then in Mistral's format) -> a weightless checkpoint at `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if "dim" in config and "n_layers" in config:
        return write_native_skeleton(config, path, dtype)
    model = skeleton(config, dtype)
    text = nesting.unwrap_config(config)[0] if nesting.text_config_of(config) else config
    tensors = layout_for_config(text).tensors(model)
    if nesting.text_config_of(config):  # the language model under the wrapper's prefix, a placeholder vision tower beside it
        prefix = "language_model.model."
        tensors = [PlannedTensor("language_model.lm_head.weight" if p.name == "lm_head.weight" else prefix + p.name[len("model."):], p.tensor)
                   for p in tensors]
        vision = (config.get("vision_config") or {}).get("hidden_size", 1024)
        tensors.append(PlannedTensor("vision_tower.patch_embed.proj.weight", _placeholder((vision, 3, 14, 14), dtype)))
    if model.quantization:  # stored as the quantized checkpoint: FP8 + weight_scale_inv, or INT4 packed + scales
        tensors, _ = fp8.requantized(tensors, model.quantization, layout_for_config(text).quantized_weights)
    if model.key_form is not None:  # the family's release names (DeepSeek-V4's own)
        tensors = model.key_form.to_disk(tensors)
    header = _header_bytes(tensors, provenance("skeleton", "config"))
    with open(path / SINGLE_NAME, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(p.nbytes for p in tensors))  # a hole: no disk used
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
