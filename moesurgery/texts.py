"""Built-in English text (Python's own documentation, `pydoc_data.topics`) for calibration and
held-out evaluation, so calibrated surgery works with no download: `--calibration pydoc`."""

from __future__ import annotations


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds leave the documentation out
        from .errors import BadInputError

        raise BadInputError("the built-in `pydoc` text needs Python's pydoc_data module, which this Python lacks: pass a text file") from None
    return topics


def split_keys() -> tuple[list[str], list[str]]:
    """(calibration keys, held-out keys): every 4th topic (sorted) is held out."""
    keys = sorted(_topics())
    return [k for i, k in enumerate(keys) if i % 4 != 3], [k for i, k in enumerate(keys) if i % 4 == 3]


def calibration_text(max_chars: int = 200_000) -> str:
    topics = _topics()
    return "\n\n".join(topics[k] for k in split_keys()[0])[:max_chars]


def heldout_text(max_chars: int = 200_000) -> str:
    topics = _topics()
    return "\n\n".join(topics[k] for k in split_keys()[1])[:max_chars]


APACHE = "/usr/share/common-licenses/Apache-2.0"  # Debian's copy: legal English, another domain than pydoc


def apache_text() -> str:
    """The Apache License 2.0 as Debian ships it (held-out text of another domain than the calibration text)."""
    from pathlib import Path

    try:
        return Path(APACHE).read_text()
    except OSError:
        from .errors import BadInputError

        raise BadInputError(f"{APACHE} is not here (Debian's common-licenses): pass a text file") from None
