"""Tokenized examples -> influence scores, with factors loaded once and reused for many calls.

Scores follow Kronfluence's convention: ``score(q, t) = g_q^T (G + damping)^-1 g_t`` where ``g`` is the
gradient of the summed completion loss over the tracked modules and ``G`` the fitted Hessian
approximation. Positive means training on ``t`` lowers the loss of ``q`` (helpful).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from kronfluence.arguments import ScoreArguments
from kronfluence.module.utils import get_tracked_module_names, make_modules_partition
from kronfluence.score.pairwise import compute_pairwise_scores_with_loaders
from kronfluence.score.self import compute_self_scores_with_loaders
from kronfluence.utils.constants import ALL_MODULE_NAME
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.utils.exceptions import FactorsNotFoundError
from torch import nn
from torch.utils import data

from if_query.errors import InputError
from if_query.fitting import make_analyzer
from if_query.metadata import FACTORS_NAME
from if_query.task import CompletionLossTask, shifted_logits_and_labels, summed_token_losses
from if_query.tokenization import Collator, TokenizedExample

logger = logging.getLogger(__name__)


ENGINES = ("if-query", "kronfluence")
KRONFLUENCE_ONLY = ("query_rank", "queries_per_pass")


@dataclass
class ScoreConfig:
    """How scores are computed (not what they mean: that is fixed by the factors and damping)."""

    engine: str = "if-query"  # if-query: exact token-factor engine; kronfluence: its streaming scorer
    score_batch_size: int = 8
    # The earlier tool's separate batch sizes (None: score_batch_size); see batch_sizes().
    query_batch_size: int | None = None
    train_batch_size: int | None = None
    damping: float | None = None  # None: Kronfluence's heuristic, 0.1 x the mean eigenvalue per module
    per_token: bool = False
    # if-query engine: bytes of whitened gradients formed at once on the device (None: from free memory),
    # bytes of token factors kept in RAM before spilling to a memory-mapped file (None: half the free RAM).
    workspace_bytes: int | None = None
    host_memory_bytes: int | None = None
    spill_dir: str | None = None
    # Kronfluence engine only:
    query_rank: int | None = None  # low-rank query gradients (memory), None = exact
    queries_per_pass: int | None = None  # queries held per pass over the train set, None = all
    module_partitions: int = 1

    def batch_sizes(self) -> tuple[int, int]:
        """The effective (query, train) batch sizes, each defaulting to ``score_batch_size``. With one
        gradient per distinct example, a query's gradient (an example that is also a train example
        counts as a query) is computed in a batch of at most the query batch size, a train-only
        example's in a batch of at most the train batch size (:func:`gradient_batches`); in
        Kronfluence's streaming path they are its query and train batch sizes."""
        return (self.query_batch_size or self.score_batch_size, self.train_batch_size or self.score_batch_size)

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(f"unknown --engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        for name in ("score_batch_size", "module_partitions"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("query_batch_size", "train_batch_size", "query_rank", "queries_per_pass"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.engine != "kronfluence":
            used = [name for name in KRONFLUENCE_ONLY if getattr(self, name) is not None]
            used += ["module_partitions"] if self.module_partitions != 1 else []
            if used:
                raise InputError(
                    f"--{used[0].replace('_', '-')} applies only to --engine kronfluence (the default engine "
                    "scores exactly, one module at a time, in bounded memory)"
                )
        for name in ("workspace_bytes", "host_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InputError(f"--{name.replace('_bytes', '-gb').replace('_', '-')} must be >= 0")
        if self.damping is not None and (self.damping < 0 or not math.isfinite(self.damping)):
            raise InputError(f"--damping must be a finite number >= 0 or 'auto', got {self.damping}")


@dataclass
class PairwiseScores:
    scores: torch.Tensor  # (num_queries, num_train)
    per_token: list[list[torch.Tensor]] | None  # [query][train] -> (train length,)


def gradient_batches(lengths: Sequence[int], num_queries: int, config: ScoreConfig) -> list[list[int]]:
    """Index batches for one gradient per distinct example, where the first ``num_queries`` examples
    are the queries (some may also be train examples) and the rest train-only: queries in batches of
    the query batch size, then train-only examples in batches of the train batch size, each group
    sorted by length (little padding)."""
    query_size, train_size = config.batch_sizes()
    batches = []
    for indices, size in ((range(num_queries), query_size), (range(num_queries, len(lengths)), train_size)):
        order = sorted(indices, key=lambda i: lengths[i])
        batches += [order[start : start + size] for start in range(0, len(order), size)]
    return batches


def _length_order(examples: Sequence[TokenizedExample]) -> list[int]:
    """Indices sorted by length (stable), so batches carry little padding."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i]))


def _inverse(order: list[int]) -> torch.Tensor:
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return inverse


class InfluenceScorer:
    """Holds the prepared model, the task and the loaded factors; scores any number of example sets."""

    def __init__(self, model: nn.Module, task: CompletionLossTask, factors_dir: str | Path, pad_token_id: int,
                 config: ScoreConfig, quiet: bool = False):
        config.validate()
        self.config = config
        self.task = task
        self.pad_token_id = pad_token_id
        self.quiet = quiet
        self.analyzer = make_analyzer(Path(factors_dir), model, task, quiet)
        self.factor_args = self.analyzer.load_factor_args(FACTORS_NAME)
        if self.factor_args is None:
            raise InputError(f"--factors-dir {factors_dir}: no Kronfluence factors found (incomplete fit?)")
        try:
            self.factors = self.analyzer.load_all_factors(FACTORS_NAME)
        except (FactorsNotFoundError, FileNotFoundError) as exc:
            raise InputError(f"--factors-dir {factors_dir}: incomplete factors ({exc})") from exc
        self.score_args = ScoreArguments(
            damping_factor=config.damping,
            compute_per_token_scores=config.per_token,
            query_gradient_low_rank=config.query_rank,
        )
        self.module_groups = make_modules_partition(
            get_tracked_module_names(self.analyzer.model), config.module_partitions
        )

    @property
    def model(self) -> nn.Module:
        return self.analyzer.model

    @property
    def device(self) -> torch.device:
        return self.analyzer.state.device

    @property
    def is_main_process(self) -> bool:
        return self.analyzer.state.is_main_process

    def _loader(self, examples: Sequence[TokenizedExample], batch_size: int, pad_to: int | None = None,
                stack: bool = True) -> data.DataLoader:
        kwargs = DataLoaderKwargs(collate_fn=Collator(self.pad_token_id, pad_to)).to_dict()
        return self.analyzer._get_dataloader(  # noqa: SLF001 - same samplers as Kronfluence's own scoring
            dataset=list(examples), per_device_batch_size=batch_size,
            dataloader_params=kwargs, allow_duplicates=True, stack=stack,
        )

    def pairwise(self, queries: Sequence[TokenizedExample], train: Sequence[TokenizedExample]) -> PairwiseScores:
        """Scores of every (query, train) pair; train gradients are computed once per pass over the
        train set, and one pass holds all queries unless ``queries_per_pass`` limits it."""
        query_order, train_order = _length_order(queries), _length_order(train)
        sorted_queries = [queries[i] for i in query_order]
        sorted_train = [train[i] for i in train_order]
        pad_to = max(len(t) for t in train) if self.config.per_token else None
        query_size, train_size = self.config.batch_sizes()
        batches = math.ceil(len(queries) / query_size)
        per_pass = self.config.queries_per_pass or len(queries)
        self.score_args.query_gradient_accumulation_steps = max(1, min(batches, math.ceil(per_pass / query_size)))
        total = None
        for modules in self.module_groups:
            result = compute_pairwise_scores_with_loaders(
                loaded_factors=self.factors, model=self.model, state=self.analyzer.state, task=self.task,
                query_loader=self._loader(sorted_queries, query_size, stack=False),
                per_device_query_batch_size=query_size,
                train_loader=self._loader(sorted_train, train_size, pad_to=pad_to),
                score_args=self.score_args, factor_args=self.factor_args,
                tracked_module_names=modules, disable_tqdm=self.quiet,
            )
            if not self.is_main_process:
                continue
            scores = result[ALL_MODULE_NAME]
            total = scores if total is None else total + scores
        if not self.is_main_process:
            return PairwiseScores(torch.empty(0), None)
        total = total[_inverse(query_order)][:, _inverse(train_order)]
        if not self.config.per_token:
            return PairwiseScores(total, None)
        per_token = [[total[q, t, : len(train[t])].clone() for t in range(len(train))] for q in range(len(queries))]
        return PairwiseScores(total.sum(dim=-1), per_token)

    def self_scores(self, examples: Sequence[TokenizedExample]) -> torch.Tensor:
        """``g^T (G + damping)^-1 g`` of each example (exact, never low-rank)."""
        if not examples:
            return torch.empty(0)
        order = _length_order(examples)
        arguments = ScoreArguments(damping_factor=self.config.damping)
        total = None
        for modules in self.module_groups:
            result = compute_self_scores_with_loaders(
                loaded_factors=self.factors, model=self.model, state=self.analyzer.state, task=self.task,
                train_loader=self._loader([examples[i] for i in order], self.config.batch_sizes()[1]),
                score_args=arguments,
                factor_args=self.factor_args, tracked_module_names=modules, disable_tqdm=self.quiet,
            )
            if self.is_main_process:
                scores = result[ALL_MODULE_NAME]
                total = scores if total is None else total + scores
        if not self.is_main_process:
            return torch.empty(0)
        return total[_inverse(order)]

    @torch.no_grad()
    def completion_losses(self, examples: Sequence[TokenizedExample]) -> torch.Tensor:
        """Summed cross-entropy over completion tokens (EOS included), float64."""
        order = _length_order(examples)
        collate = Collator(self.pad_token_id)
        sums = torch.empty(len(examples), dtype=torch.float64)
        size = self.config.batch_sizes()[0]  # the queries' losses
        for start in range(0, len(order), size):
            indices = order[start : start + size]
            batch = {k: v.to(self.device) for k, v in collate([examples[i] for i in indices]).items()}
            logits, labels = shifted_logits_and_labels(batch, self.model)
            sums[indices] = summed_token_losses(logits, labels).double().cpu()
        return sums
