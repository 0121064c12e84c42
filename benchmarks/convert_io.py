#!/usr/bin/env python
"""I/O benchmark of `moesurgery convert` on a synthetic multi-GB, sharded, Mixtral-shaped checkpoint.

What it does, in one run:

1. Builds a random bf16 Mixtral-shaped checkpoint of about `--size-gb` GB (config.json with
   model_type mixtral), streamed through the project's own writer (`write_checkpoint` with `Lazy`
   tensors generated one at a time), sharded at `--source-shard-size`.
2. Baseline: a plain sequential copy of the same shard files (read + write in 16 MB chunks).
3. Runs `moesurgery convert SRC OUT --to qwen2_moe` (renames every expert key, adds zero shared
   experts and zero q/k/v biases) and `--to mixtral` (identity) as subprocesses: wall time, CPU time,
   peak RSS (exact, from wait4's rusage) and the largest anonymous / file-backed RSS seen by polling
   /proc/<pid>/status.
4. Reports throughput = (bytes read + bytes written) / wall time, the convert/copy ratio (target >= 0.7),
   and peak RSS against the bound largest tensor + one write buffer + 300 MB interpreter.

The page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root) before every measured
run, so copy and convert both start cold; if that fails the runs start warm and the output says so.
Each measured run starts after a `sync` (not timed); the time to flush its dirty pages after it exits is
reported separately ("+sync"), so the headline numbers compare like with like: the process's own wall time.

    python benchmarks/convert_io.py --size-gb 2
    python benchmarks/convert_io.py --size-gb 8 --json

Disk: the source plus one copy/output at a time (outputs are deleted after each measured run), so it needs
about 2.1 x size + 1 GB free in --workdir; it refuses to start otherwise. Scratch dirs are removed at the end
(also on failure or Ctrl-C) unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GB = 1_000_000_000
MB = 1_000_000
CHUNK = 16 * 1024 * 1024  # baseline copy chunk
INTERPRETER_BYTES = 300 * MB  # allowance for python + torch + safetensors in the RSS bound
WRITE_BUFFER_BYTES = CHUNK  # "one write buffer" in the RSS bound (the writer itself uses io's 8 KiB buffer)
HEAD_DIM = 128


# ----------------------------------------------------------------------------------------- shape
def mixtral_dims(size_bytes: int, layers: int, vocab: int) -> dict:
    """Pick hidden/intermediate (multiples of 128, intermediate = 3.5 x hidden as in Mixtral) so the bf16
    checkpoint is as close as possible to `size_bytes` with `layers` layers of 8 experts."""

    def total(h: int) -> tuple[int, dict]:
        inter = max(128, round(3.5 * h / 128) * 128)
        heads = max(1, h // HEAD_DIM)
        kv = max(1, min(8, heads))
        q, kvd = heads * HEAD_DIM, kv * HEAD_DIM
        per_layer = 2 * (q * h + 2 * kvd * h + h * q + 2 * h + 8 * h + 8 * 3 * inter * h)
        n = 2 * (2 * vocab * h + h) + layers * per_layer
        return n, {"hidden_size": h, "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv}

    best = min((abs(total(h)[0] - size_bytes), h) for h in range(128, 65536, 128))[1]
    n, dims = total(best)
    return {**dims, "num_hidden_layers": layers, "vocab_size": vocab, "head_dim": HEAD_DIM, "bytes": n}


def mixtral_config(d: dict) -> dict:
    return {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": d["hidden_size"],
        "intermediate_size": d["intermediate_size"],
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_attention_heads": d["num_attention_heads"],
        "num_key_value_heads": d["num_key_value_heads"],
        "head_dim": d["head_dim"],
        "vocab_size": d["vocab_size"],
        "num_hidden_layers": d["num_hidden_layers"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 32768,
        "hidden_act": "silu",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def planned_tensors(cfg: dict, seed: int):
    """Mixtral keys as `PlannedTensor`s whose values are drawn only when the writer asks for them."""
    import torch

    from moesurgery.lazy import Lazy
    from moesurgery.writer import PlannedTensor

    g = torch.Generator().manual_seed(seed)
    bf16 = torch.bfloat16
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]

    def rand(*shape, std=0.02):
        return Lazy(shape, bf16, lambda: torch.empty(shape, dtype=bf16).normal_(0.0, std, generator=g))

    def ones():
        return Lazy.full((H,), 1.0, bf16)

    out = [PlannedTensor("model.embed_tokens.weight", rand(V, H))]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        out += [
            PlannedTensor(p + "input_layernorm.weight", ones()),
            PlannedTensor(p + "self_attn.q_proj.weight", rand(q, H)),
            PlannedTensor(p + "self_attn.k_proj.weight", rand(kv, H)),
            PlannedTensor(p + "self_attn.v_proj.weight", rand(kv, H)),
            PlannedTensor(p + "self_attn.o_proj.weight", rand(H, q)),
            PlannedTensor(p + "post_attention_layernorm.weight", ones()),
            PlannedTensor(p + "block_sparse_moe.gate.weight", rand(8, H, std=0.1)),
        ]
        for j in range(8):
            e = f"{p}block_sparse_moe.experts.{j}."
            out += [PlannedTensor(e + "w1.weight", rand(I, H)), PlannedTensor(e + "w2.weight", rand(H, I)), PlannedTensor(e + "w3.weight", rand(I, H))]
    out += [PlannedTensor("model.norm.weight", ones()), PlannedTensor("lm_head.weight", rand(V, H))]
    return out


# ----------------------------------------------------------------------------------------- system
def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed_sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "kernel": platform.release(), "python": platform.python_version()}


def disk_of(path: Path) -> str:
    """'device fstype' holding `path`, from /proc/mounts (longest matching mount point)."""
    best, desc = "", "?"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, desc = mnt, f"{dev} ({fstype}, mounted on {mnt})"
    except OSError:
        pass
    return desc


def default_workdir_parent() -> Path:
    """The candidate scratch location with the most free space."""
    candidates = {Path(tempfile.gettempdir()), Path("/var/tmp"), Path.cwd()}
    candidates = [p for p in candidates if p.is_dir() and os.access(p, os.W_OK)]
    return max(candidates, key=lambda p: shutil.disk_usage(p).free)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------- runs
def copy_baseline(src: Path, dst: Path) -> dict:
    """Sequential read + write of every file of `src` in 16 MB chunks (the same user-space path a Python
    tool would take; no sendfile / copy_file_range)."""
    dst.mkdir(parents=True)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    c0 = os.times()
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        with open(f, "rb", buffering=0) as fi, open(dst / f.name, "wb", buffering=0) as fo:
            while True:
                k = fi.readinto(buf)
                if not k:
                    break
                fo.write(view[:k])
                n += k
    wall = time.perf_counter() - t0
    c1 = os.times()
    sync_s = timed_sync()
    return {"wall_s": wall, "cpu_s": (c1.user - c0.user) + (c1.system - c0.system), "sync_s": sync_s, "bytes_read": n, "bytes_written": n, "peak_rss_bytes": None}


def _status_kb(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _io(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, v = line.split(":", 1)
                out[k.strip()] = int(v)
    except (OSError, ValueError):
        pass
    return out


def moesurgery_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("moesurgery")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "moesurgery"]


def run_measured(cmd: list[str], log: Path, interval: float = 0.02) -> dict:
    """Run `cmd`; wall time, CPU time and exact peak RSS (wait4 rusage), plus the largest RssAnon and
    RssFile and the last /proc/<pid>/io seen by a poller."""
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    io_last: dict = {}
    done = threading.Event()
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

        def poll():
            while not done.is_set():
                s = _status_kb(proc.pid)
                for k in peaks:
                    if k in s:
                        peaks[k] = max(peaks[k], s[k])
                io = _io(proc.pid)
                if io:
                    io_last.update(io)
                done.wait(interval)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    sync_s = timed_sync()
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed with exit code {proc.returncode}:\n{text[-2000:]}")
    return {
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "sync_s": sync_s,
        "peak_rss_bytes": ru.ru_maxrss * 1024,  # Linux: KiB
        "peak_rss_anon_polled": peaks["RssAnon"],
        "peak_rss_file_polled": peaks["RssFile"],
        "major_faults": ru.ru_majflt,
        "minor_faults": ru.ru_minflt,
        "io_read_bytes_disk": io_last.get("read_bytes"),
        "io_rchar": io_last.get("rchar"),
        "io_wchar": io_last.get("wchar"),
        "stdout": text,
    }


def check_qwen2_moe(src: Path, out: Path) -> str:
    """Spot-check: an expert renamed by the conversion holds the source's bytes."""
    from safetensors import safe_open

    from moesurgery.reader import CheckpointReader

    a, b = CheckpointReader(src), CheckpointReader(out)
    pairs = [("model.layers.0.block_sparse_moe.experts.7.w2.weight", "model.layers.0.mlp.experts.7.down_proj.weight")]
    last = max(int(k.split(".")[2]) for k in a.keys() if k.startswith("model.layers."))
    pairs.append((f"model.layers.{last}.block_sparse_moe.experts.0.w1.weight", f"model.layers.{last}.mlp.experts.0.gate_proj.weight"))
    for ka, kb in pairs:
        with safe_open(a.info(ka).file, "pt") as fa, safe_open(b.info(kb).file, "pt") as fb:
            if not fa.get_tensor(ka).equal(fb.get_tensor(kb)):
                return f"MISMATCH {ka} vs {kb}"
    return "ok"


