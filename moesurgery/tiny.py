"""Built-in tiny checkpoints (`tiny:mixtral`, `tiny:llama`, ...): random weights made on the fly,
so every command can be tried with no download. Cached under ~/.cache/moesurgery/tiny."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import BadInputError
from .lazy import Lazy
from .writer import PlannedTensor, write_checkpoint

VERSION = 1
BASE = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY = {
    "llama": {**BASE, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "intermediate_size": 256},
    "mixtral": {
        **BASE, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "intermediate_size": 128,
        "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
    },
}


def tiny_names() -> list[str]:
    return sorted(TINY)


def cache_dir() -> Path:
    root = os.environ.get("MOESURGERY_CACHE") or Path.home() / ".cache" / "moesurgery"
    return Path(root) / "tiny"


def _tensors(cfg: dict, seed: int) -> list[PlannedTensor]:
    g = torch.Generator().manual_seed(seed)
    H, V, I = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def rand(*shape, std=0.08):
        return Lazy.of(torch.randn(shape, generator=g) * std)

    def norm():
        return Lazy.of(1.0 + 0.1 * torch.randn(H, generator=g))

    out = [PlannedTensor("model.embed_tokens.weight", rand(V, H, std=0.5))]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        out += [
            PlannedTensor(p + "input_layernorm.weight", norm()),
            PlannedTensor(p + "self_attn.q_proj.weight", rand(q, H)),
            PlannedTensor(p + "self_attn.k_proj.weight", rand(kv, H)),
            PlannedTensor(p + "self_attn.v_proj.weight", rand(kv, H)),
            PlannedTensor(p + "self_attn.o_proj.weight", rand(H, q)),
            PlannedTensor(p + "post_attention_layernorm.weight", norm()),
        ]
        if cfg["model_type"] == "mixtral":
            out.append(PlannedTensor(p + "block_sparse_moe.gate.weight", rand(cfg["num_local_experts"], H, std=0.5)))
            for j in range(cfg["num_local_experts"]):
                e = f"{p}block_sparse_moe.experts.{j}."
                out += [PlannedTensor(e + "w1.weight", rand(I, H)), PlannedTensor(e + "w3.weight", rand(I, H)), PlannedTensor(e + "w2.weight", rand(H, I))]
        else:
            out += [PlannedTensor(f"{p}mlp.{n}_proj.weight", rand(*s)) for n, s in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))]
    out += [PlannedTensor("model.norm.weight", norm()), PlannedTensor("lm_head.weight", rand(V, H))]
    return out


def make_tiny(name: str, path: Path, seed: int = 0) -> Path:
    if name not in TINY:
        raise BadInputError(f"unknown built-in model tiny:{name} (have: {', '.join('tiny:' + n for n in tiny_names())})")
    cfg = TINY[name]
    write_checkpoint(Path(path), _tensors(cfg, seed), cfg, source_name=f"tiny:{name}", command="built-in", overwrite=True)
    return Path(path)


def ensure_tiny(name: str) -> Path:
    """The cached built-in checkpoint `tiny:name`, made if missing."""
    path = cache_dir() / f"{name}-v{VERSION}"
    if not (path / "config.json").exists():
        make_tiny(name, path)
    return path
