"""The quick check every surgery ends with: source vs output FFN blocks on random inputs."""

from __future__ import annotations

import torch

from ..canonical import Model, ffn_tensors
from ..runtime.model import ffn_forward, load_ffn
from ..verify import error_parts

TOLERANCE = 1e-5  # relative, computed in fp32


def pick_layers(n: int, most: int = 4) -> list[int]:
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def quick_check(source: Model, output: Model, layers: list[int] | None = None, tokens: int = 64, seed: int = 0,
                inputs: dict[int, torch.Tensor] | None = None) -> dict:
    """Feed the same hidden states to source and output FFN blocks of some layers: N(0, 1) ones, or
    `inputs` {layer: [T, H]} (the source's real FFN inputs from calibration, for calibrated surgery
    whose routers only make sense in distribution)."""
    if inputs:
        layers = sorted(inputs)
    else:
        layers = pick_layers(len(source.layers)) if layers is None else layers
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in layers:
        x = inputs[i][:tokens] if inputs else torch.randn(tokens, source.arch.hidden_size, generator=gen)
        hashed = getattr(getattr(source.layers[i].ffn, "router", None), "hash_table", None) is not None
        ids = torch.randint(0, source.arch.vocab_size, (x.shape[0],), generator=gen) if hashed else None  # hash-routed layers
        want = ffn_forward(x, load_ffn(source.layers[i].ffn), ids=ids)
        got = ffn_forward(x, load_ffn(output.layers[i].ffn), ids=ids)
        err, scale = error_parts(got, want)
        rows.append({"index": i, "max_abs_err": err, "rel_err": err / max(scale, 1e-30)})
        if not (torch.isfinite(want).all() and torch.isfinite(got).all()):
            bad = [n for side in (source, output) for n, t in ffn_tensors(f"model.layers.{i}.ffn.", side.layers[i].ffn)
                   if t.dtype.is_floating_point and not bool(torch.isfinite(t.load()).all())]
            rows[-1]["nonfinite"] = sorted(set(bad))[:4]
    worst = max(r["rel_err"] for r in rows) if rows else 0.0
    what = f"{min(tokens, len(next(iter(inputs.values()))))} calibration hidden states per layer" if inputs else f"{tokens} random N(0,1) hidden states per layer"
    out = {"verdict": "exact" if worst <= TOLERANCE else "lossy", "rel_err": worst, "layers": rows, "inputs": what}
    bad = sorted({n for r in rows for n in r.get("nonfinite", [])})
    if bad:
        out["nonfinite"] = bad  # NaN/Inf where both agree count as equal: said, not hidden
    return out
