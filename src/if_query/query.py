"""run-query: score query folders against training examples (records or a corpus) with fitted factors.

Model, tokenizer and factors load once; each folder (query.json + train.json) is validated before the model
loads, scored, and its CSVs written atomically. The one straight line of a job: records -> tokens -> distinct
sequences (deduplicated here, once: identical token sequences are scored once and their scores copied to every
record that has them) -> the scorer (at once, or in chunks of the train side) -> a
:class:`~if_query.results.ResultTable` with its provenance -> the writer. With ``--train-dataset`` the corpus is
the train side of every folder, and one pass over it scores every folder's queries.

Under torchrun (default engine): a job whose train side is a corpus, or needs more than one chunk, is scored by
all ranks together (they split its chunks; rank 0 gathers the scores and writes); the other jobs are shared out,
folder r to rank r mod N, each rank writing its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from if_query import distributed, ranking
from if_query.atomic import check_writable_dir
from if_query.checkpoint import Checkpoint
from if_query.compatibility import load_model_for_factors
from if_query.config import QueryConfig
from if_query.corpus import Corpus
from if_query.errors import IfQueryError, InputError, RunError
from if_query.fingerprint import dataset_fingerprint
from if_query.memory import OUT_OF_MEMORY_HINT, describe_out_of_memory, is_out_of_memory, release_memory
from if_query.metadata import METADATA_FILE, canonical_model, load_complete_metadata
from if_query.modeling import (
    load_config,
    load_tokenizer,
    position_limit,
    resolve_dtype,
    resolve_matmul_precision,
    set_matmul_precision,
)
from if_query.provenance import RUN_FILE, run_provenance
from if_query.records import Example, load_examples
from if_query.report import header_from_run, write_report
from if_query.results import RESULT_FILES, QueryResults, ResultTable, TrainSide, read_results, write_results
from if_query.scorer import EngineScorer, KronfluenceScorer, ScoredSet, TrainSequences
from if_query.tokenization import Collator, ExampleTokenizer, TokenizedExample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryJob:
    """One unit of work: a query file and a train side (a train file, or the corpus) scored into a directory."""

    name: str
    query_json: Path
    train_json: Path | None  # None: the train side is the --train-dataset corpus
    output_dir: Path

    @classmethod
    def from_folder(cls, folder: str | Path, corpus: bool = False) -> QueryJob:
        folder = Path(folder)
        return cls(str(folder), folder / "query.json", None if corpus else folder / "train.json", folder / "results")


@dataclass
class PreparedJob:
    job: QueryJob
    queries: list[Example]
    query_tokens: list[TokenizedExample]
    train: list[Example] | None = None  # None: the corpus
    train_tokens: list[TokenizedExample] | None = None

    @property
    def distinct_queries(self) -> tuple[list[TokenizedExample], list[int]]:
        return _unique(self.query_tokens)


@dataclass
class JobOutcome:
    job: QueryJob
    error: IfQueryError | None = None
    results: QueryResults | None = None
    files: list[Path] = field(default_factory=list)
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def query_jobs(config: QueryConfig) -> list[QueryJob]:
    """The jobs a config names: one per query folder, or the single-run mode's one."""
    corpus = config.train_dataset is not None
    if config.folders:
        return [QueryJob.from_folder(folder, corpus) for folder in config.folders]
    return [QueryJob("query", config.query_json, config.train_json, config.output_dir)]


def _unique(sequences: list[TokenizedExample]) -> tuple[list[TokenizedExample], list[int]]:
    """Distinct sequences and, for each input, the index of its distinct sequence."""
    index: dict[TokenizedExample, int] = {}
    for sequence in sequences:
        index.setdefault(sequence, len(index))
    return list(index), [index[s] for s in sequences]


HASHED_INPUT_BYTES = 256 * 1024**2  # inputs up to this size are identified by their content, larger ones by stat


def _stamp(path: Path | None) -> list:
    """What identifies an input's content: a small file's sha256, a large one's size and modification time (a
    directory: its files')."""
    if path is None:
        return []
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest() if f.stat().st_size
             <= HASHED_INPUT_BYTES else f.stat().st_mtime_ns] for f in files]


