"""``--engine if-query`` (the default): one forward and backward pass per distinct sequence
(:mod:`if_query.score.capture`), then exact scores module by module (:mod:`if_query.score.engine`), as the run's plan
says: at once, or the train side in chunks (on one rank, or split across the ranks)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from if_query import distributed
from if_query.config import QueryConfig
from if_query.data.tokenization import TokenizedExample
from if_query.errors import RunError
from if_query.kron.factors import HessianFactors
from if_query.model.tracking import TrackedModule
from if_query.plan.estimates import DEFAULT_PEAKS, Context, ScorePlan
from if_query.plan.memory import ram_filesystem, return_freed_memory_to_the_os
from if_query.plan.run_plan import JobPlan
from if_query.plan.sizes import ModelShape, Shape
from if_query.score import engine, refine
from if_query.score.capture import capture_token_factors
from if_query.score.scored import ScoredSet, per_token_pairs
from if_query.score.sequences import TrainSequences
from if_query.score.store import TokenFactorStore
from if_query.score.transfer import FACTORS, REFINE, Transfers

logger = logging.getLogger(__name__)


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


class EngineScorer:
    """Token factors captured once per distinct sequence, scored exactly module by module, as a job's
    :class:`~if_query.plan.run_plan.JobPlan` says: at once, or the train side in its chunks (on this rank, or split
    across the ranks). ``factors``: the fit's reader, opened (and so its files checked) by
    :func:`~if_query.run.compatibility.load_model_for_factors`."""

    def __init__(self, model: nn.Module, modules: list[TrackedModule], factors: HessianFactors, config: QueryConfig,
                 pad_token_id: int, device: torch.device, matmul_precision: str, refine_batches: list[dict],
                 quiet: bool = False):
        """``matmul_precision``: as the run resolved it; ``refine_batches``: --refine-steps' collated fitting batches
        on the device (empty without it)."""
        return_freed_memory_to_the_os()
        self.model = model.to(device).eval()
        self.tracked = modules
        self.shapes = [Shape.of(m) for m in modules]
        self.linears = {m.name: model.get_submodule(m.name) for m in modules}
        self.factors = factors
        self.pad_token_id = pad_token_id
        self.config = config
        self.device = device
        self.quiet = quiet
        self.dtype = next(model.parameters()).dtype
        self.model_shape = ModelShape.of(model, model.config)
        self.matmul_precision = matmul_precision
        self.transfers: Transfers | None = None  # sized by the first job's plan (the run's pinned sizes), kept
        self.setup = engine.Setup(factors, self.shapes, config.damping_value, device, config.cosine)
        self.refine_batches = refine_batches
        self.last_moved: dict | None = None  # what the last job moved, as the transfers counted it
        self.kept_for: str | None = None  # the run plan whose factors setup.resident holds across jobs

    def _prepare(self, plan: JobPlan) -> None:
        """The run's pinned buffers, sized once from the plan (every job carries the run's sizes), and where the
        plan says so, the factors kept on the device: across the run's jobs (``keep_factors``: those an earlier job
        of the same run plan left there serve this one), else for the job's engine calls (else dropped)."""
        if self.transfers is None:
            bounce = plan.pinned.bounce or None
            self.transfers = Transfers(self.device, **({"bounce_bytes": bounce} if bounce else {}),
                                       landing_bytes=plan.pinned.landing or None)
        held = self.setup.resident
        keep = plan.keep_factors and plan.resident  # a job planned to stream its factors (a per-token pass's own
        # plan) drops the kept ones: its memory was planned without them
        if not (keep and held is not None and self.kept_for == plan.run_id):
            held = {} if plan.resident else None
        self.kept_for = plan.run_id if keep else None
        self.setup = dataclasses.replace(self.setup, transfers=self.transfers, resident=held)

    def close(self) -> None:
        """Return the pinned buffers and the kept factors (the end of a run)."""
        if self.transfers is not None:
            self.transfers.close()
        self.transfers = None  # the next run sizes its own from its plan
        self.setup = dataclasses.replace(self.setup, resident=None)
        self.kept_for = None

    def context(self) -> Context:
        """What the plan's sizes depend on (shapes, model, strategy, dtype, options, the device)."""
        cuda = self.device.type == "cuda"
        return Context(self.shapes, self.model_shape, self.factors.strategy, self.dtype.itemsize,
                       max(self.config.batch_sizes()), self.config.per_token_scores, self.device.type, DEFAULT_PEAKS,
                       self.matmul_precision,
                       torch.cuda.get_device_properties(self.device).total_memory if cuda else None,
                       refine=bool(self.config.refine_steps))

    def _store(self, sequences: Sequence[TokenizedExample], host_budget: int,
               page_locked: bool = False) -> TokenFactorStore:
        """The token factors of ``sequences``: in RAM, or spilled to a file past ``host_budget`` (the plan's); in
        RAM and ``page_locked`` (the plan's), its memory page-locked while it lives: the device copies straight from
        and into it."""
        lengths = [len(e) for e in sequences]
        shared = {m.name: m.input_from for m in self.tracked if m.input_from is not None}
        store = TokenFactorStore({m.name: (m.out_features, m.in_features) for m in self.tracked}, lengths,
                                 self.dtype, host_budget, self.config.spill_dir, shared)
        if store.spilled and (kind := ram_filesystem(Path(store.spill_path).parent)):
            logger.warning("The spill file is on %s, which is held in RAM: spilling there saves no memory; give "
                           "--spill-dir a directory on a disk", kind)
        if page_locked and not store.spilled:
            self.transfers.register_store(store.flat, store)
        return store

    def _capture(self, sequences: Sequence[TokenizedExample], store: TokenFactorStore, queries: int,
                 what: str) -> torch.Tensor:
        with tqdm(total=len(sequences), desc=f"gradients ({what})", unit="seq", disable=self.quiet,
                  leave=what == "folder") as bar:
            batches = gradient_batches([len(s) for s in sequences], queries, self.config)
            return capture_token_factors(self.model, self.linears, sequences, store, batches, self.pad_token_id,
                                         self.device, progress=bar.update, transfers=self.transfers)

    def _engine(self, queries: engine.Side, train: engine.Side, workspace: int, per_token: bool,
                refined: tuple | None = None) -> engine.Scores:
        with tqdm(total=len(self.shapes), desc="scores", unit="module", disable=self.quiet, leave=False) as bar:
            return engine.score(queries, train, self.setup, workspace, per_token, refined,
                                progress=lambda name: bar.update(1))

    def _refine(self, queries: engine.Side) -> tuple | None:
        """--refine-steps: (each query's refined v, its refined self-influence), or None (EK-FAC)."""
        if not self.config.refine_steps:
            return None
        with torch.enable_grad():  # the factors taken from (or left in) the kept ones where the plan keeps them
            inverse = refine.Inverse(self.factors, self.shapes, self.config.damping_value, self.device,
                                     self.transfers, self.setup.resident)
            return refine.refine_queries(refine.GaussNewton(self.model, self.shapes), inverse,
                                         engine.gradients(queries, self.shapes, self.device, self.transfers),
                                         self.refine_batches, self.config.refine_steps, self.transfers)

    def score(self, queries: Sequence[TokenizedExample], train: TrainSequences, plan: JobPlan, checkpoint=None,
              per_token: bool | None = None) -> ScoredSet | None:
        """Every (query, train) score, as ``plan`` says (at once, or in its chunks). None on the ranks that do not
        write the job (a split job's ranks other than 0)."""
        per_token = self.config.per_token_scores if per_token is None else per_token
        self._prepare(plan)
        transfers = self.transfers
        counts = lambda: (transfers.to_device_bytes, transfers.moved[FACTORS], transfers.to_host_bytes,  # noqa: E731
                          transfers.direct["to device"], transfers.direct["from device"], transfers.moved[REFINE],
                          transfers.moved_off[REFINE])
        before = counts()
        transfers.page_locked_peak = 0
        if plan.at_once:
            result = self.score_at_once(queries, train, plan.store, per_token)
        else:
            result = self._score_in_chunks(queries, train, plan, checkpoint, per_token)
        self.last_moved = dict(zip(("to_device_bytes", "factor_bytes_to_device", "from_device_bytes",
                                    "direct_to_device_bytes", "direct_from_device_bytes", "refine_bytes_to_device",
                                    "refine_bytes_from_device"),
                                   (b - a for a, b in zip(before, counts(), strict=True)), strict=True))
        self.last_moved["page_locked_bytes"] = transfers.page_locked_peak
        if plan.split:  # every rank's copies summed, as the plan counts them (page-locked: the most of any rank)
            ranks = distributed.gather(self.last_moved)
            self.last_moved = {key: (max if key == "page_locked_bytes" else sum)(r[key] for r in ranks)
                               for key in self.last_moved}
        return result

    def score_at_once(self, queries: Sequence[TokenizedExample], train: TrainSequences, plan: ScorePlan,
                      per_token: bool) -> ScoredSet:
        """One store: the queries, then the train-only sequences; each captured and whitened once."""
        train_only = train.train_only()
        sequences = [*queries, *train.take(train_only)]
        position = {**{i: q for i, q in train.queries.items()},
                    **{int(i): len(queries) + k for k, i in enumerate(train_only)}}
        store = self._store(sequences, plan.host_budget, plan.registered)
        losses = self._capture(sequences, store, len(queries), "folder")
        query_side = engine.Side(store, range(len(queries)))
        result = self._engine(query_side, engine.Side(store, [position[i] for i in range(len(train.lengths))]),
                              plan.workspace_budget, per_token, self._refine(query_side))
        return ScoredSet(result.pairwise, result.query_self, result.train_self, losses[: len(queries)],
                         per_token_pairs(result.per_token, range(len(train.lengths))), result.damping)

    def _score_in_chunks(self, queries: Sequence[TokenizedExample], train: TrainSequences, plan: JobPlan,
                         checkpoint, per_token: bool) -> ScoredSet | None:
        """The queries' token factors captured once (spilled when the plan says so), then the plan's chunks of
        train-only rows, each captured into a store of its own, scored against every query module by module, its
        scores kept (in ``checkpoint`` when given: resumable) and its token factors dropped. A split job's ranks
        take their chunks in rounds; rank 0 gathers each round's scores with the rows they belong to. Train rows
        that are queries are scored from the queries' own token factors."""
        me = distributed.rank() if plan.split else 0
        workspace = plan.store.workspace_budget
        [(query_side, query_losses, refined)] = _on_every_rank(plan.split, lambda: self._queries(queries, plan),
                                                               share=False)
        total = len(train.lengths)
        kept = _ChunkScores(np.zeros((total, len(queries))) if checkpoint is None else checkpoint.scores,
                            np.zeros(total) if checkpoint is None else checkpoint.train_self, checkpoint)
        resolved, query_self = None, None

        def train_queries() -> tuple | None:  # rank 0: the train rows that are queries, from their factors
            done = checkpoint is not None and checkpoint.done[sorted(train.queries)].all()
            if me != 0 or not train.queries or done:
                return None
            rows = np.array(sorted(train.queries), dtype=np.int64)
            result = self._engine(query_side, engine.Side(query_side.store, [train.queries[i] for i in rows]),
                                  workspace, per_token, refined)
            kept.keep(rows, result.pairwise.numpy(), None if result.train_self is None else result.train_self.numpy(),
                      per_token_pairs(result.per_token, rows))
            return result.damping, result.query_self

        # in step with the other ranks: a failure here (out of memory, say) fails the job on every rank
        [done_first] = _on_every_rank(plan.split, train_queries, share=False)
        if done_first is not None:
            resolved, query_self = done_first
        last = self._score_rounds(train, plan, query_side, per_token, refined, kept)
        if last is not None:
            resolved, query_self = last
        if me != 0:
            return None
        if resolved is None:  # no chunk was left to this rank: the queries' own pass gives the rest
            result = self._engine(query_side, engine.Side(query_side.store, []), workspace, False, refined)
            resolved, query_self = result.damping, result.query_self
        return ScoredSet(torch.from_numpy(np.asarray(kept.scores).T.copy()), query_self,
                         None if query_self is None else torch.from_numpy(np.asarray(kept.train_self).copy()),
                         query_losses, kept.tokens if per_token else None, resolved)

    def _queries(self, queries: Sequence[TokenizedExample], plan: JobPlan) -> tuple:
        """The queries' side (captured into their store), their losses and refined forms."""
        store = self._store(queries, plan.store.host_budget, plan.store.registered)
        losses = self._capture(queries, store, len(queries), "queries")
        side = engine.Side(store, range(len(queries)))
        return side, losses, self._refine(side)

    def _score_rounds(self, train: TrainSequences, plan: JobPlan, query_side: engine.Side, per_token: bool,
                      refined: tuple | None, kept: _ChunkScores) -> tuple[dict, torch.Tensor | None] | None:
        """The plan's chunks, in rounds of one chunk per rank of a split job (all of them on this rank otherwise);
        rank 0 keeps each round's gathered scores in ``kept``, by the rows that came with them. A chunk that fails
        fails the job on every rank (else the others would wait forever). Returns the damping and query
        self-influences of this rank's last chunk (None: it had none)."""
        ranks = plan.world if plan.split else 1
        me = distributed.rank() if plan.split else 0
        chunks, last = plan.chunks, None
        with tqdm(total=len(chunks), desc="train chunks", unit="chunk", disable=self.quiet) as bar:
            for round_start in range(0, len(chunks), ranks):
                mine = [k for k in range(round_start, min(round_start + ranks, len(chunks)))
                        if not plan.split or chunks[k].rank == me]

                def work(mine=mine):
                    nonlocal last
                    outcomes = []
                    for k in mine:
                        result = self._score_chunk(train, plan, k, query_side, per_token, refined)
                        outcomes.append((chunks[k].rows, result.pairwise.numpy(), None if result.train_self is None
                                         else result.train_self.numpy(),
                                         per_token_pairs(result.per_token, chunks[k].rows)))
                        last = result.damping, result.query_self
                    return outcomes

                for outcomes in _on_every_rank(plan.split, work):
                    for rows, *values in outcomes:
                        if me == 0:
                            kept.keep(rows, *values)
                bar.update(min(ranks, len(chunks) - round_start))
        return last

    def _score_chunk(self, train: TrainSequences, plan: JobPlan, chunk: int, query_side: engine.Side,
                     per_token: bool, refined: tuple | None) -> engine.Scores:
        """One chunk: its sequences captured into a store of their own, scored against the queries, dropped."""
        sequences = train.take(plan.chunks[chunk].rows)
        store = self._store(sequences, plan.chunk_budget, plan.largest_chunk.registered)
        self._capture(sequences, store, 0, f"chunk {chunk + 1}/{len(plan.chunks)}")
        return self._engine(query_side, engine.Side(store, range(len(sequences))), plan.store.workspace_budget,
                            per_token, refined)


