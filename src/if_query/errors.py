"""Errors the command line turns into one-line messages and exit codes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class IfQueryError(Exception):
    """Base class: a failure with a one-line, user-facing message.

    ``option``: the setting the message is about, as its config field (``"train_dataset"``); a Python caller reads
    it from ``exc.option`` (None: no one setting). ``flag_first``: how the command line prints the message, and
    nothing more: True (the default), after that setting's flag (``"data/corpus.jsonl: not found"`` is printed
    ``--train-dataset data/corpus.jsonl: not found``); False, as it is, where the message already names the setting
    (``"--max-length must be at least 1, got 0"``, the configs' checks) or reads whole without the flag (a records
    file's errors, which name the file, the record and the problem).
    """

    exit_code = 1

    def __init__(self, message: str, option: str | None = None, *, flag_first: bool = True):
        super().__init__(message)
        self.option = option
        self.flag_first = flag_first


class InputError(IfQueryError):
    """Bad input or usage (a file, a record, an option): exit code 2, nothing written."""

    exit_code = 2


class RunError(IfQueryError):
    """A failure while running (e.g. non-finite scores): exit code 1."""

    exit_code = 1


@contextmanager
def about(option: str) -> Iterator[None]:
    """Input errors raised inside that name no setting are made about ``option`` (``exc.option``), their message
    unchanged and printed as it is (``flag_first=False``): a file's or a folder's errors, found where the setting's
    value is read (``with about("query_json"): load_examples(path)``)."""
    try:
        yield
    except InputError as exc:
        if exc.option is None:
            exc.option, exc.flag_first = option, False
        raise


def first_line(exc: BaseException) -> str:
    """An error's message in one line: its first line, or all of it when that first line ends in a colon (it
    introduces what follows); the exception's type name when it has no message."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return " ".join(lines) if lines[0].endswith(":") else lines[0]
