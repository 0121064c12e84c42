"""Resolve a checkpoint spec (a local directory or a Hugging Face repo id) to a local directory.

    ./ckpt, /models/x, ~/x      a local directory holding config.json and *.safetensors (or Mistral's
                                params.json and consolidated*.safetensors)
    org/name                    the Hub repo at its default branch
    org/name@v1.0, org/name@<sha>, org/name@refs/pr/3
                                the Hub repo at a branch, tag, commit or PR ref

Repos are fetched with `huggingface_hub.snapshot_download`, restricted to weights, configs and
tokenizer files, so caching, HF_HOME / HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE=1 all behave exactly
as in every other Hugging Face tool. Pickle weights (.bin/.pt) are never fetched nor read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError, UsageError

# What a surgery needs from a repo: weights, configs, tokenizer and chat template. Nothing else.
ALLOW_PATTERNS = [
    "model*.safetensors",  # not e.g. Mistral's root-level consolidated.safetensors duplicate
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "params.json",  # Mistral's format: when it comes without config.json, its own files are fetched next
]
NATIVE_PATTERNS = ["consolidated*.safetensors", "consolidated.safetensors.index.json", "params.json", "tekken.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# `org/name`: the same characters as the Hub allows (alphanumerics, '-', '_', '.'); revision after '@'.
_REPO_ID = re.compile(r"[\w.-]{1,96}/[\w.-]{1,96}")
_PATH_PREFIXES = ("/", "./", "../", "~")


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint ready to read.

    path: local directory with config.json and safetensors weights (for repos: the cache snapshot).
    name: the spec as the user typed it, for provenance.
    revision: for repos, the commit sha the snapshot holds; None for local directories.
    repo_id: for repos, `org/name`; None for local directories.
    """

    path: Path
    name: str
    revision: str | None = None
    repo_id: str | None = None


def resolve_source(spec: str | Path) -> ResolvedSource:
    """Turn a local directory or `org/name[@revision]` into a ResolvedSource, fetching if needed.

    Raises UsageError for a malformed spec, BadInputError for anything missing, unreachable or unsafe.
    """
    if isinstance(spec, Path):
        return _local(spec, str(spec))
    text = spec.strip()
    if not text:
        raise UsageError("empty checkpoint spec: give a local directory or a Hugging Face repo id org/name[@revision]")
    if text.startswith(_PATH_PREFIXES) or text in (".", "..") or Path(text).expanduser().exists():
        return _local(Path(text), spec)
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or ("@" in text and not revision):
        raise UsageError(
            f"{spec!r}: no such local directory, and not a Hugging Face repo id org/name[@revision]"
        )
    return _fetch(repo_id, revision or None, spec)


def _local(path: Path, name: str) -> ResolvedSource:
    """A user-given directory: check it exists and holds a usable checkpoint."""
    path = path.expanduser()
    if not path.exists():
        raise BadInputError(f"{name}: no such directory")
    if not path.is_dir():
        raise BadInputError(f"{name}: not a directory (give the checkpoint folder, not a file in it)")
    _check_checkpoint(path, name)
    return ResolvedSource(path=path.resolve(), name=name)


def _check_checkpoint(path: Path, name: str, repo_files: Sequence[str] = ()) -> None:
    """Refuse a directory without config.json or without safetensors weights (naming pickle files if any).

    repo_files: the repo's full file list when known, to tell "pickle-only repo" from "no weights".
    """
    has_weights = any(path.glob("*.safetensors"))
    if not has_weights:
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        pickles += sorted(f for f in repo_files if f.endswith(PICKLE_SUFFIXES) and "/" not in f)
        if pickles:
            raise BadInputError(
                f"{name}: only pickle weights ({pickles[0]}), refused because loading pickle can execute "
                "arbitrary code; convert the checkpoint to safetensors first"
            )
    if not (path / "config.json").is_file() and not (path / "params.json").is_file():
        raise BadInputError(f"{name}: no config.json (nor Mistral's params.json) in {path} (not a Hugging Face checkpoint directory)")
    if not has_weights:
        raise BadInputError(f"{name}: no safetensors weights (*.safetensors) in {path}")


def _fetch(repo_id: str, revision: str | None, name: str) -> ResolvedSource:
    """snapshot_download the useful files of a repo (or find them in the cache when offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    ref = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
        if (Path(folder) / "params.json").is_file() and not (Path(folder) / "config.json").is_file():  # Mistral's format only
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS + NATIVE_PATTERNS)
    except HFValidationError as e:
        raise UsageError(f"{name!r}: not a valid Hugging Face repo id ({_first_line(e)})") from e
    except LocalEntryNotFoundError as e:  # offline or Hub unreachable, and not (fully) cached
        if getattr(e, "snapshot_path", None):  # huggingface_hub >= 2.4: IncompleteSnapshotError
            why = "the cached snapshot is incomplete"
        else:
            why = "not in the local cache"
        if constants.HF_HUB_OFFLINE:
            raise BadInputError(f"cannot fetch {ref}: {why} and HF_HUB_OFFLINE=1") from e
        cause = e.__cause__
        detail = f" ({cause.__class__.__name__}: {_first_line(cause)})" if cause else ""
        raise BadInputError(f"cannot fetch {ref}: {why} and the Hub cannot be reached{detail}") from e
    except GatedRepoError as e:
        raise BadInputError(
            f"cannot fetch {ref}: gated repo; accept its terms on the Hub and log in (hf auth login or HF_TOKEN)"
        ) from e
    except RepositoryNotFoundError as e:
        raise BadInputError(
            f"cannot fetch {ref}: repository not found on the Hub (or private: log in with hf auth login or HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise BadInputError(f"cannot fetch {ref}: revision {revision!r} not found in {repo_id}") from e
    except HfHubHTTPError as e:
        raise BadInputError(f"cannot fetch {ref}: {_first_line(e)}") from e
    except OSError as e:  # network, disk full, permissions...
        raise BadInputError(f"cannot fetch {ref}: {e.__class__.__name__}: {_first_line(e)}") from e

    path = Path(folder)
    _check_checkpoint(path, ref, _cached_repo_files(repo_id, path.name))
    return ResolvedSource(path=path, name=name, revision=path.name, repo_id=repo_id)


def _cached_repo_files(repo_id: str, commit: str) -> list[str]:
    """The repo's full file list as cached by snapshot_download (huggingface_hub >= 2.4), else []."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
    except Exception:  # older huggingface_hub, or no listing cached (offline, pre-2.4 cache)
        return []


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else e.__class__.__name__
