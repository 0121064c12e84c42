"""Fine-grained expert segmentation of an MoE block (DeepSeekMoE), exact.

Each expert's neurons are cut into m slices; slice j of expert e becomes expert e*m + j with the
router row of e repeated. The top-k*m choice then picks every slice of the original top-k experts
(ties aside), and each slice's weight is the original weight / m (softmax over m equal logits, or
renormalisation over m times the mass), except sigmoid scores without renormalisation, which keep
the weight: the factor m is folded into each slice's down_proj. A selection bias added to softmax
probabilities (ERNIE-4.5) is divided by m with them, so the choice ranks as before.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..canonical import MoE
from .slicing import chunks, take_neurons


def finer_experts(moe: MoE, m: int) -> tuple[MoE, list[str]]:
    """(finer MoE, reasons it is not exact). m = 1 returns the block unchanged."""
    if m == 1:
        return moe, []
    width = moe.expert_width
    if width % m:
        raise ValueError(f"expert width {width} does not split into {m} slices")
    r = moe.router
    fold = 1.0 if (r.scoring == "sigmoid" and not r.renormalize) else float(m)
    # a down bias b (gpt-oss): every slice is routed with the expert's weight w times m / fold (its down_proj carries
    # fold), so a slice keeping b * fold / m adds up over the m slices to w * b, as before (tests/test_gpt_oss.py)
    experts = [take_neurons(e, idx, fold, bias_scale=fold / m) for e in moe.experts for idx in chunks(width, m)]
    E = r.num_experts
    rows = torch.arange(E).repeat_interleave(m)  # expert e*m + j routes like e
    weight = r.weight.index_select(0, rows)
    bias = r.bias.index_select(0, rows) if r.bias is not None else None
    if bias is not None and r.scoring == "softmax":  # ERNIE: the bias is added to probabilities, which split m ways
        bias = bias.scale(1.0 / m)  # (p/m + b/m) ranks as (p + b) did
    lossy = []
    if r.grouped and r.group_score == "top2_sum":
        lossy.append("group scores (sum of the top-2 experts of a group) change when experts are split")
    logit_bias = r.logit_bias.index_select(0, rows) if r.logit_bias is not None else None
    router = replace(r, weight=weight, bias=bias, logit_bias=logit_bias, top_k=r.top_k * m)
    return replace(moe, router=router, experts=experts), lossy
