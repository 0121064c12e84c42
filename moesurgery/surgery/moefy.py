"""Dense FFN -> routed (+ shared) experts, training-free (MoEfication / LLaMA-MoE / CMoE).

The FFN's W neurons become S shared + N routed experts of equal width f = W / (N + S). Only the
top-k routed experts run per token, so the result is lossy unless k = N; the loss is measured on
calibration hidden states (or random ones) and reported.

Routing weights: the original FFN sums every neuron with weight 1, so the ideal MoE sums the chosen
experts with weight 1. The router is renormalised and its rows are scaled so logits stay within
+-LOGIT_RANGE: the chosen experts get nearly equal weights ~1/k, and k is folded into down_proj.
So only the router's ranking matters: the ideal (oracle) picks the k experts carrying the most
activation mass; `fitted` predicts each expert's mass from the hidden state by least squares
(centred per token, since softmax ignores a per-token shift) and ranks by the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..canonical import MoE, Router, SwiGLU
from ..lazy import Lazy
from ..runtime.moe import route
from .partition import METHODS, active_mask, partition, shared_by_frequency
from .slicing import concat_neurons, take_neurons

ROUTERS = ("centroid", "fitted", "random")
LOGIT_RANGE = 0.02


@dataclass
class MoefySpec:
    experts: int  # N routed
    top_k: int
    shared: int = 0  # S always-on
    method: str = "kmeans"
    router: str = "centroid"
    scoring: str = "softmax"
    seed: int = 0

    def check(self, width: int, has_calibration: bool) -> int:
        N, K, S = self.experts, self.top_k, self.shared
        if N < 1 or K < 1 or S < 0:
            raise ValueError("--experts and --top-k must be positive, --shared >= 0")
        if K > N:
            raise ValueError(f"--top-k {K} is larger than --experts {N}")
        if width % (N + S):
            raise ValueError(f"FFN width {width} does not split into {N} routed + {S} shared experts of equal width")
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r} (have {', '.join(METHODS)})")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown --router {self.router!r} (have {', '.join(ROUTERS)})")
        needs = [f"--method {self.method}"] * (self.method == "coactivation") + [f"--router {self.router}"] * (self.router == "fitted")
        if needs and not has_calibration:
            raise ValueError(f"{' and '.join(needs)} need --calibration text (a file, or `pydoc` for built-in English text)")
        return width // (N + S)


def activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Per-neuron SwiGLU activations: x [T, H] -> [T, W]."""
    return F.silu(x @ gate.T) * (x @ up.T)


