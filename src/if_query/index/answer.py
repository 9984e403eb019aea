"""``run-query --index``: each query's candidates shortlisted from a corpus's index, then scored exactly.

A :class:`~if_query.run.run_query.QueryRunner` whose corpus workload is narrowed before it is planned: the queries'
rows are formed (one forward and backward pass per query, each module's rotated gradient dense, as the engine forms
it, sketched with the index's projections: :meth:`~if_query.index.sketch.ModuleSketch.dense_rows`), scored against
every row of the index by chunked products over its memory-mapped shards (no pass over the corpus), and each query's
``--candidates`` best and worst windows by the run's ranking (cosine: divided by the row's norm) kept. The union of
the queries' candidates is read back by location (from the windows the index keeps, when ``--train-dataset`` has the
bytes they were cut from: no document is read or tokenized again) and is the train side the engine scores exactly,
planned, written and reported as any corpus run's (``influences.csv`` holds exact scores; ``run.json`` records the
index and M under ``index``). An index built for other weights, factors, damping, dtype, ``--max-length``, tracked
modules or another corpus, or left incomplete, is refused in one line before any query is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from if_query.data.corpus import Corpus
from if_query.data.tokenization import Collator, TokenizedExample
from if_query.errors import InputError
from if_query.index.build import module_sketches
from if_query.index.sketch import ModuleSketch
from if_query.index.store import CORPUS, IndexStore, mismatch
from if_query.report.results import TrainSide
from if_query.run.run_query import QueryRunner
from if_query.run.workload import PreparedJob, Workload, corpus_workload
from if_query.score.capture import LayerRecorder, forward_backward, frozen_weights
from if_query.score.sequences import TrainSequences

logger = logging.getLogger(__name__)


def query_rows(scorer, sketches: list[ModuleSketch], queries: list[TokenizedExample], batch_size: int,
               form: str) -> torch.Tensor:
    """(queries, D) float32 on the host: each query's dense rotated gradient per module, sketched (``form``)."""
    collate = Collator(scorer.pad_token_id)
    rows = []
    with frozen_weights(scorer.model), LayerRecorder(scorer.linears) as recorder:
        for start in range(0, len(queries), batch_size):
            batch = {k: v.to(scorer.device) for k, v in collate(queries[start : start + batch_size]).items()}
            forward_backward(scorer.model, batch)
            with torch.no_grad():
                rows.append(torch.cat([s.dense_rows(s.rotated(recorder.inputs[s.shape.name],
                                                              recorder.output_grads[s.shape.name]), form)
                                       for s in sketches], dim=1).cpu())
            recorder.clear()
    return torch.cat(rows) if rows else torch.zeros(0, sum(s.dim for s in sketches))


class IndexRunner(QueryRunner):
    """run-query with ``--index`` (see the module docstring)."""

    def __init__(self, config, quiet: bool = False, results: str = "summary"):
        super().__init__(config, quiet, results)
        self._open_index()

    @classmethod
    def sharing(cls, runner: QueryRunner, config) -> IndexRunner:
        """An index run of ``config`` sharing ``runner``'s tokenizer, factors and loaded model (the
        :class:`~if_query.api.Attributor`'s calls: see :meth:`QueryRunner.for_jobs`)."""
        indexed = cls.__new__(cls)
        indexed.__dict__.update(runner.for_jobs(config).__dict__)
        indexed._open_index()
        return indexed

    def _open_index(self) -> None:
        self.index = IndexStore.open(Path(self.config.index))  # a directory that is no index: refused before the model
        kept = Corpus.saved(self.index.directory / CORPUS, self.config.train_dataset, self.example_tokenizer)
        if kept is not None:  # else the corpus is read as any run reads it, and its windows checked against the index
            self.corpus = kept
        self.digest = hashlib.sha256(json.dumps(self.index.manifest, sort_keys=True).encode()).hexdigest()[:16]
        self.shortlisted: dict = {}

    def _identity(self, queries: str, train: str) -> dict:
        """The run's identity with the index and M: its results are not an exact corpus run's."""
        return {**super()._identity(queries, train), "index": self.digest, "candidates": self.config.candidates,
                "index_query_form": self.config.index_query_form}

    def check_index(self) -> None:
        """Refuse, in one line, an index that was built for another run or is incomplete."""
        manifest = self.index.manifest
        identity = QueryRunner._identity(self, "", self.corpus.digest)
        reason = mismatch(manifest, identity, [s.name for s in self.load_scorer().shapes])
        if reason is not None:
            raise InputError(f"{self.config.index} was {reason}: build an index for this run with if-query index",
                             option="index", flag_first=False)
        if not manifest.get("complete"):
            raise InputError(f"{self.config.index} is incomplete ({self.index.done_count()} of {self.index.windows} "
                             "windows): rerun if-query index with its arguments to finish it", option="index",
                             flag_first=False)

    def workloads(self, prepared: dict[int, PreparedJob]) -> list[Workload]:
        """The corpus workload narrowed to the union of the queries' candidates."""
        if not prepared:
            return []
        self.check_index()
        work = corpus_workload(prepared, self.corpus, self._key)
        scorer = self.load_scorer()
        sketch = self.index.manifest["sketch"]
        started = time.perf_counter()
        sketches = module_sketches(scorer, sketch)
        rows = query_rows(scorer, sketches, work.queries, self.config.batch_sizes()[0], self.config.index_query_form)
        top, bottom = self.index.shortlist(rows, self.config.candidates, self.config.ranking == "cosine")
        chosen = np.unique(np.concatenate([top.ravel(), bottom.ravel()]))
        elapsed = time.perf_counter() - started
        self.shortlisted = {"path": str(self.config.index), "candidates": self.config.candidates,
                            "windows": self.index.windows, "shortlisted": len(chosen),
                            "sketch": sketch, "query_form": self.config.index_query_form, "manifest": self.digest,
                            "seconds": round(elapsed, 3)}
        logger.info("Index %s: %d queries against %d windows' rows in %.1f s; %d windows shortlisted (%d per query "
                    "at each end), scored exactly", self.config.index, len(work.queries), self.index.windows,
                    elapsed, len(chosen), min(self.config.candidates, self.index.windows))
        corpus, position = self.corpus, {int(w): k for k, w in enumerate(chosen)}
        ids = corpus.ids()

        def rows_of(wanted=None):
            for index, row in corpus.rows(lambda i: i in position and (wanted is None or wanted(position[i]))):
                yield position[index], row

        train = TrainSequences(corpus.lengths()[chosen], lambda picked: corpus.windows(chosen[np.asarray(picked,
                                                                                                         dtype=np.int64)]))
        side = TrainSide([ids[int(w)] for w in chosen], rows_of, corpus.extra_keys)
        return [dataclasses.replace(work, train=train, side=side)]

    def provenance(self, prepared: PreparedJob, resolved_damping: dict | None, plan: dict | None = None) -> dict:
        return {**super().provenance(prepared, resolved_damping, plan), "index": self.shortlisted}
