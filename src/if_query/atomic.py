"""Files that appear complete or not at all: write beside the target, then rename into place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


def _shareable(path: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp creates private files; results are meant to be read


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
            _shareable(temporary)
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
