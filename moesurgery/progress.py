"""Progress bars on stderr (rich), off when stderr is not a terminal."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

stderr_console = Console(stderr=True)


@contextmanager
def byte_progress(description: str, total: int):
    """Yields `advance(nbytes)`; a no-op when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
