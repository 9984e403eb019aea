"""Errors the command line turns into one-line messages and exit codes."""


class IfQueryError(Exception):
    """Base class: a failure with a one-line, user-facing message."""

    exit_code = 1


class InputError(IfQueryError):
    """Bad input or usage (a file, a record, an option): exit code 2, nothing written."""

    exit_code = 2


class RunError(IfQueryError):
    """A failure while running (e.g. non-finite scores): exit code 1."""

    exit_code = 1
