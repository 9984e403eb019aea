"""Files that appear complete or not at all: write beside the target, then rename into place; and the check,
before any work, that the directory they go to can be created and written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from if_query.errors import InputError


def shareable(path: str | Path) -> None:
    """Give a written file the mode a plain ``open`` would have (0o666 less the process umask): mkstemp and
    safetensors' writer create private (0600) files, and results and factors are meant to be read by others."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def shareable_tree(directory: str | Path) -> None:
    """:func:`shareable` on every file under ``directory`` (the files another library wrote there)."""
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            shareable(path)


@contextmanager
def staged_files(directory: Path, names: list[str]) -> Iterator[list[Path]]:
    """Temporary paths in ``directory`` for ``names``; when the block succeeds, each is renamed onto
    its name (so a crash before then leaves the previous files untouched); always cleaned up."""
    directory.mkdir(parents=True, exist_ok=True)
    temporaries = []
    try:
        for name in names:
            handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            os.close(handle)
            shareable(temporary)
            temporaries.append(Path(temporary))
        yield temporaries
        for name, temporary in zip(names, temporaries, strict=True):
            os.replace(temporary, directory / name)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def write_text_atomic(path: Path, write: Callable[[TextIO], None]) -> Path:
    """Write a text file through ``write(file)`` atomically."""
    with staged_files(path.parent, [path.name]) as [temporary]:
        with open(temporary, "w", encoding="utf-8", newline="") as file:
            write(file)
    return path


def check_writable_dir(directory: str | Path, option: str | None = None) -> None:
    """Refuse an output directory that could not be created or written, before any work is done for it: the
    directory, or else the nearest of its parents that exists, must be a directory this process may write in.
    An InputError naming it (``option``: the setting it is, :mod:`if_query.errors`); nothing is created."""
    directory = Path(directory)
    existing = next(path for path in (directory, *directory.parents) if path.exists())
    itself = existing == directory
    if not existing.is_dir():
        problem = "is a file, not a directory" if itself else f"cannot be created: {existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if itself else f"cannot be created: {existing} is not writable"
    else:
        return
    raise InputError(f"{directory}: {problem}", option=option)
