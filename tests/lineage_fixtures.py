"""Tiny random checkpoints of the 2025-26 families, built with transformers' own config and model
classes and saved as the Hub holds them; reference logits from the same classes.

* ``make_lineage(family, path, seed=0, **overrides) -> Path``
* ``lineage_logits(path, input_ids) -> Tensor``: transformers' forward (fp32, eager), the wrapper's
  class for nested models (text-only input).

Wrappers: ``mistral3-mistral4`` and ``mistral3-ministral3`` are saved by transformers itself (its
legacy ``language_model.model.*`` prefix, fused Mistral-4 experts); ``kimi_k25`` is written from the
in-memory state dict (``model.language_model.*``, per-expert experts) because transformers'
save_pretrained does not write K2.5's Hub names; ``kimi_k25-legacy`` moves it to the legacy prefix.
``kimi_k2`` is a DeepSeek-V3 checkpoint with Kimi's config.json (model_type kimi_k2 + auto_map).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.fixtures import _reinit_model_, _save_generation_config, _save_tokenizer

VOCAB = 128
MLA = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=256, first_k_dense_replace=1, tie_word_embeddings=False,
)
DSA = dict(index_topk=4, index_n_heads=2, index_head_dim=16)  # prompts of 12 tokens: the indexer prunes
YARN_L4 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4, "beta_fast": 32.0,
           "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}  # scaling on from position 4
GQA = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
           tie_word_embeddings=False)

CONFIGS: dict[str, dict[str, Any]] = {
    "kimi_k2": dict(MLA, model_type="deepseek_v3", n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True),
    "deepseek_v32": dict(MLA, **DSA, model_type="deepseek_v32", n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "glm_moe_dsa": dict(MLA, **DSA, model_type="glm_moe_dsa", n_group=1, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        index_topk_freq=2, index_skip_topk_offset=2),  # indexer_types full, full, shared, full
    "mistral4": dict(MLA, model_type="mistral4", first_k_dense_replace=0, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                     rope_parameters=dict(YARN_L4)),
    "ministral3": dict(GQA, model_type="ministral3", num_hidden_layers=2, intermediate_size=96, rope_parameters=dict(YARN_L4, rope_theta=1e6)),
    "minimax_m2": dict(GQA, model_type="minimax_m2", num_hidden_layers=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                       rotary_dim=8),
    "dots1": dict(GQA, model_type="dots1", num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=2.5, attention_bias=True),
    "hy_v3": dict(GQA, model_type="hy_v3", num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16, num_experts=8,
                  num_experts_per_tok=2, num_shared_experts=1, attention_bias=True),
    "solar_open": dict(GQA, model_type="solar_open", num_hidden_layers=2, moe_intermediate_size=16, n_routed_experts=8,
                       num_experts_per_tok=2, n_shared_experts=1, attention_bias=True),
    "ernie4_5_moe": dict(GQA, model_type="ernie4_5_moe", num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=16,
                         moe_num_experts=8, moe_k=2, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_interval=1),
}
PIXTRAL = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
               patch_size=4, image_size=32, num_channels=3)
KIMI_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=14, pos_emb_height=4,
                   pos_emb_width=4, pos_emb_time=2, merge_kernel_size=[2, 2])
WRAPPERS = ["mistral3-mistral4", "mistral3-ministral3", "kimi_k25", "kimi_k25-legacy"]
LINEAGE = list(CONFIGS) + WRAPPERS
MOE_LINEAGE = [f for f in LINEAGE if f not in ("ministral3", "mistral3-ministral3")]

KIMI_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}


def _text_config(family: str, **overrides):
    from transformers import AutoConfig

    kw = dict(CONFIGS[family])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def _causal_lm_class(model_type: str):
    import transformers

    if model_type == "mistral4":  # AutoModelForCausalLM does not map mistral4
        return transformers.Mistral4ForCausalLM
    return transformers.AutoModelForCausalLM


def build_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised transformers model of `family` (fp32, eager attention)."""
    import transformers

    torch.manual_seed(seed)
    if family.startswith("mistral3-"):
        text = dict(CONFIGS[family.split("-", 1)[1]], **overrides)
        cfg = transformers.Mistral3Config(text_config=text, vision_config=dict(PIXTRAL), image_token_index=5, spatial_merge_size=2,
                                          tie_word_embeddings=False)
        model = transformers.Mistral3ForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    elif family.startswith("kimi_k25"):
        text = dict(CONFIGS["kimi_k2"], **overrides, model_type="kimi_k2")  # K2.5's text config names kimi_k2
        cfg = transformers.Kimi_K25Config(text_config=text, vision_config=dict(KIMI_VISION), projection_hidden_size=32, image_token_id=VOCAB + 1,
                                          video_token_id=VOCAB + 2, vision_start_token_id=VOCAB + 3, vision_end_token_id=VOCAB + 4,
                                          tie_word_embeddings=False)  # placeholders outside the vocabulary: text-only prompts are text
        model = transformers.Kimi_K25ForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    else:
        cfg = _text_config(family, **overrides)
        cls = _causal_lm_class(cfg.model_type)
        build = cls.from_config if cls is transformers.AutoModelForCausalLM else cls._from_config
        model = build(cfg, attn_implementation="eager", dtype=torch.float32)
    _reinit_model_(model, seed)
    return model.eval()


