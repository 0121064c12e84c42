"""`bench`: MoE-block and full-model throughput of a source and its candidates, against the roofline
of this device measured in the same run.

Roofline of one MoE block (b bytes/param, H hidden, f expert width, T tokens, E experts, top-k):
    touched U(T) = E * (1 - (1 - k/E)^T)          (the measured count for the block bench)
    bytes  ~ U * 3*H*f*b + router + shared + activations in/out
    FLOPs  = 2*T*H*(3*k*f + 3*f_shared + E)
    time  >= max(bytes / bandwidth, FLOPs / peak)
Bandwidth is a large tensor copy ((read + write) bytes / time); peak is a large square matmul in the
bench dtype. Full model (prefill of T tokens, decode of B sequences one token each with a KV cache of
`context` tokens): attention weights + score FLOPs (causal) + KV cache reads + lm_head are added.
Timing: warmup, then the median of repeats (synchronised on CUDA).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from .canonical import Model, MoE
from .errors import BadInputError, UsageError
from .lazy import Lazy
from .runtime.model import FFNWeights, Runtime, ffn_forward
from .runtime.moe import BACKEND_NAMES, MoEWeights, SwiGLUWeights, grouped_mm_available, route, triton_available

DEFAULT_TOKENS = (1, 16, 256, 4096)
DEFAULT_BATCHES = (1, 16)
PARTS = ("block", "prefill", "decode")
CLOCK = time.perf_counter  # wall clock; benchmarks/moe_dispatch.py --clock thread swaps in time.thread_time


@dataclass
class BenchOptions:
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    batches: tuple[int, ...] = DEFAULT_BATCHES
    context: int = 128
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    layers: int | None = None
    parts: tuple[str, ...] = PARTS
    repeats: int = 5
    warmup: int = 1
    budget_s: float = 3.0  # stop repeating (after 3 runs) once one measurement took this long
    seed: int = 0
    check: bool = True
    quick: bool = False  # small roofline probes, single runs: smoke tests
    cuda_graph: bool = True  # CUDA: time CUDA-graph replays where the step captures (rows say "cuda_graph")
    roofline_bytes: int | None = None  # copy size; default 1 GB (CPU) / 4 GB (CUDA)
    roofline_n: int | None = None  # matmul size; default 4096 (CPU) / 8192 (CUDA)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, repeats: int = 5, warmup: int = 1, budget_s: float = 3.0) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync(device)
        times: list[float] = []
        start = CLOCK()
        while len(times) < max(1, repeats):
            t0 = CLOCK()
            fn()
            sync(device)
            times.append(CLOCK() - t0)
            if len(times) >= min(3, repeats) and CLOCK() - start > budget_s:
                break
    return statistics.median(times)


def cuda_graph_replay(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first) -> its replay: one launch, no
    host work between kernels, as serving engines run decode steps. None where fn does not capture
    (a host sync or a host-to-device copy inside it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.inference_mode(), torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return graph.replay


def measure(fn, o: BenchOptions, run: dict) -> tuple[float, bool]:
    """(median seconds, whether a CUDA graph replay was timed)."""
    if o.cuda_graph and run["device"].type == "cuda":
        replay = cuda_graph_replay(fn)
        if replay is not None:
            return timeit(replay, **run), True
    return timeit(fn, **run), False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def measure_roofline(device: torch.device, dtype: torch.dtype, copy_bytes: int, n: int, repeats: int = 5, warmup: int = 1) -> dict:
    """Memory bandwidth from a copy of `copy_bytes` ((read + write) / time) and peak from an n x n matmul."""
    src = torch.ones(copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    s = timeit(lambda: dst.copy_(src), device, repeats, warmup, budget_s=2.0)
    bandwidth = 2 * src.nbytes / s / 1e9
    del src, dst
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    s = timeit(lambda: a @ b, device, repeats, warmup, budget_s=2.0)
    return {"bandwidth_gbps": bandwidth, "peak_tflops": 2 * n**3 / s / 1e12, "copy_bytes": copy_bytes, "matmul_n": n}


# ------------------------------------------------------------------------------------------ costs
def expected_touched(E: int, k: int, T: int) -> float:
    """Experts hit by T tokens under uniform routing: E * (1 - (1 - k/E)^T)."""
    return E * (1 - (1 - k / E) ** T)


def ffn_cost(ffn: FFNWeights, T: int, touched: float | None = None) -> tuple[float, float]:
    """(bytes, FLOPs) of one FFN/MoE block on T tokens; `touched` experts (default: expected)."""
    if isinstance(ffn, SwiGLUWeights):
        b, (I, H) = ffn.gate.element_size(), ffn.gate.shape
        return 3 * I * H * b + 2 * T * H * b, 6.0 * T * H * I
    E, H, f = ffn.down.shape
    b = ffn.down.element_size()
    k = ffn.router.top_k
    U = expected_touched(E, k, T) if touched is None else touched
    fs = ffn.shared.gate.shape[0] if ffn.shared is not None else 0
    gate = 1 if ffn.shared_gate is not None else 0
    nbytes = (U * 3 * H * f + E * H + 3 * H * fs + gate * H + 2 * T * H) * b
    return nbytes, 2.0 * T * H * (3 * k * f + 3 * fs + E + gate)


def attention_cost(model: Model, attn: dict[str, torch.Tensor], B: int, T: int, past: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one attention block: weights, causal scores, KV cache read + write."""
    a = model.arch
    params = sum(t.numel() for t in attn.values())
    b = next(iter(attn.values())).element_size()
    if a.attention == "mla":
        qk = a.mla.get("qk_nope_head_dim", 0) + a.mla.get("qk_rope_head_dim", 0)
        per_token_kv, score_dim = a.num_heads * (qk + a.mla.get("v_head_dim", 0)), a.num_heads * (qk + a.mla.get("v_head_dim", 0))
    else:
        per_token_kv, score_dim = 2 * a.num_kv_heads * a.head_dim, 2 * a.num_heads * a.head_dim
    pairs = T * past + T * (T + 1) / 2  # (query, key) pairs per sequence, causal
    nbytes = params * b + B * (past + T) * per_token_kv * b + 2 * B * T * a.hidden_size * b
    return nbytes, 2.0 * B * T * params + 2.0 * B * pairs * score_dim


