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


def interleave(texts: list[str], piece_chars: int = 1000) -> str:
    """Several calibration texts as one: pieces of about `piece_chars` characters (cut at a line break or space)
    taken from each text in turn, so the first N tokens hold about equal shares of every text until the
    shortest runs out (then the others go on in turn)."""
    if len(texts) == 1:
        return texts[0]
    pieces = [_pieces(t, piece_chars) for t in texts]
    out = []
    for i in range(max(map(len, pieces))):
        out += [p[i] for p in pieces if i < len(p)]
    return "".join(out)


def _pieces(text: str, size: int) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind("\n", start, end), text.rfind(" ", start, end))
            end = cut + 1 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


APACHE = "/usr/share/common-licenses/Apache-2.0"  # Debian's copy: legal English, another domain than pydoc


def apache_text() -> str:
    """The Apache License 2.0 as Debian ships it (held-out text of another domain than the calibration text)."""
    from pathlib import Path

    try:
        return Path(APACHE).read_text()
    except OSError:
        from .errors import BadInputError

        raise BadInputError(f"{APACHE} is not here (Debian's common-licenses): pass a text file") from None
