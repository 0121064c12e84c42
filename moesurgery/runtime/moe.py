"""MoE block math from the canonical Router: routing, expert dispatch, shared experts.

Router (see canonical.Router):
    logits = x @ W.T                                   # [T, E]
    s      = softmax(logits) | sigmoid(logits)         # fp32 (softmax in the model dtype for deepseek v1)
    choice = s + bias, masked to the best topk_group of n_group groups
    idx    = top_k(choice)                             # [T, k]
    w      = s[idx] (/ sum) * scaling                  # [T, k]

Expert dispatch backends (`moe_forward(x, m, backend)`), all computing the same sum:
    loop      one pass per expert hit: where(idx == e), gather, 2 matmuls, index_add_ (transformers' eager)
    sorted    argsort the T*k pairs by expert once; one matmul per contiguous segment (torch grouped_mm
              on CUDA bf16, else a loop over the segments); combine = gather back + sum over k
    batched   gather each pair's expert weights, bmm: no sort, no host sync; copies k experts per token
    auto      `choose_backend`: CUDA: batched for a handful of pairs of small experts, triton for up to
              32 pairs per expert, then sorted (grouped GEMM); CPU: sorted
    grouped   sorted through torch grouped_mm (where it runs), segments: sorted through the loop
    triton    fused Triton kernels (runtime/triton_moe.py, CUDA): pairs padded per expert, SwiGLU fused
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..canonical import SILU, Activation, Router
from . import cpu_gemv
from .cpu_gemv import linear


@dataclass
class SwiGLUWeights:
    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    act: Activation = SILU

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        if self.act.kind == "silu":
            return linear(F.silu(linear(x, self.gate)) * linear(x, self.up), self.down)
        return linear(activate(linear(x, self.gate), linear(x, self.up), self.act), self.down)


@dataclass
class MoEWeights:
    router: Router  # settings (its Lazy weight is not used here)
    router_weight: torch.Tensor  # [E, H]
    bias: torch.Tensor | None  # [E] fp32
    gate_up: torch.Tensor  # [E, 2I, H]: gate rows then up rows
    down: torch.Tensor  # [E, H, I]
    shared: SwiGLUWeights | None
    shared_gate: torch.Tensor | None  # [1, H]
    logit_bias: torch.Tensor | None = None  # [E] (gpt-oss)
    gate_up_bias: torch.Tensor | None = None  # [E, 2I]: gate biases, then up biases (gpt-oss)
    down_bias: torch.Tensor | None = None  # [E, H]
    act: Activation = SILU
    hash_table: torch.Tensor | None = None  # [V, k] int64: experts by token id (DeepSeek-V4 hash layers)

    @property
    def plain(self) -> bool:
        """SwiGLU experts without biases: what every backend computes (else the loop does)."""
        return self.act.kind == "silu" and self.gate_up_bias is None and self.down_bias is None and not self.router.weight_on_input

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def activate(gate: torch.Tensor, up: torch.Tensor, act: Activation = SILU) -> torch.Tensor:
    """The experts' gate x up product: silu(gate) * up, or gpt-oss's clamped (up + 1) * gate * sigmoid(alpha * gate)."""
    if act.kind == "silu":
        return F.silu(gate) * up
    gate, up = gate.clamp(max=act.limit), up.clamp(-act.limit, act.limit)
    if act.kind == "clamped":  # DeepSeek-V4
        return F.silu(gate) * up
    return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))


def route(x: torch.Tensor, r: Router, weight: torch.Tensor, bias: torch.Tensor | None,
          logit_bias: torch.Tensor | None = None, ids: torch.Tensor | None = None,
          hash_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (expert indices [T, k], weights [T, k] in x.dtype). Hash-routed layers (hash_table [V, k])
    take the experts of each token id in `ids` [T]."""
    if r.scoring == "sqrtsoftplus":  # DeepSeek-V4: logits in the model dtype, as transformers computes them
        scores = F.softplus(F.linear(x, weight)).sqrt()  # [T, E]
        if hash_table is not None:
            if ids is None:
                raise ValueError("a hash-routed layer needs the token ids")
            idx = hash_table[ids.reshape(-1).to(hash_table.device)].long()  # [T, k]
        else:
            idx = (scores.float() + bias.float() if bias is not None else scores.float()).topk(r.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if r.renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, (w * r.scaling).to(x.dtype)
    if logit_bias is not None:  # gpt-oss: a biased linear router, top-k of its logits, softmax over those k
        logits = F.linear(x, weight, logit_bias)  # [T, E]
        top, idx = logits.topk(r.top_k, dim=-1)
        return idx, top.softmax(dim=-1, dtype=top.dtype).to(x.dtype)
    if r.scoring == "sigmoid":
        logits = F.linear(x, weight) if r.logits_in_model_dtype else F.linear(x.float(), weight.float())
        scores = logits.float().sigmoid()  # [T, E]
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


def expert_counts(flat: torch.Tensor, experts: int) -> torch.Tensor:
    """[N] expert ids -> [E] pairs per expert, without a host sync (CUDA bincount reads max() back)."""
    return torch.zeros(experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def experts_loop(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None, act: Activation = SILU,
                 weight_on_input: bool = False) -> torch.Tensor:
    """One pass per expert that has tokens, like transformers' eager path. x [T, H] -> [T, H].
    weight_on_input (Llama 4): each pair computes e(w x) instead of w e(x)."""
    out = torch.zeros_like(x)
    I = down.shape[-1]
    hit = torch.bincount(idx.flatten(), minlength=gate_up.shape[0]).nonzero().flatten().tolist()
    for e in hit:
        token, slot = torch.where(idx == e)  # [n], [n]
        xe = x[token] * w[token, slot, None] if weight_on_input else x[token]
        gu = F.linear(xe, gate_up[e], gate_up_bias[e] if gate_up_bias is not None else None)  # [n, 2I]
        h = activate(gu[:, :I], gu[:, I:], act)
        y = F.linear(h, down[e], down_bias[e] if down_bias is not None else None)
        y = y if weight_on_input else y * w[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


# ---- torch's grouped GEMM: probed once per (device type, dtype) -------------------------------
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_grouped_ok: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """True when `grouped_mm(a [N, K], b [G, K, M] (transposed view), offs)` runs and is right here.

    CUDA: compute capability >= 8.0 and bf16 (the fast path; torch's Hopper kernel is the one to use).
    CPU: whatever dtypes torch's CPU kernel accepts (torch >= 2.9). Probed on a tiny problem."""
    device = torch.device(device)
    key = (device.type, dtype)
    if key not in _grouped_ok:
        ok = _GROUPED_MM is not None
        if ok and device.type == "cuda":
            ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
        if ok:
            try:
                gen = torch.Generator().manual_seed(0)
                a = torch.randn(24, 32, generator=gen).to(device, dtype)  # [N, K]
                b = torch.randn(3, 16, 32, generator=gen).to(device, dtype)  # [G, M, K]
                offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)  # group 1 empty
                got = _GROUPED_MM(a, b.transpose(-2, -1), offs=offs).float()
                want = torch.cat([a[:8] @ b[0].T, a[8:] @ b[2].T]).float()
                ok = bool(((got - want).abs().max() <= 0.05 * want.abs().max()).item())
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                ok = False
        _grouped_ok[key] = ok
    return _grouped_ok[key]


def _aligned(*ts: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


WEIGHT_MAJOR_ROWS = 8  # CPU: segments of at most this many rows run as W @ x.T (see experts_sorted)


def _few_rows(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a [n, K] @ weight [M, K].T for a few rows on CPU: MKL runs x @ W.T with a few rows slower than
    the tall-skinny W @ x.T, and either on one thread; cpu_gemv spreads W's row blocks over threads."""
    return cpu_gemv.row_blocks(a, weight) if cpu_gemv.applies(a, weight) else torch.mm(weight, a.T).T


def _segment_mm(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, weight_major: bool) -> None:
    """out [n, M] = a [n, K] @ weight [M, K].T"""
    if weight_major:
        out.copy_(_few_rows(a, weight))
    else:
        torch.mm(a, weight.T, out=out)


CHAIN_BYTES = 4 * 2**20  # CPU: past this much [T*k, 2I + H] work, each segment runs its whole chain while it is in cache


def _segments(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) of each non-empty segment; one host sync."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out.append((e, start, n))
            start += n
    return out


def experts_sorted(
    x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, grouped: bool | None = None
) -> torch.Tensor:
    """Sort the T*k (token, slot) pairs by expert once (one argsort, one bincount); one matmul per
    contiguous segment; the routing weight scales h before down_proj, and each result row is written
    to its (token, slot) row of a [T*k, H] buffer, summed over k at the end (no index_add_).

    grouped=None: torch's grouped GEMM on CUDA where it has its fast path (bf16, sm80+): one call for
    all segments, no host sync. Elsewhere a loop over the non-empty segments:
      - few pairs: gather all rows, 2 matmuls per expert hit, activation once for all rows;
      - many pairs on CPU: per segment, gather -> gate_up -> SwiGLU -> down -> write, so the
        [rows, 2I] intermediates stay in cache instead of streaming [T*k, 2I] through memory.
    On CPU torch's grouped_mm is a C++ loop of the same x @ W.T matmuls, and MKL runs those slowly for
    a few rows, on one thread: short segments run as a bmm over W's row blocks (cpu_gemv) or
    weight-major (W @ x.T) instead."""
    T, k = idx.shape
    H, I = down.shape[1], down.shape[2]
    N = T * k
    flat = idx.flatten()  # [N]
    order = flat.argsort(stable=True)  # [N] pair ids (t*k + j) grouped by expert
    token = order // k  # [N]
    ws = w.flatten().index_select(0, order).unsqueeze(1)  # [N, 1]
    counts = expert_counts(flat, gate_up.shape[0])  # [E]
    if grouped is None:
        grouped = x.device.type == "cuda" and grouped_mm_available(x.device, x.dtype) and _aligned(x, gate_up, down)
    cpu = x.device.type == "cpu"
    if grouped:
        offs = counts.cumsum(0).to(torch.int32)  # [E]
        xs = x.index_select(0, token)  # [N, H]
        gu = _GROUPED_MM(xs, gate_up.transpose(-2, -1), offs=offs)  # [N, 2I]
        if triton_available(x.device):  # fused elementwise passes: less traffic over [T*k, .] buffers
            from . import triton_moe

            h = triton_moe.swiglu_scale(gu, ws.view(-1))  # [N, I]
            return triton_moe.gather_sum(_GROUPED_MM(h, down.transpose(-2, -1), offs=offs), order, T, k)
        h = F.silu(gu[:, :I]) * gu[:, I:] * ws  # [N, I]
        buf = x.new_empty(N, H).index_copy_(0, order, _GROUPED_MM(h, down.transpose(-2, -1), offs=offs))  # [T*k, H] (token, slot) order
    elif cpu and N * (2 * I + H) * x.element_size() > CHAIN_BYTES:
        buf = x.new_empty(N, H)  # [T*k, H] in (token, slot) order
        for e, a, n in _segments(counts):
            small = n <= WEIGHT_MAJOR_ROWS
            xe = x.index_select(0, token[a : a + n])  # [n, H]
            gu = _few_rows(xe, gate_up[e]) if small else torch.mm(xe, gate_up[e].T)  # [n, 2I]
            h = F.silu(gu[:, :I]).mul_(gu[:, I:]).mul_(ws[a : a + n])  # [n, I]
            y = _few_rows(h, down[e]) if small else torch.mm(h, down[e].T)  # [n, H]
            buf.index_copy_(0, order[a : a + n], y)
    else:
        segments = _segments(counts)
        xs = x.index_select(0, token)  # [N, H]
        gu = x.new_empty(N, 2 * I)
        for e, a, n in segments:
            _segment_mm(xs[a : a + n], gate_up[e], gu[a : a + n], cpu and n <= WEIGHT_MAJOR_ROWS)
        h = F.silu(gu[:, :I]) * gu[:, I:] * ws  # [N, I]
        ys = x.new_empty(N, H)
        for e, a, n in segments:
            _segment_mm(h[a : a + n], down[e], ys[a : a + n], cpu and n <= WEIGHT_MAJOR_ROWS)
        buf = torch.empty_like(ys).index_copy_(0, order, ys)
    return buf.view(T, k, H).sum(dim=1)  # [T, H]


def experts_grouped(x, idx, w, gate_up, down) -> torch.Tensor:
    """`sorted` forced through torch's grouped GEMM (raises where it does not run)."""
    if not grouped_mm_available(x.device, x.dtype):
        raise RuntimeError(f"torch grouped_mm is not available for {x.dtype} on {x.device.type}")
    return experts_sorted(x, idx, w, gate_up, down, grouped=True)


def experts_segments(x, idx, w, gate_up, down) -> torch.Tensor:
    """`sorted` with the per-segment matmul loop."""
    return experts_sorted(x, idx, w, gate_up, down, grouped=False)


def experts_batched(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Gather each pair's expert weights and bmm: one kernel per projection, no sort, no host sync.
    It copies k experts' weights per token, so it only pays for a handful of tokens."""
    T, k = idx.shape
    H, I = down.shape[1], down.shape[2]
    flat = idx.flatten()  # [N]
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [N, H, 1]
    gu = torch.bmm(gate_up.index_select(0, flat), xs).squeeze(-1)  # [N, 2I]
    h = F.silu(gu[:, :I]) * gu[:, I:] * w.reshape(-1, 1)  # [N, I]
    ys = torch.bmm(down.index_select(0, flat), h.unsqueeze(-1)).squeeze(-1)  # [N, H]
    return ys.view(T, k, H).sum(dim=1)


AUTO_BATCHED_MAX_PAIRS = 8  # `auto` picks `batched` for at most this many (token, expert) pairs...
AUTO_BATCHED_MAX_BYTES = 32 * 2**20  # ...when the weights it gathers are this small (else it is a copy of them)
AUTO_TRITON_MAX_ROWS = 32  # CUDA: `triton` while pairs per expert (T*k/E) stay under this, then grouped GEMM


def choose_backend(T: int, k: int, gate_up: torch.Tensor, down: torch.Tensor) -> str:
    """What `auto` runs for T tokens on this device.

    CUDA: `batched` for a handful of pairs of small experts (one kernel beats per-expert launches);
    `triton` up to AUTO_TRITON_MAX_ROWS pairs per expert (on an H100 it reads the touched experts at
    0.77-0.95 of the copy bandwidth at T <= 16, ~4 pairs per expert, where torch's grouped GEMM gets
    0.66-0.85); past that `sorted` through grouped GEMM with the fused elementwise kernels (4-5% faster
    at 64 pairs per expert, 8-25% at 1024). The crossover lies between; 32 is untested. BENCHMARKS.md.
    CPU: `sorted`."""
    pair_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    if gate_up.device.type == "cuda":
        if T * k <= AUTO_BATCHED_MAX_PAIRS and T * k * pair_bytes <= AUTO_BATCHED_MAX_BYTES:
            return "batched"
        if T * k <= AUTO_TRITON_MAX_ROWS * gate_up.shape[0] and triton_available(gate_up.device):
            return "triton"
    return "sorted"


def experts_triton(x, idx, w, gate_up, down) -> torch.Tensor:
    """Fused Triton kernels (CUDA): sorted pairs padded per expert, gate_up + SwiGLU in one kernel."""
    from . import triton_moe

    return triton_moe.experts_triton(x, idx, w, gate_up, down)


def triton_available(device: torch.device | str) -> bool:
    from . import triton_moe

    return triton_moe.available(device)


def experts_auto(x, idx, w, gate_up, down) -> torch.Tensor:
    return BACKENDS[choose_backend(idx.shape[0], idx.shape[1], gate_up, down)](x, idx, w, gate_up, down)


BACKENDS = {
    "loop": experts_loop,
    "sorted": experts_sorted,
    "batched": experts_batched,
    "auto": experts_auto,
    "grouped": experts_grouped,
    "segments": experts_segments,
    "triton": experts_triton,
}
BACKEND_NAMES = tuple(BACKENDS)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r} (have: {', '.join(BACKEND_NAMES)})")
    return name


def moe_forward(x: torch.Tensor, m: MoEWeights, backend: str = "loop", return_routing: bool = False, ids: torch.Tensor | None = None):
    """x [..., H] -> [..., H] (and the expert indices [T, k] when return_routing); ids [...]: the token ids (hash layers)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [T, H]
    idx, w = route(x2, m.router, m.router_weight, m.bias, m.logit_bias, ids, m.hash_table)
    if m.plain:
        out = BACKENDS[check_backend(backend)](x2, idx, w, m.gate_up, m.down)
    else:  # biased / clamped experts (gpt-oss): the loop computes them
        out = experts_loop(x2, idx, w, m.gate_up, m.down, m.gate_up_bias, m.down_bias, m.act, m.router.weight_on_input)
    if m.shared is not None:
        shared = m.shared(x2)
        if m.shared_gate is not None:
            shared = torch.sigmoid(F.linear(x2, m.shared_gate)) * shared
        out = out + shared
    out = out.reshape(shape)
    return (out, idx) if return_routing else out
