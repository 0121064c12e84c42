"""Tiny random Llama 4 checkpoints (transformers' Llama4TextConfig / Llama4ForCausalLM and the llama4 wrapper),
saved as transformers saves them. MoE every other layer (interleave_moe_layer_step 2), top-1 (and a top-2
variant), llama3 rope, NoPE every 4th layer with temperature tuning from position 2 (floor_scale 3), chunks of 4
on rope layers: 12-token prompts exercise all of them."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.fixtures import _reinit_model_, _save_generation_config, _save_tokenizer

VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
            max_position_embeddings=256, attention_chunk_size=4, floor_scale=3, attn_scale=0.1, attn_temperature_tuning=True,
            use_qk_norm=True, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8})
VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
              pixel_shuffle_ratio=0.5, projector_input_dim=64, projector_output_dim=64, vision_output_dim=64, rope_theta=10000)
LLAMA4 = ["llama4_text", "llama4_text-top2", "llama4"]


def build_model(family: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    text = dict(TEXT, **overrides)
    if family == "llama4_text-top2":
        text.update(num_experts_per_tok=2, interleave_moe_layer_step=1)
    kw = dict(attn_implementation="eager", dtype=torch.float32)
    if family == "llama4":
        cfg = transformers.Llama4Config(text_config=text, vision_config=dict(VISION), boi_token_index=VOCAB + 1, eoi_token_index=VOCAB + 2,
                                        image_token_index=VOCAB + 3, tie_word_embeddings=False)
        model = transformers.Llama4ForConditionalGeneration._from_config(cfg, **kw)
    else:
        model = transformers.Llama4ForCausalLM._from_config(transformers.Llama4TextConfig(**text), **kw)
    _reinit_model_(model, seed)
    return model.eval()


def make_llama4(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    build_model(family, seed, **overrides).save_pretrained(str(path), safe_serialization=True)
    _save_generation_config(path)
    _save_tokenizer(path, VOCAB)
    return path


def llama4_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' Llama4ForCausalLM (for the wrapper too: AutoModelForCausalLM reads its language model; the
    wrapper's own forward is broken in transformers 5.24)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()
