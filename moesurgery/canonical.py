"""The canonical form every layout reads into and writes from.

A model is embeddings + decoder layers + final norm + lm head. Each layer keeps its attention
tensors untouched (keys relative to `model.layers.{L}.`) and describes its FFN either as a dense
SwiGLU or as an MoE block: router + routed experts + optional shared experts (+ optional gate).
All tensors are `Lazy`: the canonical form of a 100 GB checkpoint costs kilobytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Union

from .lazy import Lazy


def checked_hash_table(t: Lazy, experts: int) -> Lazy:
    """A hash layer's token -> experts table [V, k] that checks, whenever it is read (by the writer, the runtime or
    a surgery), that every entry names one of the layer's `experts`: a bad table is bad input, not a copied one."""
    def load():
        table = t.load()
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= experts):
            from .errors import BadInputError

            bad = int(table.max()) if int(table.max()) >= experts else int(table.min())
            raise BadInputError(f"{t.origin or 'tid2eid'}: a token is routed to expert {bad}, but the layer has {experts} experts")
        return table

    return Lazy(t.shape, t.dtype, load, origin=t.origin)


@dataclass(slots=True)
class SwiGLU:
    """down(silu(gate x) * up x): a dense FFN, one expert, or the (concatenated) shared experts.
    gpt-oss experts carry biases on every projection (and their MoE's Activation says how gate and up combine)."""

    gate: Lazy  # [I, H]
    up: Lazy  # [I, H]
    down: Lazy  # [H, I]
    gate_bias: Lazy | None = None  # [I]
    up_bias: Lazy | None = None  # [I]
    down_bias: Lazy | None = None  # [H]

    @property
    def biased(self) -> bool:
        return self.gate_bias is not None or self.up_bias is not None or self.down_bias is not None

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    @property
    def num_params(self) -> int:
        return self.gate.numel + self.up.numel + self.down.numel


@dataclass(frozen=True)
class Activation:
    """How an expert combines gate and up: silu(gate) * up; gpt-oss's clamped form
    (up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g) with g = gate.clamp(max=limit); or DeepSeek-V4's
    clamped SwiGLU silu(gate.clamp(max=limit)) * up.clamp(-limit, limit) ("clamped")."""

    kind: Literal["silu", "gpt_oss", "clamped"] = "silu"
    alpha: float = 1.702
    limit: float = 7.0


SILU = Activation()


@dataclass
class Router:
    """Which experts a token goes to and with what weight.

    logits = x @ weight.T (+ logit_bias)                   # [T, E]
    s = softmax(logits) | sigmoid(logits) | sqrt(softplus(logits))   # fp32 unless softmax_in_model_dtype
    chosen = top_k(s + bias), restricted to the best `topk_group` of `n_group` groups
             | hash_table[token id]                        # hash-routed layers (DeepSeek-V4): by token, not by score
    w = s[chosen] (/ sum if renormalize) * scaling
    """

    weight: Lazy  # [E, H]
    top_k: int
    scoring: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"
    renormalize: bool = True
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "top2_sum"
    bias: Lazy | None = None  # e_score_correction_bias [E]: selection only, fp32
    softmax_in_model_dtype: bool = False  # deepseek v1, mistral4: logits and softmax in the model dtype
    logits_in_model_dtype: bool = False  # minimax_m2: sigmoid router logits in the model dtype (sigmoid in fp32)
    logit_bias: Lazy | None = None  # [E] added to the logits (gpt-oss's router is a biased linear): selection and weights
    weight_on_input: bool = False  # Llama 4: an expert computes e(w * x), the weight scaling its input, not its output
    hash_table: Lazy | None = None  # [V, k] int: DeepSeek-V4's hash layers pick a token's experts by its id (tid2eid)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def grouped(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group


@dataclass
class MoE:
    router: Router
    experts: list[SwiGLU]
    shared: SwiGLU | None = None  # always-on experts, concatenated along the width
    shared_gate: Lazy | None = None  # [1, H]: output += sigmoid(x @ gate.T) * shared(x)
    act: Activation = SILU  # the routed experts' activation
    shared_act: Activation = SILU  # the shared experts' (DeepSeek-V4 clamps them too)

    @property
    def expert_width(self) -> int:
        return self.experts[0].width

    @property
    def shared_width(self) -> int:
        return self.shared.width if self.shared is not None else 0


