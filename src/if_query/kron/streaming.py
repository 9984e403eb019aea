"""Kronfluence's own pairwise and self-influence scorers (``--engine kronfluence``, the cross-check)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer
from kronfluence.arguments import ScoreArguments
from kronfluence.module.utils import get_tracked_module_names, make_modules_partition
from kronfluence.score.pairwise import compute_pairwise_scores_with_loaders
from kronfluence.score.self import compute_self_scores_with_loaders
from kronfluence.utils.constants import ALL_MODULE_NAME
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.utils.exceptions import FactorsNotFoundError
from torch import nn
from torch.utils import data

from if_query.data.tokenization import Collator, TokenizedExample
from if_query.errors import InputError
from if_query.kron.factors import FACTORS_NAME, clamp_kfac_eigenvalues
from if_query.kron.fit import CompletionLossTask, make_analyzer, wrap_tracked_modules
from if_query.model import loss


@dataclass(frozen=True)
class StreamingOptions:
    """What Kronfluence's scorers are run with (run-query's options of the same names)."""

    factors_dir: Path
    damping: float | None  # None: Kronfluence's heuristic
    per_token_scores: bool
    query_rank: int | None  # query_gradient_low_rank
    module_partitions: int
    query_batch_size: int
    train_batch_size: int
    queries_per_pass: int | None  # None: every query in one pass


@dataclass
class PairwiseScores:
    scores: torch.Tensor  # (num_queries, num_train)
    per_token: list[list[torch.Tensor]] | None  # [query][train] -> (train length,)


def _length_order(examples: Sequence[TokenizedExample]) -> list[int]:
    """Indices sorted by length (stable), so batches carry little padding."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i]))


def _inverse(order: list[int]) -> torch.Tensor:
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return inverse


def load_dataloader(analyzer: Analyzer, examples: Sequence[TokenizedExample], batch_size: int, collate: Collator,
                    stack: bool) -> data.DataLoader:
    """A loader over ``examples`` with the samplers of Kronfluence's own scoring (its distributed sampler
    under torchrun, every example once otherwise)."""
    # private: the public score methods take datasets, not loaders; the *_with_loaders functions need
    # loaders built exactly as Kronfluence builds them (checked in tests/test_kron_adapter.py).
    return analyzer._get_dataloader(  # noqa: SLF001
        dataset=list(examples), per_device_batch_size=batch_size,
        dataloader_params=DataLoaderKwargs(collate_fn=collate).to_dict(), allow_duplicates=True, stack=stack,
    )


class StreamingScorer:
    """Kronfluence's pairwise and self-influence scorers on a prepared model and loaded factors.

    On the non-main ranks of a torchrun launch every method returns None (they take part in the
    passes; rank 0 holds the result)."""

    def __init__(self, model: nn.Module, module_names: list[str], options: StreamingOptions, pad_token_id: int,
                 quiet: bool = False):
        self.task = CompletionLossTask(module_names)
        self.options = options
        self.pad_token_id = pad_token_id
        self.quiet = quiet
        model = wrap_tracked_modules(model, self.task)
        self.analyzer = make_analyzer(Path(options.factors_dir), model, self.task, quiet)
        self.factor_args = self.analyzer.load_factor_args(FACTORS_NAME)
        if self.factor_args is None:
            raise InputError(f"{options.factors_dir}: no Kronfluence factors found (incomplete fit?)")
        try:
            self.factors = self.analyzer.load_all_factors(FACTORS_NAME)
        except (FactorsNotFoundError, FileNotFoundError) as exc:
            raise InputError(f"{options.factors_dir}: incomplete factors ({exc})") from exc
        clamp_kfac_eigenvalues(self.factors)
        self.score_args = ScoreArguments(
            damping_factor=options.damping,
            compute_per_token_scores=options.per_token_scores,
            query_gradient_low_rank=options.query_rank,
        )
        self.module_groups = make_modules_partition(get_tracked_module_names(self.model), options.module_partitions)

    @property
    def model(self) -> nn.Module:
        return self.analyzer.model

    @property
    def device(self) -> torch.device:
        return self.analyzer.state.device

    @property
    def is_main_process(self) -> bool:
        return self.analyzer.state.is_main_process

    @property
    def distributed(self) -> bool:
        return self.analyzer.state.use_distributed

    def _loader(self, examples: Sequence[TokenizedExample], batch_size: int, pad_to: int | None = None,
                stack: bool = True) -> data.DataLoader:
        return load_dataloader(self.analyzer, examples, batch_size, Collator(self.pad_token_id, pad_to), stack)

    def pairwise(self, queries: Sequence[TokenizedExample], train: Sequence[TokenizedExample]
                 ) -> PairwiseScores | None:
        """Scores of every (query, train) pair; train gradients are computed once per pass over the
        train set, and one pass holds all queries unless ``queries_per_pass`` limits it."""
        query_order, train_order = _length_order(queries), _length_order(train)
        sorted_queries = [queries[i] for i in query_order]
        sorted_train = [train[i] for i in train_order]
        per_token = self.options.per_token_scores
        pad_to = max(len(t) for t in train) if per_token else None
        query_size, train_size = self.options.query_batch_size, self.options.train_batch_size
        batches = math.ceil(len(queries) / query_size)
        per_pass = self.options.queries_per_pass or len(queries)
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
            if self.is_main_process:
                scores = result[ALL_MODULE_NAME]
                total = scores if total is None else total + scores
        if not self.is_main_process:
            return None
        total = total[_inverse(query_order)][:, _inverse(train_order)]
        if not per_token:
            return PairwiseScores(total, None)
        tokens = [[total[q, t, : len(train[t])].clone() for t in range(len(train))] for q in range(len(queries))]
        return PairwiseScores(total.sum(dim=-1), tokens)

    def self_scores(self, examples: Sequence[TokenizedExample]) -> torch.Tensor | None:
        """``g^T (G + damping)^-1 g`` of each example (exact, never low-rank), (examples,)."""
        if not examples:
            return torch.empty(0) if self.is_main_process else None
        order = _length_order(examples)
        arguments = ScoreArguments(damping_factor=self.options.damping)
        total = None
        for modules in self.module_groups:
            result = compute_self_scores_with_loaders(
                loaded_factors=self.factors, model=self.model, state=self.analyzer.state, task=self.task,
                train_loader=self._loader([examples[i] for i in order], self.options.train_batch_size),
                score_args=arguments,
                factor_args=self.factor_args, tracked_module_names=modules, disable_tqdm=self.quiet,
            )
            if self.is_main_process:
                scores = result[ALL_MODULE_NAME]
                total = scores if total is None else total + scores
        if not self.is_main_process:
            return None
        return total[_inverse(order)]

    @torch.no_grad()
    def completion_losses(self, examples: Sequence[TokenizedExample]) -> torch.Tensor:
        """Summed cross-entropy over the labelled tokens, (examples,) float64."""
        order = _length_order(examples)
        collate = Collator(self.pad_token_id)
        sums = torch.empty(len(examples), dtype=torch.float64)
        size = self.options.query_batch_size  # the queries' losses
        for start in range(0, len(order), size):
            indices = order[start : start + size]
            batch = {k: v.to(self.device) for k, v in collate([examples[i] for i in indices]).items()}
            logits, labels = loss.shifted_logits_and_labels(batch, self.model)
            sums[indices] = loss.summed_token_losses(logits, labels).double().cpu()
        return sums
