"""What a scoring pass covers, formed once: a job's records tokenized (:class:`PreparedJob`), and the distinct
sequences scored with the maps back to the records (:class:`Workload`), through the one dedupe
(:func:`if_query.data.tokenization.distinct`: identical token sequences are scored once and their scores copied to
every record that has them)."""

from __future__ import annotations

from dataclasses import dataclass

from if_query.data.jobs import QueryJob
from if_query.data.records import Example
from if_query.data.tokenization import TokenizedExample, distinct
from if_query.report.results import TrainSide
from if_query.run.identity import sequences_digest
from if_query.score.sequences import TrainSequences


@dataclass
class PreparedJob:
    job: QueryJob
    queries: list[Example]
    query_tokens: list[TokenizedExample]
    train: list[Example] | None = None  # None: the corpus
    train_tokens: list[TokenizedExample] | None = None


@dataclass(frozen=True)
class Workload:
    """What one scoring pass covers, formed once (nothing downstream dedupes again): the distinct query sequences
    of its jobs, each job's map from its query records to them, the distinct train sequences (readable by range)
    with their train.csv rows, each train record's distinct sequence (None: a corpus, one row each), and the run
    identity's digest (:mod:`if_query.run.identity`) that partial results are kept under."""

    jobs: list[int]  # indices of the jobs scored together (several only against a corpus)
    queries: list[TokenizedExample]
    query_index: list[list[int]]  # per job: each query record's distinct query
    train: TrainSequences
    side: TrainSide
    train_index: list[int] | None
    key: str


def records_workload(index: int, prepared: PreparedJob, key) -> Workload:
    """A records job's workload (``key(queries, train digest)``: the identity digest partial results are kept
    under)."""
    queries, query_index = distinct(prepared.query_tokens)
    train, train_index = distinct(prepared.train_tokens)
    position = {q: i for i, q in enumerate(queries)}
    also_queries = {j: position[s] for j, s in enumerate(train) if s in position}
    return Workload([index], queries, [query_index], TrainSequences.of(train, also_queries),
                    TrainSide.of_records(prepared.train), train_index, key(queries, sequences_digest(train)))


def corpus_workload(prepared: dict[int, PreparedJob], corpus, key) -> Workload:
    """Every job's distinct queries together against the corpus (its windows one train row each)."""
    queries, _ = distinct([s for job in prepared.values() for s in job.query_tokens])
    position = {q: i for i, q in enumerate(queries)}
    return Workload(list(prepared), queries, [[position[s] for s in job.query_tokens] for job in prepared.values()],
                    TrainSequences(corpus.lengths(), corpus.windows),
                    TrainSide(corpus.ids(), corpus.rows, corpus.extra_keys), None, key(queries, corpus.digest))
