#!/usr/bin/env python
"""Does `verify` stream at the speed of reading? A synthetic checkpoint, its reads timed against verify.

What it does, in one run:

1. Builds a random Llama- or Mixtral-shaped checkpoint of about `--size-gb` GB (bf16 or fp32 on disk, one
   safetensors shard per decoder layer + an index, config.json), written with safetensors' `save_file`
   one layer at a time, and a byte copy of it (the candidate: distinct files, so a cold run really reads
   2 x the bytes from disk).
2. read: every tensor of both checkpoints read once with `CheckpointReader.get` and copied into process
   memory (`.clone()`: the reader may hand out file-backed tensors whose bytes only arrive when touched).
   Also the raw `os.read` speed of the same files, for context.
3. verify: `verify(ref, cand, batch=1, seq_len=16)` (small inputs: the time is the weights' streaming),
   which reads both checkpoints once per layer.
4. Reports the ratio verify / read (both checkpoints), target close to 1.

`--cache warm` (default) reads the files (untimed) before every measured run, so each is served from the page
cache even if another process drops it between runs;
`--cache cold` evicts the benchmark's own files with posix_fadvise(DONTNEED) (after fsync) before every
measured run (no root, nothing else evicted); `--cache both` does both. Medians over `--repeats` runs.
`--profile` adds a cProfile of one warm verify (top functions by own time) to the output.

    python benchmarks/verify_speed.py --size-gb 1
    python benchmarks/verify_speed.py --size-gb 4 --cache both --json
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from moesurgery.reader import CheckpointReader  # noqa: E402
from moesurgery.verify import verify  # noqa: E402

GB = 1_000_000_000
MB = 1_000_000
HEAD_DIM = 128
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------- shape
def dims_for(size_bytes: int, shape: str, itemsize: int, layers: int, vocab: int) -> dict:
    """hidden (a multiple of 128) so that the checkpoint is as close as possible to `size_bytes`."""

    def params(h: int) -> tuple[int, dict]:
        heads = h // HEAD_DIM
        kv = max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)  # GQA: kv heads divide heads
        attn = 2 * h * heads * HEAD_DIM + 2 * h * kv * HEAD_DIM + 2 * h
        if shape == "llama":
            inter = max(128, round(2.6875 * h / 128) * 128)
            ffn = 3 * h * inter
            d = dict(intermediate_size=inter)
        else:
            inter = max(128, round(3.5 * h / 128) * 128)
            ffn = 8 * 3 * h * inter + 8 * h
            d = dict(intermediate_size=inter, num_local_experts=8, num_experts_per_tok=2)
        total = layers * (attn + ffn) + 2 * vocab * h + h
        return total, dict(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=vocab, **d)

    best = min((abs(params(h)[0] * itemsize - size_bytes), h) for h in range(256, 16385, 128))[1]
    return params(best)[1]


def build(path: Path, dims: dict, shape: str, dtype: torch.dtype, seed: int = 0) -> int:
    """Write the checkpoint, one shard per layer; returns the bytes of tensor data."""
    path.mkdir(parents=True)
    H, I, V, L = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"], dims["num_hidden_layers"]
    q, kv = dims["num_attention_heads"] * HEAD_DIM, dims["num_key_value_heads"] * HEAD_DIM
    gen = torch.Generator().manual_seed(seed)

    def w(*s):
        return torch.empty(*s, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)

    def ones(n):
        return torch.ones(n, dtype=dtype)

    weight_map, total, n = {}, 0, L + 1
    for i in range(n):
        if i < L:
            p = f"model.layers.{i}."
            t = {p + "input_layernorm.weight": ones(H), p + "post_attention_layernorm.weight": ones(H),
                 p + "self_attn.q_proj.weight": w(q, H), p + "self_attn.k_proj.weight": w(kv, H),
                 p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.o_proj.weight": w(H, q)}
            if shape == "llama":
                t |= {p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H), p + "mlp.down_proj.weight": w(H, I)}
            else:
                m = p + "block_sparse_moe."
                t[m + "gate.weight"] = w(dims["num_local_experts"], H)
                for j in range(dims["num_local_experts"]):
                    t |= {f"{m}experts.{j}.w1.weight": w(I, H), f"{m}experts.{j}.w3.weight": w(I, H), f"{m}experts.{j}.w2.weight": w(H, I)}
        else:
            t = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": ones(H), "lm_head.weight": w(V, H)}
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(t, path / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(t, name)
        total += sum(x.nbytes for x in t.values())
        del t
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {"model_type": shape if shape == "mixtral" else "llama", "architectures": ["MixtralForCausalLM" if shape == "mixtral" else "LlamaForCausalLM"],
              "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0,
              "torch_dtype": str(dtype).removeprefix("torch."), "tie_word_embeddings": False, **dims}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return total


# ----------------------------------------------------------------------------------------- cache
def shard_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in sorted(d.glob("*.safetensors"))]


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only: fsync first)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes in the page cache (util-linux `fincore`), None if unavailable."""
    if not shutil.which("fincore"):
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout
        res = size = 0
        for line in out.split("\n"):
            if line.strip():
                a, b = line.split()
                res, size = res + int(a), size + int(b)
        return res / size if size else None
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


