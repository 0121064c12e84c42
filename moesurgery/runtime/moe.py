"""MoE block math from the canonical Router: routing, expert dispatch, shared experts.

Router (see canonical.Router):
    logits = x @ W.T                                   # [T, E]
    s      = softmax(logits) | sigmoid(logits)         # fp32 (softmax in the model dtype for deepseek v1)
    choice = s + bias, masked to the best topk_group of n_group groups
    idx    = top_k(choice)                             # [T, k]
    w      = s[idx] (/ sum) * scaling                  # [T, k]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..canonical import Router


@dataclass
class SwiGLUWeights:
    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


@dataclass
class MoEWeights:
    router: Router  # settings (its Lazy weight is not used here)
    router_weight: torch.Tensor  # [E, H]
    bias: torch.Tensor | None  # [E] fp32
    gate_up: torch.Tensor  # [E, 2I, H]: gate rows then up rows
    down: torch.Tensor  # [E, H, I]
    shared: SwiGLUWeights | None
    shared_gate: torch.Tensor | None  # [1, H]

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def route(x: torch.Tensor, r: Router, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (expert indices [T, k], weights [T, k] in x.dtype)."""
    if r.scoring == "sigmoid":
        scores = F.linear(x.float(), weight.float()).sigmoid()  # [T, E]
    elif r.softmax_in_model_dtype:
        scores = F.linear(x, weight).softmax(dim=-1)
    else:
        scores = F.linear(x, weight).float().softmax(dim=-1)
    choice = scores + bias.float() if bias is not None else scores
    if r.n_group > 1 and r.topk_group < r.n_group:
        T, E = choice.shape
        grouped = choice.view(T, r.n_group, E // r.n_group)  # [T, G, E/G]
        if r.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(r.topk_group, dim=-1).indices, 1.0)
        mask = keep.bool().unsqueeze(-1).expand_as(grouped).reshape(T, E)
        choice = choice.masked_fill(~mask, float("-inf"))
    idx = choice.topk(r.top_k, dim=-1).indices  # [T, k]
    w = scores.gather(1, idx)
    if r.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + (1e-20 if r.scoring == "sigmoid" else 0.0))
    if r.scaling != 1.0:
        w = w * r.scaling
    return idx, w.to(x.dtype)


def experts_loop(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One pass per expert that has tokens, like transformers' eager path. x [T, H] -> [T, H]."""
    out = torch.zeros_like(x)
    I = down.shape[-1]
    hit = torch.bincount(idx.flatten(), minlength=gate_up.shape[0]).nonzero().flatten().tolist()
    for e in hit:
        token, slot = torch.where(idx == e)  # [n], [n]
        gu = F.linear(x[token], gate_up[e])  # [n, 2I]
        h = F.silu(gu[:, :I]) * gu[:, I:]
        y = F.linear(h, down[e]) * w[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def experts_sorted(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Sort (token, slot) pairs by expert once, one matmul per contiguous segment."""
    T, k = idx.shape
    I = down.shape[-1]
    flat = idx.flatten()  # [T*k]
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    xs = x[token]  # [T*k, H] grouped by expert
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            gu = F.linear(xs[start : start + n], gate_up[e])
            ys[start : start + n] = F.linear(F.silu(gu[:, :I]) * gu[:, I:], down[e])
            start += n
    ys = ys * w.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token, ys)


BACKENDS = {"loop": experts_loop, "sorted": experts_sorted}


def moe_forward(x: torch.Tensor, m: MoEWeights, backend: str = "loop", return_routing: bool = False):
    """x [..., H] -> [..., H] (and the expert indices [T, k] when return_routing)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [T, H]
    idx, w = route(x2, m.router, m.router_weight, m.bias)
    out = BACKENDS[backend](x2, idx, w, m.gate_up, m.down)
    if m.shared is not None:
        shared = m.shared(x2)
        if m.shared_gate is not None:
            shared = torch.sigmoid(F.linear(x2, m.shared_gate)) * shared
        out = out + shared
    out = out.reshape(shape)
    return (out, idx) if return_routing else out
