"""What every layout shares: reading a config + checkpoint into the canonical form and back.

A family module subclasses `Layout`, declares its keys and what its config can express
(capabilities), and writes its own config fields. The generic read/write here covers the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..attention_shapes import attention_shapes
from ..canonical import SILU, Activation, Arch, Layer, Model, MoE, Router, SwiGLU, checked_hash_table
from ..errors import BadInputError
from ..lazy import Lazy, cat, stack
from ..reader import CheckpointReader
from ..writer import PlannedTensor

# Attention keys (relative to model.layers.{L}.) a GQA layout can host.
GQA_ATTN_KEYS = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")),
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PROJ = ("gate", "up", "down")


def need(cfg: dict, key: str, family: str):
    if cfg.get(key) is None:
        raise BadInputError(f"config.json: {family} config has no '{key}'")
    return cfg[key]


def _as_int(key: str, value) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise BadInputError(f"config.json: '{key}' must be an integer, not {value!r}")
    return int(value)


def need_int(cfg: dict, key: str, family: str) -> int:
    return _as_int(key, need(cfg, key, family))


def get_int(cfg: dict, key: str, default: int | None = None) -> int:
    """cfg[key] as an int (default when absent or null); a non-integer is a one-line error naming it."""
    value = cfg.get(key)
    return default if value is None else _as_int(key, value)


def get_float(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"config.json: '{key}' must be a number, not {value!r}")
    return float(value)


def read_rope(cfg: dict, default_theta: float, default_partial: float) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling in legacy form or None, partial_rotary_factor) from either config style."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        params = dict(params)
        theta = get_float(params, "rope_theta", default_theta)
        params.pop("rope_theta")
        partial = get_float(params, "partial_rotary_factor", get_float(cfg, "partial_rotary_factor", default_partial))
        params.pop("partial_rotary_factor", None)
        scaling = params if params.get("rope_type", "default") != "default" else None
        return theta, scaling, partial
    theta = get_float(cfg, "rope_theta", default_theta) or default_theta
    scaling = cfg.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    partial = get_float(cfg, "partial_rotary_factor", default_partial) or default_partial
    return theta, scaling or None, partial


def layer_kinds(types, n: int, kinds: tuple, field: str = "layer_types") -> list:
    """A per-layer list from config.json (`field`), checked: n entries, each one of `kinds`."""
    types = list(types) if isinstance(types, (list, tuple)) else types
    if not isinstance(types, list) or len(types) != n or set(types) - set(kinds):
        raise BadInputError(f"config.json: {field} must list {n} layers of {' / '.join(kinds)}")
    return types


def router_settings(num_experts: int, top_k: int, scoring: str = "softmax", renormalize: bool = True, **settings) -> Router:
    """A config's router settings; its weight is a placeholder that `read_moe` replaces per layer."""
    return Router(Lazy.zeros((num_experts, 1), torch.float32), top_k, scoring, renormalize, **settings)


EXPERT_COUNT_ALIASES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "moe_k")  # names of one field

# ---------------------------------------------------------------- dense / MoE schedules (data)
SPARSE_TYPES = ("sparse", "moe", "hash_moe")  # mlp_layer_types entries that are MoE layers


