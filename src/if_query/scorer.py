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

from if_query import distributed, engine
from if_query.capture import TokenFactorStore, capture_token_factors
from if_query.config import QueryConfig
from if_query.errors import RunError
from if_query.kron import FactorReader, StreamingScorer
from if_query.memory import (
    device_memory_free,
    host_memory_available,
    host_share,
    ram_filesystem,
    return_freed_memory_to_the_os,
)
from if_query.modeling import MlpProjection, resolve_matmul_precision
from if_query.plan import DEFAULT_PEAKS, plan_scoring
from if_query.sizes import ModelShape, Shape, human_bytes
from if_query.tokenization import TokenizedExample
from if_query.transfer import Transfers

logger = logging.getLogger(__name__)
MIN_WORKSPACE_BYTES = 64 * 1024**2


@dataclass
class ScoredSet:
    """Scores of queries against train sequences (float64, on the host); both scorers return one."""

    scores: torch.Tensor  # (queries, train)
    query_self: torch.Tensor  # (queries,)
    train_self: torch.Tensor  # (train,)
    query_losses: torch.Tensor  # (queries,) summed completion loss
    per_token: list[list[torch.Tensor]] | None  # [query][train] -> (train length,)
    damping: dict[str, float | None] | None  # resolved damping per module (None: not known)

    def select(self, queries: Sequence[int], train: Sequence[int]) -> ScoredSet:
        """The rows ``queries`` and columns ``train`` (indices into this set; repeats allowed)."""
        per_token = (None if self.per_token is None
                     else [[self.per_token[q][t] for t in train] for q in queries])
        return ScoredSet(self.scores[queries][:, train].double(), self.query_self[queries].double(),
                         self.train_self[train].double(), self.query_losses[queries], per_token, self.damping)

    def cosine(self) -> torch.Tensor:
        """``influence_cosine``: each score over the geometric mean of the two self-influences, in [-1, 1]
        (0 where a self-influence is 0), (queries, train)."""
        norms = torch.sqrt(self.query_self.clamp_min(0)[:, None] * self.train_self.clamp_min(0)[None, :])
        return torch.nan_to_num(self.scores / norms, nan=0.0).clamp(-1.0, 1.0)

    def check_finite(self, query_ids: Sequence[str], train_ids: Sequence[str]) -> None:
        """Raise :class:`RunError` naming the first records whose loss or scores are not finite."""
        if bad := _non_finite(self.query_losses, query_ids):
            raise _non_finite_error("loss", bad)
        if bad := _non_finite(self.scores.flatten(), [f"{q}/{t}" for q in query_ids for t in train_ids]):
            raise _non_finite_error("influence score", bad)


def _non_finite(values: torch.Tensor, ids: Sequence[str]) -> list[str]:
    return [ids[i] for i in (~torch.isfinite(values)).nonzero().flatten().tolist()]


def _non_finite_error(what: str, ids: list[str]) -> RunError:
    shown = ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return RunError(f"non-finite {what} for {shown}; try --dtype float32 (or bfloat16 instead of float16)"
                    + (", or a larger --damping" if what != "loss" else ""))


def gradient_batches(lengths: Sequence[int], num_queries: int, config: QueryConfig) -> list[list[int]]:
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


HOST_SHARE = 0.5  # default --host-memory-gb: this fraction of the available RAM, divided among the host's ranks
DEVICE_WORKSPACE_SHARE = 0.5  # default --workspace-gb on CUDA: this fraction of the free device memory
HOST_WORKSPACE_SHARE = 0.25  # ... on CPU: this fraction of the available RAM after the token factors


def _workspace_default(device: torch.device, reserved: int) -> int:
    """W blocks: half of the free device memory (CUDA; cached blocks count as free, so every folder of one
    size gets the same plan), a quarter of the host's after ``reserved`` (this rank's share)."""
    if device.type == "cuda":
        return max(MIN_WORKSPACE_BYTES, int(device_memory_free(device) * DEVICE_WORKSPACE_SHARE))
    return max(MIN_WORKSPACE_BYTES, host_share(HOST_WORKSPACE_SHARE, host_memory_available() - reserved))