# ----------------------------------------------------------------------------------------- measured runs
def read_all(*dirs: Path) -> int:
    """Every tensor once via CheckpointReader.get, copied into process memory (what a read() gives; the
    reader may hand out file-backed tensors whose pages only arrive when touched). Returns the bytes."""
    total = 0
    for d in dirs:
        reader = CheckpointReader(d)
        for key in reader.keys():
            t = reader.get(key).clone()
            total += t.nbytes
            del t
    return total


def raw_read(files: list[Path], chunk: int = 16 * 1024 * 1024) -> int:
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def timed(fn, files: list[Path], cold: bool) -> float:
    if cold:
        evict(files)
    else:  # re-warm before every run: another process may have dropped the page cache meanwhile
        raw_read(files)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile_verify(ref: Path, cand: Path, kw: dict, top: int = 15) -> list[dict]:
    prof = cProfile.Profile()
    prof.enable()
    verify(ref, cand, **kw)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = sum(v[2] for v in stats.stats.values())  # own time
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})" if line else fn, "calls": nc, "own_s": tt, "cum_s": ct})
    rows.sort(key=lambda r: -r["own_s"])
    return [{**r, "own_pct": 100 * r["own_s"] / total} for r in rows[:top]]


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (each of the two)")
    ap.add_argument("--shape", choices=("llama", "mixtral"), default="llama")
    ap.add_argument("--disk-dtype", choices=tuple(DTYPES), default="bf16", help="dtype of the tensors on disk")
    ap.add_argument("--dtype", default="float32", help="verify's compute dtype (its --dtype; default float32 as the CLI)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", choices=("warm", "cold", "both"), default="warm")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    ap.add_argument("--profile", action="store_true", help="cProfile one warm verify")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)

    from moesurgery.verify import parse_dtype

    compute = parse_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    disk_dtype = DTYPES[args.disk_dtype]
    size = int(args.size_gb * GB)
    dims = dims_for(size, args.shape, disk_dtype.itemsize, args.layers, args.vocab)
    workdir = Path(tempfile.mkdtemp(prefix="verify_speed-", dir=args.workdir))
    free = shutil.disk_usage(workdir).free
    if free < 2.2 * size + GB:
        shutil.rmtree(workdir)
        print(f"error: needs about {(2.2 * size + GB) / GB:.1f} GB free in {workdir.parent}, has {free / GB:.1f} GB", file=sys.stderr)
        return 2
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        ref, cand = workdir / "ref", workdir / "cand"
        t0 = time.perf_counter()
        nbytes = build(ref, dims, args.shape, disk_dtype)
        shutil.copytree(ref, cand)
        os.sync()
        log(f"built 2 x {nbytes / GB:.2f} GB ({args.shape}, {args.disk_dtype}, hidden {dims['hidden_size']}, "
            f"intermediate {dims['intermediate_size']}, {dims['num_hidden_layers']} layers) in {time.perf_counter() - t0:.1f}s")
        files = shard_files(ref, cand)
        kw = dict(batch=args.batch, seq_len=args.seq_len, dtype=compute)
        report = verify(ref, cand, **kw)  # warm-up (imports, allocator) and the sanity check
        assert report["verdict"] == "exact", report["verdict"]

        modes = ["warm", "cold"] if args.cache == "both" else [args.cache]
        results = {}
        for mode in modes:
            cold = mode == "cold"
            raw, read, ver = [], [], []
            for _ in range(args.repeats):
                raw.append(timed(lambda: raw_read(files), files, cold))
                read.append(timed(lambda: read_all(ref, cand), files, cold))
                ver.append(timed(lambda: verify(ref, cand, **kw), files, cold))
            r = {"raw_read_s": statistics.median(raw), "read_s": statistics.median(read), "verify_s": statistics.median(ver),
                 "runs": {"raw_read_s": raw, "read_s": read, "verify_s": ver}}
            r["ratio"] = r["verify_s"] / r["read_s"]  # medians
            r["ratio_best"] = min(ver) / min(read)  # least disturbed runs (shared machines)
            r["read_gbps"] = 2 * nbytes / r["read_s"] / GB
            r["verify_gbps"] = 2 * nbytes / r["verify_s"] / GB
            r["raw_read_gbps"] = 2 * nbytes / r["raw_read_s"] / GB
            if cold:
                evict(files)
                r["cached_after_evict"] = cached_fraction(files)
            results[mode] = r
            log(f"{mode}: read {r['read_s']:.2f}s, verify {r['verify_s']:.2f}s, ratio {r['ratio']:.2f}")

        out = {
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "python benchmarks/verify_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(),
            "checkpoint": {"shape": args.shape, "disk_dtype": args.disk_dtype, "bytes": nbytes, **dims},
            "verify_dtype": str(compute).removeprefix("torch."),
            "inputs": {"batch": args.batch, "seq_len": args.seq_len},
            "results": results,
            "loadavg_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
        }
        if args.profile:
            raw_read(files)
            out["profile"] = profile_verify(ref, cand, kw)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(markdown(out))
    return 0


