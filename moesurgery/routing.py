"""Routing statistics: what each expert of each MoE layer does on some text, from a streamed forward
pass (one layer's weights in memory at a time).

Per MoE layer and expert, on the source model's own hidden states:
    counts[e]  tokens routed to e (among each token's top-k)
    mass[e]    sum of e's routing weights
    reap[e]    mean over e's tokens of weight * ||e(x)||   (REAP's router-weighted activation, arXiv 2510.13999)
    output[e]  the same summed over e's tokens: the routed output e contributes (what pruning it removes)
per layer: load imbalance (max / mean count, coefficient of variation, normalised entropy of the
counts), dead experts (never routed to), and the most co-activated expert pairs (both in one token's
top-k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .canonical import Model, MoE
from .runtime.model import Runtime, ffn_forward, load_ffn
from .runtime.moe import activate, route

TOP_PAIRS = 16  # co-activated pairs reported per layer


@torch.no_grad()
def expert_stats(h: torch.Tensor, moe: MoE, dtype=torch.float32, ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """counts, mass, reap [E] and co-activation counts [E, E] of one MoE block on its inputs h [T, H]
    (ids [T]: the token ids, for hash-routed layers)."""
    w = load_ffn(moe, "cpu", dtype)
    idx, weight = route(h, w.router, w.router_weight, w.bias, w.logit_bias, ids, w.hash_table)  # [T, k]
    E, (T, k) = w.num_experts, idx.shape
    counts = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.flatten(), torch.ones(T * k, dtype=torch.float64))
    mass = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.flatten(), weight.flatten().double())
    reap_sum = torch.zeros(E, dtype=torch.float64)
    I = w.down.shape[-1]
    for e in counts.nonzero().flatten().tolist():
        token, slot = torch.where(idx == e)
        gu = F.linear(h[token], w.gate_up[e], w.gate_up_bias[e] if w.gate_up_bias is not None else None)  # [n, 2I]
        y = F.linear(activate(gu[:, :I], gu[:, I:], w.act), w.down[e], w.down_bias[e] if w.down_bias is not None else None)  # [n, H] unweighted
        reap_sum[e] = (weight[token, slot].double() * y.double().norm(dim=-1)).sum()
    reap = torch.where(counts > 0, reap_sum / counts.clamp(min=1), torch.zeros_like(reap_sum))
    one_hot = torch.zeros(T, E, dtype=torch.float32).scatter_(1, idx, 1.0)  # [T, E]
    co = (one_hot.T @ one_hot).double()  # [E, E]: tokens that chose both
    co.fill_diagonal_(0)
    return {"counts": counts, "mass": mass, "reap": reap, "output": reap_sum, "coactivation": co}


def layer_summary(stats: dict[str, torch.Tensor], top_k: int) -> dict:
    counts, E = stats["counts"], stats["counts"].numel()
    total = float(counts.sum())
    mean = total / E if E else 0.0
    p = counts / total if total else counts
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(E) if E > 1 and total else 1.0
    co = stats["coactivation"]
    pairs = []
    if E > 1 and float(co.sum()) > 0:
        upper = torch.triu(co, diagonal=1)
        vals, flat = upper.flatten().topk(min(TOP_PAIRS, E * (E - 1) // 2))
        pairs = [{"experts": [int(i) // E, int(i) % E], "tokens": int(v)} for v, i in zip(vals.tolist(), flat.tolist()) if v > 0]
    return {
        "experts": E,
        "top_k": top_k,
        "tokens": int(total / top_k) if top_k else 0,
        "counts": [int(c) for c in counts.tolist()],
        "mass": [round(float(m), 6) for m in stats["mass"].tolist()],
        "reap": [round(float(r), 6) for r in stats["reap"].tolist()],
        "output": [round(float(r), 6) for r in stats["output"].tolist()],
        "max_over_mean": float(counts.max()) / mean if mean else 0.0,
        "cv": float(counts.std(unbiased=False)) / mean if mean else 0.0,
        "entropy": entropy,  # of the count distribution, 1 = perfectly balanced
        "dead": [int(e) for e in (counts == 0).nonzero().flatten().tolist()],
        "coactivation_top_pairs": pairs,
    }


@torch.no_grad()
def routing_statistics(model: Model, ids: torch.Tensor, dtype=torch.float32) -> dict[int, dict]:
    """{layer index: summary} for every MoE layer, from one streamed forward pass of `model` on ids [B, T]."""
    rt = Runtime(model, "cpu", dtype)
    positions = torch.arange(ids.shape[1])
    rope = rt.rope(0, ids.shape[1])
    x = rt.embed(ids)
    state: dict = {"ids": ids}
    out = {}
    for i, layer in enumerate(model.layers):
        loaded = rt.layer(i)
        x, _ = rt.attention(x, loaded, positions, rope, state=state)
        h = rt.ffn_input(x, loaded)
        if isinstance(layer.ffn, MoE):
            out[i] = layer_summary(expert_stats(h.reshape(-1, h.shape[-1]), layer.ffn, dtype, ids.reshape(-1)), layer.ffn.router.top_k)
        x = rt.ffn_output(x, loaded, ffn_forward(h, loaded.ffn, "auto", ids=ids))
        del loaded
    return out


def plot_heatmap(layers: dict[int, dict], path) -> None:
    """A layer x expert heat map of each expert's share of its layer's routed tokens (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import UsageError

        raise UsageError("--plot needs matplotlib: pip install 'moesurgery[plot]'") from None
    rows = [torch.tensor(s["counts"], dtype=torch.float64) for s in layers.values()]
    E = max(len(r) for r in rows)
    grid = torch.zeros(len(rows), E)
    for j, r in enumerate(rows):
        grid[j, : len(r)] = (r / r.sum().clamp(min=1)).float()
    fig, ax = plt.subplots(figsize=(max(6, E / 8), max(3, len(rows) / 4)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(rows)), [str(i) for i in layers])
    fig.colorbar(im, ax=ax, label="share of the layer's routed tokens")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
