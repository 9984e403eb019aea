"""The scores of a run's finished train rows, on disk beside its results, so that a killed run over a large train
side resumes with whatever budget and number of ranks the rerun has.

``<output dir>/.if-query-partial/`` holds ``progress.json`` (what the scores are of: the run's identity digest,
:func:`if_query.run.identity.run_identity`, which leaves out the budgets and the number of ranks; the shape) and the
scores themselves as raw arrays: ``scores.bin`` (train, queries) float64 — one row per train example, so a chunk is
one write of its rows — ``train_self.bin`` (train,) float64 and ``done.bin`` (train,) one byte per row. A chunk's
score rows are flushed before its ``done`` bytes are set and flushed, so a row marked done is complete; a rerun
plans its chunks over the rows not done. A rerun whose identity differs ignores the directory, with a warning, and
starts again; a run that succeeds removes it.

Disk use is 8 (Q + 1) + 1 bytes per train example: 137 MB for 16 queries against a million documents.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from if_query.fit.metadata import write_json_atomic

logger = logging.getLogger(__name__)
DIRECTORY = ".if-query-partial"
PROGRESS_FILE = "progress.json"
FORMAT = 2  # 1: chunk numbers (tied to one budget and rank count); 2: rows


def _progress(key: str, queries: int, train: int) -> dict:
    """progress.json: what the partial results are of."""
    return {"format": FORMAT, "key": key, "shape": [train, queries]}


class Checkpoint:
    """Scores (train, queries), train self-influences and the done rows so far (see the module docstring)."""

    def __init__(self, output_dir: str | Path, key: str, queries: int, train: int):
        self.directory = Path(output_dir) / DIRECTORY
        self.key, self.queries, self.train = key, queries, train
        progress = self.directory / PROGRESS_FILE
        resume = False
        if progress.is_file():
            try:
                recorded = json.loads(progress.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                recorded = {}
            resume = recorded == self._progress()
            if not resume:
                logger.warning("Ignoring the partial results in %s: they were made with other settings, inputs, "
                               "model or factors; starting again", self.directory)
        if not resume:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        if resume:
            try:
                self._open("r+")
            except (OSError, ValueError):  # progress.json matches but an array is missing or short: start again
                logger.warning("Ignoring the partial results in %s: they are incomplete; starting again",
                               self.directory)
                resume = False
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory.mkdir(parents=True, exist_ok=True)
        if not resume:
            self._open("w+")
            write_json_atomic(progress, self._progress())
        elif done := int(self._done[:train].sum()):
            logger.info("Resuming from %s: %d of %d train examples already scored", self.directory, done, train)

    def _open(self, mode: str) -> None:
        rows = max(self.train, 1)
        self.scores = np.memmap(self.directory / "scores.bin", np.float64, mode, shape=(rows, self.queries or 1))
        self.train_self = np.memmap(self.directory / "train_self.bin", np.float64, mode, shape=(rows,))
        self._done = np.memmap(self.directory / "done.bin", np.uint8, mode, shape=(rows,))

    def _progress(self) -> dict:
        return _progress(self.key, self.queries, self.train)

    @property
    def done(self) -> np.ndarray:
        """(train,) bool: the rows whose scores are on disk."""
        return np.asarray(self._done[: self.train], dtype=bool)

    def record(self, rows: np.ndarray, scores: np.ndarray, train_self: np.ndarray | None) -> None:
        """Train rows ``rows`` are scored: ``scores`` (queries, len(rows)), ``train_self`` (len(rows),)."""
        self.scores[rows] = scores.T
        if train_self is not None:
            self.train_self[rows] = train_self
        self.scores.flush()
        self.train_self.flush()
        self._done[rows] = 1
        self._done.flush()

    def remove(self) -> None:
        """The run succeeded: the partial results go."""
        del self.scores, self.train_self, self._done
        shutil.rmtree(self.directory, ignore_errors=True)


def done_rows(output_dir: str | Path, key: str, queries: int, train: int) -> np.ndarray | None:
    """(train,) bool: the rows the partial results in ``output_dir`` hold for this identity and shape; None when
    there are none (or they are another run's). Reads only: the plan is made from it before anything is written."""
    directory = Path(output_dir) / DIRECTORY
    try:
        recorded = json.loads((directory / PROGRESS_FILE).read_text(encoding="utf-8"))
        if recorded != _progress(key, queries, train):
            return None
        done = np.fromfile(directory / "done.bin", dtype=np.uint8)
        rows = max(train, 1)
        complete = ((directory / "scores.bin").stat().st_size >= rows * max(queries, 1) * 8
                    and (directory / "train_self.bin").stat().st_size >= rows * 8 and len(done) >= train)
    except (OSError, ValueError):
        return None
    return done[:train].astype(bool) if complete else None
