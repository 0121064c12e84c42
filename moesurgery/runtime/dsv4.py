"""DeepSeek-V4's decoder, as transformers' DeepseekV4ForCausalLM computes it (eager).

Hyper-connections replace the residual: the stream is hc_mult copies [B, T, N, H] of the hidden state;
before each sublayer `hc` mixes them (weights from a Sinkhorn-normalised projection of the flattened
stream) into the sublayer's input, and after it writes `post * out + comb^T stream` back; `hc_head`
collapses the streams before the final norm.

Attention (per layer kind): queries from a low-rank q (q_a -> norm -> q_b, then a weightless per-head
RMS norm), one shared KV head (K = V, kv norm), rope on the trailing rotary dims as interleaved pairs
(main table on sliding layers, compress table on CSA / HCA), a 128-token sliding window over the
raw keys plus compressed entries (HCA: one per 128 tokens; CSA: one per 4 tokens over overlapping
8-token windows, chosen per query by the lightning indexer's top-k), a sink logit per head, the
output rotated back, then the grouped low-rank output projection (o_a per group, o_b).

Decode keeps per layer what later positions can still use: the rotated keys of the last `sliding_window`
positions, the compressed entries (and the indexer's keys) of every complete window, and the inputs since the
last complete window's start (a new window's entry needs them; CSA overlaps the previous window). A step projects
only its new positions: prefill and decode are one code path, exact against the full forward in fp64.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from .model import LoadedLayer, Runtime, _load, ffn_forward, tensors_fit_config
from .rope import inv_freq_and_scale


def acc(t: torch.Tensor) -> torch.Tensor:
    """t in the accumulation dtype: fp32 as transformers computes these steps (fp64 in an fp64 run)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' DeepseekV4 RMSNorm (w None: the unweighted one)."""
    x32 = acc(x)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.to(y.dtype) if w is not None else y).to(x.dtype)


