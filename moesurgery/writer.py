"""Streaming sharded safetensors writer.

The whole output is planned first (every tensor's name, shape, dtype and shard), which is also what
`--dry-run` prints. Each shard's header is written up front, then tensors are materialised one at a
time and streamed in: memory is one tensor plus the OS write buffer, never a shard.
The output is built in a temporary sibling directory and renamed into place on success.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import UsageError, environment_error
from .lazy import Lazy
from .progress import byte_progress
from .reader import DTYPE_NAMES
from .units import parse_size  # noqa: F401 (re-exported)

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000

# Files copied from the source next to the weights (tokenizer, chat template, generation config).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tekken.json",  # Mistral's tokenizer (mistral-common)
)
SIDE_GLOBS = ("*.tiktoken", "tokenizer*.model")


@dataclass(slots=True)
class PlannedTensor:
    name: str
    tensor: Lazy

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes


@dataclass
class Shard:
    filename: str
    tensors: list[PlannedTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, stem: str = "model") -> list[Shard]:
    """Greedy in order: a shard is closed when the next tensor would overflow it. Files `stem`.safetensors, or
    `stem`-00001-of-0000N.safetensors (model: transformers'; consolidated: Mistral's format)."""
    names = sorted(t.name for t in tensors)  # a sorted list is a tenth of a set's memory at 1M names
    dup = next((a for a, b in zip(names, names[1:]) if a == b), None)
    if dup is not None:
        raise ValueError(f"duplicate output tensor {dup}")
    del names
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    if n == 1:
        return [Shard(f"{stem}.safetensors", groups[0])]
    return [Shard(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _header_bytes(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.tensor.dtype],
            "shape": list(t.tensor.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_shard(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str], advance=lambda n: None) -> None:
    with open(path, "wb") as f:
        f.write(_header_bytes(tensors, metadata))
        for t in tensors:
            for piece in _pieces(t.tensor):  # a fused tensor streams one part (expert) at a time
                value = piece.load()
                if tuple(value.shape) != piece.shape or value.dtype != piece.dtype:
                    raise RuntimeError(f"{t.name}: planned {piece.shape} {piece.dtype}, got {tuple(value.shape)} {value.dtype}")
                if value.numel():
                    f.write(_tensor_bytes(value))
                del value
                advance(piece.nbytes)


def _pieces(t: Lazy):
    """The tensor, or its parts along dim 0 recursively (whose bytes, written in order, are the tensor's)."""
    if t.parts is None:
        yield t
        return
    for p in t.parts:
        yield from _pieces(p)


def write_weights(out_dir: Path, shards: list[Shard], metadata: dict[str, str]) -> None:
    total = sum(s.nbytes for s in shards)
    with byte_progress("writing", total) as advance:
        for shard in shards:
            write_shard(out_dir / shard.filename, shard.tensors, metadata, advance)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
        }
        stem = shards[0].filename.split("-", 1)[0]
        (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(source: Path, out_dir: Path) -> list[str]:
    copied = []
    names = set(SIDE_FILES)
    for pattern in SIDE_GLOBS:
        names.update(p.name for p in source.glob(pattern))
    for name in sorted(names):
        src = source / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    return copied


def provenance(command: str, source: str) -> dict[str, str]:
    return {"format": "pt", "moesurgery_version": __version__, "moesurgery_command": command, "moesurgery_source": source}


def check_output_path(output: Path, source: Path | None, overwrite: bool) -> None:
    output = Path(output).absolute()
    if output.is_symlink():  # also a dangling one: refused before any work (replacing a link's target is a surprise)
        raise UsageError(f"output {output} is a symbolic link (to {os.readlink(output)}): give the directory itself")
    if source is not None:
        src = Path(source).resolve()
        out = output.resolve()
        if out == src or src in out.parents:
            raise UsageError(f"output {output} is inside the source {src}: choose another directory")
        if out in src.parents:
            raise UsageError(f"output {output} contains the source {src}: choose another directory")
    if output.exists() and not overwrite:
        raise UsageError(f"output {output} exists: pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")
    clear_stale(output)


OWNER_FILE = ".moesurgery-owner"  # inside a temporary output: "host pid" of the run building it


def _alive(owner: Path) -> bool:
    """True unless `owner` names a process of this host that is gone (or cannot be read)."""
    try:
        host, pid = owner.read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True  # another machine's run on a shared file system: leave it alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def stale_siblings(output: Path) -> tuple[list[Path], list[Path]]:
    """(stale, live) temporary siblings of `output` left by earlier runs (killed ones leave them)."""
    output = Path(output).absolute()
    if not output.parent.is_dir():
        return [], []
    stale, live = [], []
    for p in output.parent.glob(f".{glob_escape(output.name)}.*.moesurgery-tmp"):
        (live if _alive(p / OWNER_FILE) else stale).append(p)
    old = output.with_name(f".{output.name}.moesurgery-old")
    if old.exists() or old.is_symlink():
        stale.append(old)
    return stale, live


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def clear_stale(output: Path) -> list[str]:
    """Remove temporary siblings whose run is gone; refuse while another run writes `output`."""
    stale, live = stale_siblings(output)
    if live:
        raise UsageError(f"another moesurgery run ({(live[0] / OWNER_FILE).read_text().strip()}) is writing {output} "
                         f"(its temporary directory {live[0].name} is there): wait for it, or remove it if that run is gone")
    removed = []
    for p in stale:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def _mkdirs(path: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last)."""
    made = []
    for d in reversed([path, *path.parents]):
        if not d.exists():
            d.mkdir()
            made.append(d)
    return made


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(output: Path, source: Path | None = None, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `output`, on failure (an error,
    Ctrl-C, SIGTERM) it is removed, with any parent directories this run created. OS errors (no
    space, permissions, read-only) become one-line EnvironmentFaults naming `output`."""
    output = Path(output).absolute()
    check_output_path(output, source, overwrite)
    made: list[Path] = []
    tmp = None
    try:
        made = _mkdirs(output.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".moesurgery-tmp", dir=output.parent))
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / OWNER_FILE).unlink()
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: the output gets the usual permissions
        if output.exists():
            old = output.with_name(f".{output.name}.moesurgery-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError,)) and e.errno is not None:
            raise environment_error(e, str(output)) from e
        raise


def write_checkpoint(
    output: Path,
    tensors: list[PlannedTensor],
    config: dict,
    *,
    source_dir: Path | None = None,
    source_name: str = "",
    command: str = "",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    finish=None,
    config_name: str = "config.json",
    stem: str = "model",
) -> list[Shard]:
    """Write a whole checkpoint: weights, index, config.json, side files, provenance.

    `finish(tmp)`, when given, runs on the complete temporary output before it is renamed into
    place (the surgery's quick check) and returns more files to write {name: text} (the model
    card); if it fails, nothing reaches `output`."""
    shards = plan_shards(tensors, max_shard_size, stem)
    meta = provenance(command, source_name)
    with staged_output(output, source_dir, overwrite) as tmp:
        write_weights(tmp, shards, meta)
        (tmp / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            copy_side_files(source_dir, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "moesurgery.json").write_text(json.dumps({**meta, "shards": len(shards)}, indent=2) + "\n")
        if finish is not None:
            for name, text in (finish(tmp) or {}).items():
                (tmp / name).write_text(text)
    return shards
