"""Errors with documented exit codes.

0 success, 1 unexpected failure, 2 usage error, 3 bad or unsupported input,
4 a verification expectation not met.
"""

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_NOT_EXACT = 4


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
