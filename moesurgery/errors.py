"""Errors with documented exit codes.

0 success, 1 unexpected failure (a bug), 2 usage error, 3 bad or unsupported input,
4 a verification expectation not met, 5 environment (cannot read or write: permissions,
read-only file system, full disk), 130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM).
"""

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_NOT_EXACT = 4
EXIT_ENVIRONMENT = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class MoeSurgeryError(Exception):
    """Base error: its message is printed as one `error: ...` line."""

    exit_code = EXIT_UNEXPECTED


class UsageError(MoeSurgeryError):
    exit_code = EXIT_USAGE


class BadInputError(MoeSurgeryError):
    """Unreadable checkpoint, unsupported layout, incompatible conversion."""

    exit_code = EXIT_BAD_INPUT


class VerificationError(MoeSurgeryError):
    exit_code = EXIT_NOT_EXACT


class EnvironmentFault(MoeSurgeryError):
    """The machine refused: permission denied, read-only file system, no space left."""

    exit_code = EXIT_ENVIRONMENT


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like KeyboardInterrupt (cleanup runs), but no library
    (click, typer, a thread pool) mistakes it for an ordinary error or swallows it."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signum)
        self.signum = signum
        self.exit_code = EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
        self.message = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"


def environment_error(e: OSError, what: str) -> EnvironmentFault:
    """An OSError of the machine (not of the input) as one line naming `what`."""
    import errno
    import os

    reason = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EDQUOT: "disk quota exceeded"}.get(e.errno) or (os.strerror(e.errno) if e.errno else str(e))
    return EnvironmentFault(f"cannot write {what}: {reason}")
