"""Sizes and counts for humans and from humans (no torch: the CLI imports this at start-up)."""

from __future__ import annotations

import re

from .errors import UsageError


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, '123' -> 123."""
    if isinstance(text, int):
        if text <= 0:
            raise UsageError("--max-shard-size must be positive")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise UsageError(f"--max-shard-size: cannot parse {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    value, unit, binary = m.groups()
    base = 1024 if binary else 1000
    power = " KMGT".index(unit.upper()) if unit else 0
    size = int(float(value) * base**power)
    if size <= 0:
        raise UsageError("--max-shard-size must be positive")
    return size


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def human_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