_FUSED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)$")


def _per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory fused experts [E, 2I, H] / [E, H, I] as per-expert Hub tensors."""
    out = {}
    for key, t in state.items():
        m = _FUSED.fullmatch(key)
        if not m:
            out[key] = t
        elif m.group(2) == "gate_up_proj":
            half = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{m.group(1)}.{j}.gate_proj.weight"] = t[j, :half].clone()
                out[f"{m.group(1)}.{j}.up_proj.weight"] = t[j, half:].clone()
        else:
            for j in range(t.shape[0]):
                out[f"{m.group(1)}.{j}.down_proj.weight"] = t[j].clone()
    return out


def make_lineage(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny `family` checkpoint at `path` in the form its Hub releases take."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(family, seed, **overrides)
    if family.startswith("kimi_k25"):
        state = _per_expert({k: v.contiguous() for k, v in model.state_dict().items()})
        if family == "kimi_k25-legacy":
            state = {("language_model.model." + k[len("model.language_model."):] if k.startswith("model.language_model.") else
                      "language_model.lm_head.weight" if k == "lm_head.weight" else k): v for k, v in state.items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg["architectures"] = ["Kimi_K25ForConditionalGeneration"]
        (path / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    else:
        model.save_pretrained(str(path), safe_serialization=True)
    if family == "kimi_k2":  # Kimi's own config.json around DeepSeek-V3 tensors
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], auto_map=dict(KIMI_AUTO_MAP))
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _save_generation_config(path)
    _save_tokenizer(path, VOCAB)
    return path


def load_lineage(path: Path):
    """transformers' model of a lineage checkpoint (fp32, eager), whatever class it needs."""
    import transformers

    cfg = json.loads((Path(path) / "config.json").read_text())
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if cfg["model_type"] == "mistral3":
        model = transformers.Mistral3ForConditionalGeneration.from_pretrained(str(path), **kw)
    elif cfg["model_type"] == "kimi_k25":
        model = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(str(path), **kw)
    elif cfg["model_type"] == "kimi_k2":  # as Moonshot's deploy guide says: read it as deepseek_v3 (transformers maps
        import tempfile                   # its per-expert Hub tensors by model_type, and knows no kimi_k2)

        tmp = Path(tempfile.mkdtemp(prefix="kimi-as-v3-"))
        for f in Path(path).iterdir():
            (tmp / f.name).symlink_to(f.resolve())
        (tmp / "config.json").unlink()
        (tmp / "config.json").write_text(json.dumps({**{k: v for k, v in cfg.items() if k != "auto_map"}, "model_type": "deepseek_v3"}))
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp), **kw)
    else:
        model = _causal_lm_class(cfg["model_type"]).from_pretrained(str(path), **kw)
    return model.eval()


def lineage_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = load_lineage(path)
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


# ------------------------------------------------------------------------------------ INT4
def int4_quantization_config(group: int) -> dict:
    """Kimi K2-Thinking's quantization_config (routed experts INT4, everything else bf16), group `group`."""
    return {
        "config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": ["Linear"],
                                      "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group,
                                                  "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                                                  "symmetric": True, "type": "int"}}},
        "format": "pack-quantized",
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def make_int4(source: Path, path: Path, group: int = 16) -> Path:
    """An INT4 copy of the bf16 checkpoint `source`: its routed experts quantized by compressed-tensors' own
    code (symmetric, per group of `group` inputs), as Kimi K2-Thinking ships; returns `path`."""
    import shutil

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from safetensors.torch import load_file

    path = Path(path)
    shutil.copytree(source, path)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                                                             group_size=group))
    out = {}
    for key, w in load_file(str(Path(source) / "model.safetensors")).items():
        if ".mlp.experts." in key and key.endswith("_proj.weight"):
            w = w.to(torch.bfloat16)
            g = w.unflatten(-1, (w.shape[-1] // group, group))
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights)
            parts = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
            out.update({f"{key[: -len('.weight')]}.{n}": t.contiguous() for n, t in parts.items()})
        else:
            out[key] = w.to(torch.bfloat16) if w.is_floating_point() and "e_score_correction_bias" not in key else w
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(quantization_config=int4_quantization_config(group), torch_dtype="bfloat16", dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
