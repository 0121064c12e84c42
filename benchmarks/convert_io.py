#!/usr/bin/env python
"""I/O benchmark of `moesurgery convert` on a synthetic multi-GB, sharded, Mixtral-shaped checkpoint.

What it does, in one run:

1. Builds a random bf16 Mixtral-shaped checkpoint of about `--size-gb` GB (config.json with model_type
   mixtral), streamed through the project's own writer (`write_checkpoint` with `Lazy` tensors drawn one
   at a time), sharded at `--source-shard-size`. Two layers by default, so the tensors are big: at 8 GB
   an expert matrix is ~160 MB and the embedding / lm_head ~300 MB.
2. Baselines: a plain sequential copy of the same files, twice over: `shutil.copyfile` (in-kernel
   sendfile) and read + write through a 16 MB user buffer. Each runs in its own interpreter.
3. `moesurgery convert SRC OUT --to qwen2_moe` (renames every expert key, adds zero shared experts and
   zero q/k/v biases) and `--to mixtral` (identity), as subprocesses: wall and CPU time, exact peak RSS
   (wait4's rusage), and the largest anonymous / file-backed RSS seen polling /proc/<pid>/status.
   `convert --dry-run` is timed too: the fixed cost (interpreter, torch import, header scan, plan).
4. Throughput = (bytes read + bytes written) / wall time; the convert/copy ratio (target >= 0.7); peak
   RSS against largest tensor + one 16 MB write buffer + 300 MB interpreter (target: at or below).

Before every measured run: the previous output is deleted, `sync`, the page cache is dropped
(`echo 3 > /proc/sys/vm/drop_caches`, needs root) and python/torch are re-warmed with an import, so the
checkpoint is cold and the software is not. Without permission to drop caches every run is warm, after one
warm-up run of each kind, and the output says so. Rounds are interleaved (`--repeat`, default 3) and
medians reported: on a shared machine single runs are noisy. The time to flush each run's dirty pages
after it exits is reported apart ("+sync").

    python benchmarks/convert_io.py --size-gb 2
    python benchmarks/convert_io.py --size-gb 8 --json > convert_io-8gb.json

Disk: the source plus one copy/output at a time, so about 2.1 x size + 1 GB free in --workdir (default: the
temp location with the most free space); it refuses to start otherwise. The scratch dir is removed at the
end, also on failure or Ctrl-C, unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402

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
        kv = max(d for d in range(1, min(8, heads) + 1) if heads % d == 0)  # GQA: kv heads divide the heads
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
    """The temp location ($TMPDIR or /tmp, /var/tmp) with the most free space; the first on a tie."""
    candidates = [Path(tempfile.gettempdir()), Path("/var/tmp")]
    candidates = [p for p in candidates if p.is_dir() and os.access(p, os.W_OK)]
    return max(candidates, key=lambda p: shutil.disk_usage(p).free)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------- runs
COPY_MODES = {"copyfile": "copy (shutil.copyfile)", "chunk16": "copy (16 MB read+write)"}


def copy_files(mode: str, src: Path, dst: Path) -> int:
    """The baseline, run in its own interpreter (no torch imported): copy every file of `src` to `dst`,
    with shutil.copyfile (in-kernel sendfile on Linux) or read + write through a 16 MB user buffer."""
    dst.mkdir(parents=True)
    n = 0
    buf = bytearray(CHUNK) if mode == "chunk16" else None
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        if buf is None:
            shutil.copyfile(f, dst / f.name)
            n += f.stat().st_size
            continue
        view = memoryview(buf)
        with open(f, "rb", buffering=0) as fi, open(dst / f.name, "wb", buffering=0) as fo:
            while True:
                k = fi.readinto(buf)
                if not k:
                    break
                fo.write(view[:k])
                n += k
    return n


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
    RssFile and the last /proc/<pid>/io seen by a poller. Linux's ru_maxrss of a child is at least the
    parent's own peak RSS (subprocess vforks; exec records the borrowed mm's high-water mark), so this
    process stays small: torch is only ever imported in children."""
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


def _tensor_index(directory: Path) -> dict[str, tuple[Path, int, int]]:
    """key -> (file, absolute begin, end) from the safetensors headers (no torch)."""
    out = {}
    for f in weight_files(directory):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for k, e in header.items():
            a, b = e["data_offsets"]
            out[k] = (f, 8 + n + a, 8 + n + b)
    return out