# ----------------------------------------------------------------------------------------- report
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def summarise(runs: list[dict]) -> dict:
    """Median over repeats (by wall time) of one measurement kind."""
    runs = sorted(runs, key=lambda r: r["wall_s"])
    med = dict(runs[len(runs) // 2])
    med.pop("stdout", None)
    med["wall_s_all"] = [r["wall_s"] for r in runs]
    med["peak_rss_bytes"] = max((r["peak_rss_bytes"] or 0) for r in runs) or None
    med["throughput_Bps"] = (med["bytes_read"] + med["bytes_written"]) / med["wall_s"]
    med["throughput_with_sync_Bps"] = (med["bytes_read"] + med["bytes_written"]) / (med["wall_s"] + med["sync_s"])
    return med


def markdown(res: dict) -> str:
    lines = []
    s = res["source"]
    lines.append(
        f"source: {fmt_bytes(s['bytes'])} in {s['shards']} shard(s), {s['tensors']} tensors, hidden {s['dims']['hidden_size']}, "
        f"intermediate {s['dims']['intermediate_size']}, {s['dims']['num_hidden_layers']} layers x 8 experts, vocab {s['dims']['vocab_size']}; "
        f"largest tensor {fmt_bytes(s['largest_tensor_bytes'])} ({s['largest_tensor']}), expert matrix {fmt_bytes(s['expert_matrix_bytes'])}"
    )
    lines.append(f"page cache: {'dropped before every measured run (cold)' if res['cold_cache'] else 'NOT dropped (no permission): all runs warm, after one warm-up each'}")
    lines.append("")
    lines.append("| run | read | written | wall | +sync | throughput (r+w)/wall | vs copy | CPU | peak RSS | max anon / file RSS | RSS bound | RSS ok |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = res["runs"]["copy"]["throughput_Bps"]
    for name, r in res["runs"].items():
        ratio = r["throughput_Bps"] / base
        rss = r["peak_rss_bytes"]
        bound = res["rss_bound_bytes"]
        lines.append(
            f"| {name} | {fmt_bytes(r['bytes_read'])} | {fmt_bytes(r['bytes_written'])} | {r['wall_s']:.1f} s | {r['sync_s']:.1f} s | "
            f"{fmt_bytes(r['throughput_Bps'])}/s | {ratio:.2f} | {r['cpu_s']:.1f} s | {fmt_bytes(rss)} | "
            + (f"{fmt_bytes(r.get('peak_rss_anon_polled'))} / {fmt_bytes(r.get('peak_rss_file_polled'))}" if rss else "-")
            + f" | {fmt_bytes(bound) if rss else '-'} | {('yes' if rss <= bound else 'NO') if rss else '-'} |"
        )
    lines.append("")
    lines.append(
        f"targets: convert/copy throughput >= 0.7 -> {'met' if res['targets']['throughput_ok'] else 'NOT met'}; "
        f"peak RSS <= largest tensor + {fmt_bytes(WRITE_BUFFER_BYTES)} write buffer + {fmt_bytes(INTERPRETER_BYTES)} "
        f"= {fmt_bytes(res['rss_bound_bytes'])} -> {'met' if res['targets']['rss_ok'] else 'NOT met'}"
    )
    lines.append(f"interpreter start-up (import moesurgery.convert + torch, included in convert wall): {res['startup_s']:.2f} s; generation: {res['source']['generate_s']:.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB (1e9 bytes), default 2")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (hidden size is derived from size and layers), default 2")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--source-shard-size", default="1GB", help="max shard size of the generated source, default 1GB (so 2 GB -> 2 shards, 8 GB -> 8)")
    ap.add_argument("--max-shard-size", default=None, help="passed to `moesurgery convert` (default: its own, 5GB)")
    ap.add_argument("--targets", default="qwen2_moe,mixtral", help="comma-separated --to layouts, default qwen2_moe,mixtral")
    ap.add_argument("--repeat", type=int, default=1, help="measured runs of each (interleaved; the median is reported)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch parent dir (default: the temp location with most free space)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache (runs warm, after one warm-up each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print one JSON document (after the table)")
    args = ap.parse_args(argv)

    from moesurgery.writer import parse_size, write_checkpoint

    size = int(args.size_gb * GB)
    dims = mixtral_dims(size, args.layers, args.vocab)
    cfg = mixtral_config(dims)
    parent = (args.workdir or default_workdir_parent()).absolute()
    parent.mkdir(parents=True, exist_ok=True)
    need = int(2.1 * dims["bytes"]) + GB
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"error: {parent} has {fmt_bytes(free)} free; a {fmt_bytes(dims['bytes'])} run needs about {fmt_bytes(need)} "
              "(source + one copy/output at a time + 1 GB): pass --workdir on a bigger disk or a smaller --size-gb", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="moesurgery-convert-io.", dir=parent))
    log = lambda msg: print(f"[convert_io] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        src = work / "src"
        log(f"generating {fmt_bytes(dims['bytes'])} Mixtral-shaped checkpoint in {src} ...")
        t = time.perf_counter()
        tensors = planned_tensors(cfg, args.seed)
        write_checkpoint(src, tensors, cfg, source_name="benchmarks/convert_io.py", command="synthetic", max_shard_size=parse_size(args.source_shard_size))
        gen_s = time.perf_counter() - t
        largest = max(tensors, key=lambda p: p.nbytes)
        expert = next(p for p in tensors if ".experts." in p.name)
        src_weights = sum(p.stat().st_size for p in weight_files(src))
        source = {
            "path": str(src), "bytes": dims["bytes"], "files_bytes": dir_bytes(src), "shards": len(weight_files(src)), "tensors": len(tensors),
            "dims": dims, "largest_tensor": largest.name, "largest_tensor_bytes": largest.nbytes, "expert_matrix_bytes": expert.nbytes,
            "generate_s": gen_s,
        }
        del tensors

        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import moesurgery.convert"], check=True)
        startup_s = time.perf_counter() - t

        cold = not args.no_drop_caches and drop_caches()
        targets = [x.strip() for x in args.targets.split(",") if x.strip()]
        kinds = ["copy"] + [f"convert --to {x}" for x in targets]
        measured: dict[str, list[dict]] = {k: [] for k in kinds}
        outputs: dict[str, str] = {}

        def once(kind: str) -> dict:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            if cold:
                drop_caches()
            if kind == "copy":
                r = copy_baseline(src, out)
            else:
                to = kind.split()[-1]
                cmd = moesurgery_cmd() + ["convert", str(src), str(out), "--to", to, "--json"]
                if args.max_shard_size:
                    cmd += ["--max-shard-size", args.max_shard_size]
                r = run_measured(cmd, work / "convert.log")
                r["bytes_read"] = src_weights
                r["bytes_written"] = sum(p.stat().st_size for p in weight_files(out))
                r["command"] = " ".join(cmd)
                if to == "qwen2_moe":
                    outputs[kind] = check_qwen2_moe(src, out)
                r["output_shards"] = len(weight_files(out))
            shutil.rmtree(out, ignore_errors=True)
            return r

        if not cold:
            for k in kinds:  # warm-up: every run then starts from the same (warm) cache state
                log(f"warm-up: {k}")
                once(k)
        for i in range(args.repeat):
            for k in kinds:
                log(f"run {i + 1}/{args.repeat}: {k}")
                r = once(k)
                log(f"  {r['wall_s']:.1f} s, {(r['bytes_read'] + r['bytes_written']) / r['wall_s'] / MB:.0f} MB/s" + (f", peak RSS {r['peak_rss_bytes'] / MB:.0f} MB" if r["peak_rss_bytes"] else ""))
                measured[k].append(r)

        runs = {k: summarise(v) for k, v in measured.items()}
        bound = largest.nbytes + WRITE_BUFFER_BYTES + INTERPRETER_BYTES
        converts = [runs[k] for k in kinds if k != "copy"]
        res = {
            "benchmark": "convert_io",
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {**machine(), "disk": disk_of(parent), "workdir": str(parent)},
            "cold_cache": cold,
            "source": source,
            "startup_s": startup_s,
            "rss_bound_bytes": bound,
            "runs": runs,
            "checks": outputs,
            "targets": {
                "throughput_ratio": {k: runs[k]["throughput_Bps"] / runs["copy"]["throughput_Bps"] for k in kinds if k != "copy"},
                "throughput_ok": all(r["throughput_Bps"] >= 0.7 * runs["copy"]["throughput_Bps"] for r in converts),
                "rss_ok": all(r["peak_rss_bytes"] <= bound for r in converts),
            },
        }
        print(markdown(res))
        if outputs:
            print(f"\noutput spot-check (renamed experts hold the source bytes): {outputs}")
        if args.json:
            print(json.dumps(res, indent=2, default=str))
        return 0
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
