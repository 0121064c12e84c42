"""resolve_source against a fake Hugging Face cache (real blobs/ + symlinked snapshots/ layout), offline.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into `huggingface_hub.constants` at import time,
so setting the env vars inside a test is not enough: the fixture patches the constants too (and the
env vars, for anything reading them later). snapshot_download reads both constants at call time.
One test runs a fresh interpreter to check the plain env vars work end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import OfflineModeIsEnabled
from safetensors.torch import save_file

from moesurgery.errors import BadInputError, UsageError
from moesurgery.reader import CheckpointReader
from moesurgery.source import ALLOW_PATTERNS, ResolvedSource, resolve_source

SHA = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "89abcdef0123456789abcdef0123456789abcdef"
CONFIG = {"model_type": "mixtral", "num_local_experts": 2, "hidden_size": 4}
HAS_TREE_CACHE = hasattr(huggingface_hub, "get_cached_repo_tree")  # huggingface_hub >= 2.4


def _tiny_safetensors(path: Path) -> None:
    save_file({"model.embed_tokens.weight": torch.arange(8, dtype=torch.float32).reshape(2, 4)}, str(path))


def add_repo(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs=("main",), tree=None) -> Path:
    """Lay out a repo the way huggingface_hub does: blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>,
    refs/<branch> holding the commit (no trailing newline). `tree`: file names for a cached trees/<commit>.json."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / digest).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", digest), snapshot / name)
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    if tree is not None:
        listing = {name: {"size": 1, "blob_id": "0" * 40} for name in tree}
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


@pytest.fixture
def weights(tmp_path) -> bytes:
    _tiny_safetensors(tmp_path / "w.safetensors")
    return (tmp_path / "w.safetensors").read_bytes()


@pytest.fixture
def cache(tmp_path, monkeypatch, weights) -> Path:
    """An offline HF cache with org/name (main -> SHA) and org/pickled (only pytorch_model.bin)."""
    home = tmp_path / "hf_home"
    hub = home / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config = json.dumps(CONFIG).encode()
    add_repo(
        hub,
        "org/name",
        SHA,
        {"config.json": config, "model.safetensors": weights, "tokenizer.json": b"{}"},
        refs=("main", "v1"),
    )
    add_repo(hub, "org/pickled", SHA2, {"config.json": config, "pytorch_model.bin": b"\x80\x04pickle"})
    return hub


@pytest.fixture
def spy(monkeypatch):
    """Record snapshot_download calls (still calling the real one) to prove the Hub path really ran."""
    calls = []
    real = huggingface_hub.snapshot_download

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", wrapper)
    return calls


@pytest.fixture
def hub_errors(monkeypatch):
    """Errors raised by HfApi.repo_info / list_repo_tree inside snapshot_download: offline mode must block them."""
    errors = []
    for method in ("repo_info", "list_repo_tree"):
        real = getattr(HfApi, method)

        def wrapper(self, *args, _real=real, **kwargs):
            try:
                return _real(self, *args, **kwargs)
            except Exception as e:
                errors.append(e)
                raise

        monkeypatch.setattr(HfApi, method, wrapper)
    return errors


# ---- Hub repos, from the cache --------------------------------------------------------------------


def test_repo_default_branch(cache, spy, hub_errors):
    src = resolve_source("org/name")
    # the Hub was asked first, the request was blocked by offline mode, and the cache answered
    assert [type(e) for e in hub_errors] == [OfflineModeIsEnabled]
    assert src == ResolvedSource(cache / "models--org--name" / "snapshots" / SHA, "org/name", SHA, "org/name")
    assert (src.path / "config.json").is_symlink()  # served straight from the cache, not copied
    (args, kwargs), = spy
    assert args == ("org/name",) and kwargs["revision"] is None
    assert kwargs["allow_patterns"] == ALLOW_PATTERNS


@pytest.mark.parametrize("rev", ["main", "v1", SHA])
def test_repo_at_revision(cache, spy, rev):
    src = resolve_source(f"org/name@{rev}")
    assert src.path == cache / "models--org--name" / "snapshots" / SHA
    assert (src.name, src.revision, src.repo_id) == (f"org/name@{rev}", SHA, "org/name")
    assert spy[0][1]["revision"] == rev


def test_resolved_repo_opens_with_reader(cache):
    reader = CheckpointReader(resolve_source("org/name").path)
    assert reader.keys() == ["model.embed_tokens.weight"]
    assert torch.equal(reader.get("model.embed_tokens.weight"), torch.arange(8.0).reshape(2, 4))


def test_unknown_repo_offline(cache, hub_errors):
    with pytest.raises(BadInputError, match=r"cannot fetch org/missing: not in the local cache and HF_HUB_OFFLINE=1"):
        resolve_source("org/missing")
    assert [type(e) for e in hub_errors] == [OfflineModeIsEnabled]


def test_unknown_revision_offline(cache):
    with pytest.raises(BadInputError, match=r"cannot fetch org/name@nope: not in the local cache and HF_HUB_OFFLINE=1"):
        resolve_source("org/name@nope")
    with pytest.raises(BadInputError, match=f"org/name@{SHA2}"):
        resolve_source(f"org/name@{SHA2}")  # a commit sha is looked up directly in snapshots/


def test_pickle_only_repo(cache):
    with pytest.raises(BadInputError, match=r"org/pickled: only pickle weights \(pytorch_model.bin\).*execute"):
        resolve_source("org/pickled")