def check_qwen2_moe(src: Path, out: Path) -> str:
    """Spot-check: experts renamed by the conversion hold the source's bytes (compared raw, without torch)."""
    a, b = _tensor_index(src), _tensor_index(out)
    last = max(int(k.split(".")[2]) for k in a if k.startswith("model.layers."))
    pairs = [
        ("model.layers.0.block_sparse_moe.experts.7.w2.weight", "model.layers.0.mlp.experts.7.down_proj.weight"),
        (f"model.layers.{last}.block_sparse_moe.experts.0.w1.weight", f"model.layers.{last}.mlp.experts.0.gate_proj.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ]
    for ka, kb in pairs:
        if kb not in b:
            return f"MISSING {kb}"
        (fa, a0, a1), (fb, b0, b1) = a[ka], b[kb]
        if a1 - a0 != b1 - b0:
            return f"SIZE MISMATCH {ka} vs {kb}"
        with open(fa, "rb") as x, open(fb, "rb") as y:
            x.seek(a0)
            y.seek(b0)
            left = a1 - a0
            while left:  # 1 MB pieces: this process stays small (see run_measured on ru_maxrss)
                k = min(left, 1 << 20)
                if x.read(k) != y.read(k):
                    return f"MISMATCH {ka} vs {kb}"
                left -= k
    return "ok"


def generate(directory: Path, cfg: dict, shard_size: str, seed: int) -> dict:
    """Write the synthetic checkpoint with the project's writer (run in a child: torch stays out of the
    parent, whose RSS a vfork'ed child would otherwise inherit in its ru_maxrss)."""
    from moesurgery.writer import parse_size, write_checkpoint

    t = time.perf_counter()
    tensors = planned_tensors(cfg, seed)
    write_checkpoint(directory, tensors, cfg, source_name="benchmarks/convert_io.py", command="synthetic", max_shard_size=parse_size(shard_size))
    largest = max(tensors, key=lambda p: p.nbytes)
    expert = next(p for p in tensors if ".experts." in p.name)
    return {"tensors": len(tensors), "largest_tensor": largest.name, "largest_tensor_bytes": largest.nbytes,
            "expert_matrix_bytes": expert.nbytes, "generate_s": time.perf_counter() - t}


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
    """The median run (by wall time) of one kind, with every wall time and the largest peak RSS."""
    runs = sorted(runs, key=lambda r: r["wall_s"])
    med = {k: v for k, v in runs[len(runs) // 2].items() if k != "stdout"}
    med["wall_s_all"] = [round(r["wall_s"], 2) for r in runs]
    med["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    moved = med["bytes_read"] + med["bytes_written"]
    med["throughput_Bps"] = moved / med["wall_s"]
    med["throughput_with_sync_Bps"] = moved / (med["wall_s"] + med["sync_s"])
    return med


def markdown(res: dict) -> str:
    s, d = res["source"], res["source"]["dims"]
    out = [
        f"source: {fmt_bytes(s['bytes'])} bf16 in {s['shards']} shard(s), {s['tensors']} tensors (hidden {d['hidden_size']}, "
        f"intermediate {d['intermediate_size']}, {d['num_hidden_layers']} layers x 8 experts, vocab {d['vocab_size']}); "
        f"largest tensor {fmt_bytes(s['largest_tensor_bytes'])} ({s['largest_tensor']}), expert matrix {fmt_bytes(s['expert_matrix_bytes'])}",
        "page cache: " + ("dropped before every measured run (checkpoint cold; python/torch files re-warmed by an import)" if res["cold_cache"]
                          else "NOT dropped: every run warm, after one warm-up run of each kind"),
        f"runs: {res['repeat']} interleaved round(s), median shown, all walls in brackets; load average before / after: {res['loadavg_before']} / {res['loadavg_after']}",
        "",
        "| run | read + written | wall (median) | +sync | throughput (r+w)/wall | vs " + res["baseline"] + " | CPU | peak RSS (anon / file) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = res["runs"][res["baseline"]]["throughput_Bps"]
    for name, r in res["runs"].items():
        rss = f"{fmt_bytes(r['peak_rss_bytes'])} ({fmt_bytes(r['peak_rss_anon_polled'])} / {fmt_bytes(r['peak_rss_file_polled'])})"
        walls = "/".join(f"{w:.1f}" for w in r["wall_s_all"])
        out.append(
            f"| {name} | {fmt_bytes(r['bytes_read'])} + {fmt_bytes(r['bytes_written'])} | {r['wall_s']:.1f} s ({walls}) | {r['sync_s']:.1f} s | "
            f"{fmt_bytes(r['throughput_Bps'])}/s | {r['throughput_Bps'] / base:.2f} | {r['cpu_s']:.1f} s | {rss} |"
        )
    t = res["targets"]
    out += [
        "",
        f"fixed cost of `moesurgery convert` (interpreter + torch import + header scan + plan, i.e. `--dry-run`): {res['fixed_s']:.1f} s (median); "
        "streaming throughput without it: "
        + ", ".join(f"{k.split()[-1]} " + (f"{fmt_bytes(v)}/s" if v else "- (run too short)") for k, v in res["steady_Bps"].items()),
        f"throughput target convert >= 0.7 x {res['baseline']}: "
        + ", ".join(f"{k.split()[-1]} {v:.2f}" for k, v in t["throughput_ratio"].items())
        + f" -> {'met' if t['throughput_ok'] else 'NOT met'}"
        + f" (vs {res['other_baseline']}: " + ", ".join(f"{k.split()[-1]} {v:.2f}" for k, v in t["throughput_ratio_other"].items()) + ")",
        f"RSS target peak <= largest tensor {fmt_bytes(s['largest_tensor_bytes'])} + write buffer {fmt_bytes(WRITE_BUFFER_BYTES)} + interpreter "
        f"{fmt_bytes(INTERPRETER_BYTES)} = {fmt_bytes(res['rss_bound_bytes'])}: "
        + ", ".join(f"{k.split()[-1]} {fmt_bytes(res['runs'][k]['peak_rss_bytes'])}" for k in t["throughput_ratio"])
        + f" -> {'met' if t['rss_ok'] else 'NOT met'}",
        f"generation of the source: {s['generate_s']:.1f} s; output spot-check (renamed experts hold the source bytes): {res['checks'] or '-'}",
    ]
    return "\n".join(out)


def loadavg() -> str:
    """load average (1/5/15 min) and CPU pressure (share of time some task waited for a CPU, avg60)."""
    text = "?"
    try:
        text = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0]
        text += f", cpu pressure {some.split()[2].split('=')[1]}%"
    except (OSError, IndexError):
        pass
    return text


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--_copy":  # internal: one baseline copy
        print(copy_files(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])))
        return 0
    if argv is None and len(sys.argv) == 6 and sys.argv[1] == "--_generate":  # internal: write the source
        print(json.dumps(generate(Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], int(sys.argv[5]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB (1e9 bytes), default 2")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers; hidden size is derived from size and layers (default 2)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--source-shard-size", default="1GB", help="max shard size of the generated source (default 1GB: 2 GB -> 2 shards)")
    ap.add_argument("--max-shard-size", default=None, help="passed to `moesurgery convert` (default: its own, 5GB)")
    ap.add_argument("--targets", default="qwen2_moe,mixtral", help="comma-separated --to layouts (default qwen2_moe,mixtral)")
    ap.add_argument("--baseline", choices=sorted(COPY_MODES), default="copyfile", help="copy the targets are judged against (both are run)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved measured rounds; medians are reported (default 3)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch parent dir (default: the temp location with the most free space)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache (warm runs, after one warm-up each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON document on stdout (the markdown table goes to stderr)")
    args = ap.parse_args(argv)

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
        log(f"generating a {fmt_bytes(dims['bytes'])} Mixtral-shaped checkpoint in {src}")
        gen = subprocess.run([sys.executable, str(Path(__file__).absolute()), "--_generate", str(src), json.dumps(cfg), args.source_shard_size, str(args.seed)],
                             check=True, stdout=subprocess.PIPE, text=True)
        src_weights = sum(p.stat().st_size for p in weight_files(src))
        source = {"path": str(src), "bytes": dims["bytes"], "files_bytes": dir_bytes(src), "shards": len(weight_files(src)), "dims": dims,
                  **json.loads(gen.stdout.strip().splitlines()[-1])}
        largest_bytes = source["largest_tensor_bytes"]

        cold = not args.no_drop_caches and drop_caches()
        targets = [x.strip() for x in args.targets.split(",") if x.strip()]
        kinds = list(COPY_MODES.values()) + [f"convert --to {x}" for x in targets]
        measured: dict[str, list[dict]] = {k: [] for k in kinds}
        fixed: list[float] = []
        checks: dict[str, str] = {}
        warm_software = [sys.executable, "-c", "import moesurgery.cli, moesurgery.convert"]
        out = work / "out"

        def prepare() -> None:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            if cold:
                drop_caches()
                subprocess.run(warm_software, check=True)  # the checkpoint is cold, the software is not

        def once(kind: str) -> dict:
            prepare()
            if kind.startswith("copy"):
                mode = next(m for m, label in COPY_MODES.items() if label == kind)
                r = run_measured([sys.executable, str(Path(__file__).absolute()), "--_copy", mode, str(src), str(out)], work / "run.log")
                r["bytes_read"] = r["bytes_written"] = dir_bytes(out)
            else:
                to = kind.split()[-1]
                cmd = moesurgery_cmd() + ["convert", str(src), str(out), "--to", to, "--json"]
                if args.max_shard_size:
                    cmd += ["--max-shard-size", args.max_shard_size]
                r = run_measured(cmd, work / "run.log")
                r["bytes_read"] = src_weights
                r["bytes_written"] = dir_bytes(out)
                r["command"] = " ".join(cmd)
                r["output_shards"] = len(weight_files(out))
                if to == "qwen2_moe":
                    checks[kind] = check_qwen2_moe(src, out)
            shutil.rmtree(out, ignore_errors=True)
            return r

        if not cold:
            for k in kinds:  # warm-up: every measured run then starts from the same (warm) cache state
                log(f"warm-up: {k}")
                once(k)
        before = loadavg()
        for i in range(args.repeat):
            for k in kinds:
                r = once(k)
                measured[k].append(r)
                log(f"round {i + 1}/{args.repeat} {k}: {r['wall_s']:.1f} s, {(r['bytes_read'] + r['bytes_written']) / r['wall_s'] / MB:.0f} MB/s, "
                    f"peak RSS {r['peak_rss_bytes'] / MB:.0f} MB")
            prepare()
            dry = run_measured(moesurgery_cmd() + ["convert", str(src), str(out), "--to", targets[0], "--dry-run", "--json"], work / "run.log")
            fixed.append(dry["wall_s"])
        after = loadavg()

        runs = {k: summarise(v) for k, v in measured.items()}
        fixed_s = statistics.median(fixed)
        bound = largest_bytes + WRITE_BUFFER_BYTES + INTERPRETER_BYTES
        conv = [k for k in kinds if k.startswith("convert")]
        base, other = COPY_MODES[args.baseline], next(v for k, v in COPY_MODES.items() if k != args.baseline)
        res = {
            "benchmark": "convert_io",
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "machine": {**machine(), "disk": disk_of(parent), "workdir": str(parent)},
            "cold_cache": cold,
            "repeat": args.repeat,
            "loadavg_before": before,
            "loadavg_after": after,
            "source": source,
            "baseline": base,
            "other_baseline": other,
            "fixed_s": fixed_s,
            "fixed_s_all": [round(x, 2) for x in fixed],
            # streaming rate once the fixed cost is paid; None where the run is mostly fixed cost
            "steady_Bps": {k: (runs[k]["bytes_read"] + runs[k]["bytes_written"]) / (runs[k]["wall_s"] - fixed_s)
                           if runs[k]["wall_s"] - fixed_s > 0.25 * runs[k]["wall_s"] else None for k in conv},
            "rss_bound_bytes": bound,
            "runs": runs,
            "checks": checks,
            "targets": {
                "throughput_ratio": {k: runs[k]["throughput_Bps"] / runs[base]["throughput_Bps"] for k in conv},
                "throughput_ratio_other": {k: runs[k]["throughput_Bps"] / runs[other]["throughput_Bps"] for k in conv},
                "throughput_ok": all(runs[k]["throughput_Bps"] >= 0.7 * runs[base]["throughput_Bps"] for k in conv),
                "rss_ok": all(runs[k]["peak_rss_bytes"] <= bound for k in conv),
            },
        }
        if args.json:  # like the CLI's --json: one JSON document on stdout, the table on stderr
            print(markdown(res), file=sys.stderr)
            print(json.dumps(res, indent=2, default=str))
        else:
            print(markdown(res))
        return 0
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
