"""Tiny random Qwen3-Next / Qwen3.5-MoE checkpoints (Gated DeltaNet + gated attention hybrids), built with
transformers' own classes and saved as the Hub holds them:

* ``qwen3_next``: Qwen3NextForCausalLM.save_pretrained (per-expert experts, fused in_proj_qkvz / in_proj_ba)
* ``qwen3_next-dense``: the same with a dense first layer (mlp_only_layers)
* ``qwen3_next-fused``: experts stored fused ([E, 2I, H] gate_up_proj, [E, H, I] down_proj)
* ``qwen3_5_moe``: the vision-language wrapper (model.language_model.* + model.visual.* + an mtp.* head)
* ``qwen3_5_moe-fused``: the wrapper with fused experts, as the official checkpoints store them
* ``qwen3_5_moe_text``: Qwen3_5MoeForCausalLM.save_pretrained (text-only, model.*)
* ``qwen3_5_moe_text-prefixed``: the same under model.language_model.* (what that class saves after loading the
  wrapper's checkpoint)
* ``qwen3_5_text`` / ``qwen3_5``: dense Qwen3.5, text-only and in its vision-language wrapper

Two chunks of the chunked delta rule are exercised by prompts longer than 64 tokens (``LONG``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.fixtures import _reinit_model_, _save_generation_config, _save_tokenizer
from tests.lineage_fixtures import _per_expert

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
              layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"], rms_norm_eps=1e-6,
              max_position_embeddings=256, tie_word_embeddings=False)
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
              out_hidden_size=64, num_position_embeddings=16, in_channels=3)
HYBRID = ["qwen3_next", "qwen3_next-dense", "qwen3_next-fused", "qwen3_5_moe", "qwen3_5_moe-fused", "qwen3_5_moe_text",
          "qwen3_5_moe_text-prefixed"]
DENSE_HYBRID = ["qwen3_5_text", "qwen3_5"]
MOE_ONLY = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


def build_model(family: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    text = dict(COMMON, **overrides)
    kw = dict(attn_implementation="eager", dtype=torch.float32)
    if family.startswith("qwen3_next"):
        extra = dict(intermediate_size=96, mlp_only_layers=[0] if family == "qwen3_next-dense" else [], norm_topk_prob=True)
        cfg = transformers.Qwen3NextConfig(**{**extra, **text}, rope_parameters=dict(ROPE))
        model = transformers.Qwen3NextForCausalLM._from_config(cfg, **kw)
    elif family in DENSE_HYBRID:
        text = {k: v for k, v in text.items() if k not in MOE_ONLY}
        rope = dict(ROPE, mrope_section=[2, 1, 1], mrope_interleaved=True)
        if family == "qwen3_5_text":
            model = transformers.Qwen3_5ForCausalLM._from_config(transformers.Qwen3_5TextConfig(**text, intermediate_size=96, rope_parameters=rope), **kw)
        else:
            cfg = transformers.Qwen3_5Config(text_config=dict(text, intermediate_size=96, rope_parameters=rope), vision_config=dict(VISION),
                                             image_token_id=VOCAB + 1, video_token_id=VOCAB + 2, vision_start_token_id=VOCAB + 3,
                                             vision_end_token_id=VOCAB + 4, tie_word_embeddings=False)
            model = transformers.Qwen3_5ForConditionalGeneration._from_config(cfg, **kw)
    elif family.startswith("qwen3_5_moe_text"):
        cfg = transformers.Qwen3_5MoeTextConfig(**text, rope_parameters=dict(ROPE, mrope_section=[2, 1, 1], mrope_interleaved=True))
        model = transformers.Qwen3_5MoeForCausalLM._from_config(cfg, **kw)
    else:
        cfg = transformers.Qwen3_5MoeConfig(text_config=dict(text, rope_parameters=dict(ROPE, mrope_section=[2, 1, 1], mrope_interleaved=True)),
                                            vision_config=dict(VISION), image_token_id=VOCAB + 1, video_token_id=VOCAB + 2,
                                            vision_start_token_id=VOCAB + 3, vision_end_token_id=VOCAB + 4, tie_word_embeddings=False)
        model = transformers.Qwen3_5MoeForConditionalGeneration._from_config(cfg, **kw)
    _reinit_model_(model, seed)
    return model.eval()


def make_hybrid(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(family, seed, **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    if family.endswith(("-fused", "-prefixed")):  # rewritten as one file
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        if family.endswith("-fused"):  # the in-memory (fused) experts as stored tensors
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            state["mtp.fc.weight"] = torch.randn(64, 128, generator=torch.Generator().manual_seed(7))  # an MTP head beside the model
        else:
            state = {("model.language_model." + k[6:] if k.startswith("model.") else k): v.contiguous() for k, v in model.state_dict().items()}
            state = _per_expert(state)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    _save_generation_config(path)
    _save_tokenizer(path, VOCAB)
    return path


def load_hybrid(path: Path):
    import transformers

    cfg = json.loads((Path(path) / "config.json").read_text())
    wrappers = {"qwen3_5_moe": transformers.Qwen3_5MoeForConditionalGeneration, "qwen3_5": transformers.Qwen3_5ForConditionalGeneration}
    cls = wrappers.get(cfg["model_type"], transformers.AutoModelForCausalLM)
    return cls.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def hybrid_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hybrid(path)(input_ids=input_ids).logits.float()
