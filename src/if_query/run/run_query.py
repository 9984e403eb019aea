"""run-query: score query folders against training examples (records or a corpus) with fitted factors.

Model, tokenizer and factors load once; each folder (query.json + train.json) is validated before the model
loads, scored, and its CSVs written atomically. The one straight line of a job: records -> tokens -> distinct
sequences (deduplicated here, once: identical token sequences are scored once and their scores copied to every
record that has them) -> the scorer (at once, or in chunks of the train side) -> a
:class:`~if_query.report.results.ResultTable` with its provenance -> the writer. With ``--train-dataset`` the corpus is
the train side of every folder, and one pass over it scores every folder's queries.

Every decision is the run's plan's (:mod:`if_query.plan.run_plan`), made once by rank 0 before any scoring. Under
torchrun (default engine): a job with at least two train chunks to do is split across all ranks (rank 0 gathers the
scores and writes); every other job is scored by one rank alone, jobs shared out in turn, each rank writing its own.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import numpy as np

from if_query import distributed
from if_query.atomic import check_writable_dir
from if_query.config import QueryConfig
from if_query.data.corpus import Corpus
from if_query.data.jobs import QueryJob, query_jobs
from if_query.data.tokenization import Collator, ExampleTokenizer, TokenizedExample, distinct
from if_query.errors import IfQueryError, InputError, RunError
from if_query.fit.metadata import load_complete_metadata
from if_query.model.fingerprint import dataset_fingerprint
from if_query.model.loading import (
    load_config,
    load_tokenizer,
    position_limit,
    resolve_dtype,
    resolve_matmul_precision,
    set_matmul_precision,
)
from if_query.plan.memory import OUT_OF_MEMORY_HINT, describe_out_of_memory, is_out_of_memory, release_memory
from if_query.plan.run_plan import Budgets, JobPlan, RunPlan, plan_job, plan_run, resolve_budgets
from if_query.plan.sizes import human_bytes
from if_query.report import ranking
from if_query.report.provenance import run_provenance
from if_query.report.results import ResultTable, write_results
from if_query.run.checkpoint import Checkpoint, done_rows
from if_query.run.compatibility import load_model_for_factors
from if_query.run.identity import identity_digest, run_identity, sequences_digest, stale
from if_query.run.outcomes import JobOutcome, collect
from if_query.run.refine_data import refine_examples
from if_query.run.workload import PreparedJob, Workload, corpus_workload, records_workload
from if_query.score.engine_scorer import EngineScorer
from if_query.score.scored import ScoredSet
from if_query.score.sequences import TrainSequences

logger = logging.getLogger(__name__)
class QueryRunner:
    """Loads the model and factors once, then scores any number of jobs.

    ``results``: what each job's outcome keeps in memory, ``"summary"`` (each query's ``--top-k`` most helpful and
    harmful rows: what the terminal summary prints, small whatever the run) or ``"all"`` (every written row, as
    :meth:`~if_query.report.results.ResultTable.frames`)."""

    def __init__(self, config: QueryConfig, quiet: bool = False, results: str = "summary"):
        self.config = config
        self.quiet = quiet
        self.results = results
        if config.spill_dir is not None:  # where token factors may be spilled: checked before any work
            check_writable_dir(config.spill_dir, "spill_dir")
        self.metadata = load_complete_metadata(config.factors_dir)  # checked against the model: load_scorer
        self.dtype = resolve_dtype(config.dtype)
        self.tokenizer = load_tokenizer(config.model, config.revision, config.base_model)
        # read once: positions, the refine check
        self.hf_config = load_config(config.model, config.revision, config.base_model)
        limit = position_limit(self.hf_config)
        self.example_tokenizer = ExampleTokenizer(self.tokenizer, config.max_length, config.eos_in_loss, limit,
                                                  config.chat_template)
        self.corpus = self._corpus(config, self.example_tokenizer)
        self.scorer = None  # EngineScorer or KronfluenceScorer, once the model is loaded
        self.device = distributed.device()
        self.matmul_precision = resolve_matmul_precision(config.matmul_precision, self.device)
        set_matmul_precision(self.matmul_precision)
        self.refine_examples = (refine_examples(config, self.metadata, self.hf_config, self.dtype, self.device,
                                                self.example_tokenizer) if config.refine_steps else [])

    def for_jobs(self, config: QueryConfig) -> QueryRunner:
        """A runner of ``config``: other jobs (records, files, a corpus, output directories) scored with this runner's
        options, sharing its tokenizer, factors and model, which it loads first if it has not yet (once for every
        runner made this way: the :class:`~if_query.api.Attributor`'s calls). ``config`` may differ from this
        runner's only in what it scores and where it writes; its corpus is read by the new runner's run."""
        self.load_scorer()
        runner = copy.copy(self)
        runner.config = config
        runner.example_tokenizer = self.example_tokenizer.again()
        runner.corpus = self._corpus(config, runner.example_tokenizer)
        return runner

    @staticmethod
    def _corpus(config: QueryConfig, example_tokenizer: ExampleTokenizer) -> Corpus | None:
        """The --train-dataset corpus (read when the run locates it), or None."""
        return None if config.train_dataset is None else Corpus(config.train_dataset, example_tokenizer,
                                                                  config.spill_dir)

    def prepare(self, job: QueryJob) -> PreparedJob:
        """Check the job's folder and where it writes, read, validate and tokenize its files (raises InputError;
        loads no model)."""
        if self.config.folders and not (folder := job.query_json.parent).is_dir():
            raise InputError(f"{folder}: " + ("not a folder" if folder.exists() else "folder not found"))
        if job.output_dir is not None:
            check_writable_dir(job.output_dir, None if self.config.folders else "output_dir")
        tokenizer = self.example_tokenizer  # a conversation's query is scored on its last assistant turn alone
        queries, source = job.query_examples()
        prepared = PreparedJob(job, [tokenizer.shown(query, source, every_turn=False) for query in queries],
                               tokenizer.tokenize_all(queries, source, every_turn=False))
        if job.has_train_records:
            train, source = job.train_examples()
            prepared.train = [tokenizer.shown(example, source) for example in train]
            prepared.train_tokens = tokenizer.tokenize_all(train, source)
        return prepared

    def load_scorer(self) -> EngineScorer:
        """Load the model once, refusing factors that do not fit it
        (:func:`~if_query.run.compatibility.load_model_for_factors`), and build the configured scorer."""
        if self.scorer is not None:
            return self.scorer
        model, modules, factors = load_model_for_factors(self.config, self.metadata, self.dtype)
        if self.config.engine == "kronfluence":
            from if_query.score.kronfluence_scorer import KronfluenceScorer  # imports Kronfluence: only this engine

            self.scorer = KronfluenceScorer(model, modules, self.config, self.tokenizer.pad_token_id, self.quiet)
        else:
            ordered, size = sorted(self.refine_examples, key=len), self.config.refine_batch_size
            collate = Collator(self.tokenizer.pad_token_id)
            batches = [{k: v.to(self.device) for k, v in collate(ordered[i : i + size]).items()}
                       for i in range(0, len(ordered), size)]
            self.scorer = EngineScorer(model, modules, factors, self.config, self.tokenizer.pad_token_id,
                                       self.device, self.matmul_precision, batches, self.quiet)
        return self.scorer

    # --- scoring: a job's distinct sequences -> the plan -> the scorer -> a ResultTable ---

    def workloads(self, prepared: dict[int, PreparedJob]) -> list[Workload]:
        """What each job scores, formed once: a records job's distinct sequences; with a corpus, one workload of
        every job's distinct queries together against it (partial results in the first job's directory)."""
        if not prepared:
            return []
        if self.corpus is not None:
            return [corpus_workload(prepared, self.corpus, self._key)]
        return [records_workload(index, job, self._key) for index, job in prepared.items()]

    def _key(self, queries: list[TokenizedExample], train: str) -> str:
        """The identity digest of scoring ``queries`` against a train side of digest ``train``."""
        return identity_digest(self._identity(sequences_digest(queries), train))

    def _identity(self, queries: str, train: str) -> dict:
        refine = dataset_fingerprint(self.refine_examples) if self.config.refine_steps else None
        resolved = {"dtype": str(self.dtype).removeprefix("torch."), "matmul_precision": self.matmul_precision}
        return run_identity(self.config, self.metadata, queries, train, resolved, refine)

    def make_plan(self, workloads: list[Workload], prepared: dict[int, PreparedJob]) -> RunPlan:
        """The run's plan (see :mod:`if_query.plan.run_plan`), made on rank 0 — the only reads of free memory — and
        broadcast: every rank follows the same decisions."""
        plan = None
        if distributed.is_main_rank():
            config, world = self.config, distributed.world_size()
            budgets = resolve_budgets(config.host_memory_bytes, config.workspace_bytes, self.device,
                                      distributed.local_world_size())
            jobs = [self._plan_job(work, prepared, budgets, world) for work in workloads]
            corpus = self.corpus is not None and bool(workloads)  # read only when some job scores against it
            plan = plan_run(budgets, jobs, world, {"corpus": self.corpus.digest if corpus else None},
                            keep_allowed=not self.config.refine_steps)
        plan = distributed.broadcast(plan)
        if plan.extra["corpus"] is not None and self.corpus.digest != plan.extra["corpus"]:
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
        if (directory := self._partial_dir(work, prepared)) is not None:
            done = done_rows(directory, work.key, len(work.queries), len(work.train.lengths))
        return plan_job(name, self.scorer.context(), budgets, [len(q) for q in work.queries], work.train.lengths,
                        list(work.train.queries), done, world)

    def _partial_dir(self, work: Workload, prepared: dict[int, PreparedJob]) -> Path | None:
        """Where a chunked job keeps its partial results: its (first) job's output directory; None when it writes
        nothing, or when its per-token scores come from the chunk pass (they are not kept on disk)."""
        if self.config.per_token_scores and self.config.top_train is None:
            return None
        return prepared[work.jobs[0]].job.output_dir

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
        directory = self._partial_dir(work, prepared)
        if plan.store is None or plan.at_once or distributed.rank() != plan.rank or directory is None:
            return None
        checkpoint = Checkpoint(directory, work.key, len(work.queries), len(work.train.lengths))
        if int(checkpoint.done.sum()) < plan.done_rows:  # rank 0 planned from partial results this rank cannot see
            raise RunError(f"rank {distributed.rank()} does not see the partial results rank 0 planned from in "
                           f"{checkpoint.directory} ({plan.done_rows} train examples done): put the output folders on "
                           "storage every node sees, or remove that directory to start again")
        return checkpoint

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
        if isinstance(scorer, EngineScorer) and scorer.last_moved is not None:
            recorded["moved_counted"] = scorer.last_moved  # what this rank's transfers counted, beside the plan's
        return [(self._table(prepared[index], query_index, work, scored, budgets, recorded, plan),
                 checkpoint if number == 0 else None)
                for number, (index, query_index) in enumerate(zip(work.jobs, work.query_index, strict=True))]

    def _table(self, prepared: PreparedJob, query_index: list[int], work: Workload, scored: ScoredSet,
               budgets: Budgets, plan: dict, job: JobPlan | None = None) -> ResultTable:
        """The results of one job's records from the scores of its workload's distinct sequences."""
        side, train_index = work.side, work.train_index
        columns = train_index if train_index is not None else range(len(side.ids))
        selected = scored.select(query_index, columns)
        selected.check_finite([e.pair_id for e in prepared.queries], side.ids)
        config = self.config
        kept = None
        if config.top_train is not None:
            ranked = (selected.cosine() if config.ranking == "cosine" else None)
            ranked = selected.scores if ranked is None else ranked
            kept = [ranking.kept(ranked[q].numpy(), side.ids, config.top_train)
                    for q in range(len(prepared.queries))]
        tokens = None
        if config.per_token_scores:
            if kept is not None:  # a second pass, over the kept train examples only
                selected = dataclasses.replace(selected, per_token=self._kept_per_token(kept, query_index, work,
                                                                                        budgets, job))
            rows = sorted({t for q, t in selected.per_token})
            sequences = dict(zip(rows, work.train.take([columns[t] for t in rows]), strict=True))
            tokens = lambda t: self.example_tokenizer.token_strings(sequences[t])  # noqa: E731
        return ResultTable(prepared.queries, [t.num_labelled for t in prepared.query_tokens], side, selected, kept,
                           tokens, self.provenance(prepared, scored.damping, plan))

    def _kept_per_token(self, kept: list[np.ndarray], query_index: list[int], work: Workload,
                        budgets: Budgets, job: JobPlan | None = None) -> dict:
        """Per-token scores of the kept pairs: the kept train examples' distinct sequences scored again (planned
        with the run's budgets, on this rank alone, keeping the factors the run keeps across ``job``s) with
        per-token scores; {(query record, train record): scores}."""
        train_index = work.train_index
        records = sorted(set(np.concatenate(kept).tolist()))
        distinct = sorted({train_index[t] if train_index is not None else t for t in records})
        position = {d: k for k, d in enumerate(distinct)}
        again = TrainSequences.of(work.train.take(distinct))
        scorer = self.load_scorer()
        plan = plan_job("the kept train examples", scorer.context(), budgets, [len(q) for q in work.queries],
                        again.lengths)
        if job is not None:  # the run's factors, kept on the device, stay there for its next jobs
            plan = dataclasses.replace(plan, keep_factors=job.keep_factors, run_id=job.run_id)
        scored = scorer.score(work.queries, again, plan, per_token=True)
        result = {}
        for row, q in enumerate(query_index):
            for t in kept[row].tolist():
                d = train_index[t] if train_index is not None else t
                result[row, t] = scored.per_token[q, position[d]]
        return result

    def provenance(self, prepared: PreparedJob, resolved_damping: dict | None, plan: dict | None = None) -> dict:
        """The run.json written with a job's results (see :mod:`if_query.report.provenance`)."""
        config, job = self.config, prepared.job
        return run_provenance(
            command=config.command, model=config.model, revision=config.revision, factors_dir=config.factors_dir,
            metadata=self.metadata, damping=config.damping_value, resolved_damping=resolved_damping,
            dtype=str(self.dtype).removeprefix("torch."), matmul_precision=self.matmul_precision,
            max_length=config.max_length, eos_in_loss=config.eos_in_loss,
            chat_template=self.example_tokenizer.template_digest(prepared.queries + (prepared.train or [])),
            per_token_scores=config.per_token_scores, query_json=job.query_json,
            train_json=job.train_json or config.train_dataset, plan=plan, identity=self.identity(prepared),
            rank_by=config.ranking,
        )

    def identity(self, prepared: PreparedJob) -> dict:
        """What determines the numbers of one job's results (:func:`if_query.run.identity.run_identity`): recorded in
        its run.json, compared by --skip-done."""
        train = (self.corpus.digest if prepared.train_tokens is None
                 else sequences_digest(distinct(prepared.train_tokens)[0]))
        return self._identity(sequences_digest(distinct(prepared.query_tokens)[0]), train)

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
        if ranks and any(job.output_dir is None for job in jobs):
            raise InputError("under torchrun results travel between ranks as files: give output_dir",
                             option="output_dir", flag_first=False)
        if ranks:
            distributed.start_folder_sharding()
        outcomes = [JobOutcome(job) for job in jobs]
        prepared = self._prepare_all(outcomes, stop_on_error and not ranks)
        self.example_tokenizer.warn_capped()
        workloads = self.workloads(prepared)
        if prepared:
            if self.config.engine == "kronfluence":  # its NCCL group on the rank's GPU before the model loads
                distributed.check_launch()
                distributed.start_data_parallel()
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
        if isinstance(self.scorer, EngineScorer):
            self.scorer.close()  # the pinned buffers go back at the end of the run
        if ranks:
            collect(outcomes, {i for i in range(len(jobs)) if writer[i] == distributed.rank()})
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
                if job.output_dir is None:  # nothing written, nothing to compare with
                    continue
                if (reason := stale(job.output_dir, self.identity(prepared[index]))) is None:
                    logger.info("Skipping %s: its results are complete and were scored with the same settings, "
                                "weights, factors and inputs", job.name)
                    outcomes[index].skipped = True
                    del prepared[index]
                    if self.config.report and distributed.is_main_rank():  # the page as asked now (--top-k)
                        from if_query.report.html import report_results_dir

                        try:
                            outcomes[index].files = [report_results_dir(job.output_dir, None, self.config.top_k)]
                        except IfQueryError as exc:  # the page asked for is not written: the job failed
                            if raise_errors:
                                raise
                            outcomes[index].error, outcomes[index].skipped = exc, False
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
                    if outcome.job.output_dir is not None:
                        outcome.files = self.write(table, outcome.job.output_dir)
                    outcome.results = table.frames() if self.results == "all" else table.summary(self.config.top_k)
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
            from if_query.report.html import header_from_run, write_report  # pandas: only with --report

            files.append(write_report(output_dir, header_from_run(results.provenance), self.config.top_k,
                                      results.frames()))  # from the table in memory, not the CSVs read back
        return files