def expert_mass(act: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Activation mass each expert carries per token: [T, W] -> [T, N] (sum of |a| over its neurons)."""
    owner = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    return act[:, torch.cat(groups)].abs() @ F.one_hot(owner, len(groups)).to(act.dtype)


def build_router(kind: str, groups: list[torch.Tensor], gate: torch.Tensor, x: torch.Tensor | None, act: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Router rows [N, H] (before temperature scaling)."""
    H = gate.shape[1]
    if kind == "random":
        return torch.randn(len(groups), H, generator=torch.Generator().manual_seed(seed))
    if kind == "centroid":
        unit = F.normalize(gate.float(), dim=-1)
        return torch.stack([unit[g].mean(0) for g in groups])
    # fitted: ridge regression of each expert's activation mass on the hidden state. The target is
    # centred per token (softmax top-k ignores a per-token shift; the router has no bias) but not
    # rescaled per expert: the ranking across experts is what the router must reproduce.
    mass = expert_mass(act, groups)  # [T, N]
    mass = mass - mass.mean(-1, keepdim=True)
    xf = x.float()
    lam = 1e-2 * xf.pow(2).mean() * xf.shape[0]
    w = torch.linalg.solve(xf.T @ xf + lam * torch.eye(H), xf.T @ mass)  # [H, N]
    return w.T.contiguous()


def moefy(ffn: SwiGLU, spec: MoefySpec, x: torch.Tensor | None = None, layer_index: int = 0) -> tuple[MoE, dict]:
    """(MoE, measurements). `x` [T, H]: calibration FFN inputs of this layer (None: random inputs)."""
    f = spec.check(ffn.width, x is not None)
    N, K, S = spec.experts, spec.top_k, spec.shared
    gate, up, down = ffn.gate.load().float(), ffn.up.load().float(), ffn.down.load().float()
    H, W = gate.shape[1], gate.shape[0]
    probe = x.float() if x is not None else torch.randn(512, H, generator=torch.Generator().manual_seed(spec.seed + 7))
    act = activations(probe, gate, up)  # [T, W]
    all_neurons = torch.arange(W)
    shared_ids = torch.tensor([], dtype=torch.long)
    active = active_mask(act, H) if x is not None and (S or spec.method == "coactivation") else None
    if S:
        if x is not None:
            shared_ids = shared_by_frequency(active, S * f)
        else:  # no calibration: the neurons with the largest typical contribution
            score = act.abs().mean(0) * down.norm(dim=0)
            shared_ids = score.topk(S * f).indices.sort().values
    routed_ids = all_neurons[~torch.isin(all_neurons, shared_ids)]
    # coactivation refines its clusters for the top-k choice on each neuron's contribution |a| |down_i|
    mass = act.abs() * down.norm(dim=0) if spec.method == "coactivation" else None
    groups = partition(spec.method, routed_ids, N, gate=gate, up=up, active=active, seed=spec.seed + layer_index, mass=mass, top_k=K)
    rows = build_router(spec.router, groups, gate, probe, act, spec.seed + layer_index)  # [N, H]
    rows = rows * (LOGIT_RANGE / (probe @ rows.T).abs().max().clamp_min(1e-12))
    experts = [take_neurons(ffn, g, float(K)) for g in groups]
    shared = concat_neurons([take_neurons(ffn, shared_ids[i * f : (i + 1) * f]) for i in range(S)]) if S else None
    router = Router(Lazy.of(rows.to(ffn.gate.dtype)), top_k=K, scoring=spec.scoring, renormalize=True)
    moe = MoE(router, experts, shared)
    measured = measure(moe, ffn_out=act @ down.T, act=act, down=down, probe=probe, groups=groups, shared_ids=shared_ids, rows=rows, K=K, scoring=spec.scoring)
    measured["calibration"] = x is not None
    return moe, measured


def neuron_weights(idx: torch.Tensor, w: torch.Tensor, groups: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-token weight of every neuron given the chosen experts: [T, k] -> [T, W]."""
    owner = torch.empty(width, dtype=torch.long)
    for e, g in enumerate(groups):
        owner[g] = e
    per_expert = torch.zeros(idx.shape[0], len(groups)).scatter_(1, idx, w.float())  # [T, N]
    out = torch.zeros(idx.shape[0], width)
    routed = torch.cat(groups)
    out[:, routed] = per_expert[:, owner[routed]]
    return out


def measure(moe: MoE, ffn_out, act, down, probe, groups, shared_ids, rows, K, scoring) -> dict:
    """Relative error of the MoE block against the dense FFN on the probe tokens, and of an
    oracle router that picks the experts carrying the most activation mass. The oracle only replaces
    the router's choice: its experts are weighted by the same renormalised scores (~1 each once k is
    unfolded), so where both choose alike the two errors are equal."""
    W = act.shape[1]
    idx, w = route(probe, moe.router, rows, None)  # weights ~1/K; K is folded into down
    weights = neuron_weights(idx, w * K, groups, W)
    oracle_idx = expert_mass(act, groups).topk(K, dim=-1).indices
    logits = F.linear(probe.float(), rows.float())
    scores = (logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)).gather(1, oracle_idx)
    oracle = neuron_weights(oracle_idx, scores / (scores.sum(-1, keepdim=True) + 1e-20) * K, groups, W)
    if len(shared_ids):
        weights[:, shared_ids] = 1.0
        oracle[:, shared_ids] = 1.0
    norm = ffn_out.norm()
    return {
        "rel_err": float(((act * weights) @ down.T - ffn_out).norm() / norm),
        "oracle_rel_err": float(((act * oracle) @ down.T - ffn_out).norm() / norm),
        "router_oracle_agreement": float((idx.unsqueeze(-1) == oracle_idx.unsqueeze(-2)).any(-1).float().mean()),
    }