def moe_schedule(cfg: dict, num_layers: int, kind: str) -> list[bool]:
    """Which layers are MoE, from the fields of schedule `kind`:
      all            every layer (Mixtral, OLMoE, MiniMax-M2, Solar-Open)
      first_k_dense  i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek, GLM-4.5, Kimi)
      layer_types    mlp_layer_types ("dense" / "sparse"), else first_k_dense (DeepSeek-V3.2, GLM-5, Hy3)
      qwen           not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
      ernie          moe_layer_start_index <= i <= moe_layer_end_index and (i + 1) % moe_layer_interval == 0"""
    if kind == "all":
        return [True] * num_layers
    if kind == "layer_types" and cfg.get("mlp_layer_types") is not None:
        types = cfg["mlp_layer_types"]
        if not isinstance(types, list) or len(types) != num_layers:
            raise BadInputError(f"config.json: mlp_layer_types must list {num_layers} layer types (num_hidden_layers)")
        return [t in SPARSE_TYPES for t in types]
    if kind in ("first_k_dense", "layer_types"):
        first = get_int(cfg, "first_k_dense_replace", 0) or 0
        freq = get_int(cfg, "moe_layer_freq", 1) or 1
        return [i >= first and i % freq == 0 for i in range(num_layers)]
    if kind == "qwen":
        step = get_int(cfg, "decoder_sparse_step", 1) or 1
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers for i in only):
            raise BadInputError(f"config.json: mlp_only_layers must list layer indices below {num_layers} (num_hidden_layers), not {only!r}")
        return [i not in only and (i + 1) % step == 0 for i in range(num_layers)]
    if kind == "ernie":
        start = get_int(cfg, "moe_layer_start_index", 0) or 0
        end = get_int(cfg, "moe_layer_end_index", num_layers - 1)
        end = num_layers - 1 if end < 0 else end
        interval = get_int(cfg, "moe_layer_interval", 1) or 1
        return [start <= i <= end and (i + 1) % interval == 0 for i in range(num_layers)]
    raise ValueError(kind)


def schedule_config(kind: str, moe: list[bool]) -> dict:
    """The config fields of schedule `kind` that give the layers `moe` (express() has checked it fits)."""
    dense = [i for i, m in enumerate(moe) if not m]
    if kind == "all":
        return {}
    if kind == "first_k_dense":
        return {"first_k_dense_replace": len(dense), "moe_layer_freq": 1}
    if kind == "layer_types":
        return {"first_k_dense_replace": len(dense), "mlp_layer_types": ["sparse" if m else "dense" for m in moe]}
    if kind == "qwen":
        return {"decoder_sparse_step": 1, "mlp_only_layers": dense}
    if kind == "ernie":
        start = len(dense)
        return {"moe_layer_start_index": start, "moe_layer_end_index": len(moe) - 1, "moe_layer_interval": 1}
    raise ValueError(kind)


def interleave(a: Lazy, b: Lazy) -> Lazy:
    """Rows a_0, b_0, a_1, b_1... of two [n, ...] tensors (gpt-oss's fused gate/up)."""
    shape = (2 * a.shape[0], *a.shape[1:])
    return Lazy(shape, a.dtype, lambda: torch.stack([a.load(), b.load()], dim=1).reshape(shape))


@dataclass
class MoESpec:
    """The MoE fields of a config: one value for all MoE layers."""

    num_experts: int
    top_k: int
    expert_width: int
    shared_width: int
    router: Router  # with a placeholder weight; per layer it is replaced
    act: Activation = SILU  # the routed experts' activation
    shared_act: Activation = SILU  # the shared experts' (DeepSeek-V4: clamped like the routed ones)


