"""Calibration: the real FFN inputs of every layer on some text, streamed layer by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Generator

import torch

from .canonical import FFN, Model
from .errors import BadInputError
from .runtime.model import Runtime, ffn_forward, load_ffn


def tokenize(source_dir: Path, text: str, vocab_size: int) -> torch.Tensor:
    """Token ids [N] of `text` with the checkpoint's tokenizer.json, or Mistral's tekken.json (UTF-8 bytes without either)."""
    tok = Path(source_dir) / "tokenizer.json"
    if tok.exists():
        try:
            from tokenizers import Tokenizer

            return torch.tensor(Tokenizer.from_file(str(tok)).encode(text).ids)
        except ImportError:
            pass
    tekken = Path(source_dir) / "tekken.json"
    if tekken.exists():  # Mistral's own tokenizer (checkpoints in Mistral's format)
        from .tekken import encode

        ids = encode(tekken, text)
        if ids is not None:
            return torch.tensor(ids)
    return torch.tensor([b % vocab_size for b in text.encode()])


def chunk(ids: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[N] -> [B, seq_len] covering at most max_tokens tokens."""
    ids = ids[: max_tokens]
    rows = max(1, ids.numel() // seq_len)
    if ids.numel() < seq_len:
        return ids.view(1, -1)
    return ids[: rows * seq_len].view(rows, seq_len)


def read_calibration(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"--calibration: no such file {p}")
    text = p.read_text(errors="replace")
    if len(text) < 16:
        raise BadInputError(f"--calibration: {p} holds too little text")
    return text


def calibration_mix(names: list[str]) -> str:
    """Calibration texts by name (built-in `pydoc`, `manuals`) or file path; several are interleaved in pieces so
    the calibration tokens hold about equal shares of each (texts.interleave)."""
    from .texts import BUILTIN, builtin_text, interleave

    return interleave([builtin_text(n) if n in BUILTIN else read_calibration(n) for n in names])


def ffn_inputs(model: Model, ids: torch.Tensor, dtype=torch.float32, device: str = "cpu") -> Generator[tuple[int, torch.Tensor], FFN | None, None]:
    """Yield (layer index, FFN input [T, H] on the CPU) of the *source* model, one layer at a time;
    the forward passes run on `device` (one layer's weights there at a time).

    `send(ffn)` instead of `next()` after layer i's input: the stream goes on through `ffn` (the
    layer's replacement) instead of the source's FFN, so later layers see the inputs the converted
    model will give them (sequential calibration)."""
    rt = Runtime(model, device, dtype)
    with torch.no_grad():
        positions = torch.arange(ids.shape[1], device=rt.device)
        rope = rt.rope(0, ids.shape[1])
        x = rt.embed(ids)
        state: dict = {"ids": ids.to(rt.device)}
        for i in range(len(model.layers)):
            layer = rt.layer(i)
            x, _ = rt.attention(x, layer, positions, rope, state=state)
            h = rt.ffn_input(x, layer)
            replacement = yield i, h.reshape(-1, h.shape[-1]).to("cpu", torch.float32)
            ffn = layer.ffn if replacement is None else load_ffn(replacement, rt.device, dtype)
            x = rt.ffn_output(x, layer, ffn_forward(h, ffn, "auto", ids=state["ids"]))
            del layer
