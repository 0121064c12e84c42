"""Forward pass of any canonical Model, streaming one decoder layer at a time.

Each layer's tensors are read from the checkpoint, used and freed, so memory is one layer plus
activations: a model larger than memory runs. Pure torch, no transformers.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..canonical import FFN, SILU, Layer, Model, SwiGLU, checked_hash_table
from ..lazy import Lazy
from .attention import gqa_attention, rms_norm
from .cpu_gemv import linear
from .moe import MoEWeights, SwiGLUWeights, moe_forward
from .rope import cos_sin, rope_params

FFNWeights = SwiGLUWeights | MoEWeights
SHAPE_ERROR = re.compile(r"shape '\[.*\]' is invalid|cannot be multiplied|must match the size|size of tensor a .* must match")


@contextlib.contextmanager
def tensors_fit_config(index: int):
    """A layer whose tensors cannot compute together is bad input, named, not a crash. `validate` checks every
    attention tensor's shape against the config (attention_shapes.py) when the model is read; this is the fallback
    for what shapes alone do not catch (a shape error from torch, recognised by its message)."""
    try:
        yield
    except RuntimeError as e:
        if not SHAPE_ERROR.search(str(e)):
            raise
        from ..errors import BadInputError

        raise BadInputError(f"model.layers.{index}: its attention tensors do not fit config.json's dimensions ({str(e).splitlines()[0]})") from None


@dataclass
class LoadedLayer:
    index: int
    attn: dict[str, torch.Tensor]
    ffn: FFNWeights


def _load(t: Lazy, device, dtype) -> torch.Tensor:
    return t.load().to(device=device, dtype=dtype)


def load_swiglu(f: SwiGLU, device, dtype, act=SILU) -> SwiGLUWeights:
    return SwiGLUWeights(_load(f.gate, device, dtype), _load(f.up, device, dtype), _load(f.down, device, dtype), act)


def load_ffn(ffn: FFN, device="cpu", dtype=torch.float32) -> FFNWeights:
    if isinstance(ffn, SwiGLU):
        return load_swiglu(ffn, device, dtype)
    E, (I, H) = len(ffn.experts), ffn.experts[0].gate.shape
    gate_up = torch.empty(E, 2 * I, H, device=device, dtype=dtype)  # [E, 2I, H]: gate rows, then up rows
    down = torch.empty(E, H, I, device=device, dtype=dtype)  # [E, H, I]
    for e, expert in enumerate(ffn.experts):  # copy_ casts in place: no per-expert temporaries
        gate_up[e, :I].copy_(expert.gate.load())
        gate_up[e, I:].copy_(expert.up.load())
        down[e].copy_(expert.down.load())
    r = ffn.router
    biased = ffn.experts[0].biased
    zeros_i = Lazy.zeros((I,), torch.float32)

    def stacked(parts) -> torch.Tensor:
        return torch.stack([_load(p, device, dtype) for p in parts])

    return MoEWeights(
        logit_bias=_load(r.logit_bias, device, dtype) if r.logit_bias is not None else None,
        gate_up_bias=stacked([cat_bias(e.gate_bias or zeros_i, e.up_bias or zeros_i) for e in ffn.experts]) if biased else None,
        down_bias=stacked([e.down_bias or Lazy.zeros((H,), torch.float32) for e in ffn.experts]) if biased else None,
        act=ffn.act,
        router=r,
        router_weight=_load(r.weight, device, dtype),
        bias=r.bias.load().to(device=device, dtype=torch.float32) if r.bias is not None else None,
        gate_up=gate_up,
        down=down,
        shared=load_swiglu(ffn.shared, device, dtype, ffn.shared_act) if ffn.shared is not None else None,
        hash_table=hash_table(r.hash_table, E, device) if r.hash_table is not None else None,
        shared_gate=_load(ffn.shared_gate, device, dtype) if ffn.shared_gate is not None else None,
    )


def hash_table(t: Lazy, experts: int, device) -> torch.Tensor:
    """A hash layer's token -> experts table [V, k] (int64), every entry checked to name one of the layer's experts."""
    return checked_hash_table(t, experts).load().to(device=device, dtype=torch.int64)


def cat_bias(a: Lazy, b: Lazy) -> Lazy:
    from ..lazy import cat

    return cat([a.to(b.dtype), b])


def load_layer(layer: Layer, device="cpu", dtype=torch.float32) -> LoadedLayer:
    attn = {k: _load(v, device, dtype) for k, v in layer.attn.items()}
    return LoadedLayer(layer.index, attn, load_ffn(layer.ffn, device, dtype))


def ffn_forward(h: torch.Tensor, ffn: FFNWeights, backend: str = "loop", return_routing: bool = False, ids: torch.Tensor | None = None):
    if isinstance(ffn, SwiGLUWeights):
        return (ffn(h), None) if return_routing else ffn(h)
    return moe_forward(h, ffn, backend, return_routing, ids)


class Runtime:
    """Runs `model` on `device` in `dtype`. With `resident=True` layers stay loaded between calls."""

    def __new__(cls, model: Model, *args, **kwargs):
        if cls is Runtime and model.arch.attention == "dsv4":  # hyper-connection streams: its own decoder
            from .dsv4 import DeepseekV4Runtime

            cls = DeepseekV4Runtime
        return super().__new__(cls)

    def __init__(self, model: Model, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, backend: str = "loop", resident: bool = False):
        self.model, self.arch = model, model.arch
        self.device, self.dtype, self.backend = torch.device(device), dtype, backend
        self.resident = resident
        self._layers: dict[int, LoadedLayer] = {}
        self._embed: torch.Tensor | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [L, rotary_dim] for positions 0..L-1

    # ---- weights --------------------------------------------------------------------------
    def layer(self, index: int) -> LoadedLayer:
        if index in self._layers:
            return self._layers[index]
        loaded = load_layer(self.model.layers[index], self.device, self.dtype)
        if self.resident:
            self._layers[index] = loaded
        return loaded

    def embed_weight(self) -> torch.Tensor:
        if self._embed is None:
            self._embed = _load(self.model.embed, self.device, self.dtype)
        return self._embed

    def use_embed(self, weight: torch.Tensor) -> None:
        """The embedding matrix, already read (cast here; not read again)."""
        self._embed = weight.to(self.device, self.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, H]
        return F.embedding(input_ids.to(self.device), self.embed_weight())

    def head(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # [B, T, H] -> [B, T, V] fp32
        """Final norm and lm_head (tied: the embeddings); `weight`: the lm_head already read."""
        x = self.norm(x, _load(self.model.norm, self.device, self.dtype))
        if weight is not None:
            weight = weight.to(self.device, self.dtype)
        elif self.model.lm_head is None:
            weight = self.embed_weight()
        else:
            weight = _load(self.model.lm_head, self.device, self.dtype)
        return linear(x, weight).float()

    # ---- blocks ---------------------------------------------------------------------------
    def rope(self, past: int, T: int):
        """cos, sin [T, rotary_dim] for positions past..past+T-1, on the device. Slices of a table
        kept on the device (grown by doubling) where the rope does not depend on the length, so a
        decode step does no host work or copy (it can be captured in a CUDA graph); `dynamic`
        scaling past max_position_embeddings is computed for the length, as transformers does."""
        if self.arch.attention == "mla":
            return None
        end = past + T
        if rope_params(self.arch)["rope_type"] == "dynamic" and end > self.arch.max_position_embeddings:
            positions = torch.arange(past, end, device=self.device)
            return cos_sin(self.arch, positions, seq_len=end)
        if self._rope is None or self._rope[0].shape[0] < end:
            n = max(end, 2 * self._rope[0].shape[0] if self._rope is not None else 256)
            self._rope = cos_sin(self.arch, torch.arange(n, device=self.device), seq_len=min(n, self.arch.max_position_embeddings))
        cos, sin = self._rope
        return cos[past:end], sin[past:end]

    def norm(self, x, weight):
        """The model's RMSNorm: w * x_hat, or (1 + w) * x_hat (zero-centred, Qwen3-Next / 3.5)."""
        if self.arch.norm_offset:
            from .gdn import rms_norm_offset

            return rms_norm_offset(x, weight, self.arch.rms_norm_eps)
        return rms_norm(x, weight, self.arch.rms_norm_eps)

    def attention(self, x, layer: LoadedLayer, positions, rope, cache=None, state: dict | None = None):
        """Pre-norm attention with residual: x -> x + attn(norm(x)). `state` carries what one layer hands
        the next within a forward pass (the sparse-attention choice of GLM-5's shared layers)."""
        with tensors_fit_config(layer.index):
            return self._attention(x, layer, positions, rope, cache, state)

    def _attention(self, x, layer: LoadedLayer, positions, rope, cache=None, state: dict | None = None):
        h = self.norm(x, layer.attn["input_layernorm.weight"])
        if self.arch.attention == "hybrid":
            from .gdn import gated_attention, gated_deltanet

            if self.arch.layer_types[layer.index] == "linear_attention":
                out, cache = gated_deltanet(h, layer.attn, self.arch, cache)
            else:
                out, cache = gated_attention(h, layer.attn, self.arch, *rope, positions, cache)
        elif self.arch.attention == "mla":
            from .mla import mla_attention

            out, cache = mla_attention(h, layer.attn, self.arch, positions, cache, state=state)
        else:
            types = self.arch.layer_types
            window = self.arch.sliding_window if types is None or types[layer.index] == "sliding_attention" else None
            out, cache = gqa_attention(h, layer.attn, self.arch, *rope, positions, cache, window, layer.index)
        return x + out, cache

    def ffn_input(self, x, layer: LoadedLayer) -> torch.Tensor:
        return self.norm(x, layer.attn["post_attention_layernorm.weight"])

    def ffn_output(self, x, layer: LoadedLayer, y: torch.Tensor) -> torch.Tensor:
        """The stream after the FFN gave y: the residual x + y."""
        return x + y

    def decoder_layer(self, x, layer: LoadedLayer, positions, rope, cache=None, state: dict | None = None):
        x, cache = self.attention(x, layer, positions, rope, cache, state)
        ids = (state or {}).get("ids")  # token ids, for hash-routed layers
        return self.ffn_output(x, layer, ffn_forward(self.ffn_input(x, layer), layer.ffn, self.backend, ids=ids)), cache

    # ---- whole model ----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] fp32. `caches` (a list, one entry per layer) is
        extended in place for incremental decoding."""
        past = 0 if not caches or caches[0] is None else (caches[0]["len"] if isinstance(caches[0], dict) else caches[0][0].shape[2])
        T = input_ids.shape[1]
        positions = torch.arange(past, past + T, device=self.device)
        rope = self.rope(past, T)
        x = self.embed(input_ids)
        state: dict = {"ids": input_ids.to(self.device)}
        for i in range(len(self.model.layers)):
            layer = self.layer(i)
            cache = caches[i] if caches and i < len(caches) else None
            x, cache = self.decoder_layer(x, layer, positions, rope, cache, state)
            if caches is not None:
                if i < len(caches):
                    caches[i] = cache
                else:
                    caches.append(cache)
            del layer
        return self.head(x)