def model_cost(rt: Runtime, B: int, T: int, past: int) -> tuple[float, float]:
    """(bytes, FLOPs) of Runtime.forward on [B, T] new tokens after `past` cached ones."""
    H, V = rt.arch.hidden_size, rt.arch.vocab_size
    b = rt.embed_weight().element_size()
    nbytes, flops = B * T * H * b + V * H * b, 2.0 * B * T * V * H  # embedding rows, lm_head (every position)
    for i in range(len(rt.model.layers)):
        layer = rt.layer(i)
        ab, af = attention_cost(rt.model, layer.attn, B, T, past)
        fb, ff = ffn_cost(layer.ffn, B * T)
        nbytes, flops = nbytes + ab + fb, flops + af + ff
    return nbytes, flops


def measured_row(key: str, value: int, seconds: float, tokens: int, cost: tuple[float, float], roof: dict) -> dict:
    nbytes, flops = cost
    t_mem, t_flop = nbytes / (roof["bandwidth_gbps"] * 1e9), flops / (roof["peak_tflops"] * 1e12)
    bound = max(t_mem, t_flop)
    return {
        key: value,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "gbps": nbytes / seconds / 1e9,
        "tflops": flops / seconds / 1e12,
        "roofline_seconds": bound,
        "roofline_fraction": bound / seconds,
        "bound": "memory" if t_mem >= t_flop else "compute",
        "bytes": int(nbytes),
        "flops": int(flops),
    }


# ------------------------------------------------------------------------------------------ models
def subset(model: Model, layers: int | None) -> Model:
    """The first `layers` decoder layers (all when None)."""
    if layers is None or layers >= len(model.layers):
        return model
    if layers < 1:
        raise UsageError("--layers must be >= 1")
    return replace(model.with_layers(model.layers[:layers]), arch=replace(model.arch, num_layers=layers))


def describe(model: Model) -> dict:
    moe = next((l.ffn for l in model.layers if isinstance(l.ffn, MoE)), None)
    return {
        "layout": model.family,
        "experts": len(moe.experts) if moe else 0,
        "top_k": moe.router.top_k if moe else 0,
        "expert_width": moe.expert_width if moe else 0,
        "shared_width": moe.shared_width if moe else 0,
        "layers": len(model.layers),
        "moe_layers": len(model.moe_layers()),
    }


def _resident_head(model: Model, device: torch.device, dtype: torch.dtype) -> Model:
    """norm and lm_head loaded once (Runtime.head reloads them on every call)."""
    def keep(t: Lazy | None) -> Lazy | None:
        return None if t is None else Lazy.of(t.load().to(device=device, dtype=dtype))

    return replace(model, norm=keep(model.norm), lm_head=keep(model.lm_head))