@pytest.mark.skipif(not HAS_TREE_CACHE, reason="tree listing cache needs huggingface_hub >= 2.4")
def test_pickle_only_repo_named_from_tree_listing(cache):
    # What an online download of a pickle-only repo leaves: config.json fetched, the .bin filtered out,
    # and the full file listing cached in trees/<commit>.json.
    add_repo(cache, "org/bin-online", SHA, {"config.json": b"{}"}, tree=["config.json", "pytorch_model.bin"])
    with pytest.raises(BadInputError, match=r"only pickle weights \(pytorch_model.bin\)"):
        resolve_source("org/bin-online")


@pytest.mark.skipif(not HAS_TREE_CACHE, reason="tree listing cache needs huggingface_hub >= 2.4")
def test_incomplete_snapshot_offline(cache):
    add_repo(cache, "org/partial", SHA, {"config.json": b"{}"}, tree=["config.json", "model.safetensors"])
    with pytest.raises(BadInputError, match=r"org/partial: the cached snapshot is incomplete and HF_HUB_OFFLINE=1"):
        resolve_source("org/partial")


def test_repo_without_weights(cache):
    add_repo(cache, "org/empty", SHA, {"config.json": b"{}", "tokenizer.json": b"{}"})
    with pytest.raises(BadInputError, match=r"org/empty: no safetensors weights"):
        resolve_source("org/empty")


def test_env_vars_alone_work_in_fresh_process(cache, tmp_path):
    """No patching: HF_HUB_OFFLINE / HF_HUB_CACHE from the environment, read by huggingface_hub at import."""
    code = "from moesurgery.source import resolve_source; print(resolve_source('org/name@v1').path)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cache / "models--org--name" / "snapshots" / SHA)

    code = "from moesurgery.source import resolve_source; resolve_source('org/missing')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "HF_HUB_OFFLINE=1" in out.stderr


# ---- local directories ----------------------------------------------------------------------------


@pytest.fixture
def local_ckpt(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    _tiny_safetensors(d / "model.safetensors")
    return d


def test_local_dir(local_ckpt, monkeypatch):
    for spec in (local_ckpt, str(local_ckpt)):
        src = resolve_source(spec)
        assert (src.path, src.name, src.revision, src.repo_id) == (local_ckpt.resolve(), str(local_ckpt), None, None)
    monkeypatch.chdir(local_ckpt.parent)
    assert resolve_source("./ckpt").path == local_ckpt.resolve()
    assert resolve_source("ckpt").path == local_ckpt.resolve()  # exists on disk: local, not a repo id
    assert CheckpointReader(resolve_source("ckpt").path).keys() == ["model.embed_tokens.weight"]


def test_local_dir_shadows_repo_id(local_ckpt, monkeypatch, spy):
    (local_ckpt.parent / "org").mkdir()
    local_ckpt.rename(local_ckpt.parent / "org" / "name")
    monkeypatch.chdir(local_ckpt.parent)
    assert resolve_source("org/name").path == (local_ckpt.parent / "org" / "name").resolve()
    assert spy == []


def test_missing_local_path(tmp_path):
    for spec in (str(tmp_path / "nope"), "./definitely/not/here", "~/definitely-not-here-moesurgery"):
        with pytest.raises(BadInputError, match="no such directory"):
            resolve_source(spec)


def test_local_file_not_dir(local_ckpt):
    with pytest.raises(BadInputError, match="not a directory"):
        resolve_source(str(local_ckpt / "config.json"))


def test_local_dir_without_config(local_ckpt):
    (local_ckpt / "config.json").unlink()
    with pytest.raises(BadInputError, match="no config.json"):
        resolve_source(local_ckpt)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pt"])
def test_local_dir_only_pickle(local_ckpt, name):
    (local_ckpt / "model.safetensors").unlink()
    (local_ckpt / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(BadInputError, match=rf"only pickle weights \({name}\).*execute.*safetensors"):
        resolve_source(local_ckpt)


# ---- malformed specs ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", "   ", "a/b/c", "gpt2", "org/", "org/name@", "bad name/x", "a--b/c"])
def test_malformed_spec(spec, cache):
    with pytest.raises(UsageError):
        resolve_source(spec)


def test_exit_codes():
    assert BadInputError.exit_code == 3 and UsageError.exit_code == 2


def test_mistral_format_repo_fetches_its_own_files(cache, spy, weights):
    """A repo in Mistral's format only (params.json, consolidated*.safetensors): a second fetch asks for them."""
    from moesurgery.source import NATIVE_PATTERNS

    add_repo(cache, "mistralai/native", SHA, {"params.json": b'{"dim": 4}', "consolidated.safetensors": weights, "tekken.json": b"{}"})
    src = resolve_source("mistralai/native")
    assert (src.path / "consolidated.safetensors").is_file()
    assert [kw["allow_patterns"] for _, kw in spy] == [ALLOW_PATTERNS, ALLOW_PATTERNS + NATIVE_PATTERNS]


def test_repo_with_both_formats_is_read_as_transformers(tmp_path):
    """Mistral's repos often hold both: the transformers files win, consolidated.safetensors is not read twice."""
    _tiny_safetensors(tmp_path / "model-00001-of-00001.safetensors")
    save_file({"tok_embeddings.weight": torch.zeros(2, 4)}, str(tmp_path / "consolidated.safetensors"))
    assert CheckpointReader(tmp_path).keys() == ["model.embed_tokens.weight"]
