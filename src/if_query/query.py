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
from kronfluence.analyzer import prepare_model

from if_query.errors import IfQueryError, InputError, RunError
from if_query.metadata import describe_mismatch, load_complete_metadata, model_identity
from if_query.modeling import find_mlp_modules, load_model, load_tokenizer, make_trackable, resolve_dtype
from if_query.records import Example, load_examples
from if_query.results import QueryResults, examples_frame, write_results
from if_query.scoring import InfluenceScorer, ScoreConfig
from if_query.task import CompletionLossTask
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
        self.scorer: InfluenceScorer | None = None

    def prepare(self, job: QueryJob) -> PreparedJob:
        """Read, validate and tokenize a job's files (raises InputError; loads no model)."""
        queries = load_examples(job.query_json)
        train = load_examples(job.train_json)
        return PreparedJob(
            job, queries, train,
            self.example_tokenizer.tokenize_all(queries, str(job.query_json)),
            self.example_tokenizer.tokenize_all(train, str(job.train_json)),
        )

    def load_model(self) -> InfluenceScorer:
        if self.scorer is not None:
            return self.scorer
        fit = self.metadata["fit"]
        model = load_model(self.config.model, self.config.revision, self.dtype)
        modules = find_mlp_modules(model, fit["layer_stride"])
        expected = {"model": fit["model"], "revision": fit["revision"],
                    "tracked_modules": [[m["name"], m["shape"]] for m in self.metadata["tracked_modules"]]}
        found = {"model": model_identity(self.config.model), "revision": self.config.revision,
                 "tracked_modules": [[m.name, m.shape] for m in modules]}
        if found != expected:
            raise InputError(
                f"--factors-dir {self.config.factors_dir} was fitted for another model "
                f"({describe_mismatch(expected, found)})"
            )
        model = make_trackable(model, modules)
        task = CompletionLossTask([m.name for m in modules])
        model = prepare_model(model, task)
        self.scorer = InfluenceScorer(
            model, task, self.config.factors_dir, self.tokenizer.pad_token_id, self.config.score, self.quiet
        )
        return self.scorer

    def score(self, prepared: PreparedJob) -> QueryResults | None:
        """Scores, cosines and losses of one job (None on non-main distributed ranks)."""
        scorer = self.load_model()
        unique_queries, query_index = _unique(prepared.query_tokens)
        unique_train, train_index = _unique(prepared.train_tokens)
        per_token = None
        # Queries first, then train examples that are not queries: scores are one (queries x distinct)
        # product whose query block's diagonal holds the queries' self-influences.
        query_set = set(unique_queries)
        distinct = unique_queries + [s for s in unique_train if s not in query_set]
        if scorer.can_cache(len(distinct)):
            whitened, distinct_losses = scorer.whitened(distinct)
            n_queries = len(unique_queries)
            products = (whitened[:n_queries] @ whitened.T).double().cpu()
            position = {sequence: i for i, sequence in enumerate(distinct)}
            train_positions = [position[s] for s in unique_train]
            unique_scores = products[:, train_positions]
            distinct_self = torch.cat([products[:, :n_queries].diagonal(),
                                       whitened[n_queries:].square().sum(1).double().cpu()])
            self_influence = {"query": distinct_self[:n_queries], "train": distinct_self[train_positions]}
            loss_sums = distinct_losses[:n_queries]
        else:
            pairwise = scorer.pairwise(unique_queries, unique_train)
            unique_scores, per_token = pairwise.scores, pairwise.per_token
            self_influence = self._self_influence(unique_queries, unique_train, unique_scores)
            loss_sums = scorer.completion_losses(unique_queries)
        counts = torch.tensor([sequence.num_labelled for sequence in unique_queries], dtype=torch.float64)
        if not scorer.is_main_process:
            return None
        query_ids = [e.pair_id for e in prepared.queries]
        train_ids = [e.pair_id for e in prepared.train]

        losses = loss_sums[query_index]
        if bad := _non_finite(losses, query_ids):
            raise _non_finite_error("loss", bad)
        scores = unique_scores[query_index][:, train_index].double()
        if bad := _non_finite(scores.flatten(), [f"{q}/{t}" for q in query_ids for t in train_ids]):
            raise _non_finite_error("influence score", bad)
        query_self = self_influence["query"][query_index].double()
        train_self = self_influence["train"][train_index].double()
        cosine = scores / torch.sqrt(query_self.clamp_min(0)[:, None] * train_self.clamp_min(0)[None, :])
        cosine = torch.nan_to_num(cosine, nan=0.0).clamp(-1.0, 1.0)

        influences = {
            "query_id": [q for q in query_ids for _ in train_ids],
            "train_id": [t for _ in query_ids for t in train_ids],
            "influence_score": scores.flatten().tolist(),
            "influence_cosine": cosine.flatten().tolist(),
        }
        train_columns: dict[str, list] = {}
        if per_token is not None:
            influences["per_token_scores"] = [
                json.dumps(per_token[query_index[q]][train_index[t]].tolist())
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

    def _self_influence(self, queries: list[TokenizedExample], train: list[TokenizedExample],
                        scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Self-influence of every query and train sequence. A sequence that is both a query and a
        train example is read off the exact pairwise diagonal instead of being recomputed (not with
        low-rank queries, and not across processes, where every rank must run the same passes)."""
        scorer = self.scorer
        reuse_diagonal = self.config.score.query_rank is None and not scorer.analyzer.state.use_distributed
        train_position = {sequence: j for j, sequence in enumerate(train)}
        known: dict[TokenizedExample, float] = {}
        if reuse_diagonal:
            for i, sequence in enumerate(queries):
                if sequence in train_position:
                    known[sequence] = float(scores[i, train_position[sequence]])
        missing = [s for s in dict.fromkeys(queries + train) if s not in known]
        computed = scorer.self_scores(missing)
        if not scorer.is_main_process:
            return {}
        known.update({s: float(v) for s, v in zip(missing, computed.tolist(), strict=True)})
        return {
            "query": torch.tensor([known[s] for s in queries], dtype=torch.float64),
            "train": torch.tensor([known[s] for s in train], dtype=torch.float64),
        }

    def run(self, jobs: list[QueryJob], stop_on_error: bool = True) -> list[JobOutcome]:
        """Validate every job, load the model once, then score and write each valid job."""
        outcomes: list[JobOutcome] = []
        prepared: list[tuple[JobOutcome, PreparedJob]] = []
        for job in jobs:
            outcome = JobOutcome(job)
            outcomes.append(outcome)
            try:
                prepared.append((outcome, self.prepare(job)))
            except InputError as exc:
                if stop_on_error:
                    raise
                outcome.error = exc
        if not prepared:
            return outcomes
        self.load_model()
        for outcome, job in prepared:
            logger.info("Scoring %s: %d queries x %d train examples",
                        job.job.name, len(job.queries), len(job.train))
            try:
                outcome.results = self.score(job)
                if outcome.results is not None:
                    outcome.files = write_results(outcome.results, job.job.output_dir)
            except IfQueryError as exc:
                if stop_on_error:
                    raise
                outcome.error = exc
        return outcomes


