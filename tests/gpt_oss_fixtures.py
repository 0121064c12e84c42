"""Tiny random gpt-oss checkpoints, built with transformers' GptOssConfig / GptOssForCausalLM and saved as
transformers saves them (fused transposed experts, gate/up interleaved, biases, sinks); random sinks and
biases, and layer 0's gate/up scaled so the ±swiglu_limit clamp acts on part of the pre-activations.
A sliding window of 4 makes the sliding layers differ from the full ones on 12-token prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.fixtures import _save_generation_config, _save_tokenizer

VOCAB = 128
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=4, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def build_model(seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(**{**CONFIG, **overrides})
    model = transformers.GptOssForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        model.model.layers[0].mlp.experts.gate_up_proj.mul_(6.0)  # past the clamp
    return model.eval()


def make_gpt_oss(path: Path, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    build_model(seed, **overrides).save_pretrained(str(path), safe_serialization=True)
    _save_generation_config(path)
    _save_tokenizer(path, VOCAB)
    return path


def gpt_oss_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                                              experts_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def make_gpt_oss_mxfp4(path: Path, seed: int = 0) -> Path:
    """The release's form: experts MXFP4 (`*_blocks` + `*_scales`), everything else bf16, its quantization_config."""
    import json

    from safetensors.torch import save_file

    from moesurgery import mxfp4

    path = Path(path)
    model = build_model(seed)
    model.save_pretrained(str(path), safe_serialization=True)
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[k + mxfp4.BLOCKS], state[k + mxfp4.SCALES] = mxfp4.quantize(v.transpose(1, 2))  # [E, in, out] -> stored [E, out, in]
        else:
            state[k] = v.to(torch.bfloat16).contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    _save_generation_config(path)
    _save_tokenizer(path, VOCAB)
    return path