class Layout:
    # identity
    name: str = ""
    architecture: str = ""
    # keys (relative to model.layers.{L}.<ffn_prefix>.)
    ffn_prefix: str = "mlp"  # mlp | feed_forward | block_sparse_moe
    router_key: str = "gate.weight"  # gate.weight | router.weight | router.gate.weight
    bias_key: str | None = None  # gate.e_score_correction_bias | e_score_correction_bias | expert_bias | moe_statics...
    bias_row: bool = False  # the bias is stored [1, E] (ERNIE's moe_statics), not [E]
    expert_key: str = "experts.{j}.{proj}_proj.weight"
    expert_proj: dict = {"gate": "gate", "up": "up", "down": "down"}
    fused_keys: tuple = ("experts.gate_up_proj", "experts.down_proj")  # 3-D expert tensors, where stored fused
    fused_transposed: bool = False  # [E, H, 2I] + [E, I, H] (Llama 4, gpt-oss) instead of [E, 2I, H] + [E, H, I]
    gate_up_interleaved: bool = False  # fused gate/up alternate along 2I: gate_0, up_0, gate_1... (gpt-oss), not [gate | up]
    expert_bias_suffix: str | None = None  # fused experts with biases: fused_keys[i] + suffix ([E, 2I], [E, H]; gpt-oss "_bias")
    router_bias_key: str | None = None  # a bias of the router's linear, added to its logits (gpt-oss "router.bias")
    hash_key: str | None = None  # hash-routed layers' token -> experts table (DeepSeek-V4 "gate.tid2eid" [V, k])
    key_forms: tuple = ()  # keyforms.KeyForm: other names the family's checkpoints circulate in (read, and written back in)
    quantized_weights = None  # re.Pattern of the (transformers) names its quantized releases store quantized; None: fp8.LINEAR_WEIGHT
    linear_attn_form: str | None = None  # hybrid layouts: Gated DeltaNet projections "grouped" (Qwen3-Next) or "flat" (Qwen3.5)
    dense_width_key: str = "intermediate_size"  # the config field of the dense layers' width (Llama 4: intermediate_size_mlp)
    weight_on_input: bool = False  # the router's weight scales the expert's input (Llama 4)
    expert_kind: str = "swiglu"  # swiglu, gpt_oss (clamped SwiGLU with biases) or clamped (DeepSeek-V4): what the layout's experts compute
    hub_experts: str = "per_expert"  # how the family's Hub releases store experts (skeletons mimic it)
    experts_on_disk: str = "per_expert"  # how this layout writes experts: per_expert | fused | as_read (the source's form; read: either)
    shared_key: str | None = None  # "shared_expert" | "shared_experts" | "shared_mlp"
    shared_gate_key: str | None = None
    schedule: str = "all"  # which config fields say which layers are MoE (see moe_schedule)
    needs_remote_code: bool = False  # the config points at Hub code (auto_map): not loadable offline
    needs_shared: bool = False  # "no shared expert" must be written as a zero one (vLLM cannot load n_shared_experts = 0)
    writes_head: bool = False  # a tied lm_head is written out, tie_word_embeddings false: the engine's model for the family
    # (vLLM's or llama.cpp's graph) has no tied fallback and would run with an unloaded head
    llama_cpp: str | None = None  # llama.cpp's architecture for this layout (convert_hf_to_gguf), None: not supported
    llama_cpp_renorm: str = "config"  # how llama.cpp weighs top-k: config (norm_topk_prob) | never | always
    aliases: tuple = ()  # other model_type names read as this layout
    # capabilities: what the config can express
    moe: bool = False
    attention: str = "gqa"
    qkv_bias: str = "never"  # never | always | optional | with_o (llama: q,k,v,o together)
    qk_norms: tuple = (None,)  # which qk-norm kinds it can host
    sliding_window: bool = False
    partial_rotary: bool = False
    scorings: tuple = ("softmax",)
    renorm: str = "config"  # always | config | never | config_k>1
    scaling: bool = False
    group_score: str | None = None  # None | max | top2_sum
    has_bias: bool = False
    shared: str | None = None  # None | gated | multiple
    dense_layers: str = "all"  # all (dense model) | none | prefix | any
    softmax_in_model_dtype: bool = False
    logits_in_model_dtype: bool = False
    query_scaling: bool = False  # can hold Llama-4 query scaling (llama_4_scaling_beta in rope_parameters)
    rope_interleave: bool = False  # GQA rope over (x0, x1), (x2, x3)... pairs (ERNIE)
    rope_parameters_style: bool = False  # write rope as transformers 5's rope_parameters (else rope_theta + rope_scaling)
    default_rope_theta: float = 10000.0
    default_attention_bias: bool = False
    default_partial_rotary: float = 1.0

    # ---------------------------------------------------------------- config -> canonical
    def read_arch(self, cfg: dict) -> Arch:
        f = self.name
        hidden = need_int(cfg, "hidden_size", f)
        heads = need_int(cfg, "num_attention_heads", f)
        kv_heads = get_int(cfg, "num_key_value_heads", heads)
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise BadInputError(f"config.json: num_attention_heads ({heads}) is not a positive multiple of num_key_value_heads ({kv_heads})")
        theta, scaling, partial = read_rope(cfg, self.default_rope_theta, self.default_partial_rotary)
        layers = need_int(cfg, "num_hidden_layers", f)
        for key, value in cfg.items():  # per-layer lists (layer_types, mlp_layer_types, ...): transformers refuses other lengths
            if key.endswith("layer_types") and isinstance(value, list) and len(value) != layers:
                raise BadInputError(f"config.json: {key} lists {len(value)} layers, num_hidden_layers is {layers}")
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        extra = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range") if k in cfg}
        return Arch(
            hidden_size=hidden,
            vocab_size=need_int(cfg, "vocab_size", f),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=get_int(cfg, "num_key_value_heads", heads),
            head_dim=(get_int(cfg, "head_dim", 0) or hidden // heads),
            rms_norm_eps=get_float(cfg, "rms_norm_eps", 1e-6),
            max_position_embeddings=get_int(cfg, "max_position_embeddings", 4096),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention=self.attention,
            qkv_bias=self.read_qkv_bias(cfg),
            o_bias=self.qkv_bias == "with_o" and bool(cfg.get("attention_bias", self.default_attention_bias)),
            qk_norm=self.read_qk_norm(cfg),
            sliding_window=self.read_sliding_window(cfg),
            dtype=str(dtype),
            extra=extra,
        )

    def read_qkv_bias(self, cfg: dict) -> bool:
        if self.qkv_bias == "always":
            return True
        if self.qkv_bias in ("optional", "with_o"):
            return bool(cfg.get("attention_bias", self.default_attention_bias))
        return False

    def read_qk_norm(self, cfg: dict):
        return self.qk_norms[0]

    def read_sliding_window(self, cfg: dict) -> int | None:
        return None

    def is_moe_layer(self, cfg: dict, index: int) -> bool:
        return self.moe and moe_schedule(cfg, get_int(cfg, "num_hidden_layers", 0), self.schedule)[index]

    def read_moe_spec(self, cfg: dict) -> MoESpec:
        raise NotImplementedError

    # ---------------------------------------------------------------- checkpoint -> canonical
    def read(self, cfg: dict, reader: CheckpointReader) -> Model:
        arch = self.read_arch(cfg)
        spec = self.read_moe_spec(cfg) if self.moe else None
        claimed: set[str] = set()

        def take(key: str) -> Lazy:
            claimed.add(key)
            return reader.lazy(key)

        embed = take("model.embed_tokens.weight")
        norm = take("model.norm.weight")
        lm_head = None
        if not arch.tie_word_embeddings or "lm_head.weight" in reader:
            if "lm_head.weight" in reader or not arch.tie_word_embeddings:
                lm_head = take("lm_head.weight")
        layers = []
        by_layer: dict[int, list[str]] = {}
        pattern = re.compile(r"model\.layers\.(\d+)\.(.+)")
        for key in reader.keys():
            m = pattern.fullmatch(key)
            if m:
                by_layer.setdefault(int(m.group(1)), []).append(m.group(2))
        mtp = get_int(cfg, "num_nextn_predict_layers", 0) or 0  # DeepSeek-V3 / GLM: layers past the decoder
        beyond = sorted(i for i in by_layer if i >= arch.num_layers + mtp)
        not_mtp = [i for i in by_layer if arch.num_layers <= i < arch.num_layers + mtp and "eh_proj.weight" not in by_layer[i]]
        if not_mtp:  # an MTP layer joins embedding and hidden state (enorm, hnorm, eh_proj); a decoder layer does not
            i = min(not_mtp)
            raise BadInputError(f"checkpoint has tensors for layer {i} (e.g. model.layers.{i}.{by_layer[i][0]}) but config.json says "
                                f"num_hidden_layers = {arch.num_layers}, and layer {i} is no multi-token-prediction layer (no eh_proj)")
        if beyond:
            raise BadInputError(f"checkpoint has tensors for layer {beyond[0]} (e.g. model.layers.{beyond[0]}.{by_layer[beyond[0]][0]}) "
                                f"but config.json says num_hidden_layers = {arch.num_layers}" + (f" (+{mtp} multi-token-prediction)" if mtp else ""))
        for index in range(arch.num_layers):
            prefix = f"model.layers.{index}."
            rels = by_layer.get(index, [])
            if not rels:
                raise BadInputError(f"checkpoint has no tensors for layer {index} (config says {arch.num_layers} layers)")
            attn = {r: take(prefix + r) for r in rels if not r.startswith(self.ffn_prefix + ".") and not r.endswith(IGNORED_SUFFIXES)}
            if self.moe and self.is_moe_layer(cfg, index):
                ffn = self.read_moe(reader, prefix + self.ffn_prefix + ".", spec, take)
            else:
                ffn = self.read_dense(prefix + self.ffn_prefix + ".", take)
            for r in rels:
                if r.startswith(self.ffn_prefix + ".") and prefix + r not in claimed:
                    raise BadInputError(f"unexpected tensor {prefix + r} for a {self.name} {'MoE' if isinstance(ffn, MoE) else 'dense'} layer")
            layers.append(Layer(index, attn, ffn))
        extras = {k: reader.lazy(k) for k in reader.keys() if k not in claimed and not k.endswith(IGNORED_SUFFIXES)}
        fused = any(key.endswith(self.fused_keys[0]) for key in claimed)
        model = Model(self.name, arch, embed, norm, lm_head, layers, dict(cfg), extras, experts_stored="fused" if fused else "per_expert")
        self.validate(model, spec)
        return model

    def read_dense(self, prefix: str, take) -> SwiGLU:
        return SwiGLU(*(take(f"{prefix}{p}_proj.weight") for p in PROJ))

    def read_expert(self, prefix: str, j: int, take) -> SwiGLU:
        return SwiGLU(*(take(prefix + self.expert_key.format(j=j, proj=self.expert_proj[p])) for p in PROJ))

    def read_fused_experts(self, prefix: str, spec: MoESpec, take) -> list[SwiGLU]:
        """Per-expert views of fused 3-D tensors: each expert's gate/up/down is read as its own slice."""
        gate_up, down = (take(prefix + k) for k in self.fused_keys)
        E, I, H = spec.num_experts, spec.expert_width, gate_up.shape[1 if self.fused_transposed else 2]
        want = ((E, H, 2 * I), (E, I, H)) if self.fused_transposed else ((E, 2 * I, H), (E, H, I))
        for t, shape in zip((gate_up, down), want):
            if t.shape != shape:
                raise BadInputError(f"{t.origin}: shape {list(t.shape)}, expected {list(shape)} from config.json")
        biases = None
        if self.expert_bias_suffix:  # [E, 2I] and [E, H]
            biases = [take(prefix + k + self.expert_bias_suffix) for k in self.fused_keys]
            for t, shape in zip(biases, ((E, 2 * I), (E, H))):
                if t.shape != shape:
                    raise BadInputError(f"{t.origin}: shape {list(t.shape)}, expected {list(shape)} from config.json")
        experts = []
        for j in range(E):
            gu, d = gate_up.select(j), down.select(j)
            if self.fused_transposed:  # [H, 2I], [I, H]
                gu, d = gu.t(), d.t()  # [2I, H], [H, I]
            gate, up = (gu.index_select(0, range(0, 2 * I, 2)), gu.index_select(0, range(1, 2 * I, 2))) if self.gate_up_interleaved else (gu[:I], gu[I:])
            expert = SwiGLU(gate, up, d)
            if biases is not None:
                b = biases[0].select(j)
                expert.gate_bias, expert.up_bias = (b.index_select(0, range(0, 2 * I, 2)), b.index_select(0, range(1, 2 * I, 2))) if self.gate_up_interleaved else (b[:I], b[I:])
                expert.down_bias = biases[1].select(j)
            experts.append(expert)
        return experts

    def read_moe(self, reader: CheckpointReader, prefix: str, spec: MoESpec, take) -> MoE:
        router_weight = take(prefix + self.router_key)
        bias = take(prefix + self.bias_key) if self.bias_key and prefix + self.bias_key in reader else None
        if bias is not None and self.bias_row:
            bias = bias.reshape(bias.numel)
        logit_bias = take(prefix + self.router_bias_key) if self.router_bias_key else None
        hashed = take(prefix + self.hash_key) if self.hash_key and prefix + self.hash_key in reader else None
        if hashed is not None:
            hashed = checked_hash_table(hashed, spec.num_experts)
        router = Router(**{**spec.router.__dict__, "weight": router_weight, "bias": bias, "logit_bias": logit_bias, "hash_table": hashed})
        if prefix + self.fused_keys[0] in reader:
            experts = self.read_fused_experts(prefix, spec, take)
        else:
            experts = [self.read_expert(prefix, j, take) for j in range(spec.num_experts)]
        shared = shared_gate = None
        if self.shared_key and spec.shared_width:
            shared = self.read_dense(f"{prefix}{self.shared_key}.", take)
        if self.shared_gate_key and shared is not None:
            shared_gate = take(prefix + self.shared_gate_key)
        return MoE(router, experts, shared, shared_gate, spec.act, spec.shared_act)

    def validate(self, model: Model, spec: MoESpec | None = None) -> None:
        """Shapes agree with the config: errors name the tensor."""
        a = model.arch
        H = a.hidden_size

        def check(t: Lazy, shape: tuple, what: str):
            if t.shape != tuple(shape):
                raise BadInputError(f"{t.origin or what}: shape {list(t.shape)}, expected {list(shape)} from config.json")
            if not t.dtype.is_floating_point:  # quantized forms read as their float values; an integer weight is no weight
                raise BadInputError(f"{t.origin or what}: dtype {str(t.dtype).removeprefix('torch.')}, a weight must be floating point "
                                    "(or a quantized form the config declares)")

        def check_ffn(f: SwiGLU, width: int):
            check(f.gate, (width, H), "gate_proj")
            check(f.up, (width, H), "up_proj")
            check(f.down, (H, width), "down_proj")

        check(model.embed, (a.vocab_size, H), "embeddings")
        check(model.norm, (H,), "model.norm.weight")
        if model.lm_head is not None:
            check(model.lm_head, (a.vocab_size, H), "lm_head.weight")
        dense_width = model.config.get(self.dense_width_key)
        for layer in model.layers:
            for key in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                if key not in layer.attn:
                    raise BadInputError(f"model.layers.{layer.index}.{key} is missing")
                check(layer.attn[key], (H,), f"model.layers.{layer.index}.{key}")
            for key, shape in self.attention_shapes(a, layer.index).items():
                if key not in layer.attn:
                    raise BadInputError(f"model.layers.{layer.index}.{key} is missing")
                check(layer.attn[key], shape, f"model.layers.{layer.index}.{key}")
            if isinstance(layer.ffn, SwiGLU):
                width = dense_width if isinstance(dense_width, int) and not (self.moe and self.dense_layers == "none") else layer.ffn.width
                check_ffn(layer.ffn, width)
                continue
            moe = layer.ffn
            r, E = moe.router, len(moe.experts)
            if not 1 <= r.top_k <= E:
                raise BadInputError(f"config.json: layer {layer.index} routes each token to {r.top_k} experts (top-k) of {E}: top-k must be between 1 and {E}")
            if r.n_group < 1 or E % r.n_group or not 1 <= r.topk_group <= r.n_group:
                raise BadInputError(f"config.json: {E} experts cannot form {r.n_group} groups with {r.topk_group} kept (n_group / topk_group)")
            if not r.scaling > 0:
                raise BadInputError(f"config.json: layer {layer.index} scales its routed experts by {r.scaling}: the routed scaling factor must be positive")
            if r.grouped and r.top_k > r.topk_group * (E // r.n_group):
                raise BadInputError(f"config.json: top-k {r.top_k} is more than the {r.topk_group} kept groups of {E // r.n_group} experts hold")
            check(moe.router.weight, (len(moe.experts), H), "router")
            if moe.router.bias is not None:
                check(moe.router.bias, (len(moe.experts),), "e_score_correction_bias")
            for e in moe.experts:
                check_ffn(e, spec.expert_width if spec else moe.expert_width)
            if moe.shared is not None:
                check_ffn(moe.shared, spec.shared_width if spec and spec.shared_width else moe.shared.width)
            if moe.shared_gate is not None:
                check(moe.shared_gate, (1, H), "shared_expert_gate.weight")

    def attention_shapes(self, a: Arch, index: int) -> dict[str, tuple]:
        """The attention tensors of layer `index` that validate() checks against the config, with their shapes
        (every attention kind: GQA, MLA (+ indexer), DeepSeek-V4, the hybrid layouts' two kinds; the layer norms apart)."""
        shapes = attention_shapes(a, index, self.linear_attn_form)
        return {k: s for k, s in shapes.items() if k not in ("input_layernorm.weight", "post_attention_layernorm.weight")}

    # ---------------------------------------------------------------- canonical -> checkpoint
    def writes_fused(self, model: Model) -> bool:
        return self.experts_on_disk == "fused" or (self.experts_on_disk == "as_read" and model.experts_stored == "fused")

    def tensors(self, model: Model, fused: bool | None = None) -> list[PlannedTensor]:
        """The checkpoint's tensors; experts fused or per expert as the layout writes them (or as `fused` says)."""
        out = [PlannedTensor("model.embed_tokens.weight", model.embed)]
        fused = self.writes_fused(model) if fused is None else fused
        for layer in model.layers:
            prefix = f"model.layers.{layer.index}."
            out += [PlannedTensor(prefix + k, v) for k, v in layer.attn.items()]
            ffn_prefix = prefix + self.ffn_prefix + "."
            if isinstance(layer.ffn, SwiGLU):
                out += self.swiglu_tensors(ffn_prefix, layer.ffn)
            else:
                out += self.moe_tensors(ffn_prefix, layer.ffn, fused)
        out.append(PlannedTensor("model.norm.weight", model.norm))
        if model.lm_head is not None:
            out.append(PlannedTensor("lm_head.weight", model.lm_head))
        elif self.writes_head:  # tied, written out: llama.cpp's graph for this family has no tied fallback
            out.append(PlannedTensor("lm_head.weight", model.embed))
        out += [PlannedTensor(k, v) for k, v in model.extras.items()]
        return out

    def swiglu_tensors(self, prefix: str, ffn: SwiGLU) -> list[PlannedTensor]:
        return [PlannedTensor(f"{prefix}{p}_proj.weight", getattr(ffn, p)) for p in PROJ]

    def moe_tensors(self, prefix: str, moe: MoE, fused: bool = False) -> list[PlannedTensor]:
        out = [PlannedTensor(prefix + self.router_key, moe.router.weight)]
        if self.bias_key and not (self.hash_key and moe.router.hash_table is not None):  # hash-routed layers select by token: no bias
            bias = moe.router.bias or Lazy.zeros((moe.router.num_experts,), torch.float32)
            out.append(PlannedTensor(prefix + self.bias_key, bias.reshape(1, bias.numel) if self.bias_row else bias))
        if self.router_bias_key:
            out.append(PlannedTensor(prefix + self.router_bias_key, moe.router.logit_bias or Lazy.zeros((moe.router.num_experts,), moe.router.weight.dtype)))
        if self.hash_key and moe.router.hash_table is not None:
            out.append(PlannedTensor(prefix + self.hash_key, moe.router.hash_table))
        if fused:  # streamed one expert at a time (lazy.stack parts)
            join = interleave if self.gate_up_interleaved else (lambda a, b: cat([a, b]))
            if self.fused_transposed:
                gate_up = stack([join(e.gate, e.up).t() for e in moe.experts])  # [E, H, 2I]
                down = stack([e.down.t() for e in moe.experts])  # [E, I, H]
            else:
                gate_up = stack([join(e.gate, e.up) for e in moe.experts])  # [E, 2I, H]
                down = stack([e.down for e in moe.experts])  # [E, H, I]
            from ..mxfp4 import fused_form  # a fused tensor whose experts all keep their MXFP4 form is written in it

            gate_up.form = fused_form([[e.gate, e.up] if self.gate_up_interleaved else [cat([e.gate, e.up])] for e in moe.experts])
            down.form = fused_form([[e.down] for e in moe.experts])
            out += [PlannedTensor(prefix + self.fused_keys[0], gate_up), PlannedTensor(prefix + self.fused_keys[1], down)]
            if self.expert_bias_suffix:
                H, I, dtype = moe.experts[0].down.shape[0], moe.expert_width, moe.experts[0].gate.dtype
                zeros = Lazy.zeros((I,), dtype)
                gate_up_bias = stack([join(e.gate_bias or zeros, e.up_bias or zeros) for e in moe.experts])  # [E, 2I]
                down_bias = stack([e.down_bias or Lazy.zeros((H,), dtype) for e in moe.experts])  # [E, H]
                out += [PlannedTensor(prefix + self.fused_keys[0] + self.expert_bias_suffix, gate_up_bias),
                        PlannedTensor(prefix + self.fused_keys[1] + self.expert_bias_suffix, down_bias)]
        else:
            for j, e in enumerate(moe.experts):
                out += [PlannedTensor(prefix + self.expert_key.format(j=j, proj=self.expert_proj[p]), getattr(e, p)) for p in PROJ]
        if moe.shared is not None:
            out += self.swiglu_tensors(f"{prefix}{self.shared_key}.", moe.shared)
        if moe.shared_gate is not None:
            out.append(PlannedTensor(prefix + self.shared_gate_key, moe.shared_gate))
        return out

    # config --------------------------------------------------------------------------------
    def write_config(self, model: Model) -> dict:
        """The target config.json. Same family: the source config with the FFN fields updated (and the
        other names transformers knows them by dropped: a stale `num_local_experts: 8` beside
        `num_experts: 16` makes transformers and llama.cpp refuse the checkpoint)."""
        if model.family == self.name:
            cfg = dict(model.config)
        else:
            cfg = self.base_config(model.arch)
        ffn = self.ffn_config(model)
        for key in EXPERT_COUNT_ALIASES:
            if key not in ffn:
                cfg.pop(key, None)
        cfg.update(ffn)
        if self.writes_head and model.lm_head is None:
            cfg["tie_word_embeddings"] = False
        cfg["architectures"] = [self.architecture]
        cfg["model_type"] = self.name
        return cfg

    def base_config(self, arch: Arch) -> dict:
        cfg = {
            "vocab_size": arch.vocab_size,
            "hidden_size": arch.hidden_size,
            "num_hidden_layers": arch.num_layers,
            "num_attention_heads": arch.num_heads,
            "num_key_value_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": arch.max_position_embeddings,
            "rms_norm_eps": arch.rms_norm_eps,
            "rope_theta": arch.rope_theta,
            "rope_scaling": arch.rope_scaling,
            "tie_word_embeddings": arch.tie_word_embeddings,
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": arch.dtype,
            **arch.extra,
        }
        if self.rope_parameters_style:
            del cfg["rope_theta"], cfg["rope_scaling"]
            cfg["rope_parameters"] = self.rope_parameters(arch)
        cfg.update(self.attention_config(arch))
        return cfg

    def attention_config(self, arch: Arch) -> dict:
        return {}

    @staticmethod
    def rope_parameters(arch: Arch) -> dict:
        """transformers 5's rope_parameters for `arch`."""
        scaling = dict(arch.rope_scaling or {})
        out = {"rope_theta": arch.rope_theta, "rope_type": scaling.pop("rope_type", "default"), **scaling}
        if arch.partial_rotary_factor != 1.0:
            out["partial_rotary_factor"] = arch.partial_rotary_factor
        return out

    def ffn_config(self, model: Model) -> dict:
        dense = [l.ffn for l in model.layers if isinstance(l.ffn, SwiGLU)]
        return {"intermediate_size": dense[0].width} if dense else {}