FFN = Union[SwiGLU, MoE]


@dataclass
class Arch:
    """Everything but the FFN: embeddings, attention, norms, rope."""

    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None = None  # legacy HF form: {"rope_type": ..., "factor": ...}
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention: Literal["gqa", "mla", "hybrid", "dsv4"] = "gqa"  # hybrid: Qwen3-Next / 3.5 (Gated DeltaNet + gated attention layers)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal[None, "head", "full"] = None
    sliding_window: int | None = None
    mla: dict = field(default_factory=dict)  # q_lora_rank, kv_lora_rank, qk_*_head_dim, v_head_dim... (+ "variant")
    rope_interleave: bool = False  # GQA rotating (x0, x1), (x2, x3)... pairs (ERNIE-4.5), not rotate_half
    indexer: dict | None = None  # DSA lightning indexer: {topk, heads, head_dim, interleave, types: ["full"|"shared"] per layer}
    layer_types: list | None = None  # per layer: "linear_attention" / "full_attention" (hybrid), "sliding_attention" / "full_attention" (gpt-oss)
    linear_attn: dict = field(default_factory=dict)  # hybrid: Gated DeltaNet dims {nk, nv, dk, dv, kernel}
    norm_offset: bool = False  # RMSNorms apply (1 + w), zero-centred (Qwen3-Next / 3.5)
    rope_layers: list | None = None  # Llama 4: per layer True (rope) / False (NoPE); None: every layer rotates
    qk_l2: bool = False  # Llama 4: weightless RMS (L2) norm of q and k per head, after rope, on rope layers
    attn_temperature: tuple | None = None  # Llama 4 NoPE layers: q *= 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))
    attention_chunk: int | None = None  # Llama 4 "chunked_attention" layers: queries see keys of their own chunk only
    sinks: bool = False  # gpt-oss: a learned sink logit per head (self_attn.sinks [h]) in every softmax's denominator
    dsv4: dict = field(default_factory=dict)  # DeepSeek-V4 (attention "dsv4"): hyper-connections, compressed attention... (layouts/deepseek_v4.py)
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)  # token ids etc. copied to the target config

    def describe_attention(self) -> str:
        if self.attention == "dsv4":
            d, types = self.dsv4, self.layer_types or []
            kinds = {t: types.count(t) for t in ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")}
            return (f"DeepSeek-V4: {self.num_heads} query heads x {self.head_dim} on one shared KV head, sinks, window {self.sliding_window}; "
                    f"{kinds['sliding_attention']} sliding, {kinds['compressed_sparse_attention']} CSA (/{d['compress_rates'].get('compressed_sparse_attention')}, "
                    f"indexer top-{d['index_topk']}), {kinds['heavily_compressed_attention']} HCA (/{d['compress_rates'].get('heavily_compressed_attention')}) layers; "
                    f"{d['hc_mult']} hyper-connection streams")
        if self.attention == "hybrid":
            linear = sum(t == "linear_attention" for t in self.layer_types or [])
            return (f"hybrid: {linear} Gated DeltaNet layers ({self.linear_attn.get('nk')}/{self.linear_attn.get('nv')} heads) + "
                    f"{self.num_layers - linear} gated attention layers ({self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}, "
                    f"partial rotary {self.partial_rotary_factor})")
        if self.attention == "mla":
            out = f"MLA ({self.num_heads} heads, kv_lora_rank {self.mla.get('kv_lora_rank')})"
            if self.indexer:
                out += f", sparse attention (DSA indexer, top-{self.indexer['topk']} keys)"
            if self.query_scale:
                out += f", llama-4 query scaling from {self.query_scale[1]} positions"
            return out
        kind = "MHA" if self.num_heads == self.num_kv_heads else "GQA"
        parts = [f"{kind} {self.num_heads}/{self.num_kv_heads} heads x {self.head_dim}"]
        if self.qkv_bias:
            parts.append("qkv bias")
        if self.qk_norm:
            parts.append(f"qk-norm ({self.qk_norm})")
        if self.partial_rotary_factor != 1.0:
            parts.append(f"partial rotary {self.partial_rotary_factor}")
        if self.sliding_window:
            parts.append(f"sliding window {self.sliding_window}")
        if self.rope_interleave:
            parts.append("interleaved rope")
        if self.query_scale:
            parts.append(f"llama-4 query scaling from {self.query_scale[1]} positions")
        return ", ".join(parts)

    @property
    def query_scale(self) -> tuple[float, int] | None:
        """(beta, original positions) of Llama-4's query scaling q * (1 + beta log(1 + floor(pos / orig))),
        as Mistral 4 / Ministral 3 keep it in rope_parameters; None when absent."""
        r = self.rope_scaling or {}
        beta = r.get("llama_4_scaling_beta")
        if not beta:
            return None
        return float(beta), int(r.get("original_max_position_embeddings") or self.max_position_embeddings)


@dataclass(slots=True)
class Layer:
    index: int
    attn: dict[str, Lazy]  # "self_attn.q_proj.weight", "input_layernorm.weight", ... (untouched)
    ffn: FFN


@dataclass
class Model:
    family: str
    arch: Arch
    embed: Lazy  # [V, H]
    norm: Lazy  # [H]
    lm_head: Lazy | None  # [V, H]; None when tied to the embeddings
    layers: list[Layer]
    config: dict  # the source config.json, as read
    extras: dict[str, Lazy] = field(default_factory=dict)  # tensors outside the decoder (e.g. MTP)
    quantization: dict | None = None  # the source's block-scaled fp8 quantization_config (weights read dequantized)
    wrapper: "object | None" = None  # nesting.Wrapper: the multimodal model around this language model, if any
    experts_stored: str = "per_expert"  # how the source stored its experts: per_expert | fused (layouts that write "as_read")
    native: "object | None" = None  # native.NativeForm: the source was in Mistral's format (written back in it by default)
    key_form: "object | None" = None  # keyforms.KeyForm the source's tensors were named in (written back in it, same family)

    def moe_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if isinstance(layer.ffn, MoE)]

    def with_layers(self, layers: list[Layer]) -> "Model":
        return replace(self, layers=layers)


