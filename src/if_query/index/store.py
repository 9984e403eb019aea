"""An index directory: its manifest, its rows in memory-mapped shard files, and the shortlist read from them.

``INDEX/manifest.json`` says what the rows are of (:data:`IDENTITY_KEYS`: weights, factors, damping, dtype,
``--max-length``, the corpus's windows; the tracked modules; the sketch: kind, seed, R, k, the row's dtype and each
module's place in the row and its error) and whether the index is complete. Windows are cut into shards of
``shard_rows`` consecutive windows: ``shard-NNNNN.rows`` (windows, D) float16/float32, each row divided by its norm
(whitened gradients overflow float16's range: unit rows never do), ``shard-NNNNN.norms`` (windows,) float64 (each
row's squared norm: the self-influence estimate the cosine divides by, and the raw score's scale) and
``shard-NNNNN.done`` (one byte per window). A batch's rows and norms are flushed before its done bytes are set and
flushed, so a window marked done is complete: a rerun with the same manifest does only the rest, whatever its number
of ranks (shard s is rank s mod N's). ``lengths.npy`` holds every window's tokens; ``corpus/`` the windows themselves
(:meth:`~if_query.data.corpus.Corpus.save`: 4 bytes a token), which ``run-query --index`` reads its candidates from
instead of reading the corpus again.

Disk: D × (2 or 4) + 9 bytes per window, D = Σ_modules k² (4 modules at k = 32 in float16: 8 KB).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from if_query.errors import InputError
from if_query.fit.metadata import write_json_atomic

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
CORPUS = "corpus"  # the windows, as Corpus.save keeps them
FORMAT = 1
ROW_DTYPES = {"float16": np.float16, "float32": np.float32}
# What the rows' numbers depend on: a run-query --index whose own values differ is refused (run.identity's names)
# (not --chat-template: a corpus's windows do not depend on it, text documents ignoring it and conversations always
# going through the template; it changes the queries alone, which are the run's)
IDENTITY_KEYS = ("weights", "revision", "factors", "damping", "dtype", "max_length", "eos_in_loss", "train")
DESCRIBED = {"weights": "other weights", "factors": "other factors", "train": "another corpus (its windows' tokens)",
             "max_length": "another --max-length", "damping": "another --damping", "dtype": "another --dtype",
             "revision": "another --revision", "eos_in_loss": "another --eos-in-loss",
             "tracked_modules": "other tracked modules"}


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def mismatch(manifest: dict, identity: dict, modules: list[str]) -> str | None:
    """Why an index of ``manifest`` does not serve a run of ``identity`` (its values of :data:`IDENTITY_KEYS`)
    and tracked ``modules``: the first difference, in words; None when it serves."""
    recorded = manifest.get("identity", {})
    for key in IDENTITY_KEYS:
        if recorded.get(key) != identity.get(key):
            values = "" if key in ("weights", "factors", "train") else f" ({recorded.get(key)!r}, this run "\
                f"{identity.get(key)!r})"
            return f"built for {DESCRIBED[key]}{values}"
    if manifest.get("tracked_modules") != modules:
        return f"built for {DESCRIBED['tracked_modules']}"
    return None


class IndexStore:
    """An index directory's shard files (see the module docstring), opened to write (``create``/``resume``) or to
    read (``open``)."""

    def __init__(self, directory: Path, manifest: dict, mode: str):
        self.directory, self.manifest = Path(directory), manifest
        self.windows = int(manifest["windows"])
        self.shard_rows = int(manifest["shard_rows"])
        self.dim = int(manifest["row_dim"])
        self.row_dtype = ROW_DTYPES[manifest["row_dtype"]]
        self.mode = mode
        self._maps: dict[int, tuple[np.memmap, np.memmap, np.memmap]] = {}

    @classmethod
    def create(cls, directory: Path, manifest: dict, lengths: np.ndarray) -> IndexStore:
        """A new index: its shard files made at full size (zeros: nothing done), then its manifest."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("shard-*"):
            stale.unlink()
        np.save(directory / "lengths.npy", np.asarray(lengths, dtype=np.int64))
        store = cls(directory, manifest, "r+")
        for shard in range(store.shards):
            rows = len(store.shard_range(shard))
            for suffix, dtype, shape in store._files(rows):
                np.memmap(directory / f"shard-{shard:05d}.{suffix}", dtype, "w+", shape=shape).flush()
        write_json_atomic(directory / MANIFEST, manifest)
        return store

    @classmethod
    def open(cls, directory: Path, mode: str = "r") -> IndexStore:
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("format") != FORMAT:
            raise InputError(f"{directory}: not an if-query index (no readable {MANIFEST}): build one with "
                             "if-query index", option="index")
        return cls(directory, manifest, mode)

    def _files(self, rows: int) -> list[tuple[str, type, tuple]]:
        return [("rows", self.row_dtype, (max(rows, 1), self.dim)), ("norms", np.float64, (max(rows, 1),)),
                ("done", np.uint8, (max(rows, 1),))]

    @property
    def shards(self) -> int:
        return -(-self.windows // self.shard_rows)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.windows))

    def _map(self, shard: int) -> tuple[np.memmap, np.memmap, np.memmap]:
        if shard not in self._maps:
            rows = len(self.shard_range(shard))
            self._maps[shard] = tuple(np.memmap(self.directory / f"shard-{shard:05d}.{suffix}", dtype, self.mode,
                                                shape=shape) for suffix, dtype, shape in self._files(rows))
        return self._maps[shard]

    def done(self, shard: int) -> np.ndarray:
        """(windows of the shard,) bool: the windows whose rows are on disk."""
        return np.asarray(self._map(shard)[2][: len(self.shard_range(shard))], dtype=bool)

    def done_count(self) -> int:
        return sum(int(self.done(s).sum()) for s in range(self.shards))

    def record(self, shard: int, local: np.ndarray, rows: np.ndarray) -> None:
        """Windows ``local`` (offsets in the shard) have ``rows`` (n, D): kept as unit rows and squared norms."""
        values, squared, done = self._map(shard)
        norms = (rows.astype(np.float64) ** 2).sum(axis=1)
        values[local] = (rows / np.sqrt(np.where(norms > 0, norms, 1.0))[:, None]).astype(self.row_dtype)
        squared[local] = norms
        values.flush()
        squared.flush()
        done[local] = 1
        done.flush()

    def mark_complete(self) -> None:
        self.manifest["complete"] = True
        write_json_atomic(self.directory / MANIFEST, self.manifest)

    def shortlist(self, queries: torch.Tensor, candidates: int, cosine: bool,
                  chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Each query's ``candidates`` highest and ``candidates`` lowest windows by the run's ranking, estimated from
        the rows: ``<q, row>``, divided by ``|row|`` with ``cosine`` (the query's own norm ranks nothing). Chunked
        products over the memory-mapped shards (``queries`` (Q, D) float32). Returns (top, bottom) window indices,
        (Q, M) each."""
        count = min(candidates, self.windows)
        sides = {name: (torch.full((len(queries), 0), -torch.inf, dtype=torch.float64),
                        torch.zeros(len(queries), 0, dtype=torch.int64)) for name in ("top", "bottom")}
        for shard in range(self.shards):
            span = self.shard_range(shard)
            values, squared, _ = self._map(shard)
            for start in range(0, len(span), chunk_rows):
                stop = min(start + chunk_rows, len(span))
                rows = torch.from_numpy(np.array(values[start:stop], dtype=np.float32))  # unit rows
                key = (queries @ rows.T).double()  # (Q, n): the cosine's order
                if not cosine:
                    key *= torch.from_numpy(np.array(squared[start:stop])).sqrt()
                where = torch.arange(span.start + start, span.start + stop).expand(len(queries), -1)
                for name, sign in (("top", 1.0), ("bottom", -1.0)):
                    best, at = sides[name]
                    merged, merged_at = torch.cat([best, sign * key], 1), torch.cat([at, where], 1)
                    kept = torch.topk(merged, min(count, merged.shape[1]), dim=1)
                    sides[name] = kept.values, torch.gather(merged_at, 1, kept.indices)
        return sides["top"][1].numpy(), sides["bottom"][1].numpy()

    def norms(self) -> np.ndarray:
        """Every window's squared row norm, (windows,) float64."""
        return np.concatenate([np.asarray(self._map(s)[1][: len(self.shard_range(s))]) for s in range(self.shards)])

    def rows(self) -> np.ndarray:
        """Every row, (windows, D) float32 (small indexes and tests: the shortlist never holds them all)."""
        units = np.concatenate([np.asarray(self._map(s)[0][: len(self.shard_range(s))], dtype=np.float32)
                                for s in range(self.shards)])
        return units * np.sqrt(self.norms()).astype(np.float32)[:, None]
