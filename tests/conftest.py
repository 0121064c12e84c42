"""Shared pytest fixtures: tiny on-disk checkpoints, built once per session."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.fixtures import VOCAB_SIZE, make_checkpoint


def _cache_key(family: str, overrides: dict[str, Any]) -> str:
    blob = json.dumps(
        {"family": family, **{k: overrides[k] for k in sorted(overrides)}},
        sort_keys=True,
        default=str,  # torch.dtype etc.
    )
    return f"{family}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``checkpoint(family, seed=0, dtype=torch.float32, **config_overrides) -> Path``.

    Each distinct (family, overrides) checkpoint is built once per session; treat it as read-only
    (copy it first if a test needs to modify it).
    """
    root = tmp_path_factory.mktemp("checkpoints")
    cache: dict[str, Path] = {}

    def build(family: str, **overrides: Any) -> Path:
        key = _cache_key(family, overrides)
        if key not in cache:
            cache[key] = make_checkpoint(family, root / key, **overrides)
        return cache[key]

    return build


@pytest.fixture
def one_thread():
    """Tiny shapes: intra-op threads only add stalls (and on a busy 2-core CI box, seconds)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    """Seeded token ids, shape [2, 12], over the tiny vocabulary."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB_SIZE, (2, 12), generator=gen)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One MOESURGERY_CACHE for the session holding the embedded tiny checkpoints (mixtral, llama), made once."""
    from moesurgery.tiny import ensure_tiny

    root = tmp_path_factory.mktemp("moesurgery-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOESURGERY_CACHE", str(root))
    try:
        ensure_tiny("mixtral")
        ensure_tiny("llama")
    finally:
        mp.undo()
    return root