def ffn_params(ffn: FFN) -> tuple[int, int]:
    """(total, active per token) parameters of one FFN, router included."""
    if isinstance(ffn, SwiGLU):
        return ffn.num_params, ffn.num_params
    expert = ffn.experts[0].num_params
    fixed = ffn.router.weight.numel + (ffn.shared.num_params if ffn.shared else 0)
    fixed += ffn.shared_gate.numel if ffn.shared_gate is not None else 0
    return fixed + expert * len(ffn.experts), fixed + expert * ffn.router.top_k


def model_params(model: Model) -> tuple[int, int]:
    """(total, active per token) parameters."""
    total = model.embed.numel + model.norm.numel + (model.lm_head.numel if model.lm_head is not None else 0)
    active = total
    for layer in model.layers:
        attn = sum(t.numel for t in layer.attn.values())
        t, a = ffn_params(layer.ffn)
        total += attn + t
        active += attn + a
    return total, active


def ffn_tensors(prefix: str, ffn: FFN):
    """(name, Lazy) of an FFN's tensors: the source key where the tensor is one, else a path under `prefix`."""
    def named(path: str, t: Lazy):
        return (t.origin or path), t

    if isinstance(ffn, SwiGLU):
        return [named(f"{prefix}{p}", getattr(ffn, p)) for p in ("gate", "up", "down")]
    out = [named(f"{prefix}router", ffn.router.weight)]
    if ffn.router.bias is not None:
        out.append(named(f"{prefix}router.bias", ffn.router.bias))
    for j, e in enumerate(ffn.experts):
        out += ffn_tensors(f"{prefix}experts.{j}.", e)
    if ffn.shared is not None:
        out += ffn_tensors(f"{prefix}shared.", ffn.shared)
    if ffn.shared_gate is not None:
        out.append(named(f"{prefix}shared_gate", ffn.shared_gate))
    return out


def model_tensors(model: Model):
    """(name, Lazy) of every tensor of the model, in checkpoint order."""
    yield "model.embed_tokens.weight", model.embed
    for layer in model.layers:
        prefix = f"model.layers.{layer.index}."
        for k, v in layer.attn.items():
            yield prefix + k, v
        yield from ffn_tensors(prefix + "ffn.", layer.ffn)
    yield "model.norm.weight", model.norm
    if model.lm_head is not None:
        yield "lm_head.weight", model.lm_head
    yield from model.extras.items()