class QueryRunner:
    """Loads the model and factors once, then scores any number of jobs."""

    def __init__(self, config: QueryConfig, quiet: bool = False):
        self.config = config
        self.quiet = quiet
        if config.spill_dir is not None:  # where token factors may be spilled: checked before any work
            check_writable_dir(config.spill_dir, "spill_dir")
        self.metadata = load_complete_metadata(config.factors_dir)  # checked against the model: load_scorer
        self.dtype = resolve_dtype(config.dtype)
        self.tokenizer = load_tokenizer(config.model, config.revision)
        self.hf_config = load_config(config.model, config.revision)  # read once: positions, the refine check
        limit = position_limit(self.hf_config)
        self.example_tokenizer = ExampleTokenizer(self.tokenizer, config.max_length, config.eos_in_loss, limit)
        self.corpus = None if config.train_dataset is None else Corpus(config.train_dataset, self.example_tokenizer)
        self.scorer: EngineScorer | KronfluenceScorer | None = None
        self.device = distributed.device()
        self.matmul_precision = resolve_matmul_precision(config.matmul_precision, self.device)
        set_matmul_precision(self.matmul_precision)
        self.refine_examples = self._refine_data() if config.refine_steps else []

    def _refine_data(self) -> list[TokenizedExample]:
        """--refine-steps: refuse (before the model loads) where g, v and H v will not fit the device; the
        fitting examples of the Gauss-Newton batches (the factors' own by default, checked unchanged)."""
        from if_query.hessian_data import load_hessian_examples
        from if_query.modeling import meta_model
        from if_query.refine import refine_bytes
        from if_query.sizes import ModelShape, Shape, human_bytes

        config = self.config
        shapes = [Shape(m["name"], m["shape"][0], m["shape"][1], m["bias"]) for m in self.metadata["tracked_modules"]]
        model_bytes = ModelShape.of(meta_model(self.hf_config), self.hf_config).parameters * self.dtype.itemsize
        vectors, _ = refine_bytes(shapes, 1)
        if self.device.type == "cuda":
            limit, where = torch.cuda.get_device_properties(self.device).total_memory, f"{self.device}'s memory"
        else:
            from if_query.memory import host_memory_available

            limit, where = host_memory_available(), "the free RAM"
        if vectors + model_bytes > limit:
            raise InputError(f"needs g, v and H v of one query on the device ({human_bytes(vectors)}: the tracked "
                             f"weights three times in float32) besides the model ({human_bytes(model_bytes)}), more "
                             f"than {where} ({human_bytes(limit)}); track fewer blocks (--layer-stride) or run "
                             "without it", option="refine_steps")
        fit, data = self.metadata["fit"], self.metadata.get("hessian_data")
        if config.refine_data is not None:
            return load_hessian_examples(config.refine_data, self.example_tokenizer)
        if data is None:
            raise InputError("needs the factors' fitting data, and their metadata.json does not say how it was "
                             "tokenized (fitted by an older if-query); give --refine-data", option="refine_steps")
        tokenizer = ExampleTokenizer(self.tokenizer, data["max_length"],
                                     position_limit=self.example_tokenizer.position_limit)
        examples = load_hessian_examples(fit["hessian_dataset"], tokenizer, data["max_examples"])
        if dataset_fingerprint(examples) != fit["hessian_dataset_fingerprint"]:
            raise InputError(f"needs the factors' fitting data, and {fit['hessian_dataset']} changed since the fit "
                             "(its fingerprint differs); give --refine-data", option="refine_steps")
        return examples

    def prepare(self, job: QueryJob) -> PreparedJob:
        """Check the job's folder and where it writes, read, validate and tokenize its files (raises InputError;
        loads no model)."""
        if self.config.folders and not (folder := job.query_json.parent).is_dir():
            raise InputError(f"{folder}: " + ("not a folder" if folder.exists() else "folder not found"))
        check_writable_dir(job.output_dir, None if self.config.folders else "output_dir")
        queries = load_examples(job.query_json)
        prepared = PreparedJob(job, queries, self.example_tokenizer.tokenize_all(queries, str(job.query_json)))
        if job.train_json is not None:
            prepared.train = load_examples(job.train_json)
            prepared.train_tokens = self.example_tokenizer.tokenize_all(prepared.train, str(job.train_json))
        return prepared

    def load_scorer(self) -> EngineScorer | KronfluenceScorer:
        """Load the model once, refusing factors that do not fit it
        (:func:`~if_query.compatibility.load_model_for_factors`), and build the configured scorer."""
        if self.scorer is not None:
            return self.scorer
        model, modules, factors = load_model_for_factors(self.config, self.metadata, self.dtype)
        if self.config.engine == "kronfluence":
            self.scorer = KronfluenceScorer(model, modules, self.config, self.tokenizer.pad_token_id, self.quiet)
        else:
            self.scorer = EngineScorer(model, modules, factors, self.config, self.tokenizer.pad_token_id,
                                       self.device, self.quiet)
            ordered, size = sorted(self.refine_examples, key=len), self.config.refine_batch_size
            collate = Collator(self.tokenizer.pad_token_id)
            self.scorer.refine_batches = [{k: v.to(self.device) for k, v in collate(ordered[i : i + size]).items()}
                                          for i in range(0, len(ordered), size)]
        return self.scorer

    # --- scoring: a job's distinct sequences -> the scorer -> a ResultTable ---

    def _records_side(self, prepared: PreparedJob, queries: list[TokenizedExample]
                      ) -> tuple[TrainSequences, list[int], TrainSide]:
        """The distinct train sequences of a job's train records (those that are also queries marked), each
        record's distinct index, and the records as train.csv writes them."""
        distinct, index = _unique(prepared.train_tokens)
        position = {q: i for i, q in enumerate(queries)}
        also_queries = {j: position[s] for j, s in enumerate(distinct) if s in position}
        return TrainSequences.of(distinct, also_queries), index, TrainSide.of_records(prepared.train)

    def _corpus_side(self) -> tuple[TrainSequences, TrainSide]:
        corpus = self.corpus
        lengths = corpus.lengths()
        return (TrainSequences(lengths, corpus.windows),
                TrainSide(corpus.ids(), corpus.rows, corpus.extra_keys))

    def checkpoint(self, job: QueryJob, queries: int, train: int) -> Checkpoint | None:
        """The resumable partial results of a job scored in chunks (rank 0 only; None otherwise)."""
        if not distributed.is_main_rank() or not isinstance(self.scorer, EngineScorer):
            return None
        config = dataclasses.asdict(self.config)
        options = {k: str(v) for k, v in config.items() if k in {f.name for f in dataclasses.fields(self.config)
                                                                  if f.compare}}
        key = {"options": options, "query": _stamp(job.query_json),
               "train": _stamp(job.train_json or Path(self.config.train_dataset)),
               "factors": [self.metadata.get("completed_at"), self.metadata["fit"].get("weights_fingerprint")],
               "model": canonical_model(self.config.model), "budget": self.scorer.host_budget,
               "world": distributed.world_size()}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        return Checkpoint(job.output_dir, digest, queries, train)

    def score(self, prepared: PreparedJob) -> ResultTable | None:
        """One job's results (None on the ranks other than 0 when the ranks score it together, or on
        Kronfluence's torchrun path)."""
        return self.score_jobs([prepared])[0][0]

    def score_jobs(self, jobs: list[PreparedJob]) -> list[tuple[ResultTable | None, Checkpoint | None]]:
        """Each job's results and the partial results to remove once they are written. Jobs whose train side is
        the corpus are scored in one pass over it, their queries together."""
        if self.corpus is not None:
            return self._score_against_corpus(jobs)
        return [self._score_records(job) for job in jobs]

    def _score_records(self, prepared: PreparedJob) -> tuple[ResultTable | None, Checkpoint | None]:
        queries, query_index = prepared.distinct_queries
        train, train_index, side = self._records_side(prepared, queries)
        scored, checkpoint = self._scored(prepared.job, queries, train)
        if scored is None:
            return None, checkpoint
        return self._table(prepared, query_index, side, train_index, scored, queries, train), checkpoint

    def _score_against_corpus(self, jobs: list[PreparedJob]) -> list[tuple[ResultTable | None, Checkpoint | None]]:
        """Every job's distinct queries together against the corpus (partial results in the first job's output
        directory), then each job's rows of the scores."""
        queries, index_of = [], {}
        for job in jobs:
            for sequence in job.query_tokens:
                if sequence not in index_of:
                    index_of[sequence] = len(queries)
                    queries.append(sequence)
        train, side = self._corpus_side()
        scored, checkpoint = self._scored(jobs[0].job, queries, train)
        if scored is None:
            return [(None, checkpoint)] + [(None, None)] * (len(jobs) - 1)
        return [(self._table(job, [index_of[s] for s in job.query_tokens], side, None, scored, queries, train),
                 checkpoint if number == 0 else None) for number, job in enumerate(jobs)]

    def _scored(self, job: QueryJob, queries: list[TokenizedExample], train: TrainSequences
                ) -> tuple[ScoredSet | None, Checkpoint | None]:
        scorer = self.load_scorer()
        chunked = isinstance(scorer, EngineScorer) and scorer.chunked(queries, train)
        checkpoint = self.checkpoint(job, len(queries), len(train.lengths)) if chunked else None
        per_token = self.config.per_token_scores and self.config.top_train is None
        return scorer.score(queries, train, checkpoint, per_token=per_token), checkpoint

    def _table(self, prepared: PreparedJob, query_index: list[int], side: TrainSide, train_index: list[int] | None,
               scored: ScoredSet, queries: list[TokenizedExample], train: TrainSequences) -> ResultTable:
        """The results of one job's records from the scores of its distinct sequences (``train_index``: each
        train record's distinct sequence; None: one each, a corpus)."""
        columns = train_index if train_index is not None else range(len(side.ids))
        selected = scored.select(query_index, columns)
        selected.check_finite([e.pair_id for e in prepared.queries], side.ids)
        config = self.config
        kept = None
        if config.top_train is not None:
            kept = [ranking.kept(selected.scores[q].numpy(), side.ids, config.top_train)
                    for q in range(len(prepared.queries))]
        tokens = None
        if config.per_token_scores:
            if kept is not None:  # a second pass, over the kept train examples only
                selected.per_token = self._kept_per_token(kept, queries, query_index, train, train_index)
            rows = {t for q, t in selected.per_token}
            sequences = dict(zip(sorted(rows), train.take([columns[t] for t in sorted(rows)]), strict=True))
            tokens = lambda t: self.example_tokenizer.token_strings(sequences[t])  # noqa: E731
        table = ResultTable(prepared.queries, [t.num_labelled for t in prepared.query_tokens], side, selected, kept,
                            tokens)
        table.provenance = self.provenance(prepared.job, scored.damping)
        return table

    def _kept_per_token(self, kept: list[np.ndarray], queries: list[TokenizedExample], query_index: list[int],
                        train: TrainSequences, train_index: list[int] | None) -> dict:
        """Per-token scores of the kept pairs: the kept train examples' distinct sequences scored again, at
        once, with per-token scores; {(query record, train record): scores}."""
        records = sorted(set(np.concatenate(kept).tolist()))
        distinct = sorted({train_index[t] if train_index is not None else t for t in records})
        position = {d: k for k, d in enumerate(distinct)}
        scored = self.load_scorer().score_at_once(queries, TrainSequences.of(train.take(distinct)), True)
        result = {}
        for row, q in enumerate(query_index):
            for t in kept[row].tolist():
                d = train_index[t] if train_index is not None else t
                result[row, t] = scored.per_token[q, position[d]]
        return result

    def provenance(self, job: QueryJob, resolved_damping: dict | None) -> dict:
        """The run.json written with a job's results (see :mod:`if_query.provenance`)."""
        config = self.config
        return run_provenance(
            command=config.command, model=config.model, revision=config.revision, factors_dir=config.factors_dir,
            metadata=self.metadata, damping=config.damping_value, resolved_damping=resolved_damping,
            dtype=str(self.dtype).removeprefix("torch."), matmul_precision=self.matmul_precision,
            max_length=config.max_length, eos_in_loss=config.eos_in_loss,
            per_token_scores=config.per_token_scores, query_json=job.query_json,
            train_json=job.train_json or config.train_dataset,
        )

    def is_done(self, job: QueryJob) -> bool:
        """Whether every result file of ``job`` exists and is newer than its inputs and the factors."""
        train = job.train_json or Path(self.config.train_dataset)
        inputs = [job.query_json, train, Path(self.config.factors_dir) / METADATA_FILE]
        outputs = [job.output_dir / name for name in (*RESULT_FILES, RUN_FILE)]  # run.json is moved in last
        try:
            newest_input = max(path.stat().st_mtime for path in inputs)
            return all(path.stat().st_mtime >= newest_input for path in outputs)
        except OSError:
            return False

    # --- running jobs ---

    def run(self, jobs: list[QueryJob] | None = None) -> list[JobOutcome]:
        """Validate every job (default: the config's), load the model once, then score and write each
        valid job (with report.html under ``--report``).

        A single run stops at its first error (raised); with query folders a folder's error is kept in
        its outcome and the others go on. Under torchrun with the default engine (see the module docstring)
        every rank returns the outcomes of all jobs (others' results read back from their files)."""
        jobs = query_jobs(self.config) if jobs is None else jobs
        stop_on_error = not self.config.folders
        ranks = distributed.world_size() > 1 and self.config.engine != "kronfluence"
        if ranks:
            distributed.start_folder_sharding()
        outcomes = [JobOutcome(job) for job in jobs]
        prepared: dict[int, PreparedJob] = {}
        for index, outcome in enumerate(outcomes):
            if self.config.skip_done and self.is_done(outcome.job):
                logger.info("Skipping %s: results are complete and newer than its inputs and factors",
                            outcome.job.name)
                outcome.skipped = True
                continue
            try:
                prepared[index] = self.prepare(outcome.job)
            except InputError as exc:
                if stop_on_error and not ranks:
                    raise
                outcome.error = exc
        self.example_tokenizer.warn_capped()
        if prepared:
            self.load_scorer()
        together = self._scored_together(prepared) if ranks else set(prepared)
        shared = [i for i in prepared if i not in together]
        owner = {i: 0 for i in range(len(jobs))}  # rank 0 reports what every rank knows alike
        if ranks:
            owner.update({i: k % distributed.world_size() for k, i in enumerate(shared)})
        mine = [i for i in prepared if i in together or owner[i] == distributed.rank()]
        scored_together = [i for i in mine if i in together]
        for batch in ([scored_together] if self.corpus is not None else [[i] for i in scored_together]) + [
                [i] for i in mine if i not in together]:
            if not batch:
                continue
            for index in batch:
                job = prepared[index]
                logger.info("Scoring %s: %d queries x %s train examples", job.job.name, len(job.queries),
                            len(job.train) if job.train is not None else "the corpus's")
            for index, error in zip(batch, self._score_and_write([outcomes[i] for i in batch],
                                                                 [prepared[i] for i in batch]), strict=True):
                if error is not None:
                    if stop_on_error and not ranks:
                        raise error
                    outcomes[index].error = error
        if ranks:
            self._collect(outcomes, {i for i in range(len(jobs)) if owner[i] == distributed.rank()})
            if stop_on_error and (failed := [o for o in outcomes if o.error is not None]):
                raise failed[0].error
        return outcomes

    def _scored_together(self, prepared: dict[int, PreparedJob]) -> set[int]:
        """Under torchrun, the jobs all ranks score together (a corpus, or more than one chunk): rank 0 decides
        (host budgets may differ between hosts), every rank follows."""
        together = set()
        if distributed.is_main_rank() and isinstance(self.scorer, EngineScorer):
            for index, job in prepared.items():
                queries, _ = job.distinct_queries
                if job.train is None or self.scorer.chunked(queries, self._records_side(job, queries)[0]):
                    together.add(index)
        together = distributed.broadcast(together)
        if together:
            logger.info("%d of %d jobs are scored by all %d ranks together (their chunks split); the others are "
                        "shared out", len(together), len(prepared), distributed.world_size())
        return together

    def _score_and_write(self, outcomes: list[JobOutcome], jobs: list[PreparedJob]) -> list[IfQueryError | None]:
        """Score and write jobs (scored together: see :meth:`score_jobs`) into their outcomes; each job's error,
        if it failed. Running out of memory is those jobs' failure (with a hint), not the run's: the memory is
        released and the next job can go on."""
        error = None
        try:
            results = self.score_jobs(jobs)
        except IfQueryError as exc:
            return [exc] * len(jobs)
        except Exception as exc:  # noqa: BLE001 - only an out-of-memory error is turned into the jobs' failure
            if not is_out_of_memory(exc):
                raise
            error = RunError(f"out of memory on {self.device} ({describe_out_of_memory(exc)}); {OUT_OF_MEMORY_HINT}")
        if error is not None:  # the exception (and the frames holding its tensors) is gone: release the memory
            release_memory(self.device)
            return [error] * len(jobs)
        errors: list[IfQueryError | None] = []
        for outcome, job, (table, _) in zip(outcomes, jobs, results, strict=True):
            try:
                if table is not None:
                    outcome.files = self.write(table, job.job.output_dir)
                    outcome.results = table.summary(self.config.top_k)
                errors.append(None)
            except IfQueryError as exc:
                errors.append(exc)
        for _, checkpoint in results:
            if checkpoint is not None and not any(errors):
                checkpoint.remove()
        return errors

    def write(self, results: ResultTable, output_dir: Path) -> list[Path]:
        """The CSVs and run.json (atomically), then report.html under ``--report``."""
        files = write_results(results, output_dir)
        if self.config.report:
            files.append(write_report(output_dir, header_from_run(results.provenance), self.config.top_k))
        return files

    @staticmethod
    def _collect(outcomes: list[JobOutcome], mine: set[int]) -> None:
        """Fill in the outcomes of the jobs other ranks scored (their status, results from disk)."""
        status = {i: (o.error.exit_code, str(o.error), o.error.option) if o.error
                  else ("skipped" if o.skipped else "ok")
                  for i, o in enumerate(outcomes) if i in mine}
        for shard in distributed.gather(status):
            for index, state in shard.items():
                outcome = outcomes[index]
                if index in mine:
                    continue
                outcome.error = None
                if isinstance(state, tuple):
                    outcome.error = (InputError if state[0] == InputError.exit_code else RunError)(*state[1:])
                elif state == "skipped":
                    outcome.skipped = True
                else:
                    outcome.results = read_results(outcome.job.output_dir)
