"""Mistral's `tekken.json` tokenizer (mistral-common's Tekkenizer), for checkpoints that ship no tokenizer.json
(Mistral Large 3 in Mistral's format): byte-level BPE over the pieces its regex `pattern` splits text into,
ranks from `vocab` (the first default_vocab_size - default_num_special_tokens entries), ids offset by the
special tokens. Text only (no special tokens, no BOS): what calibration and `verify --text` need.

    encode(path, text) -> [ids] | None   (None: no `regex` module to run the pattern)
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=2)
def _load(path: str):
    data = json.loads(Path(path).read_text())
    cfg = data["config"]
    special = int(cfg["default_num_special_tokens"])
    inner = int(cfg["default_vocab_size"]) - special
    ranks = {base64.b64decode(t["token_bytes"]): int(t["rank"]) for t in data["vocab"][:inner]}
    return cfg["pattern"], ranks, special


def _bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's merge loop: repeatedly join the adjacent pair of lowest rank."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return [ranks[p] for p in parts]


def encode(path: str | Path, text: str) -> list[int] | None:
    try:
        import regex
    except ImportError:
        return None
    pattern, ranks, special = _load(str(path))
    out: list[int] = []
    cache: dict[str, list[int]] = {}
    for piece in regex.findall(pattern, text):
        ids = cache.get(piece)
        if ids is None:
            b = piece.encode()
            ids = cache[piece] = [ranks[b]] if b in ranks else _bpe(b, ranks)
        out.extend(ids)
    return [i + special for i in out]