class EngineScorer:
    """Token factors captured once per distinct sequence, scored exactly module by module."""

    def __init__(self, model: nn.Module, modules: list[MlpProjection], config: QueryConfig, pad_token_id: int,
                 device: torch.device, quiet: bool = False):
        return_freed_memory_to_the_os()
        self.model = model.to(device).eval()
        self.tracked = modules
        self.linears = {m.name: model.get_submodule(m.name) for m in modules}
        self.factors = FactorReader(config.factors_dir)
        self.pad_token_id = pad_token_id
        self.config = config
        self.device = device
        self.quiet = quiet
        self.dtype = next(model.parameters()).dtype
        self.model_shape = ModelShape.of(model, model.config)
        self.matmul_precision = resolve_matmul_precision(config.matmul_precision, device)
        self.transfers = Transfers(device)  # its pinned buffers serve every folder
        self.resolved_damping: dict[str, float | None] | None = None  # of the last scored set (for run.json)

    def plan(self, examples: Sequence[TokenizedExample]) -> tuple[TokenFactorStore, int]:
        """Allocate the token factors (RAM or spill file) and choose the workspace; log the plan
        (:func:`if_query.plan.plan_scoring`, as ``if-query plan`` computes it) and warn if it will not fit."""
        lengths = [len(e) for e in examples]
        budget = self.config.host_memory_bytes
        if budget is None:
            budget = host_share(HOST_SHARE)
        shared = {m.name: m.input_from for m in self.tracked if m.input_from is not None}
        store = TokenFactorStore({m.name: (m.out_features, m.in_features) for m in self.tracked}, lengths,
                                 self.dtype, budget, self.config.spill_dir, shared)
        if store.spilled and (kind := ram_filesystem(Path(store.spill_path).parent)):
            logger.warning("The spill file is on %s, which is held in RAM: spilling there saves no memory; give "
                           "--spill-dir a directory on a disk", kind)
        workspace = self.config.workspace_bytes
        if workspace is None:
            workspace = _workspace_default(self.device, 0 if store.spilled else store.nbytes)
        cuda = self.device.type == "cuda"
        plan = plan_scoring(
            [Shape.of(m) for m in self.tracked], self.model_shape, lengths, self.factors.strategy,
            self.dtype.itemsize, max(self.config.batch_sizes()), workspace, budget, self.config.per_token_scores,
            self.device.type, DEFAULT_PEAKS, self.matmul_precision,
            torch.cuda.get_device_properties(self.device).total_memory if cuda else None,
            labelled=[e.num_labelled + 1 for e in examples])
        ranks = distributed.local_world_size()
        logger.info("%s%s", plan.line(), f"; the host budget is this rank's share ({ranks} ranks)" if ranks > 1 else "")
        for peak in plan.peaks():
            if not peak.fits:
                logger.warning("The plan does not fit: %s", peak.describe())
        return store, workspace

    def score(self, queries: Sequence[TokenizedExample], train: Sequence[TokenizedExample]) -> ScoredSet:
        position: dict[TokenizedExample, int] = {}
        for sequence in (*queries, *train):
            position.setdefault(sequence, len(position))
        distinct = list(position)
        store, workspace = self.plan(distinct)
        config = self.config
        moved = (self.transfers.to_host_bytes, self.transfers.to_device_bytes)
        with tqdm(total=len(distinct), desc="gradients", unit="seq", disable=self.quiet) as bar:
            batches = gradient_batches([len(s) for s in distinct], len(queries), config)
            losses = capture_token_factors(self.model, self.linears, distinct, store, batches, self.pad_token_id,
                                           self.device, progress=bar.update, transfers=self.transfers)
        with tqdm(total=len(self.tracked), desc="scores", unit="module", disable=self.quiet) as bar:
            result = engine.score(
                store, self.factors, {m.name: m.bias for m in self.tracked},
                [position[q] for q in queries], [position[t] for t in train], config.damping_value,
                config.per_token_scores, workspace, self.device, progress=lambda name: bar.update(1),
                transfers=self.transfers,
            )
        logger.debug("Token factors moved: %s from the device while capturing, %s to it while scoring",
                     human_bytes(self.transfers.to_host_bytes - moved[0]),
                     human_bytes(self.transfers.to_device_bytes - moved[1]))
        self.resolved_damping = result.damping
        return ScoredSet(result.pairwise, result.query_self, result.train_self,
                         losses[[position[q] for q in queries]], result.per_token, result.damping)


class KronfluenceScorer:
    """Kronfluence's streaming scorers (pairwise, then self-influences), as a cross-check."""

    def __init__(self, model: nn.Module, modules: list[MlpProjection], config: QueryConfig, pad_token_id: int,
                 quiet: bool = False):
        self.scorer = StreamingScorer(model, [m.name for m in modules], config, pad_token_id, quiet)
        self.config = config
        self.resolved_damping = None  # resolved inside Kronfluence, not reported

    def score(self, queries: Sequence[TokenizedExample], train: Sequence[TokenizedExample]) -> ScoredSet | None:
        """None on non-main ranks of a torchrun launch."""
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
            per_token=pairwise.per_token,
            damping=None,
        )
