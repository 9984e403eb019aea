"""run-query: score query folders against training examples with fitted factors.

Model, tokenizer and factors load once; each folder (query.json + train.json) is validated before
the model loads, scored, and its CSVs written atomically. Identical token sequences are scored once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from if_query import distributed
from if_query.config import QueryConfig
from if_query.errors import IfQueryError, InputError, RunError
from if_query.fingerprint import check_fingerprint
from if_query.memory import OUT_OF_MEMORY_HINT, describe_out_of_memory, is_out_of_memory, release_memory
from if_query.metadata import METADATA_FILE, describe_model_mismatch, load_complete_metadata, model_identity
from if_query.modeling import (
    load_config,
    load_model,
    load_tokenizer,
    position_limit,
    resolve_dtype,
    resolve_matmul_precision,
    set_matmul_precision,
    track_mlp_modules,
)
from if_query.provenance import RUN_FILE, run_provenance
from if_query.records import Example, load_examples
from if_query.report import header_from_run, write_report
from if_query.results import RESULT_FILES, QueryResults, make_results, read_results, write_results
from if_query.scorer import EngineScorer, KronfluenceScorer
from if_query.tokenization import ExampleTokenizer, TokenizedExample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueryJob:
    """One unit of work: a query file and a train file scored into an output directory."""

    name: str
    query_json: Path
    train_json: Path
    output_dir: Path

    @classmethod
    def from_folder(cls, folder: str | Path) -> QueryJob:
        folder = Path(folder)
        return cls(str(folder), folder / "query.json", folder / "train.json", folder / "results")


@dataclass
class PreparedJob:
    job: QueryJob
    queries: list[Example]
    train: list[Example]
    query_tokens: list[TokenizedExample]
    train_tokens: list[TokenizedExample]


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
    if config.folders:
        return [QueryJob.from_folder(folder) for folder in config.folders]
    return [QueryJob("query", config.query_json, config.train_json, config.output_dir)]


def _unique(sequences: list[TokenizedExample]) -> tuple[list[TokenizedExample], list[int]]:
    """Distinct sequences and, for each input, the index of its distinct sequence."""
    index: dict[TokenizedExample, int] = {}
    for sequence in sequences:
        index.setdefault(sequence, len(index))
    return list(index), [index[s] for s in sequences]


class QueryRunner:
    """Loads the model and factors once, then scores any number of jobs."""

    def __init__(self, config: QueryConfig, quiet: bool = False):
        self.config = config
        self.quiet = quiet
        self.metadata = load_complete_metadata(config.factors_dir)
        self.dtype = resolve_dtype(config.dtype)
        self.tokenizer = load_tokenizer(config.model, config.revision)
        limit = position_limit(load_config(config.model, config.revision))
        self.example_tokenizer = ExampleTokenizer(self.tokenizer, config.max_length, config.eos_in_loss, limit)
        self.scorer: EngineScorer | KronfluenceScorer | None = None
        self.device = distributed.device()
        self.matmul_precision = resolve_matmul_precision(config.matmul_precision, self.device)
        set_matmul_precision(self.matmul_precision)

    def prepare(self, job: QueryJob) -> PreparedJob:
        """Read, validate and tokenize a job's files (raises InputError; loads no model)."""
        queries = load_examples(job.query_json)
        train = load_examples(job.train_json)
        return PreparedJob(
            job, queries, train,
            self.example_tokenizer.tokenize_all(queries, str(job.query_json)),
            self.example_tokenizer.tokenize_all(train, str(job.train_json)),
        )

    def load_scorer(self) -> EngineScorer | KronfluenceScorer:
        """Load the model once, check it against the factors, and build the configured scorer."""
        if self.scorer is not None:
            return self.scorer
        fit = self.metadata["fit"]
        self._check_factors({"model": model_identity(self.config.model), "revision": self.config.revision})
        identity = (self.metadata, self.config.model, self.config.revision, self.config.factors_dir)
        checked = check_fingerprint(*identity)  # before loading where it can (local folders, cached hub models)
        model = load_model(self.config.model, self.config.revision, self.dtype)
        if not checked:  # a hub model not cached before load_model downloaded it
            check_fingerprint(*identity, loaded=True)
        model, modules = track_mlp_modules(model, fit["layer_stride"])
        self._check_factors({"tracked_modules": [[m.name, m.shape] for m in modules]})
        if self.config.engine == "kronfluence":
            self.scorer = KronfluenceScorer(model, modules, self.config, self.tokenizer.pad_token_id, self.quiet)
        else:
            self.scorer = EngineScorer(model, modules, self.config, self.tokenizer.pad_token_id, self.device,
                                       self.quiet)
        return self.scorer

    def _check_factors(self, found: dict) -> None:
        """Refuse factors fitted for another model, revision or set of tracked modules (``found``'s keys)."""
        fit = self.metadata["fit"]
        fitted = {"model": fit["model"], "revision": fit["revision"],
                  "tracked_modules": [[m["name"], m["shape"]] for m in self.metadata["tracked_modules"]]}
        if reasons := describe_model_mismatch(fitted, found):
            raise InputError(f"--factors-dir {self.config.factors_dir} does not fit this model: {reasons}")

    def score(self, prepared: PreparedJob) -> QueryResults | None:
        """One job's results (None on the non-main ranks of Kronfluence's torchrun path). Identical
        token sequences are scored once and their scores copied to every record that has them."""
        unique_queries, query_index = _unique(prepared.query_tokens)
        unique_train, train_index = _unique(prepared.train_tokens)
        scored = self.load_scorer().score(unique_queries, unique_train)
        if scored is None:
            return None
        scored = scored.select(query_index, train_index)
        scored.check_finite([e.pair_id for e in prepared.queries], [e.pair_id for e in prepared.train])
        tokens = ([self.example_tokenizer.token_strings(t) for t in prepared.train_tokens]
                  if scored.per_token is not None else None)
        return make_results(prepared.queries, prepared.train, scored,
                            [t.num_labelled for t in prepared.query_tokens], tokens)

    def provenance(self, job: QueryJob) -> dict:
        """The run.json written with a job's results (see :mod:`if_query.provenance`)."""
        config = self.config
        return run_provenance(
            command=config.command, model=config.model, revision=config.revision, factors_dir=config.factors_dir,
            metadata=self.metadata, damping=config.damping_value,
            resolved_damping=self.scorer.resolved_damping,
            dtype=str(self.dtype).removeprefix("torch."), matmul_precision=self.matmul_precision,
            max_length=config.max_length, eos_in_loss=config.eos_in_loss,
            per_token_scores=config.per_token_scores, query_json=job.query_json, train_json=job.train_json,
        )

    def is_done(self, job: QueryJob) -> bool:
        """Whether every result file of ``job`` exists and is newer than its inputs and the factors."""
        inputs = [job.query_json, job.train_json, Path(self.config.factors_dir) / METADATA_FILE]
        outputs = [job.output_dir / name for name in (*RESULT_FILES, RUN_FILE)]  # run.json is moved in last
        try:
            newest_input = max(path.stat().st_mtime for path in inputs)
            return all(path.stat().st_mtime >= newest_input for path in outputs)
        except OSError:
            return False

    def run(self, jobs: list[QueryJob] | None = None) -> list[JobOutcome]:
        """Validate every job (default: the config's), load the model once, then score and write each
        valid job (with report.html under ``--report``).

        A single run stops at its first error (raised); with query folders a folder's error is kept in
        its outcome and the others go on. Under torchrun with the default engine each rank scores its
        share of the jobs; every rank returns the outcomes of all jobs (others' results read back from
        their files)."""
        jobs = query_jobs(self.config) if jobs is None else jobs
        stop_on_error = not self.config.folders
        sharded = distributed.world_size() > 1 and self.config.engine != "kronfluence"
        if sharded:
            distributed.start_folder_sharding()
        mine = set(distributed.folder_shard(len(jobs))) if sharded else set(range(len(jobs)))
        outcomes = [JobOutcome(job) for job in jobs]
        prepared: list[tuple[JobOutcome, PreparedJob]] = []
        for index, outcome in enumerate(outcomes):
            if index not in mine:
                continue
            if self.config.skip_done and self.is_done(outcome.job):
                logger.info("Skipping %s: results are complete and newer than its inputs and factors",
                            outcome.job.name)
                outcome.skipped = True
                continue
            try:
                prepared.append((outcome, self.prepare(outcome.job)))
            except InputError as exc:
                if stop_on_error and not sharded:
                    raise
                outcome.error = exc
        self.example_tokenizer.warn_capped()
        if prepared:
            self.load_scorer()
        for outcome, job in prepared:
            logger.info("Scoring %s: %d queries x %d train examples",
                        job.job.name, len(job.queries), len(job.train))
            error = self._score_and_write(outcome, job)
            if error is not None:
                if stop_on_error and not sharded:
                    raise error
                outcome.error = error
        if sharded:
            self._collect(outcomes, mine)
            if stop_on_error and (failed := [o for o in outcomes if o.error is not None]):
                raise failed[0].error
        return outcomes

    def _score_and_write(self, outcome: JobOutcome, job: PreparedJob) -> IfQueryError | None:
        """Score and write one job into ``outcome``; its error, if it failed. Running out of memory is that
        job's failure (with a hint), not the run's: the memory is released and the next job can go on."""
        try:
            outcome.results = self.score(job)
            if outcome.results is not None:
                outcome.results.provenance = self.provenance(job.job)
                outcome.files = self.write(outcome.results, job.job.output_dir)
            return None
        except IfQueryError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - only an out-of-memory error is turned into the job's failure
            if not is_out_of_memory(exc):
                raise
            error = RunError(f"out of memory on {self.device} ({describe_out_of_memory(exc)}); {OUT_OF_MEMORY_HINT}")
        # The exception (and the frames holding its tensors) is gone here: the memory can really be released.
        outcome.results = None
        release_memory(self.device)
        return error

    def write(self, results: QueryResults, output_dir: Path) -> list[Path]:
        """The CSVs and run.json (atomically), then report.html under ``--report``."""
        files = write_results(results, output_dir)
        if self.config.report:
            files.append(write_report(output_dir, header_from_run(results.provenance), self.config.top_k))
        return files

    @staticmethod
    def _collect(outcomes: list[JobOutcome], mine: set[int]) -> None:
        """Fill in the outcomes of the jobs other ranks scored (their status, results from disk)."""
        status = {i: (o.error.exit_code, str(o.error)) if o.error else ("skipped" if o.skipped else "ok")
                  for i, o in enumerate(outcomes) if i in mine}
        for shard in distributed.gather(status):
            for index, state in shard.items():
                outcome = outcomes[index]
                if index in mine:
                    continue
                if isinstance(state, tuple):
                    outcome.error = (InputError if state[0] == InputError.exit_code else RunError)(state[1])
                elif state == "skipped":
                    outcome.skipped = True
                else:
                    outcome.results = read_results(outcome.job.output_dir)
