"""run-query: score query folders against training examples with fitted factors.

Model, tokenizer and factors load once; each folder (query.json + train.json) is validated before
the model loads, scored, and its CSVs written atomically. Identical token sequences are scored once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from if_query import distributed
from if_query.errors import IfQueryError, InputError, RunError
from if_query.fingerprint import check_fingerprint
from if_query.metadata import METADATA_FILE, describe_mismatch, load_complete_metadata, model_identity
from if_query.modeling import (
    check_token_shaped,
    default_device,
    find_mlp_modules,
    load_model,
    load_tokenizer,
    make_trackable,
    resolve_dtype,
)
from if_query.provenance import RUN_FILE, run_provenance
from if_query.records import Example, load_examples
from if_query.results import RESULT_FILES, QueryResults, examples_frame, read_results, write_results
from if_query.scorer import EngineScorer, KronfluenceScorer
from if_query.scoring import ScoreConfig
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


@dataclass
class QueryConfig:
    model: str
    factors_dir: str
    revision: str | None = None
    dtype: str = "auto"
    max_length: int = 512
    score: ScoreConfig = field(default_factory=ScoreConfig)
    command: list[str] | None = None  # the command line recorded in run.json (None: sys.argv)


def _unique(sequences: list[TokenizedExample]) -> tuple[list[TokenizedExample], list[int]]:
    """Distinct sequences and, for each input, the index of its distinct sequence."""
    index: dict[TokenizedExample, int] = {}
    for sequence in sequences:
        index.setdefault(sequence, len(index))
    return list(index), [index[s] for s in sequences]


def _non_finite(values: torch.Tensor, ids: list[str]) -> list[str]:
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    return [ids[i] for i in bad]


def _non_finite_error(what: str, ids: list[str]) -> RunError:
    shown = ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return RunError(f"non-finite {what} for {shown}; try --dtype float32 (or bfloat16 instead of float16)"
                    + (", or a larger --damping" if what != "loss" else ""))


class QueryRunner:
    """Loads the model and factors once, then scores any number of jobs."""

    def __init__(self, config: QueryConfig, quiet: bool = False):
        config.score.validate()
        self.config = config
        self.quiet = quiet
        self.metadata = load_complete_metadata(config.factors_dir)
        self.dtype = resolve_dtype(config.dtype)
        self.tokenizer = load_tokenizer(config.model, config.revision)
        self.example_tokenizer = ExampleTokenizer(self.tokenizer, config.max_length)
        self.scorer: EngineScorer | KronfluenceScorer | None = None
        self.device = default_device()

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
        modules = find_mlp_modules(model, fit["layer_stride"])
        check_token_shaped(model, modules)
        self._check_factors({"tracked_modules": [[m.name, m.shape] for m in modules]})
        model = make_trackable(model, modules)
        score = self.config.score
        if score.engine == "kronfluence":
            self.scorer = KronfluenceScorer(model, modules, self.config.factors_dir, self.tokenizer.pad_token_id,
                                            score, self.quiet)
        else:
            self.scorer = EngineScorer(model, modules, self.config.factors_dir, self.tokenizer.pad_token_id,
                                       score, self.device, self.quiet)
        return self.scorer

    def _check_factors(self, found: dict) -> None:
        """Refuse factors fitted for another model, revision or set of tracked modules (``found``'s keys)."""
        fit = self.metadata["fit"]
        expected = {"model": fit["model"], "revision": fit["revision"],
                    "tracked_modules": [[m["name"], m["shape"]] for m in self.metadata["tracked_modules"]]}
        expected = {key: expected[key] for key in found}
        if found != expected:
            raise InputError(
                f"--factors-dir {self.config.factors_dir} was fitted for another model "
                f"({describe_mismatch(expected, found)})"
            )

    def score(self, prepared: PreparedJob) -> QueryResults | None:
        """Scores, cosines and losses of one job (None on non-main ranks of Kronfluence's torchrun path)."""
        scorer = self.load_scorer()
        unique_queries, query_index = _unique(prepared.query_tokens)
        unique_train, train_index = _unique(prepared.train_tokens)
        scored = scorer.score(unique_queries, unique_train)
        if scored is None:
            return None
        query_ids = [e.pair_id for e in prepared.queries]
        train_ids = [e.pair_id for e in prepared.train]
        counts = torch.tensor([sequence.num_labelled for sequence in unique_queries], dtype=torch.float64)

        losses = scored.query_losses[query_index]
        if bad := _non_finite(losses, query_ids):
            raise _non_finite_error("loss", bad)
        scores = scored.scores[query_index][:, train_index].double()
        if bad := _non_finite(scores.flatten(), [f"{q}/{t}" for q in query_ids for t in train_ids]):
            raise _non_finite_error("influence score", bad)
        query_self = scored.query_self[query_index].double()
        train_self = scored.train_self[train_index].double()
        cosine = scores / torch.sqrt(query_self.clamp_min(0)[:, None] * train_self.clamp_min(0)[None, :])
        cosine = torch.nan_to_num(cosine, nan=0.0).clamp(-1.0, 1.0)

        influences = {
            "query_id": [q for q in query_ids for _ in train_ids],
            "train_id": [t for _ in query_ids for t in train_ids],
            "influence_score": scores.flatten().tolist(),
            "influence_cosine": cosine.flatten().tolist(),
        }
        train_columns: dict[str, list] = {}
        if scored.per_token is not None:
            influences["per_token_scores"] = [
                json.dumps(scored.per_token[query_index[q]][train_index[t]].tolist())
                for q in range(len(query_ids)) for t in range(len(train_ids))
            ]
            train_columns["tokens"] = [
                json.dumps(self.example_tokenizer.token_strings(tokens), ensure_ascii=False)
                for tokens in prepared.train_tokens
            ]
        return QueryResults(
            queries=examples_frame(prepared.queries, "query_id", {
                "loss": (losses / counts[query_index]).tolist(),
                "loss_sum": losses.tolist(),
            }),
            train=examples_frame(prepared.train, "train_id", train_columns),
            influences=pd.DataFrame(influences),
        )

    def provenance(self, job: QueryJob) -> dict:
        """The run.json written with a job's results (see :mod:`if_query.provenance`)."""
        config = self.config
        return run_provenance(
            command=config.command, model=config.model, revision=config.revision, factors_dir=config.factors_dir,
            metadata=self.metadata, damping=config.score.damping,
            resolved_damping=self.scorer.resolved_damping,
            dtype=str(self.dtype).removeprefix("torch."), max_length=config.max_length,
            per_token_scores=config.score.per_token, query_json=job.query_json, train_json=job.train_json,
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

    def run(self, jobs: list[QueryJob], stop_on_error: bool = True, skip_done: bool = False) -> list[JobOutcome]:
        """Validate every job, load the model once, then score and write each valid job.

        Under torchrun with the default engine each rank scores its share of the jobs; every rank
        returns the outcomes of all jobs (others' results read back from their files)."""
        sharded = distributed.world_size() > 1 and self.config.score.engine != "kronfluence"
        if sharded:
            distributed.start_folder_sharding()
        mine = set(distributed.folder_shard(len(jobs))) if sharded else set(range(len(jobs)))
        outcomes = [JobOutcome(job) for job in jobs]
        prepared: list[tuple[JobOutcome, PreparedJob]] = []
        for index, outcome in enumerate(outcomes):
            if index not in mine:
                continue
            if skip_done and self.is_done(outcome.job):
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
        if prepared:
            self.load_scorer()
        for outcome, job in prepared:
            logger.info("Scoring %s: %d queries x %d train examples",
                        job.job.name, len(job.queries), len(job.train))
            try:
                outcome.results = self.score(job)
                if outcome.results is not None:
                    outcome.results.provenance = self.provenance(job.job)
                    outcome.files = write_results(outcome.results, job.job.output_dir)
            except IfQueryError as exc:
                if stop_on_error and not sharded:
                    raise
                outcome.error = exc
        if sharded:
            self._collect(outcomes, mine)
            if stop_on_error and (failed := [o for o in outcomes if o.error is not None]):
                raise failed[0].error
        return outcomes

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
