"""Checkpoints in Mistral's own format: `params.json` + `consolidated*.safetensors`.

Mistral ships Mistral Large 3 (and, beside the transformers files, its older Mistral / Mixtral
releases) in the format of its own inference code: a params.json config and tensors named without the
`model.` prefix (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, `experts.E.w1`, `gate`,
`norm`, `output`), weights optionally FP8 with one scale per tensor (`qscale_weight`).

    params.json  --hf_config-->  the transformers config of the layout computing the same function
                                 (mistral | mixtral | mistral4 (MLA + shared expert: Large 3))
    native names <--RENAMES-->   transformers names; GQA q/k rows permuted: Mistral's rope pairs
                                 (x0, x1), (x2, x3)... are transformers' rotate-half halves (MLA keeps
                                 the pairs: mistral4 rotates interleaved)

The layouts read the transformers names through `NativeView`; a model read this way remembers its
`NativeForm`, and is written back in it (params.json, the native names, rows permuted back, the
vision encoder as stored) unless `--format hf` asks for the transformers checkpoint.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInputError
from .keyforms import RenamedView, rename, table
from .lazy import Lazy

PARAMS = "params.json"
STEM = "consolidated"  # consolidated.safetensors, consolidated-00001-of-00003.safetensors + consolidated.safetensors.index.json
LAYOUTS = ("mistral", "mixtral", "mistral4")  # the transformers layouts Mistral's format can hold
SIDE_FILES = ("tekken.json",)  # Mistral's tokenizer (mistral-common)
# native tensors outside the language model (Pixtral's encoder and adapter): carried as stored
VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.", "vision_tower.")
# activation scales of static FP8: no meaning once the weights are read dequantized
ACT_SCALES = re.compile(r".*(\.qscale_act|_fake_quantizer\.qscale_act)")

# (native, transformers) names; {L} a layer, {E} an expert
RENAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{L}.attention_norm.weight", "model.layers.{L}.input_layernorm.weight"),
    ("layers.{L}.ffn_norm.weight", "model.layers.{L}.post_attention_layernorm.weight"),
    # GQA (Mistral, Mixtral)
    ("layers.{L}.attention.wq.weight", "model.layers.{L}.self_attn.q_proj.weight"),
    ("layers.{L}.attention.wk.weight", "model.layers.{L}.self_attn.k_proj.weight"),
    ("layers.{L}.attention.wv.weight", "model.layers.{L}.self_attn.v_proj.weight"),
    ("layers.{L}.attention.wo.weight", "model.layers.{L}.self_attn.o_proj.weight"),
    # MLA (Large 3)
    ("layers.{L}.attention.wq_a.weight", "model.layers.{L}.self_attn.q_a_proj.weight"),
    ("layers.{L}.attention.q_a_norm.weight", "model.layers.{L}.self_attn.q_a_layernorm.weight"),
    ("layers.{L}.attention.wq_b.weight", "model.layers.{L}.self_attn.q_b_proj.weight"),
    ("layers.{L}.attention.wkv_a_with_mqa.weight", "model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight"),
    ("layers.{L}.attention.kv_a_norm.weight", "model.layers.{L}.self_attn.kv_a_layernorm.weight"),
    ("layers.{L}.attention.wkv_b.weight", "model.layers.{L}.self_attn.kv_b_proj.weight"),
    # dense FFN (Mistral; Large 3's first layers)
    ("layers.{L}.feed_forward.w1.weight", "model.layers.{L}.mlp.gate_proj.weight"),
    ("layers.{L}.feed_forward.w2.weight", "model.layers.{L}.mlp.down_proj.weight"),
    ("layers.{L}.feed_forward.w3.weight", "model.layers.{L}.mlp.up_proj.weight"),
    # Mixtral's MoE, under feed_forward
    ("layers.{L}.feed_forward.gate.weight", "model.layers.{L}.block_sparse_moe.gate.weight"),
    ("layers.{L}.feed_forward.experts.{E}.w1.weight", "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight"),
    ("layers.{L}.feed_forward.experts.{E}.w2.weight", "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight"),
    ("layers.{L}.feed_forward.experts.{E}.w3.weight", "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight"),
    # Large 3's MoE, on the layer (DeepSeek-V3's: router, routed experts, one shared expert)
    ("layers.{L}.gate.weight", "model.layers.{L}.mlp.gate.weight"),
    ("layers.{L}.experts.{E}.w1.weight", "model.layers.{L}.mlp.experts.{E}.gate_proj.weight"),
    ("layers.{L}.experts.{E}.w2.weight", "model.layers.{L}.mlp.experts.{E}.down_proj.weight"),
    ("layers.{L}.experts.{E}.w3.weight", "model.layers.{L}.mlp.experts.{E}.up_proj.weight"),
    ("layers.{L}.shared_experts.w1.weight", "model.layers.{L}.mlp.shared_experts.gate_proj.weight"),
    ("layers.{L}.shared_experts.w2.weight", "model.layers.{L}.mlp.shared_experts.down_proj.weight"),
    ("layers.{L}.shared_experts.w3.weight", "model.layers.{L}.mlp.shared_experts.up_proj.weight"),
)
ROPE_PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}  # GQA rows in pair order on disk

TO_HF, TO_NATIVE = table(RENAMES, 0, 1), table(RENAMES, 1, 0)


def is_native(directory: Path) -> bool:
    """A Mistral-format checkpoint: params.json and no config.json (a repo holding both is read as transformers')."""
    return (directory / PARAMS).is_file() and not (directory / "config.json").is_file()


def read_params(directory: Path) -> dict:
    path = directory / PARAMS
    try:
        params = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise BadInputError(f"{path}: not a JSON object")
    return params


# ---------------------------------------------------------------- params.json <-> transformers config
def _num(params: dict, key: str, kind=int, where: str = PARAMS):
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BadInputError(f"{where}: {key} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    return kind(value)


def hf_config(params: dict) -> dict:
    """The transformers config (mistral, mixtral or mistral4) computing what params.json describes."""
    need = ("dim", "n_layers", "n_heads", "vocab_size", "norm_eps")
    missing = [k for k in need if k not in params]
    if missing:
        raise BadInputError(f"{PARAMS}: no {missing[0]} (not a Mistral params.json)")
    dim, heads = _num(params, "dim"), _num(params, "n_heads")
    cfg = {
        "hidden_size": dim,
        "num_hidden_layers": _num(params, "n_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": _num(params, "n_kv_heads") if "n_kv_heads" in params else heads,
        "head_dim": _num(params, "head_dim") if "head_dim" in params else dim // heads,
        "vocab_size": _num(params, "vocab_size"),
        "rms_norm_eps": _num(params, "norm_eps", float),
        "tie_word_embeddings": bool(params.get("tied_embeddings", False)),
        "max_position_embeddings": int(params.get("max_position_embeddings") or params.get("max_seq_len") or 128_000),
        "hidden_act": params.get("activation", "silu"),
        "torch_dtype": "bfloat16",
    }
    if "hidden_dim" in params:
        cfg["intermediate_size"] = _num(params, "hidden_dim")
    theta = float(params.get("rope_theta", 10000.0))
    moe = params.get("moe") or {}
    if not isinstance(moe, dict):
        raise BadInputError(f"{PARAMS}: moe must be an object, got {moe!r}")
    mla = bool(params.get("qk_nope_head_dim"))
    if mla:
        if not moe or not moe.get("num_shared_experts"):
            raise BadInputError(f"{PARAMS}: an MLA model without shared experts is not a Mistral Large 3 (not supported)")
        return _mistral4(params, cfg, moe, theta)
    if params.get("yarn") or params.get("llama_4_scaling"):
        raise BadInputError(f"{PARAMS}: yarn / llama_4_scaling on a GQA model (Ministral 3) is not supported in Mistral's format")
    window = params.get("sliding_window")
    if isinstance(window, list):
        raise BadInputError(f"{PARAMS}: per-layer sliding windows are not supported")
    cfg.update(rope_theta=theta, sliding_window=window or None)
    if not moe:
        return {**cfg, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    if moe.get("num_shared_experts"):
        raise BadInputError(f"{PARAMS}: shared experts with GQA attention are not a layout Mistral's format describes")
    return {**cfg, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
            "num_local_experts": _num(moe, "num_experts", where=PARAMS + " moe"),
            "num_experts_per_tok": _num(moe, "num_experts_per_tok", where=PARAMS + " moe"),
            "intermediate_size": _num(moe, "expert_hidden_dim", where=PARAMS + " moe") if "expert_hidden_dim" in moe else cfg["intermediate_size"]}


def _mistral4(params: dict, cfg: dict, moe: dict, theta: float) -> dict:
    """Large 3: DeepSeek-V3's MLA and MoE with a softmax router, yarn + Llama-4 query scaling (vLLM's reading of params.json)."""
    m = PARAMS + " moe"
    rope = {"rope_type": "default", "rope_theta": theta}
    yarn = params.get("yarn") or {}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": theta, "factor": float(yarn.get("factor", 1.0)),
                "original_max_position_embeddings": int(yarn.get("original_max_position_embeddings", 4096)),
                "beta_fast": float(yarn.get("beta", 32.0)), "beta_slow": float(yarn.get("alpha", 1.0)), "mscale": 1.0, "mscale_all_dim": 1.0}
        if not yarn.get("apply_scale", True):
            rope["attention_factor"] = 1.0
    l4 = params.get("llama_4_scaling")
    if l4:
        original = int(l4.get("original_max_position_embeddings", rope.get("original_max_position_embeddings", 0)))
        if yarn and original != rope["original_max_position_embeddings"]:
            raise BadInputError(f"{PARAMS}: llama_4_scaling and yarn disagree on original_max_position_embeddings "
                                f"({original} vs {rope['original_max_position_embeddings']}): mistral4 holds one")
        rope.update(llama_4_scaling_beta=float(l4.get("beta", 0.0)), original_max_position_embeddings=original)
    nope, rot = _num(params, "qk_nope_head_dim"), _num(params, "qk_rope_head_dim")
    rope["partial_rotary_factor"] = rot / (nope + rot)
    experts = _num(moe, "num_experts", where=m)
    return {**cfg, "model_type": "mistral4", "architectures": ["Mistral4ForCausalLM"],
            "q_lora_rank": _num(params, "q_lora_rank") if params.get("q_lora_rank") else None,
            "kv_lora_rank": _num(params, "kv_lora_rank"), "qk_nope_head_dim": nope, "qk_rope_head_dim": rot,
            "v_head_dim": _num(params, "v_head_dim"), "head_dim": nope + rot, "rope_interleave": True, "rope_parameters": rope,
            "n_routed_experts": experts, "num_experts_per_tok": _num(moe, "num_experts_per_tok", where=m),
            "moe_intermediate_size": _num(moe, "expert_hidden_dim", where=m), "n_shared_experts": _num(moe, "num_shared_experts", where=m),
            "first_k_dense_replace": int(moe.get("first_k_dense_replace", 0)), "routed_scaling_factor": float(moe.get("routed_scale", 1.0)),
            "n_group": int(moe.get("num_expert_groups", 1) or 1), "topk_group": int(moe.get("num_expert_groups_per_tok", 1) or 1),
            "norm_topk_prob": True}


def params_of(cfg: dict, base: dict | None = None) -> dict:
    """params.json of a transformers config of a LAYOUTS model: the source's params.json (`base`) with every
    field the config decides rewritten, so a same-layout round trip gives the same params."""
    p = copy.deepcopy(base) if base else {}
    kind = cfg["model_type"]
    p.update(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
             n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]), head_dim=cfg.get("head_dim"),
             norm_eps=cfg["rms_norm_eps"], vocab_size=cfg["vocab_size"], tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if kind in ("mistral", "mixtral"):
        p["rope_theta"] = cfg.get("rope_theta", 10000.0 if kind == "mistral" else 1e6)
        if cfg.get("sliding_window"):
            p["sliding_window"] = cfg["sliding_window"]
        else:
            p.pop("sliding_window", None)
    if kind == "mistral":
        p["hidden_dim"] = cfg["intermediate_size"]
        p.pop("moe", None)
    elif kind == "mixtral":
        moe = dict(p.get("moe") or {})
        moe.update(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"])
        p["hidden_dim"] = cfg["intermediate_size"]
        moe.pop("expert_hidden_dim", None)
        p["moe"] = moe
    elif kind == "mistral4":
        if cfg.get("q_lora_rank"):
            p["q_lora_rank"] = cfg["q_lora_rank"]
        else:
            p.pop("q_lora_rank", None)
        p.update(kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"], qk_rope_head_dim=cfg["qk_rope_head_dim"],
                 v_head_dim=cfg["v_head_dim"])
        if "head_dim" not in (base or {}):
            p.pop("head_dim", None)  # MLA's is qk_nope + qk_rope, not a params.json field
        if cfg.get("intermediate_size"):
            p["hidden_dim"] = cfg["intermediate_size"]
        rope = dict(cfg.get("rope_parameters") or {})
        p["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type") == "yarn":
            yarn = dict(p.get("yarn") or {})
            yarn.update(factor=rope["factor"], original_max_position_embeddings=rope["original_max_position_embeddings"],
                        beta=rope.get("beta_fast", 32.0), alpha=rope.get("beta_slow", 1.0))
            if rope.get("attention_factor") == 1.0:
                yarn["apply_scale"] = False
            p["yarn"] = yarn
        if rope.get("llama_4_scaling_beta") is not None:
            l4 = dict(p.get("llama_4_scaling") or {})
            l4.update(beta=rope["llama_4_scaling_beta"], original_max_position_embeddings=rope["original_max_position_embeddings"])
            p["llama_4_scaling"] = l4
        moe = dict(p.get("moe") or {})
        moe.update(num_experts=cfg["n_routed_experts"], num_experts_per_tok=cfg["num_experts_per_tok"], expert_hidden_dim=cfg["moe_intermediate_size"],
                   num_shared_experts=cfg["n_shared_experts"], first_k_dense_replace=cfg.get("first_k_dense_replace", 0),
                   routed_scale=cfg.get("routed_scaling_factor", 1.0), num_expert_groups=cfg.get("n_group", 1) or 1,
                   num_expert_groups_per_tok=cfg.get("topk_group", 1) or 1)
        p["moe"] = moe
    if p.get("head_dim") is None:
        p.pop("head_dim", None)
    if "max_position_embeddings" not in p and "max_seq_len" not in p and cfg.get("max_position_embeddings"):
        p["max_position_embeddings"] = cfg["max_position_embeddings"]
    p.pop("quantization", None)  # written dequantized
    return p


# ---------------------------------------------------------------- rope row order
def pair_to_half(rows: int, head_dim: int) -> torch.Tensor:
    """Row index: transformers' q/k rows (each head: the rotate-half halves) from Mistral's (each head: adjacent pairs)."""
    heads, half = rows // head_dim, head_dim // 2
    h, p, j = torch.meshgrid(torch.arange(heads), torch.arange(2), torch.arange(half), indexing="ij")  # transformers row (h, p, j)
    return (h * head_dim + 2 * j + p).reshape(-1)  # is Mistral's row h, pair j, member p


def _permuted_rows(name: str, cfg: dict) -> torch.Tensor | None:
    """The row order of `name` (a transformers name) between the two formats, for GQA q/k; None: same rows."""
    if cfg.get("model_type") not in ("mistral", "mixtral"):
        return None
    proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
    heads_key = ROPE_PERMUTED.get(proj)
    if heads_key is None or ".self_attn." not in name:
        return None
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return pair_to_half(int(cfg.get(heads_key) or cfg["num_attention_heads"]) * head_dim, head_dim)


class NativeView(RenamedView):
    """A reader over a Mistral-format checkpoint under transformers names (q/k rows in transformers' order)."""

    def __init__(self, reader, cfg: dict):
        self.cfg = cfg
        names: dict[str, str] = {}  # transformers name -> disk name
        self.vision: list[str] = []
        for key in reader.keys():
            if key.startswith(VISION_PREFIXES):
                self.vision.append(key)
            elif not ACT_SCALES.fullmatch(key):
                names[rename(key, TO_HF) or key] = key  # an unknown name stays as it is (the layouts name it)
        super().__init__(reader, names, lambda name: rename(name, TO_NATIVE) or name)

    def lazy(self, name: str) -> Lazy:
        t = self.reader.lazy(self.disk(name))
        rows = _permuted_rows(name, self.cfg)
        return t if rows is None else _rows(t, rows)


def _rows(t: Lazy, index: torch.Tensor) -> Lazy:
    return t.index_select(0, index)


# the linear weights Mistral's FP8 checkpoints quantize (not embeddings, output, router gate, norms)
FP8_WEIGHT = re.compile(r"layers\.\d+\.(attention\.w\w+|feed_forward\.(w[123]|experts\.\d+\.w[123])|experts\.\d+\.w[123]|shared_experts\.w[123])\.weight")


@dataclass
class NativeForm:
    """How a model was stored in Mistral's format: its params.json and the tensors outside the language model."""

    params: dict
    passthrough: dict[str, Lazy] = field(default_factory=dict)  # vision encoder / adapter, as stored

    def tensors(self, planned: list, cfg: dict) -> tuple[list, bool, str | None]:
        """(the planned transformers tensors under their native names (q/k rows back in pair order) plus the
        pass-through, whether they are the source's FP8, a note): FP8 again (data, qscale_weight, qscale_act) when the source was and every linear
        weight is still a slice of one of its FP8 weights (or scaled: the scale absorbs it), else bf16."""
        from .lazy import Fp8Tensor
        from .writer import PlannedTensor

        out = []
        for t in planned:
            name = rename(t.name, TO_NATIVE)
            if name is None:
                raise BadInputError(f"{t.name} has no name in Mistral's format (write with --format hf)")
            rows = _permuted_rows(t.name, cfg)
            out.append(PlannedTensor(name, t.tensor if rows is None else _rows(t.tensor, torch.argsort(rows))))
        note, kept = None, False
        if self.params.get("quantization"):
            lost = [t.name for t in out if FP8_WEIGHT.fullmatch(t.name) and not isinstance(t.tensor.form, Fp8Tensor)]
            if lost:
                more = f" and {len(lost) - 1} more" if len(lost) > 1 else ""
                note = (f"written in bf16 (the per-tensor FP8 source is dequantized): {lost[0]}{more} is not a slice of an FP8 weight "
                        "(GQA q/k rows are permuted back; a computed tensor)")
            else:
                out = [PlannedTensor(n, v) for t in out for n, v in (t.tensor.form.planned(t.name) if FP8_WEIGHT.fullmatch(t.name) else [(t.name, t.tensor)])]
                note, kept = "written as per-tensor FP8 like the source (the same float8 bytes and scales, its quantization)", True
        return out + [PlannedTensor(k, v) for k, v in self.passthrough.items()], kept, note


def open_native(reader, cfg: dict, params: dict) -> tuple[NativeView, NativeForm]:
    view = NativeView(reader, cfg)
    return view, NativeForm(params, {k: reader.stored(k) for k in view.vision})
