"""The `moesurgery` console script. Signal handlers go in before anything heavy is imported, and the
process ends with os._exit after flushing: a Ctrl-C or SIGTERM during start-up, the run or
interpreter shutdown (atexit) exits 130 / 143 with one line, never a traceback."""

from __future__ import annotations

import os
import signal
import sys


def _early(signum, frame):
    code, what = (143, "terminated (SIGTERM)") if signum == signal.SIGTERM else (130, "interrupted")
    try:
        sys.stderr.write(f"error: {what}\n")
        sys.stderr.flush()
    finally:
        os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def entry() -> None:
    signal.signal(signal.SIGINT, _early)  # until main() installs its own (which unwind and clean up)
    signal.signal(signal.SIGTERM, _early)
    from .cli import main

    code = main()
    signal.signal(signal.SIGINT, _early)  # shutdown: flush, then leave without running atexit handlers
    signal.signal(signal.SIGTERM, _early)
    _flush()
    os._exit(code)