def _on_every_rank(together: bool, work: Callable[[], object], share: bool = True) -> list:
    """``work()`` on this rank. With ``together`` (a split job) the ranks then meet: a failure on any rank is raised
    on all of them (a rank left waiting in a collective would wait forever), and with ``share`` every rank's result
    comes back, in rank order; otherwise this rank's alone."""
    if not together:
        return [work()]
    value = None
    try:
        value = work()
        outcome = ("ok", value if share else None)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        outcome = ("failed", f"rank {distributed.rank()}: {type(exc).__name__}: {exc}")
    gathered = distributed.gather(outcome)
    if failures := [message for state, message in gathered if state == "failed"]:
        raise RunError(f"scoring a chunk failed on {failures[0]}")
    return [result for _, result in gathered] if share else [value]


@dataclass
class _ChunkScores:
    """What rank 0 keeps of a chunked job: ``scores`` (train, queries) and ``train_self`` (train,) float64, the
    ``checkpoint``'s memory-mapped files when there is one (resumable), and per-token scores by (query, train)."""

    scores: np.ndarray
    train_self: np.ndarray
    checkpoint: object | None = None  # if_query.run.checkpoint.Checkpoint
    tokens: dict = field(default_factory=dict)

    def keep(self, rows: np.ndarray, scores: np.ndarray, train_self: np.ndarray | None, tokens: dict | None) -> None:
        """Rows ``rows``' (queries, rows) ``scores``, (rows,) ``train_self`` and per-token scores."""
        if self.checkpoint is not None:
            self.checkpoint.record(rows, scores, train_self)
        else:
            self.scores[rows] = scores.T
            if train_self is not None:
                self.train_self[rows] = train_self
        self.tokens.update(tokens or {})
