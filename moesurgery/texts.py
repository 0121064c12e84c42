"""Built-in English text for calibration and held-out evaluation, so calibrated surgery works with no download:
Python's own documentation (`pydoc_data.topics`, `--calibration pydoc`) and, where the system has them, the GNU
manuals of /usr/share/info (`--calibration manuals`: Debian / Ubuntu info pages, their licence notices left out)."""

from __future__ import annotations

import re


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


INFO_DIR = "/usr/share/info"
_NOTICE = re.compile(r"Permission is granted|Copyright|Free Documentation License|General Public License|WITHOUT ANY WARRANTY", re.I)
_SKIP_NODE = re.compile(r"licen[cs]e|copying|copyright|warranty|index|GNU [LA]?GPL|GNU FDL", re.I)


def manuals_text(info_dir: str = INFO_DIR) -> str:
    """The GNU manuals (info pages) under `info_dir`, one piece of each in turn (`interleave`): technical English
    of another kind than Python's documentation. Nodes about licences and indices and paragraphs with licence
    notices are left out, so no legal text comes in."""
    import gzip
    from pathlib import Path

    texts = []
    for path in sorted(Path(info_dir).glob("*.info*")):
        try:
            raw = gzip.open(path, "rt", errors="replace").read() if path.suffix == ".gz" else path.read_text(errors="replace")
        except (OSError, EOFError):
            continue
        kept = []
        for node in raw.split("\x1f")[1:]:  # info nodes; the first piece is the file's preamble
            head, _, body = node.partition("\n\n")
            name = re.search(r"Node: ([^,\n]*)", head)
            if name is None or _SKIP_NODE.search(name.group(1)):
                continue
            kept += [p for p in body.split("\n\n") if p.strip() and not _NOTICE.search(p)]
        if kept:
            texts.append("\n\n".join(kept))
    if not texts:
        from .errors import BadInputError

        raise BadInputError(f"the built-in `manuals` text needs GNU info manuals in {info_dir} (Debian / Ubuntu info pages): pass a text file")
    return interleave(texts)


BUILTIN = {"pydoc": "pydoc (built-in Python documentation)", "manuals": f"manuals (GNU info manuals in {INFO_DIR})"}


def builtin_text(name: str) -> str:
    """A built-in calibration text by name (BUILTIN)."""
    return calibration_text() if name == "pydoc" else manuals_text()


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
