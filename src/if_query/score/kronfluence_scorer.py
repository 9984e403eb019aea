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
from if_query.model.tracking import MlpProjection
from if_query.plan.run_plan import JobPlan
from if_query.score.scored import ScoredSet, per_token_pairs
from if_query.score.sequences import TrainSequences


class KronfluenceScorer:
    """Kronfluence's streaming scorers (pairwise, then self-influences), as a cross-check."""

    def __init__(self, model: nn.Module, modules: list[MlpProjection], config: QueryConfig, pad_token_id: int,
                 quiet: bool = False):
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
        train = train.take(range(len(train.lengths)))
        scorer = self.scorer
        pairwise = scorer.pairwise(queries, train)
        # A sequence that is both a query and a train example: its self-influence is read off the
        # exact pairwise diagonal (not with low-rank queries, and not across processes, where every
        # rank must run the same passes).
        reuse = self.config.query_rank is None and not scorer.distributed
        train_position = {sequence: j for j, sequence in enumerate(train)}
        known: dict[TokenizedExample, float] = {}
        if reuse and pairwise is not None:
            for i, sequence in enumerate(queries):
                if sequence in train_position:
                    known[sequence] = float(pairwise.scores[i, train_position[sequence]])
        missing = [s for s in dict.fromkeys([*queries, *train]) if s not in known]
        computed = scorer.self_scores(missing)
        losses = scorer.completion_losses(queries)
        if pairwise is None or computed is None:
            return None
        known.update({s: float(v) for s, v in zip(missing, computed.tolist(), strict=True)})
        return ScoredSet(
            scores=pairwise.scores.double(),
            query_self=torch.tensor([known[s] for s in queries], dtype=torch.float64),
            train_self=torch.tensor([known[s] for s in train], dtype=torch.float64),
            query_losses=losses,
            per_token=per_token_pairs(pairwise.per_token, range(len(train))),
            damping=None,
        )