def markdown(o: dict) -> str:
    m, c = o["machine"], o["checkpoint"]
    lines = [
        f"{c['shape']} {c['disk_dtype']} checkpoint, 2 x {c['bytes'] / GB:.2f} GB (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers); "
        f"verify in {o['verify_dtype']}, batch {o['inputs']['batch']} x {o['inputs']['seq_len']} tokens; "
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {(m['ram_bytes'] or 0) / GB:.0f} GB RAM; "
        f"load average {o['loadavg_1m']['before']:.1f} before, {o['loadavg_1m']['after']:.1f} after",
        "",
        "| cache | raw os.read, both | reader.get + copy, both (read) | verify | verify / read (best runs) |",
        "|---|---|---|---|---|",
    ]
    for mode, r in o["results"].items():
        lines.append(f"| {mode} | {r['raw_read_s']:.2f} s ({r['raw_read_gbps']:.2f} GB/s) | {r['read_s']:.2f} s ({r['read_gbps']:.2f} GB/s) "
                     f"| {r['verify_s']:.2f} s ({r['verify_gbps']:.2f} GB/s) | **{r['ratio']:.2f}** ({r['ratio_best']:.2f}) |")
    lines.append(f"\nmedians of {len(next(iter(o['results'].values()))['runs']['read_s'])} runs; GB/s = 2 x checkpoint bytes / time")
    if "profile" in o:
        lines += ["", "| function (cProfile, one warm verify) | calls | own s | own % |", "|---|---|---|---|"]
        lines += [f"| `{p['function']}` | {p['calls']} | {p['own_s']:.2f} | {p['own_pct']:.0f} |" for p in o["profile"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
