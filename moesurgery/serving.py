"""Serving limits, checked when an output is planned (`--dry-run` and every write): what vLLM and
llama.cpp will refuse or compute differently for this checkpoint, each warning naming the engine
and the limit. Measured in the serving tier (tests/serving) and BENCHMARKS.md ("serving").

    serving_warnings(model, layout, quantized, tp=1, ep=1, native=False) -> [str]

`tp` / `ep` (`--serve-tp`, `--serve-ep`): the tensor- and expert-parallel sizes it will be served with.
"""

from __future__ import annotations

from .canonical import Model, MoE

LLAMA_CPP_MAX_EXPERTS = 512  # LLAMA_MAX_EXPERTS: 512 in the 2025 releases, 1024 in llama-cpp-python 0.3.36's llama.cpp
LLAMA_CPP_MAX_EXPERTS_NEW = 1024
FP8_BLOCK = 128  # vLLM's block-FP8 MoE kernels: expert widths per rank in whole 128-blocks
CPU_MOE_ALIGN = 32  # vLLM's CPU MoE fast path: expert widths padded to multiples of 32


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def serving_warnings(model: Model, layout, quantized: bool = False, tp: int = 1, ep: int = 1, native: bool = False) -> list[str]:
    """Warnings for serving `model` written as `layout` with vLLM and llama.cpp (native: in Mistral's format)."""
    out: list[str] = []
    if native:
        out.append("Mistral's format: vLLM reads it (--load-format mistral --config-format mistral --tokenizer-mode mistral); "
                   "transformers and llama.cpp's converter do not: --format hf writes the transformers checkpoint")
        if layout.name == "mixtral":
            out.append("vLLM 0.32: Mixtral in Mistral's format does not load (its params.json reader maps `moe` only with shared "
                       "experts): write it with --format hf")
    moe = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    a = model.arch
    if layout.needs_remote_code:
        out.append(f"transformers / vLLM: {layout.name} needs remote code from the Hub (its config has an auto_map): loading takes trust_remote_code "
                   "and a network (or the code copied locally)")
    if layout.name in ("qwen2_moe", "olmoe", "deepseek") and a.attention == "gqa" and a.head_dim * a.num_heads != a.hidden_size:
        out.append(f"vLLM: its {layout.name} model ignores head_dim ({a.head_dim}) and uses hidden_size / heads "
                   f"({a.hidden_size // a.num_heads}): it loads and computes another function")
    if layout.name == "hy_v3" and (a.qkv_bias or a.o_bias):
        out.append("vLLM: its hy_v3 model has no attention biases and drops these q/k/v/o biases without a word: another function")
    if layout.name == "minimax_m2":
        out.append("vLLM (CPU backend): its MoE router handles softmax only; minimax_m2's sigmoid + bias routing fails to load there (GPU is not affected)")
    if layout.name == "ernie4_5_moe":
        out.append("vLLM (CPU backend): its MoE router ignores ERNIE's selection bias (moe_statics): the same function only if the bias is zero")
    if a.attention == "mla" or a.rope_interleave:
        out.append("vLLM (CPU backend): its custom rotary op gets interleaved (non-neox) rope wrong for multi-head queries; "
                   "run with compilation_config={\"custom_ops\": [\"-rotary_embedding\"]} (the GPU kernels are not affected)")
    if tp > 1:
        if a.num_heads % tp or (a.attention == "gqa" and a.num_kv_heads % tp and tp % a.num_kv_heads):
            out.append(f"vLLM: {a.num_heads} attention heads ({a.num_kv_heads} KV) do not split over --serve-tp {tp}")
    if not moe:
        return out
    first = moe[0]
    E, k, width = len(first.experts), first.router.top_k, first.expert_width
    if layout.llama_cpp:
        if E > LLAMA_CPP_MAX_EXPERTS:
            out.append(f"llama.cpp: {E} experts is more than LLAMA_MAX_EXPERTS = {LLAMA_CPP_MAX_EXPERTS} of its 2025 releases "
                       f"({LLAMA_CPP_MAX_EXPERTS_NEW} in 2026's): older builds refuse the model")
        if not _pow2(E):
            out.append(f"llama.cpp: {E} experts is not a power of two: its CUDA / Metal MoE kernels prefer (some require) one")
        renorm = first.router.renormalize
        if layout.llama_cpp_renorm == "never" and renorm and k < E:
            out.append(f"llama.cpp: its {layout.llama_cpp} graph does not renormalise the top-{k} weights (norm_topk_prob is ignored): "
                       f"it computes another function than transformers and vLLM for this model; glm4_moe, mixtral or deepseek_v2/v3 "
                       "layouts renormalise there")
        if layout.llama_cpp_renorm == "always" and not renorm and k < E:
            out.append(f"llama.cpp: its {layout.llama_cpp} graph always renormalises the top-{k} weights; this model does not")
        if layout.name == "glm4_moe":
            out.append("llama.cpp: convert_hf_to_gguf.py's glm4moe reads GLM's own tokenizer tokens ([gMASK]...): "
                       "a checkpoint with another tokenizer fails to convert (the weights are fine)")
    elif layout.moe:
        out.append(f"llama.cpp: {layout.name} is not checked against llama.cpp (convert_hf_to_gguf may not know it)")
    if quantized and model.quantization and model.quantization.get("quant_method") == "fp8":
        if (width // max(tp, 1)) % FP8_BLOCK or width % max(tp, 1):
            out.append(f"vLLM: block-FP8 MoE needs the expert width per tensor-parallel rank ({width} / {tp}) in whole "
                       f"{FP8_BLOCK}-blocks")
    if width % CPU_MOE_ALIGN:
        out.append(f"vLLM (CPU backend): expert width {width} is padded to a multiple of {CPU_MOE_ALIGN} (slower, same function)")
    if tp > 1 and width % tp:
        out.append(f"vLLM: expert width {width} does not split over --serve-tp {tp}")
    if ep > 1 and E % ep:
        out.append(f"vLLM: {E} experts do not split over --serve-ep {ep} expert-parallel ranks")
    return out
