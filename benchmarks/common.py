"""Shared by the benchmark scripts: the machine they ran on, and the --threads/--clock options."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


def _first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine() -> dict:
    """CPU model, cores, RAM, kernel, Python, torch and its threads, load average now."""
    import torch

    mem = _first("/proc/meminfo", "MemTotal")
    info = {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or "?",
        "cores": os.cpu_count(),
        "ram_bytes": int(mem.split()[0]) * 1024 if mem else None,
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def add_clock_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: CPU time of this thread (needs --device cpu --threads 1): what the run would take on an idle machine")


def apply_clock_options(a: argparse.Namespace, device: str) -> str | None:
    """Set torch's threads and moesurgery.bench's clock from the options; an error message or None."""
    import torch

    from moesurgery import bench

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "thread":
        if not device.startswith("cpu") or torch.get_num_threads() != 1:
            return "--clock thread needs --device cpu --threads 1 (it counts this thread's CPU time only)"
        bench.CLOCK = time.thread_time
    return None
