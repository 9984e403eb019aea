"""``--engine kronfluence``: Kronfluence's own streaming pairwise and self-influence scorers, kept as a small-scale
cross-check and for low-rank queries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from if_query.config import QueryConfig
from if_query.data.tokenization import TokenizedExample
from if_query.kron.streaming import StreamingOptions, StreamingScorer
from if_query.model.tracking import TrackedModule, check_partitions
from if_query.plan.run_plan import JobPlan
from if_query.score.scored import ScoredSet, per_token_pairs
from if_query.score.sequences import TrainSequences


class KronfluenceScorer:
    """Kronfluence's streaming scorers (pairwise, then self-influences), as a cross-check."""

    def __init__(self, model: nn.Module, modules: list[TrackedModule], config: QueryConfig, pad_token_id: int,
                 quiet: bool = False):
        check_partitions(config.module_partitions, len(modules))
        query_size, train_size = config.batch_sizes()
        options = StreamingOptions(Path(config.factors_dir), config.damping_value, config.per_token_scores,
                                   config.query_rank, config.module_partitions, query_size, train_size,
                                   config.queries_per_pass)
        self.scorer = StreamingScorer(model, [m.name for m in modules], options, pad_token_id, quiet)
        self.config = config
        self.resolved_damping = None  # resolved inside Kronfluence, not reported

    def score(self, queries: Sequence[TokenizedExample], train: TrainSequences, plan: JobPlan | None = None,
              checkpoint=None, per_token: bool | None = None) -> ScoredSet | None:
        """None on non-main ranks of a torchrun launch (``plan``, ``checkpoint`` and ``per_token`` are the
        engine's)."""
        also_queries = train.queries  # train row -> query (the workload's map: nothing is deduplicated here)
        train = train.take(range(len(train.lengths)))
        scorer = self.scorer
        pairwise = scorer.pairwise(queries, train)
        # A sequence that is both a query and a train example: its self-influence is read off the
        # exact pairwise diagonal (not with low-rank queries, and not across processes, where every
        # rank must run the same passes).
        reuse = self.config.query_rank is None and not scorer.distributed
        query_self: dict[int, float] = {}
        if reuse and pairwise is not None:
            query_self = {q: float(pairwise.scores[q, row]) for row, q in also_queries.items()}
        train_only = [row for row in range(len(train)) if row not in also_queries]
        # Self-influences still needed: the queries not read off the diagonal, every train row that is no query,
        # and (without reuse) the train rows that are queries, through their query.
        missing = [q for q in range(len(queries)) if q not in query_self]
        computed = scorer.self_scores([queries[q] for q in missing] + [train[row] for row in train_only])
        losses = scorer.completion_losses(queries)
        if pairwise is None or computed is None:
            return None
        values = computed.tolist()
        query_self.update(zip(missing, values[: len(missing)], strict=True))
        train_self = dict(zip(train_only, values[len(missing):], strict=True))
        train_self.update({row: query_self[q] for row, q in also_queries.items()})
        return ScoredSet(
            scores=pairwise.scores.double(),
            query_self=torch.tensor([query_self[q] for q in range(len(queries))], dtype=torch.float64),
            train_self=torch.tensor([train_self[row] for row in range(len(train))], dtype=torch.float64),
            query_losses=losses,
            per_token=per_token_pairs(pairwise.per_token, range(len(train))),
            damping=None,
        )
