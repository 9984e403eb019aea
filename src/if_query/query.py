"""run-query: score query folders against training examples (records or a corpus) with fitted factors.

Model, tokenizer and factors load once; each folder (query.json + train.json) is validated before the model
loads, scored, and its CSVs written atomically. The one straight line of a job: records -> tokens -> distinct
sequences (deduplicated here, once: identical token sequences are scored once and their scores copied to every
record that has them) -> the scorer (at once, or in chunks of the train side) -> a
:class:`~if_query.results.ResultTable` with its provenance -> the writer. With ``--train-dataset`` the corpus is
the train side of every folder, and one pass over it scores every folder's queries.

Every decision is the run's plan's (:mod:`if_query.run_plan`), made once by rank 0 before any scoring. Under
torchrun (default engine): a job with at least two train chunks to do is split across all ranks (rank 0 gathers the
scores and writes); every other job is scored by one rank alone, jobs shared out in turn, each rank writing its own.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from if_query import distributed, ranking
from if_query.atomic import check_writable_dir
from if_query.checkpoint import Checkpoint, done_rows
from if_query.compatibility import load_model_for_factors
from if_query.config import QueryConfig
from if_query.corpus import Corpus
from if_query.errors import IfQueryError, InputError, RunError
from if_query.fingerprint import dataset_fingerprint
from if_query.identity import identity_digest, run_identity, sequences_digest
from if_query.memory import OUT_OF_MEMORY_HINT, describe_out_of_memory, is_out_of_memory, release_memory
from if_query.metadata import load_complete_metadata
from if_query.modeling import (
    load_config,
    load_tokenizer,
    position_limit,
    resolve_dtype,
    resolve_matmul_precision,
    set_matmul_precision,
)
from if_query.provenance import RUN_FILE, read_run, run_provenance
from if_query.records import Example, load_examples
from if_query.report import header_from_run, write_report
from if_query.results import RESULT_FILES, QueryResults, ResultTable, TrainSide, read_results, write_results
from if_query.run_plan import Budgets, JobPlan, RunPlan, plan_job, plan_run, resolve_budgets
from if_query.scorer import EngineScorer, KronfluenceScorer, ScoredSet, TrainSequences
from if_query.sizes import human_bytes
from if_query.tokenization import Collator, ExampleTokenizer, TokenizedExample

logger = logging.getLogger(__name__)
# How --skip-done names an identity entry that differs (others: the option, with both values)
DESCRIBED = {"weights": "model weights", "factors": "factors", "queries": "query records (their tokens)",
             "train": "train examples (their tokens)", "refine_data": "--refine-steps fitting data"}


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


@dataclass(frozen=True)
class Workload:
    """What one scoring pass covers, formed once (nothing downstream dedupes again): the distinct query sequences
    of its jobs, each job's map from its query records to them, the distinct train sequences (readable by range)
    with their train.csv rows, each train record's distinct sequence (None: a corpus, one row each), and the run
    identity's digest (:mod:`if_query.identity`) that partial results are kept under."""

    jobs: list[int]  # indices of the jobs scored together (several only against a corpus)
    queries: list[TokenizedExample]
    query_index: list[list[int]]  # per job: each query record's distinct query
    train: TrainSequences
    side: TrainSide
    train_index: list[int] | None
    key: str


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
        self.corpus = (None if config.train_dataset is None
                       else Corpus(config.train_dataset, self.example_tokenizer, config.spill_dir))
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
        else:  # the physical RAM: every rank must come to the same verdict
            from if_query.memory import host_memory_total

            limit, where = host_memory_total(), "the RAM"
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

    # --- scoring: a job's distinct sequences -> the plan -> the scorer -> a ResultTable ---

    def workloads(self, prepared: dict[int, PreparedJob]) -> list[Workload]:
        """What each job scores, formed once: a records job's distinct sequences; with a corpus, one workload of
        every job's distinct queries together against it (partial results in the first job's directory)."""
        if not prepared:
            return []
        if self.corpus is None:
            return [self._records_workload(index, job) for index, job in prepared.items()]
        queries, index_of = [], {}
        for job in prepared.values():
            for sequence in job.query_tokens:
                if sequence not in index_of:
                    index_of[sequence] = len(queries)
                    queries.append(sequence)
        corpus = self.corpus
        train = TrainSequences(corpus.lengths(), corpus.windows)
        side = TrainSide(corpus.ids(), corpus.rows, corpus.extra_keys)
        return [Workload(list(prepared), queries, [[index_of[s] for s in job.query_tokens]
                                                   for job in prepared.values()],
                         train, side, None, self._key(queries, corpus.digest))]

    def _records_workload(self, index: int, prepared: PreparedJob) -> Workload:
        queries, query_index = _unique(prepared.query_tokens)
        distinct, train_index = _unique(prepared.train_tokens)
        position = {q: i for i, q in enumerate(queries)}
        also_queries = {j: position[s] for j, s in enumerate(distinct) if s in position}
        return Workload([index], queries, [query_index], TrainSequences.of(distinct, also_queries),
                        TrainSide.of_records(prepared.train), train_index,
                        self._key(queries, sequences_digest(distinct)))

    def _key(self, queries: list[TokenizedExample], train: str) -> str:
        """The identity digest of scoring ``queries`` against a train side of digest ``train``."""
        return identity_digest(self._identity(sequences_digest(queries), train))

    def _identity(self, queries: str, train: str) -> dict:
        refine = dataset_fingerprint(self.refine_examples) if self.config.refine_steps else None
        resolved = {"dtype": str(self.dtype).removeprefix("torch."), "matmul_precision": self.matmul_precision}
        return run_identity(self.config, self.metadata, queries, train, resolved, refine)

    def make_plan(self, workloads: list[Workload], prepared: dict[int, PreparedJob]) -> RunPlan:
        """The run's plan (see :mod:`if_query.run_plan`), made on rank 0 — the only reads of free memory — and
        broadcast: every rank follows the same decisions."""
        plan = None
        if distributed.is_main_rank():
            config, world = self.config, distributed.world_size()
            budgets = resolve_budgets(config.host_memory_bytes, config.workspace_bytes, self.device,
                                      distributed.local_world_size())
            jobs = [self._plan_job(work, prepared, budgets, world) for work in workloads]
            plan = plan_run(budgets, jobs, world, {"corpus": self.corpus.digest if self.corpus else None})
        plan = distributed.broadcast(plan)
        if self.corpus is not None and self.corpus.digest != plan.extra["corpus"]:
            raise RunError(f"rank {distributed.rank()} read other windows from the corpus than rank 0 (its tokens "
                           "differ): every rank must read the same files with the same tokenizer",
                           option="train_dataset")
        self._log_plan(plan)
        return plan

    def _plan_job(self, work: Workload, prepared: dict[int, PreparedJob], budgets, world: int) -> JobPlan:
        name = prepared[work.jobs[0]].job.name if len(work.jobs) == 1 else f"{len(work.jobs)} folders' queries"
        if not isinstance(self.scorer, EngineScorer):  # Kronfluence's data parallel path: every rank, rank 0 writes
            return JobPlan(name, len(work.train.lengths), 0, None, split=world > 1, world=world)
        done = None
        if self.resumable(work):
            done = done_rows(prepared[work.jobs[0]].job.output_dir, work.key, len(work.queries),
                             len(work.train.lengths))
        return plan_job(name, self.scorer.context(), budgets, [len(q) for q in work.queries], work.train.lengths,
                        list(work.train.queries), done, world)

    def resumable(self, work: Workload) -> bool:
        """Whether a chunked job keeps partial results: unless its per-token scores come from the chunk pass
        (they are not kept on disk)."""
        return not (self.config.per_token_scores and self.config.top_train is None)

    def _log_plan(self, plan: RunPlan) -> None:
        budgets = plan.budgets
        logger.info("Host budget %s of token factors per rank (%s)%s", human_bytes(budgets.host), budgets.host_from,
                    f"; {plan.world} ranks" if plan.world > 1 else "")
        if plan.world > 1 and isinstance(self.scorer, EngineScorer):
            split = sum(job.split for job in plan.jobs)
            logger.info("%d of %d jobs split across all %d ranks (their chunks shared out); the others scored each by "
                        "one rank, shared out in turn", split, len(plan.jobs), plan.world)

    def _checkpoint(self, work: Workload, prepared: dict[int, PreparedJob], plan: JobPlan) -> Checkpoint | None:
        """The resumable partial results of a job scored in chunks, on the rank that writes it (None otherwise)."""
        if plan.store is None or plan.at_once or distributed.rank() != plan.rank or not self.resumable(work):
            return None
        return Checkpoint(prepared[work.jobs[0]].job.output_dir, work.key, len(work.queries),
                          len(work.train.lengths))

    def score(self, prepared: PreparedJob) -> ResultTable | None:
        """One job's results, planned alone (None on the ranks that do not write it)."""
        [work] = self.workloads({0: prepared})
        self.load_scorer()
        plan = self.make_plan([work], {0: prepared})
        return self.score_workload(work, {0: prepared}, plan.jobs[0], plan.budgets)[0][0]

    def score_workload(self, work: Workload, prepared: dict[int, PreparedJob], plan: JobPlan, budgets: Budgets
                       ) -> list[tuple[ResultTable | None, Checkpoint | None]]:
        """Each of the workload's jobs' results (None on ranks that do not write them) and the partial results to
        remove once they are written."""
        scorer = self.load_scorer()
        if distributed.rank() == plan.rank and plan.store is not None:
            logger.info("%s", plan.line())
            for peak in [*plan.store.peaks(), *(plan.largest_chunk.peaks() if plan.largest_chunk else [])]:
                if not peak.fits:
                    logger.warning("The plan does not fit: %s", peak.describe())
        checkpoint = self._checkpoint(work, prepared, plan)
        per_token = self.config.per_token_scores and self.config.top_train is None
        scored = scorer.score(work.queries, work.train, plan, checkpoint, per_token=per_token)
        if scored is None:
            return [(None, checkpoint)] + [(None, None)] * (len(work.jobs) - 1)
        recorded = plan.describe(budgets)
        return [(self._table(prepared[index], query_index, work, scored, budgets, recorded),
                 checkpoint if number == 0 else None)
                for number, (index, query_index) in enumerate(zip(work.jobs, work.query_index, strict=True))]

    def _table(self, prepared: PreparedJob, query_index: list[int], work: Workload, scored: ScoredSet,
               budgets: Budgets, plan: dict) -> ResultTable:
        """The results of one job's records from the scores of its workload's distinct sequences."""
        side, train_index = work.side, work.train_index
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
                selected = dataclasses.replace(selected, per_token=self._kept_per_token(kept, query_index, work,
                                                                                        budgets))
            rows = sorted({t for q, t in selected.per_token})
            sequences = dict(zip(rows, work.train.take([columns[t] for t in rows]), strict=True))
            tokens = lambda t: self.example_tokenizer.token_strings(sequences[t])  # noqa: E731
        return ResultTable(prepared.queries, [t.num_labelled for t in prepared.query_tokens], side, selected, kept,
                           tokens, self.provenance(prepared, scored.damping, plan))

    def _kept_per_token(self, kept: list[np.ndarray], query_index: list[int], work: Workload,
                        budgets: Budgets) -> dict:
        """Per-token scores of the kept pairs: the kept train examples' distinct sequences scored again (planned
        with the run's budgets, on this rank alone) with per-token scores; {(query record, train record): scores}."""
        train_index = work.train_index
        records = sorted(set(np.concatenate(kept).tolist()))
        distinct = sorted({train_index[t] if train_index is not None else t for t in records})
        position = {d: k for k, d in enumerate(distinct)}
        again = TrainSequences.of(work.train.take(distinct))
        scorer = self.load_scorer()
        plan = plan_job("the kept train examples", scorer.context(), budgets, [len(q) for q in work.queries],
                        again.lengths)
        scored = scorer.score(work.queries, again, plan, per_token=True)
        result = {}
        for row, q in enumerate(query_index):
            for t in kept[row].tolist():
                d = train_index[t] if train_index is not None else t
                result[row, t] = scored.per_token[q, position[d]]
        return result

    def provenance(self, prepared: PreparedJob, resolved_damping: dict | None, plan: dict | None = None) -> dict:
        """The run.json written with a job's results (see :mod:`if_query.provenance`)."""
        config, job = self.config, prepared.job
        return run_provenance(
            command=config.command, model=config.model, revision=config.revision, factors_dir=config.factors_dir,
            metadata=self.metadata, damping=config.damping_value, resolved_damping=resolved_damping,
            dtype=str(self.dtype).removeprefix("torch."), matmul_precision=self.matmul_precision,
            max_length=config.max_length, eos_in_loss=config.eos_in_loss,
            per_token_scores=config.per_token_scores, query_json=job.query_json,
            train_json=job.train_json or config.train_dataset, plan=plan, identity=self.identity(prepared),
        )

    def identity(self, prepared: PreparedJob) -> dict:
        """What determines the numbers of one job's results (:func:`if_query.identity.run_identity`): recorded in
        its run.json, compared by --skip-done."""
        train = (self.corpus.digest if prepared.train_tokens is None
                 else sequences_digest(dict.fromkeys(prepared.train_tokens)))
        return self._identity(sequences_digest(dict.fromkeys(prepared.query_tokens)), train)

    def stale(self, prepared: PreparedJob) -> str | None:
        """Why a job's results are not its current results (None: they are, and --skip-done skips it): a result
        file missing, or its run.json recording another identity (the first entries that differ named)."""
        job = prepared.job
        missing = [name for name in (*RESULT_FILES, RUN_FILE) if not (job.output_dir / name).is_file()]
        if missing:
            return f"{missing[0]} is missing"
        recorded = (read_run(job.output_dir) or {}).get("identity")
        if not isinstance(recorded, dict):
            return "its run.json records no identity (written by an older if-query)"
        current = self.identity(prepared)
        differing = [key for key in current if recorded.get(key) != current[key]]
        return None if not differing else "scored with other " + ", ".join(
            DESCRIBED.get(key, key.replace("_", "-")) + ("" if key in DESCRIBED else
                                                         f" ({recorded.get(key)!r}, now {current[key]!r})")
            for key in differing[:3])

    # --- running jobs ---

    def run(self, jobs: list[QueryJob] | None = None) -> list[JobOutcome]:
        """Validate every job (default: the config's) and read the corpus, load the model once, plan the run
        (:meth:`make_plan`), then score and write each valid job as the plan says (with report.html under
        ``--report``).

        A single run stops at its first error (raised); with query folders a folder's error is kept in
        its outcome and the others go on. Under torchrun (see the module docstring) every rank returns the
        outcomes of all jobs (others' results read back from their files)."""
        jobs = query_jobs(self.config) if jobs is None else jobs
        stop_on_error = not self.config.folders
        ranks = distributed.world_size() > 1 and self.config.engine != "kronfluence"
        if ranks:
            distributed.start_folder_sharding()
        outcomes = [JobOutcome(job) for job in jobs]
        prepared = self._prepare_all(outcomes, stop_on_error and not ranks)
        self.example_tokenizer.warn_capped()
        workloads = self.workloads(prepared)
        if prepared:
            self.load_scorer()
        plan = self.make_plan(workloads, prepared)
        writer = {i: 0 for i in range(len(jobs))}  # rank 0 reports what every rank knows alike
        order = sorted(range(len(workloads)), key=lambda w: not plan.jobs[w].split)  # split jobs first, in step
        for w in order:
            work, job_plan = workloads[w], plan.jobs[w]
            writer.update(dict.fromkeys(work.jobs, job_plan.rank))
            if not job_plan.scored_by(distributed.rank()):
                continue
            for index in work.jobs:
                job = prepared[index]
                logger.info("Scoring %s: %d queries x %s train examples", job.job.name, len(job.queries),
                            len(job.train) if job.train is not None else "the corpus's")
            errors = self._score_and_write([outcomes[i] for i in work.jobs], work, prepared, job_plan, plan.budgets)
            for index, error in zip(work.jobs, errors, strict=True):
                if error is not None:
                    if stop_on_error and not ranks:
                        raise error
                    outcomes[index].error = error
        if ranks:
            self._collect(outcomes, {i for i in range(len(jobs)) if writer[i] == distributed.rank()})
            if stop_on_error and (failed := [o for o in outcomes if o.error is not None]):
                raise failed[0].error
        return outcomes

    def _prepare_all(self, outcomes: list[JobOutcome], raise_errors: bool) -> dict[int, PreparedJob]:
        """Each job's records read, checked and tokenized (skipping done ones under --skip-done), and the corpus
        read once: all before the model loads. A job's input error is kept in its outcome (or raised)."""
        prepared: dict[int, PreparedJob] = {}
        for index, outcome in enumerate(outcomes):
            try:
                prepared[index] = self.prepare(outcome.job)
            except InputError as exc:
                if raise_errors:
                    raise
                outcome.error = exc
        if prepared and self.corpus is not None:
            self.corpus.locate()
        if self.config.skip_done:
            for index in list(prepared):
                job = prepared[index].job
                if (reason := self.stale(prepared[index])) is None:
                    logger.info("Skipping %s: its results are complete and were scored with the same settings, "
                                "weights, factors and inputs", job.name)
                    outcomes[index].skipped = True
                    del prepared[index]
                else:
                    logger.info("Scoring %s again: %s", job.name, reason)
        return prepared

    def _score_and_write(self, outcomes: list[JobOutcome], work: Workload, prepared: dict[int, PreparedJob],
                         plan: JobPlan, budgets: Budgets) -> list[IfQueryError | None]:
        """Score a workload and write its jobs into their outcomes; each job's error, if it failed. Running out of
        memory is those jobs' failure (with a hint), not the run's: the memory is released and the next job can
        go on."""
        error = None
        try:
            results = self.score_workload(work, prepared, plan, budgets)
        except IfQueryError as exc:
            return [exc] * len(outcomes)
        except Exception as exc:  # noqa: BLE001 - only an out-of-memory error is turned into the jobs' failure
            if not is_out_of_memory(exc):
                raise
            error = RunError(f"out of memory on {self.device} ({describe_out_of_memory(exc)}); {OUT_OF_MEMORY_HINT}")
        if error is not None:  # the exception (and the frames holding its tensors) is gone: release the memory
            release_memory(self.device)
            return [error] * len(outcomes)
        errors: list[IfQueryError | None] = []
        for outcome, (table, _) in zip(outcomes, results, strict=True):
            try:
                if table is not None:
                    outcome.files = self.write(table, outcome.job.output_dir)
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
