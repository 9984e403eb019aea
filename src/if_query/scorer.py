"""The two scorers behind one interface: distinct query and train sequences in, :class:`ScoredSet` out.

- :class:`EngineScorer` (``--engine if-query``, the default): one forward and backward pass per
  distinct sequence (:mod:`if_query.capture`), then exact scores module by module
  (:mod:`if_query.engine`), in memory bounded by a printed plan.
- :class:`KronfluenceScorer` (``--engine kronfluence``): Kronfluence's own streaming pairwise and
  self-influence scorers, kept as a small-scale cross-check and for low-rank queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from if_query import engine
from if_query.capture import (
    TokenFactorStore,
    capture_token_factors,
    host_memory_available,
    return_freed_memory_to_the_os,
)
from if_query.kron import FactorReader, clamp_kfac_eigenvalues
from if_query.modeling import TrackedModule
from if_query.scoring import InfluenceScorer, ScoreConfig, gradient_batches
from if_query.sizes import human_bytes
from if_query.task import CompletionLossTask
from if_query.tokenization import TokenizedExample

logger = logging.getLogger(__name__)
MIN_WORKSPACE_BYTES = 64 * 1024**2


@dataclass
class ScoredSet:
    """Scores of distinct queries against distinct train sequences (float64, on the host)."""

    scores: torch.Tensor  # (queries, train)
    query_self: torch.Tensor  # (queries,)
    train_self: torch.Tensor  # (train,)
    query_losses: torch.Tensor  # (queries,) summed completion loss
    per_token: list[list[torch.Tensor]] | None  # [query][train] -> (train length,)
    damping: dict[str, float | None] | None  # resolved damping per module (None: not known)


def _workspace_default(device: torch.device, reserved: int) -> int:
    """W blocks: half of the free device memory (CUDA), a quarter of the host's after ``reserved``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(MIN_WORKSPACE_BYTES, free // 2)
    return max(MIN_WORKSPACE_BYTES, (host_memory_available() - reserved) // 4)


class EngineScorer:
    """Token factors captured once per distinct sequence, scored exactly module by module."""

    def __init__(self, model: nn.Module, modules: list[TrackedModule], factors_dir: str | Path, pad_token_id: int,
                 config: ScoreConfig, device: torch.device, quiet: bool = False):
        return_freed_memory_to_the_os()
        self.model = model.to(device).eval()
        self.tracked = modules
        self.linears = {m.name: model.get_submodule(m.name) for m in modules}
        self.factors = FactorReader(factors_dir)
        self.pad_token_id = pad_token_id
        self.config = config
        self.device = device
        self.quiet = quiet
        self.dtype = next(model.parameters()).dtype
        self.resolved_damping: dict[str, float | None] | None = None  # of the last scored set (for run.json)

    def plan(self, examples: Sequence[TokenizedExample]) -> tuple[TokenFactorStore, int]:
        """Allocate the token factors (RAM or spill file) and choose the workspace; log both."""
        lengths = [len(e) for e in examples]
        shapes = {m.name: (m.out_features, m.in_features) for m in self.tracked}
        budget = self.config.host_memory_bytes
        if budget is None:
            budget = host_memory_available() // 2
        store = TokenFactorStore(shapes, lengths, self.dtype, budget, self.config.spill_dir)
        largest = max(self.tracked, key=lambda m: m.out_features * (m.in_features + 1))
        per_example = engine.whitened_bytes(store, largest.name)
        workspace = self.config.workspace_bytes
        if workspace is None:
            workspace = _workspace_default(self.device, 0 if store.spilled else store.nbytes)
        factor_bytes = 4 * (largest.out_features**2 + (largest.in_features + 1) ** 2
                            + 2 * largest.out_features * (largest.in_features + 1))
        at_once = workspace // per_example
        logger.info(
            "Plan: %d sequences, %d tokens; token factors %s %s; one module's factors up to %s; "
            "workspace %s (%s)",
            len(examples), store.tokens, human_bytes(store.nbytes),
            f"spilled to a memory-mapped file in {Path(store.spill_path).parent}" if store.spilled
            else f"in RAM (budget {human_bytes(budget)})",
            human_bytes(factor_bytes), human_bytes(workspace),
            "every gradient of a module at once" if at_once >= len(examples)
            else f"blocks of {max(1, at_once // 2)} gradients, columns formed again per block",
        )
        return store, workspace

    def score(self, queries: Sequence[TokenizedExample], train: Sequence[TokenizedExample]) -> ScoredSet:
        position: dict[TokenizedExample, int] = {}
        for sequence in (*queries, *train):
            position.setdefault(sequence, len(position))
        distinct = list(position)
        store, workspace = self.plan(distinct)
        config = self.config
        with tqdm(total=len(distinct), desc="gradients", unit="seq", disable=self.quiet) as bar:
            batches = gradient_batches([len(s) for s in distinct], len(queries), config)
            losses = capture_token_factors(self.model, self.linears, distinct, store, batches, self.pad_token_id,
                                           self.device, progress=bar.update)
        with tqdm(total=len(self.tracked), desc="scores", unit="module", disable=self.quiet) as bar:
            result = engine.score(
                store, self.factors, {m.name: m.bias for m in self.tracked},
                [position[q] for q in queries], [position[t] for t in train], config.damping,
                config.per_token, workspace, self.device, progress=lambda name: bar.update(1),
            )
        self.resolved_damping = result.damping
        return ScoredSet(result.pairwise, result.query_self, result.train_self,
                         losses[[position[q] for q in queries]], result.per_token, result.damping)


class KronfluenceScorer:
    """Kronfluence's streaming scorers (pairwise, then self-influences), as a cross-check."""

    def __init__(self, model: nn.Module, modules: list[TrackedModule], factors_dir: str | Path, pad_token_id: int,
                 config: ScoreConfig, quiet: bool = False):
        from kronfluence.analyzer import prepare_model

        task = CompletionLossTask([m.name for m in modules])
        self.scorer = InfluenceScorer(prepare_model(model, task), task, factors_dir, pad_token_id, config, quiet)
        clamp_kfac_eigenvalues(self.scorer.factors)
        self.config = config
        self.resolved_damping = None  # resolved inside Kronfluence, not reported

    @property
    def is_main_process(self) -> bool:
        return self.scorer.is_main_process

    def score(self, queries: Sequence[TokenizedExample], train: Sequence[TokenizedExample]) -> ScoredSet | None:
        """None on non-main ranks of a torchrun launch."""
        scorer = self.scorer
        pairwise = scorer.pairwise(queries, train)
        # A sequence that is both a query and a train example: its self-influence is read off the
        # exact pairwise diagonal (not with low-rank queries, and not across processes, where every
        # rank must run the same passes).
        reuse = self.config.query_rank is None and not scorer.analyzer.state.use_distributed
        train_position = {sequence: j for j, sequence in enumerate(train)}
        known: dict[TokenizedExample, float] = {}
        if reuse and scorer.is_main_process:
            for i, sequence in enumerate(queries):
                if sequence in train_position:
                    known[sequence] = float(pairwise.scores[i, train_position[sequence]])
        missing = [s for s in dict.fromkeys([*queries, *train]) if s not in known]
        computed = scorer.self_scores(missing)
        losses = scorer.completion_losses(queries)
        if not scorer.is_main_process:
            return None
        known.update({s: float(v) for s, v in zip(missing, computed.tolist(), strict=True)})
        return ScoredSet(
            scores=pairwise.scores.double(),
            query_self=torch.tensor([known[s] for s in queries], dtype=torch.float64),
            train_self=torch.tensor([known[s] for s in train], dtype=torch.float64),
            query_losses=losses,
            per_token=pairwise.per_token,
            damping=None,
        )