def bench_model(name: str, model: Model, o: BenchOptions, roof: dict) -> dict:
    device = torch.device(o.device)
    entry = {"name": name, **describe(model), "block": [], "prefill": [], "decode": []}
    rt = Runtime(_resident_head(model, device, o.dtype), device, o.dtype, o.backend, resident=True)
    t0 = time.perf_counter()
    for i in range(len(model.layers)):
        rt.layer(i)
    rt.embed_weight()
    entry["load_seconds"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(o.seed)
    run = dict(device=device, repeats=1 if o.quick else o.repeats, warmup=o.warmup, budget_s=o.budget_s)

    if "block" in o.parts:
        index = next((i for i, l in enumerate(model.layers) if isinstance(l.ffn, MoE)), 0)
        ffn = rt.layer(index).ffn
        entry["block_layer"] = model.layers[index].index
        H = model.arch.hidden_size
        hashed = isinstance(ffn, MoEWeights) and ffn.hash_table is not None  # DeepSeek-V4's hash layers route by token id
        for T in o.tokens:
            x = torch.randn(T, H, generator=gen).to(device, o.dtype)  # [T, H]
            tok = torch.randint(0, model.arch.vocab_size, (T,), generator=gen).to(device) if hashed else None
            touched = None
            if isinstance(ffn, MoEWeights):
                with torch.inference_mode():
                    idx, _ = route(x, ffn.router, ffn.router_weight, ffn.bias, ffn.logit_bias, tok, ffn.hash_table)
                touched = int(idx.unique().numel())
            s, graphed = measure(lambda: ffn_forward(x, ffn, o.backend, ids=tok), o, run)
            row = measured_row("tokens", T, s, T, ffn_cost(ffn, T, touched), roof) | {"cuda_graph": graphed}
            if touched is not None:
                row["experts_touched"] = touched
            entry["block"].append(row)
        if isinstance(ffn, MoEWeights):  # the bench backend against the reference loop, same input
            x = torch.randn(min(64, max(o.tokens)), H, generator=gen).to(device, o.dtype)
            tok = torch.randint(0, model.arch.vocab_size, (x.shape[0],), generator=gen).to(device) if hashed else None
            with torch.inference_mode():
                want, got = ffn_forward(x, ffn, "loop", ids=tok).float(), ffn_forward(x, ffn, o.backend, ids=tok).float()
            entry["backend_rel_err"] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()

    V = model.arch.vocab_size
    if "prefill" in o.parts:
        for T in o.tokens:
            ids = torch.randint(0, V, (1, T), generator=gen).to(device)
            s, graphed = measure(lambda: rt.forward(ids), o, run)
            entry["prefill"].append(measured_row("tokens", T, s, T, model_cost(rt, 1, T, 0), roof) | {"cuda_graph": graphed})

    if "decode" in o.parts:
        for B in o.batches:
            context = torch.randint(0, V, (B, o.context), generator=gen).to(device)
            nxt = torch.randint(0, V, (B, 1), generator=gen).to(device)
            caches: list = []
            with torch.inference_mode():
                rt.forward(context, caches)
            # one step; the cache list is copied, its tensors are not changed
            s, graphed = measure(lambda: rt.forward(nxt, list(caches)), o, run)
            row = measured_row("batch", B, s, B, model_cost(rt, B, 1, o.context), roof)
            row["context"], row["cuda_graph"] = o.context, graphed
            entry["decode"].append(row)
            del caches
    del rt
    return entry


def spot_check(source: Model, candidate: Model) -> dict:
    """verify's block check on random hidden states (surgery.check.quick_check), when comparable."""
    from .surgery.check import quick_check
    from .verify import check_comparable

    try:
        check_comparable(source, candidate)
    except BadInputError as e:
        return {"verdict": "skipped", "rel_err": None, "reason": str(e).removeprefix("models are not comparable: ")}
    r = quick_check(source, candidate)
    return {"verdict": r["verdict"], "rel_err": r["rel_err"], "layers": [l["index"] for l in r["layers"]], "inputs": r["inputs"]}


def ratios(source: dict, candidate: dict) -> dict:
    out = {"candidate": candidate["name"]}
    for part, key in (("block", "tokens"), ("prefill", "tokens"), ("decode", "batch")):
        base = {r[key]: r["seconds"] for r in source[part]}
        out[part] = [{key: r[key], "time_ratio": r["seconds"] / base[r[key]]} for r in candidate[part] if r[key] in base]
    return out


# ------------------------------------------------------------------------------------------ entry
def _check_options(o: BenchOptions) -> torch.device:
    if o.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if not (o.device == "cpu" or o.device.startswith("cuda")):
        raise UsageError(f"--device must be cpu or cuda, not {o.device!r}")
    if o.backend not in BACKEND_NAMES:
        raise UsageError(f"--backend must be one of {', '.join(BACKEND_NAMES)}, not {o.backend!r}")
    device = torch.device(o.device)
    if o.backend == "grouped" and not grouped_mm_available(device, o.dtype):
        raise UsageError(f"--backend grouped: torch's grouped_mm does not run for {str(o.dtype).removeprefix('torch.')} on {device.type}")
    if o.backend == "triton" and not triton_available(device):
        raise UsageError("--backend triton needs Triton and --device cuda")
    if not o.tokens or min(o.tokens) < 1 or not o.batches or min(o.batches) < 1 or o.context < 1:
        raise UsageError("--tokens, --batch and --context need positive values")
    bad = set(o.parts) - set(PARTS)
    if bad or not o.parts:
        raise UsageError(f"--measure: choose from {', '.join(PARTS)}")
    return device


def _available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def run_bench(
    source: str | None,
    candidates: list[str] = (),
    *,
    synthetic: str | None = None,
    scale: int = 1,
    granularity: int | None = None,
    shared: int = 0,
    options: BenchOptions | None = None,
) -> dict:
    """Bench SOURCE (a checkpoint spec) or a synthetic shape, and each candidate; see the module doc."""
    from .model_io import open_model
    from .synthetic import layout_candidate, scaled_shape, synthetic_model, synthetic_params

    o = options or BenchOptions()
    device = _check_options(o)
    notes = list(o.notes)
    if synthetic is None and source is None:
        raise UsageError("give a SOURCE checkpoint or --synthetic NAME")
    if synthetic is not None and (source is not None or candidates):
        raise UsageError("--synthetic builds its own source: give no SOURCE/CANDIDATE checkpoints with it (use --granularity/--shared for a candidate)")
    if granularity is not None and granularity < 1:
        raise UsageError(f"--granularity must be >= 1, not {granularity}")
    if shared < 0:
        raise UsageError(f"--shared must be >= 0, not {shared}")
    if shared and not granularity:
        raise UsageError("--shared S needs --granularity M (S of the M finer slices of each expert become shared experts)")

    models: list[tuple[str, Model]] = []
    if synthetic is not None:
        layers = o.layers or 1
        shape = scaled_shape(synthetic, scale)
        m = granularity or 1
        if shared and shape.expert_width % m:
            raise UsageError(f"expert width {shape.expert_width} does not split into {m} finer experts")
        copies = 2 + (1 if granularity else 0)  # the synthetic tensors + one resident runtime (+ candidate loads in the check)
        need = synthetic_params(shape, layers) * o.dtype.itemsize * copies
        avail = _available_bytes()
        if device.type == "cpu" and avail is not None and need > 0.9 * avail:
            raise UsageError(f"--synthetic {synthetic} --scale {scale} with {layers} layer(s) needs about {need / 1e9:.1f} GB, "
                             f"{avail / 1e9:.1f} GB available: use a larger --scale or fewer --layers")
        src = synthetic_model(synthetic, scale, layers, o.dtype, o.seed, common_width=shared * (shape.expert_width // m) if shared else 0)
        name = f"{synthetic}" + (f"/{scale}" if scale > 1 else "")
        models.append((name, src))
        if shape.note:
            notes.append(f"{synthetic}: {shape.note}")
        if shared:
            notes.append(f"the synthetic source's experts share {shared * (shape.expert_width // m)} identical neurons, so extracting them is exact")
    else:
        opened = open_model(source)
        src = subset(opened.model, o.layers)
        models.append((opened.source.name, src))
        for spec in candidates:
            c = open_model(spec)
            models.append((c.source.name, subset(c.model, o.layers)))
    if granularity:
        cand, lossy = layout_candidate(src, granularity, shared)
        models.append((f"{models[0][0]} m{granularity}" + (f" s{shared}" if shared else ""), cand))
        notes += [f"candidate is lossy: {why}" for why in lossy]

    if o.quick:
        copy_bytes, n = o.roofline_bytes or 64 * 2**20, o.roofline_n or 512
    else:
        copy_bytes = o.roofline_bytes or (4 if device.type == "cuda" else 1) * 2**30
        n = o.roofline_n or (8192 if device.type == "cuda" else 4096)
    roof = measure_roofline(device, o.dtype, copy_bytes, n, repeats=1 if o.quick else o.repeats, warmup=o.warmup)

    checks = [{"candidate": name, **spot_check(src, model)} for name, model in models[1:]] if o.check else []
    entries = []
    for name, model in models:
        entries.append(bench_model(name, model, o, roof))
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "dtype": str(o.dtype).removeprefix("torch."),
        "backend": o.backend,
        "grouped_mm": grouped_mm_available(device, o.dtype),
        "sorted_path": "grouped_mm" if device.type == "cuda" and grouped_mm_available(device, o.dtype) else "segments",
        "settings": {"tokens": list(o.tokens), "batches": list(o.batches), "context": o.context, "layers": o.layers, "parts": list(o.parts),
                     "repeats": 1 if o.quick else o.repeats, "synthetic": synthetic, "scale": scale if synthetic else None},
        "roofline": roof,
        "models": entries,
        "ratios": [ratios(entries[0], e) for e in entries[1:]],
        "check": checks,
        "notes": notes,
    }


def parse_ints(option: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"{option}: expected comma-separated integers, not {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option}: expected positive integers, not {text!r}")
    return values


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"