def hc_weights(h: torch.Tensor, fn, base, scale, N: int, iters: int, hc_eps: float, eps: float):
    """h [B, T, N, H] -> pre [B, T, N], post [B, T, N], comb [B, T, N, N] (fp32)."""
    B, T = h.shape[:2]
    flat = acc(h.reshape(B, T, -1))
    mix = rms(flat, None, eps) @ fn.to(flat.dtype).T  # [B, T, (2 + N) N]
    pre = torch.sigmoid(mix[..., :N] * scale[0] + base[:N]) + hc_eps
    post = 2 * torch.sigmoid(mix[..., N : 2 * N] * scale[1] + base[N : 2 * N])
    comb = torch.softmax(mix[..., 2 * N :].view(B, T, N, N) * scale[2] + base[2 * N :].view(N, N), -1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return pre, post, comb


class DeepseekV4Runtime(Runtime):
    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        d = self.arch.dsv4
        self.N, self.iters, self.hc_eps = d["hc_mult"], d["hc_sinkhorn_iters"], d["hc_eps"]
        self.rot = int(self.arch.head_dim * self.arch.partial_rotary_factor)
        self._inv: dict[str, torch.Tensor] = {}

    # ---- rope ------------------------------------------------------------------------------
    def inv_freq(self, table: str) -> torch.Tensor:
        if table not in self._inv:
            p = dict(self.arch.dsv4["rope"][table])
            arch = replace(self.arch, rope_theta=float(p.pop("rope_theta")), partial_rotary_factor=float(p.pop("partial_rotary_factor", self.arch.partial_rotary_factor)),
                           rope_scaling=p if p.get("rope_type", "default") != "default" else None)
            self._inv[table] = inv_freq_and_scale(arch)[0].to(self.device)  # [rot / 2]; yarn's attention factor is 1 here
        return self._inv[table]

    def rotate(self, x: torch.Tensor, pos: torch.Tensor, table: str, inverse: bool = False) -> torch.Tensor:
        """Interleaved pairs (2i, 2i+1) of the trailing `rot` channels of x [..., S, D], at positions pos [S]."""
        ang = pos.float()[:, None] * self.inv_freq(table)[None, :]  # [S, rot/2] (fp32, as transformers' table)
        c, s = acc(ang.cos().to(x.dtype)), acc(ang.sin().to(x.dtype))
        if inverse:
            s = -s
        r = acc(x[..., -self.rot :])
        a, b = r[..., 0::2], r[..., 1::2]
        out = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
        return torch.cat([x[..., : -self.rot], out.to(x.dtype)], -1)

    def rope(self, past: int, T: int):
        return None

    # ---- streams ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, N, H]
        x = F.embedding(input_ids.to(self.device), self.embed_weight())
        return x[:, :, None, :].expand(*x.shape[:2], self.N, x.shape[-1]).contiguous()

    def _hc(self, x, layer: LoadedLayer, which: str):
        a, eps = layer.attn, self.arch.rms_norm_eps
        return hc_weights(x, a[f"{which}_hc.fn"], acc(a[f"{which}_hc.base"]), acc(a[f"{which}_hc.scale"]), self.N, self.iters, self.hc_eps, eps)

    def _collapse(self, x, pre):
        return (pre[..., None] * acc(x)).sum(-2).to(x.dtype)  # [..., N, H] -> [..., H]

    def _mix(self, x, post, comb, out):
        dt = x.dtype
        return post.to(dt)[..., None] * out[:, :, None, :] + torch.einsum("btjk,btjd->btkd", comb.to(dt), x)

    def head(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:  # [..., N, H] -> [..., V]
        e, eps = self.model.extras, self.arch.rms_norm_eps
        fn, base, scale = (_load(e[f"model.hc_head.hc_{p}"], self.device, torch.promote_types(self.dtype, torch.float32)) for p in ("fn", "base", "scale"))
        flat = acc(x.reshape(*x.shape[:-2], -1))  # [..., N * H]
        pre = torch.sigmoid(rms(flat, None, eps) @ fn.T * scale + base) + self.hc_eps
        return super().head(self._collapse(x, pre), weight)

    def norm(self, x, weight):
        return rms(x, weight, self.arch.rms_norm_eps)

    # ---- sublayers -------------------------------------------------------------------------
    def attention(self, x, layer: LoadedLayer, positions, rope, cache=None, state: dict | None = None):
        pre, post, comb = self._hc(x, layer, "attn")
        h = self.norm(self._collapse(x, pre), layer.attn["input_layernorm.weight"])  # [B, T, H]
        seqs = cache["seq"] if cache else [None] * h.shape[0]
        with tensors_fit_config(layer.index):
            outs, kept = zip(*(self.attend(h[b], layer, seqs[b]) for b in range(h.shape[0])))
        return self._mix(x, post, comb, torch.stack(outs)), {"seq": list(kept), "len": kept[0]["len"]}

    def ffn_input(self, x, layer: LoadedLayer) -> torch.Tensor:
        pre, _, _ = self._hc(x, layer, "ffn")
        return self.norm(self._collapse(x, pre), layer.attn["post_attention_layernorm.weight"])

    def ffn_output(self, x, layer: LoadedLayer, y):
        _, post, comb = self._hc(x, layer, "ffn")
        return self._mix(x, post, comb, y)

    def decoder_layer(self, x, layer: LoadedLayer, positions, rope, cache=None, state: dict | None = None):
        x, cache = self.attention(x, layer, positions, rope, cache, state)
        ids = (state or {}).get("ids")
        return self.ffn_output(x, layer, ffn_forward(self.ffn_input(x, layer), layer.ffn, self.backend, ids=ids)), cache

    # ---- attention over one sequence -------------------------------------------------------
    def attend(self, xq: torch.Tensor, layer: LoadedLayer, past: dict | None = None) -> tuple[torch.Tensor, dict]:
        """xq [Q, H]: one sequence's normed inputs at its next Q positions; past: what this layer keeps of the positions
        before them (None: none) -> (output [Q, H], what it keeps after them). Kept: the rotated keys of the last
        `sliding_window` positions, the compressed entries (and indexer keys) of every complete window, and the inputs
        from the start of the last complete window on (a new window's entry needs them: CSA overlaps the previous one)."""
        a, arch, d, eps = layer.attn, self.arch, self.arch.dsv4, self.arch.rms_norm_eps
        kind = arch.layer_types[layer.index]
        table = "main" if kind == "sliding_attention" else "compress"
        Q, Hq, D = xq.shape[0], arch.num_heads, arch.head_dim
        S0 = past["len"] if past else 0
        S = S0 + Q
        qpos = torch.arange(S0, S, device=xq.device)
        qr = rms(xq @ a["self_attn.q_a_proj.weight"].T, a["self_attn.q_a_norm.weight"], eps)  # [Q, q_lora]
        q = (qr @ a["self_attn.q_b_proj.weight"].T).view(Q, Hq, D).transpose(0, 1)  # [Hq, Q, D]
        q = self.rotate(rms(q, None, eps), qpos, table)
        kv = self.rotate(rms(xq @ a["self_attn.kv_proj.weight"].T, a["self_attn.kv_norm.weight"], eps), qpos, table)  # [Q, D]
        if past:
            kv = torch.cat([past["kv"], kv], 0)  # [K, D]: positions S - K .. S - 1
        i, j = qpos[:, None], torch.arange(S - kv.shape[0], S, device=xq.device)[None, :]
        bias = torch.zeros(Q, kv.shape[0], device=xq.device, dtype=torch.float32).masked_fill(~((j <= i) & (j > i - arch.sliding_window)), -math.inf)
        keep = {"len": S, "kv": kv[-arch.sliding_window :]}
        keys = kv
        if kind != "sliding_attention":
            m = d["compress_rates"][kind]
            csa = kind == "compressed_sparse_attention"
            start = past["start"] if past else 0  # the inputs kept begin at this window's first position
            x = torch.cat([past["x"], xq], 0) if past else xq
            old = past["entries"].shape[0] if past else 0  # complete windows before: the kept inputs' first is one of them
            entries = self._extend(past, "entries", self.compress(x, a, "self_attn.compressor.", m, D, csa, start // m), old - start // m)
            W = entries.shape[0]
            usable = torch.arange(W, device=xq.device)[None, :] < ((qpos + 1) // m)[:, None]  # [Q, W]: whole window seen
            if csa:
                p = "self_attn.compressor.indexer."
                ikeys = self._extend(past, "ikeys", self.compress(x, a, p, m, d["index_head_dim"], True, start // m), old - start // m)
                keep["ikeys"] = ikeys
                if W > 0:
                    usable = usable & self.index(ikeys, xq, qr, a, qpos, usable)
            keys = torch.cat([kv, entries], 0)
            bias = torch.cat([bias, torch.zeros(Q, W, device=xq.device).masked_fill(~usable, -math.inf)], 1)
            nxt = max(0, (S // m - 1) * m)
            keep.update(entries=entries, start=nxt, x=x[nxt - start :])
        logits = acc(q @ keys.T) * D**-0.5 + bias  # [Hq, Q, K]
        sinks = a["self_attn.sinks"].to(logits.dtype).view(Hq, 1, 1).expand(Hq, Q, 1)
        p = torch.softmax(torch.cat([logits, sinks], -1), -1)[..., :-1].to(xq.dtype)
        o = self.rotate(p @ keys, qpos, table, inverse=True).transpose(0, 1)  # [Q, Hq, D]
        G, r = d["o_groups"], d["o_lora_rank"]
        wa = a["self_attn.o_a_proj.weight"].view(G, r, Hq * D // G)
        z = torch.einsum("sgi,gri->sgr", o.reshape(Q, G, Hq * D // G), wa).reshape(Q, G * r)
        return z @ a["self_attn.o_b_proj.weight"].T, keep

    @staticmethod
    def _extend(past: dict | None, name: str, fresh: torch.Tensor, known: int) -> torch.Tensor:
        """The kept entries `name` and the new complete windows of `fresh` (its first `known` are kept already)."""
        return fresh[known:] if not past else torch.cat([past[name], fresh[known:]], 0)

    def compress(self, x, a, p: str, m: int, dim: int, overlap: bool, first: int = 0) -> torch.Tensor:
        """One entry per complete window of m tokens of x [S, H] (its first row starts window `first`) [W, dim]:
        softmax-gated sum of its tokens' projections (CSA: over the Ca half of the previous window and the Cb half of
        this one; x's first window has no previous here, so it is right only for window 0), normed, rotated at the
        window's start."""
        nw = x.shape[0] // m
        if nw == 0:  # fewer tokens than one window: nothing compressed yet
            return x.new_zeros(0, dim)
        kv = (x[: nw * m] @ a[p + "kv_proj.weight"].T).view(nw, m, -1)
        g = (x[: nw * m] @ a[p + "gate_proj.weight"].T).view(nw, m, -1) + a[p + "position_bias"]
        if overlap:  # slots: Ca of window w-1 (absent for w = 0), then Cb of window w
            KV = torch.zeros(nw, 2 * m, dim, dtype=kv.dtype, device=x.device)
            Gt = torch.full((nw, 2 * m, dim), -math.inf, dtype=g.dtype, device=x.device)
            KV[:, m:], Gt[:, m:] = kv[..., dim:], g[..., dim:]
            KV[1:, :m], Gt[1:, :m] = kv[:-1, :, :dim], g[:-1, :, :dim]
            kv, g = KV, Gt
        e = (kv * torch.softmax(acc(g), 1).to(kv.dtype)).sum(1)
        e = rms(e, a[p + "kv_norm.weight"], self.arch.rms_norm_eps)
        return self.rotate(e, (torch.arange(nw, device=x.device) + first) * m, "compress")

    def index(self, keys, xq, qr, a, qpos, usable) -> torch.Tensor:
        """The lightning indexer's choice [Q, W] of compressed entries per query (xq, qr at positions qpos), from its
        own compressed keys [W, hd]: the top-k of its scores among the usable."""
        d = self.arch.dsv4
        p = "self_attn.compressor.indexer."
        nh, hd = d["index_n_heads"], d["index_head_dim"]
        Q = xq.shape[0]
        q = self.rotate((qr @ a[p + "q_b_proj.weight"].T).view(Q, nh, hd).transpose(0, 1), qpos, "compress")  # [nh, Q, hd]
        scores = F.relu(acc(q @ keys.T)) * hd**-0.5  # [nh, Q, W]
        w = acc(xq @ a[p + "scorer.weights_proj.weight"].T) * nh**-0.5  # [Q, nh]
        score = (scores * w.T[:, :, None]).sum(0).masked_fill(~usable, -math.inf)  # [Q, W]
        top = score.topk(min(d["index_topk"], score.shape[1]), -1).indices
        return torch.zeros_like(usable).scatter_(1, top, True)
