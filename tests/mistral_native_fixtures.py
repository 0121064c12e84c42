"""Tiny checkpoints in Mistral's own format (params.json + consolidated.safetensors), written from
transformers models by this fixture's own inverse of vLLM's `mistral` load format (the key map and
the q/k row permutation are written out here again, independently of moesurgery/native.py).

* ``make_native(kind, root, seed=0, fp8=False, vision=False, **config_overrides) -> (native_dir, hf_dir)``: kind is
  ``mistral`` (dense GQA), ``mixtral`` (MoE GQA) or ``large3`` (Mistral Large 3: MLA, a shared expert,
  a dense first layer, yarn + Llama-4 query scaling: transformers' ``mistral4``). ``hf_dir`` holds the
  same model saved by transformers (with fp8: the dequantized weights), the reference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.fixtures import make_checkpoint
from tests.lineage_fixtures import _per_expert, build_model

# transformers name -> Mistral's (vLLM's MistralForCausalLM / MistralLarge3ForCausalLM mappings, reversed)
_HF_TO_NATIVE = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.weight", r"layers.\1.attention.wq_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_layernorm\.weight", r"layers.\1.attention.q_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.weight", r"layers.\1.attention.wq_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.weight", r"layers.\1.attention.wkv_a_with_mqa.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_layernorm\.weight", r"layers.\1.attention.kv_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight", r"layers.\1.attention.wkv_b.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", None),  # dense: w1 / w3 / w2
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.feed_forward.gate.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", r"layers.\1.feed_forward.experts.\2.\3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"layers.\1.gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", "experts"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", "shared_experts"),
]
_W = {"gate": "w1", "down": "w2", "up": "w3"}
VISION = {  # a stand-in Pixtral encoder: carried, never interpreted
    "vision_encoder.patch_conv.weight": (8, 3, 4, 4),
    "vision_encoder.transformer.layers.0.attention.wq.weight": (8, 8),
    "vision_language_adapter.w_in.weight": (16, 8),
    "patch_merger.merging_layer.weight": (8, 32),
}


def _native_name(name: str) -> str:
    for pattern, target in _HF_TO_NATIVE:
        m = re.fullmatch(pattern, name)
        if m is None:
            continue
        if target is None:
            return f"layers.{m.group(1)}.feed_forward.{_W[m.group(2)]}.weight"
        if target == "experts":
            return f"layers.{m.group(1)}.experts.{m.group(2)}.{_W[m.group(3)]}.weight"
        if target == "shared_experts":
            return f"layers.{m.group(1)}.shared_experts.{_W[m.group(2)]}.weight"
        return m.expand(target)
    raise KeyError(name)


def _to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half rows -> Meta's adjacent pairs (the inverse of vLLM's `permute`)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().max() / 448.0).clamp(min=1e-12).float()
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def _params(cfg: dict, kind: str) -> dict:
    p = {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "n_heads": cfg["num_attention_heads"],
         "n_kv_heads": cfg["num_key_value_heads"], "norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"],
         "tied_embeddings": cfg["tie_word_embeddings"], "max_position_embeddings": cfg["max_position_embeddings"]}
    if kind in ("mistral", "mixtral"):
        p.update(head_dim=cfg["head_dim"], hidden_dim=cfg["intermediate_size"], rope_theta=cfg["rope_parameters"]["rope_theta"])
        if kind == "mixtral":
            p["moe"] = {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]}
        return p
    rope = cfg["rope_parameters"]
    p.update(hidden_dim=cfg["intermediate_size"], q_lora_rank=cfg["q_lora_rank"], kv_lora_rank=cfg["kv_lora_rank"],
             qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
             rope_theta=rope["rope_theta"],
             yarn={"factor": rope["factor"], "original_max_position_embeddings": rope["original_max_position_embeddings"],
                   "beta": rope["beta_fast"], "alpha": rope["beta_slow"]},
             llama_4_scaling={"original_max_position_embeddings": rope["original_max_position_embeddings"], "beta": rope["llama_4_scaling_beta"]},
             moe={"num_experts": cfg["n_routed_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"],
                  "expert_hidden_dim": cfg["moe_intermediate_size"], "num_shared_experts": cfg["n_shared_experts"],
                  "first_k_dense_replace": cfg["first_k_dense_replace"], "routed_scale": cfg["routed_scaling_factor"],
                  "num_expert_groups": cfg["n_group"], "num_expert_groups_per_tok": cfg["topk_group"], "route_every_n": 1})
    return p


def _hf_model(kind: str, hf_dir: Path, seed: int, **overrides):
    import transformers

    if kind == "large3":
        model = build_model("mistral4", seed, **{"first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, **overrides})
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        return model
    make_checkpoint(kind, hf_dir, seed=seed, **({"sliding_window": None} if kind == "mistral" else {}), **overrides)
    return transformers.AutoConfig.from_pretrained(str(hf_dir)) and transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir))


def make_native(kind: str, root: Path, seed: int = 0, fp8: bool = False, vision: bool = False, **overrides) -> tuple[Path, Path]:
    from safetensors.torch import load_file

    root = Path(root)
    native, hf = root / f"{kind}-native", root / f"{kind}-hf"
    native.mkdir(parents=True, exist_ok=True)
    cfg = _hf_model(kind, hf, seed, **overrides).config.to_dict()
    disk = load_file(str(hf / "model.safetensors"))  # the Hub names transformers saves
    state = _per_expert(disk)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        out = _native_name(name)
        proj = name.split(".")[-2]
        if kind != "large3" and proj in heads:
            w = _to_pairs(w, heads[proj])
        if fp8 and w.dim() == 2 and "embed" not in name and "lm_head" not in name and not name.endswith("gate.weight"):
            w8, scale = _fp8(w)
            tensors[out], tensors[out[: -len("weight")] + "qscale_weight"] = w8, scale
            tensors[out[: -len("weight")] + "qscale_act"] = torch.tensor(1.0)
            deq = (w8.float() * scale).to(torch.bfloat16).float()  # bf16, as moesurgery reads it
            dequantized[name] = deq if not (kind != "large3" and proj in heads) else _from_pairs(deq, heads[proj])
        else:
            tensors[out] = w
    params = _params(cfg, kind)
    if fp8:
        params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    if vision:
        g = torch.Generator().manual_seed(7)
        tensors.update({k: torch.randn(shape, generator=g) for k, shape in VISION.items()})
        params["vision_encoder"] = {"hidden_size": 8, "num_channels": 3, "image_size": 16, "patch_size": 4, "num_hidden_layers": 1}
    save_file(tensors, str(native / "consolidated.safetensors"), metadata={"format": "pt"})
    (native / "params.json").write_text(json.dumps(params, indent=2))
    (native / "tekken.json").write_text(json.dumps({"config": {"pattern": "stand-in"}, "vocab": []}))
    if dequantized:  # the reference computes with the weights the FP8 encodes (fused experts fused again)
        ref = {k: dequantized.get(k, v) for k, v in disk.items()}
        for key in disk:
            m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", key)
            if m is None:
                continue
            E = disk[key].shape[0]
            if m.group(2) == "gate_up_proj":
                ref[key] = torch.stack([torch.cat([dequantized[f"{m.group(1)}.{e}.gate_proj.weight"], dequantized[f"{m.group(1)}.{e}.up_proj.weight"]])
                                        for e in range(E)]).to(disk[key].dtype)
            else:
                ref[key] = torch.stack([dequantized[f"{m.group(1)}.{e}.down_proj.weight"] for e in range(E)]).to(disk[key].dtype)
        save_file(ref, str(hf / "model.safetensors"), metadata={"format": "pt"})
    return native, hf


def _from_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_logits(hf_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    import transformers

    from tests.lineage_fixtures import lineage_logits

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    if cfg["model_type"] == "mistral4":
        return lineage_logits(hf_dir, input_ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
