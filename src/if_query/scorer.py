"""The two scorers behind one interface: distinct query and train sequences in, :class:`ScoredSet` out.

- :class:`EngineScorer` (``--engine if-query``, the default): one forward and backward pass per
  distinct sequence (:mod:`if_query.capture`), then exact scores module by module
  (:mod:`if_query.engine`), in memory bounded by a printed plan.
- :class:`KronfluenceScorer` (``--engine kronfluence``): Kronfluence's own streaming pairwise and
  self-influence scorers, kept as a small-scale cross-check and for low-rank queries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from if_query import distributed, engine, refine, sizes
from if_query.capture import TokenFactorStore, capture_token_factors
from if_query.config import QueryConfig
from if_query.errors import RunError
from if_query.kron.factors import HessianFactors
from if_query.kron.streaming import StreamingOptions, StreamingScorer
from if_query.memory import (
    device_memory_free,
    host_memory_available,
    host_share,
    ram_filesystem,
    return_freed_memory_to_the_os,
)
from if_query.modeling import MlpProjection, resolve_matmul_precision
from if_query.plan import DEFAULT_PEAKS, plan_scoring
from if_query.sizes import ModelShape, Shape, human_bytes, token_factor_bytes_per_token
from if_query.tokenization import TokenizedExample
from if_query.transfer import Transfers

logger = logging.getLogger(__name__)
MIN_WORKSPACE_BYTES = 64 * 1024**2


@dataclass
class ScoredSet:
    """Scores of queries against train sequences (float64, on the host); both scorers return one."""

    scores: torch.Tensor  # (queries, train)
    query_self: torch.Tensor | None  # (queries,); None without the cosine
    train_self: torch.Tensor | None  # (train,); None without the cosine
    query_losses: torch.Tensor  # (queries,) summed completion loss
    per_token: dict[tuple[int, int], torch.Tensor] | None  # (query, train) -> (train length,), the pairs computed
    damping: dict[str, float | None] | None  # resolved damping per module (None: not known)

    def select(self, queries: Sequence[int], train: Sequence[int]) -> ScoredSet:
        """The rows ``queries`` and columns ``train`` (indices into this set; repeats allowed)."""
        per_token = None
        if self.per_token is not None:
            per_token = {(row, column): self.per_token[q, t] for row, q in enumerate(queries)
                         for column, t in enumerate(train) if (q, t) in self.per_token}
        rows, columns = torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(train, dtype=torch.long)
        return ScoredSet(self.scores[rows][:, columns].double(),
                         None if self.query_self is None else self.query_self[rows].double(),
                         None if self.train_self is None else self.train_self[columns].double(),
                         self.query_losses[rows], per_token, self.damping)

    def cosine(self) -> torch.Tensor | None:
        """``influence_cosine``: each score over the geometric mean of the two self-influences, in [-1, 1]
        (0 where a self-influence is 0), (queries, train); None without self-influences."""
        if self.query_self is None or self.train_self is None:
            return None
        norms = torch.sqrt(self.query_self.clamp_min(0)[:, None] * self.train_self.clamp_min(0)[None, :])
        return torch.nan_to_num(self.scores / norms, nan=0.0).clamp(-1.0, 1.0)

    def check_finite(self, query_ids: Sequence[str], train_ids: Sequence[str]) -> None:
        """Raise :class:`RunError` naming the first records whose loss or scores are not finite."""
        if bad := [query_ids[i] for i in _non_finite(self.query_losses)]:
            raise _non_finite_error("loss", bad)
        width = self.scores.shape[1] if self.scores.dim() == 2 else 1
        if bad := [f"{query_ids[i // width]}/{train_ids[i % width]}" for i in _non_finite(self.scores.flatten())]:
            raise _non_finite_error("influence score", bad)


def _non_finite(values: torch.Tensor, limit: int = 6) -> list[int]:
    """Indices of the first ``limit`` non-finite values (never a string per value)."""
    return (~torch.isfinite(values)).nonzero().flatten()[:limit].tolist()


def _non_finite_error(what: str, ids: list[str]) -> RunError:
    shown = ", ".join(repr(i) for i in ids[:5]) + (" and more" if len(ids) > 5 else "")
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


@dataclass
class TrainSequences:
    """The distinct train sequences to score: their lengths, a stream of the chosen ones (in order), and which
    of them are also queries (train index -> query index: scored from the queries' own token factors)."""

    lengths: np.ndarray  # (train,) int64
    stream: Callable[[Callable[[int], bool] | None], Iterator[tuple[int, TokenizedExample]]]
    queries: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, sequences: Sequence[TokenizedExample], queries: dict[int, int] | None = None) -> TrainSequences:
        def stream(wanted=None):
            return ((i, s) for i, s in enumerate(sequences) if wanted is None or wanted(i))

        return cls(np.array([len(x) for x in sequences], dtype=np.int64), stream, queries or {})

    def take(self, indices: Sequence[int]) -> list[TokenizedExample]:
        wanted = set(int(i) for i in indices)
        found = dict(self.stream(wanted.__contains__))
        return [found[int(i)] for i in indices]


def plan_chunks(lengths: np.ndarray, bytes_per_token: int, budget: int) -> list[np.ndarray]:
    """Consecutive groups of the positions of ``lengths`` whose token factors fit ``budget`` (at least one each)."""
    chunks, start, used = [], 0, 0
    for position, length in enumerate(lengths.tolist()):
        size = length * bytes_per_token
        if position > start and used + size > budget:
            chunks.append(np.arange(start, position))
            start, used = position, 0
        used += size
    if start < len(lengths):
        chunks.append(np.arange(start, len(lengths)))
    return chunks


class EngineScorer:
    """Token factors captured once per distinct sequence, scored exactly module by module; a train side whose
    token factors exceed the host budget is streamed in chunks that each fit it. ``factors``: the fit's reader,
    opened (and so its files checked) by :func:`~if_query.compatibility.load_model_for_factors`."""

    def __init__(self, model: nn.Module, modules: list[MlpProjection], factors: HessianFactors, config: QueryConfig,
                 pad_token_id: int, device: torch.device, quiet: bool = False):
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
        self.matmul_precision = resolve_matmul_precision(config.matmul_precision, device)
        self.transfers = Transfers(device)  # its pinned buffers serve every folder
        self.bytes_per_token = token_factor_bytes_per_token(self.shapes, self.dtype.itemsize)
        self.refine_batches: list[dict] = []  # --refine-steps: collated fitting batches on the device

    @property
    def host_budget(self) -> int:
        budget = self.config.host_memory_bytes
        return host_share(HOST_SHARE) if budget is None else budget

    def chunked(self, queries: Sequence[TokenizedExample], train: TrainSequences) -> bool:
        """Whether the queries' and train-only sequences' token factors exceed the host budget together."""
        train_only = [i for i in range(len(train.lengths)) if i not in train.queries]
        tokens = sum(len(q) for q in queries) + int(train.lengths[train_only].sum())
        return tokens * self.bytes_per_token > self.host_budget

    def _store(self, sequences: Sequence[TokenizedExample], budget: int, what: str) -> tuple[TokenFactorStore, int]:
        """Allocate the token factors of ``sequences`` (RAM, or a spill file past ``budget``) and choose the
        workspace; log the plan (:func:`if_query.plan.plan_scoring`, as ``if-query plan`` computes it)."""
        lengths = [len(e) for e in sequences]
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
            self.shapes, self.model_shape, lengths, self.factors.strategy, self.dtype.itemsize,
            max(self.config.batch_sizes()), workspace, budget, self.config.per_token_scores, self.device.type,
            DEFAULT_PEAKS, self.matmul_precision,
            torch.cuda.get_device_properties(self.device).total_memory if cuda else None,
            labelled=[e.num_labelled + 1 for e in sequences])
        ranks = distributed.local_world_size()
        logger.log(logging.DEBUG if what.startswith("chunk") else logging.INFO, "%s%s%s", plan.line(),
                   f" ({what})" if what != "folder" else "",
                   f"; the host budget is this rank's share ({ranks} ranks)" if ranks > 1 else "")
        for peak in plan.peaks():
            if not peak.fits:
                logger.warning("The plan does not fit: %s", peak.describe())
        return store, workspace

    def _capture(self, sequences: Sequence[TokenizedExample], store: TokenFactorStore, queries: int,
                 what: str) -> torch.Tensor:
        with tqdm(total=len(sequences), desc=f"gradients ({what})", unit="seq", disable=self.quiet,
                  leave=what == "folder") as bar:
            batches = gradient_batches([len(s) for s in sequences], queries, self.config)
            return capture_token_factors(self.model, self.linears, sequences, store, batches, self.pad_token_id,
                                         self.device, progress=bar.update, transfers=self.transfers)

    def _engine(self, queries: engine.Side, train: engine.Side, workspace: int, per_token: bool,
                refined: tuple | None = None) -> engine.Scores:
        config = self.config
        forms, own = refined or (None, None)
        with tqdm(total=len(self.shapes), desc="scores", unit="module", disable=self.quiet, leave=False) as bar:
            return engine.score(queries, train, self.factors, self.shapes, config.damping_value, per_token,
                                workspace, self.device, cosine=config.cosine, progress=lambda name: bar.update(1),
                                transfers=self.transfers, refined=forms, refined_self=own)

    def _refine(self, queries: engine.Side) -> tuple | None:
        """--refine-steps: (each query's refined v, its refined self-influence), or None (EK-FAC)."""
        if not self.config.refine_steps:
            return None
        with torch.enable_grad():
            inverse = refine.Inverse(self.factors, self.shapes, self.config.damping_value, self.device)
            return refine.refine_queries(refine.GaussNewton(self.model, self.shapes), inverse,
                                         engine.gradients(queries, self.shapes, self.device), self.refine_batches,
                                         self.config.refine_steps)

    def score(self, queries: Sequence[TokenizedExample], train: TrainSequences, checkpoint=None,
              per_token: bool | None = None) -> ScoredSet | None:
        """Every (query, train) score: at once when all token factors fit the host budget, else in chunks (see
        :meth:`_score_in_chunks`). None on the ranks other than 0 of a chunk-splitting torchrun launch."""
        per_token = self.config.per_token_scores if per_token is None else per_token
        if not self.chunked(queries, train):
            return self.score_at_once(queries, train, per_token)
        return self._score_in_chunks(queries, train, checkpoint, per_token)

    def score_at_once(self, queries: Sequence[TokenizedExample], train: TrainSequences,
                       per_token: bool) -> ScoredSet:
        """One store: the queries, then the train-only sequences; each captured and whitened once."""
        train_only = [i for i in range(len(train.lengths)) if i not in train.queries]
        sequences = [*queries, *train.take(train_only)]
        position = {**{i: q for i, q in train.queries.items()},
                    **{i: len(queries) + k for k, i in enumerate(train_only)}}
        store, workspace = self._store(sequences, self.host_budget, "folder")
        losses = self._capture(sequences, store, len(queries), "folder")
        query_side = engine.Side(store, range(len(queries)))
        result = self._engine(query_side, engine.Side(store, [position[i] for i in range(len(train.lengths))]),
                              workspace, per_token, self._refine(query_side))
        return ScoredSet(result.pairwise, result.query_self, result.train_self, losses[: len(queries)],
                         _per_token_pairs(result.per_token, range(len(train.lengths))), result.damping)

    def _score_in_chunks(self, queries: Sequence[TokenizedExample], train: TrainSequences, checkpoint,
                         per_token: bool) -> ScoredSet | None:
        """The queries' token factors captured once (spilled only if they alone exceed the budget); the
        train-only sequences in consecutive chunks whose token factors each fit what is left of it, each captured
        once, scored against every query module by module, its scores kept (in ``checkpoint`` when given:
        resumable) and its token factors dropped. Under torchrun the ranks split the chunks (chunk c on rank
        c mod N) and rank 0 gathers their scores. Train sequences that are queries are scored from the
        queries' own token factors."""
        budget = self.host_budget
        query_store, workspace = self._store(queries, budget, "queries")
        query_losses = self._capture(queries, query_store, len(queries), "queries")
        query_side = engine.Side(query_store, range(len(queries)))
        refined = self._refine(query_side)
        train_only = np.array([i for i in range(len(train.lengths)) if i not in train.queries], dtype=np.int64)
        chunk_budget = max(budget - (0 if query_store.spilled else query_store.nbytes), self.bytes_per_token)
        chunks = [train_only[c] for c in plan_chunks(train.lengths[train_only], self.bytes_per_token, chunk_budget)]
        ranks, me = distributed.world_size(), distributed.rank()
        self._log_chunks(chunks, train, len(queries), ranks)
        total = len(train.lengths)
        kept = _ChunkScores(np.zeros((total, len(queries))) if checkpoint is None else checkpoint.scores,
                            np.zeros(total) if checkpoint is None else checkpoint.train_self, checkpoint)
        done = set() if checkpoint is None else set(checkpoint.done)
        done = distributed.broadcast(done)
        resolved, query_self = None, None
        if train.queries:  # train sequences that are queries: from the queries' token factors
            rows = np.array(sorted(train.queries), dtype=np.int64)
            result = self._engine(query_side, engine.Side(query_store, [train.queries[i] for i in rows]), workspace,
                                  per_token, refined)
            kept.scores[rows] = result.pairwise.numpy().T
            if result.train_self is not None:
                kept.train_self[rows] = result.train_self.numpy()
            kept.tokens.update(_per_token_pairs(result.per_token, rows) or {})
            resolved, query_self = result.damping, result.query_self
        todo = [c for c in range(len(chunks)) if c not in done]
        last = self._score_rounds(train, chunks, todo, chunk_budget, query_side, per_token, refined, kept)
        if last is not None:
            resolved, query_self = last
        if resolved is None:  # every chunk was done before the restart: the queries' own pass gives the rest
            result = self._engine(query_side, engine.Side(query_store, []), workspace, False, refined)
            resolved, query_self = result.damping, result.query_self
        if me != 0:
            return None
        return ScoredSet(torch.from_numpy(np.asarray(kept.scores).T.copy()), query_self,
                         None if query_self is None else torch.from_numpy(np.asarray(kept.train_self).copy()),
                         query_losses, kept.tokens if per_token else None, resolved)

    def _score_rounds(self, train: TrainSequences, chunks: list[np.ndarray], todo: list[int], budget: int,
                      query_side: engine.Side, per_token: bool, refined: tuple | None, kept: _ChunkScores
                      ) -> tuple[dict, torch.Tensor | None] | None:
        """The chunks ``todo``, one per rank per round (``todo[k]`` on rank k mod N); rank 0 keeps each round's
        gathered scores in ``kept``. A chunk that fails fails the run on every rank (else the others would wait
        forever). Returns the damping and query self-influences of this rank's last chunk (None: it had none)."""
        ranks, me = distributed.world_size(), distributed.rank()
        last = None
        with tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc="train chunks", unit="chunk",
                  disable=self.quiet) as bar:
            for round_start in range(0, len(todo), ranks):
                mine = todo[round_start + me] if round_start + me < len(todo) else None
                outcome = None
                if mine is not None:
                    try:
                        result = self._score_chunk(train, chunks, mine, budget, query_side, per_token, refined)
                        outcome = (mine, result.pairwise.numpy(), None if result.train_self is None
                                   else result.train_self.numpy(), _per_token_pairs(result.per_token, chunks[mine]))
                        last = result.damping, result.query_self
                    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                        if ranks == 1:
                            raise
                        outcome = ("failed", f"rank {me}, chunk {mine + 1}: {type(exc).__name__}: {exc}")
                gathered_outcomes = distributed.gather(outcome)
                if failures := [g[1] for g in gathered_outcomes if g is not None and g[0] == "failed"]:
                    raise RunError(f"scoring a chunk failed on {failures[0]}")
                if me == 0:
                    for gathered in gathered_outcomes:
                        if gathered is not None:
                            chunk, *values = gathered
                            kept.keep(chunk, chunks[chunk], *values)
                bar.update(min(ranks, len(todo) - round_start))
        return last

    def _score_chunk(self, train: TrainSequences, chunks: list[np.ndarray], chunk: int, budget: int,
                     query_side: engine.Side, per_token: bool, refined: tuple | None) -> engine.Scores:
        """One chunk: its sequences captured into a store of their own, scored against the queries, dropped."""
        sequences = train.take(chunks[chunk])
        what = f"chunk {chunk + 1}/{len(chunks)}"
        store, workspace = self._store(sequences, budget, what)
        self._capture(sequences, store, 0, what)
        return self._engine(query_side, engine.Side(store, range(len(sequences))), workspace, per_token, refined)

    def _log_chunks(self, chunks: list[np.ndarray], train: TrainSequences, queries: int, ranks: int) -> None:
        sizes_ = [len(c) for c in chunks]
        biggest = max((int(train.lengths[c].sum()) for c in chunks), default=0) * self.bytes_per_token
        factor_reads = sum(sizes.preconditioner_bytes(s, self.factors.strategy)[0] for s in self.shapes)
        logger.info(
            "Chunks: %d train sequences in %d chunks of %d-%d sequences (token factors up to %s each, budget %s); "
            "per chunk: up to %s of token factors moved %s, every module's factors read (%s), the %d queries "
            "whitened again; %s", len(train.lengths), len(chunks), min(sizes_, default=0), max(sizes_, default=0),
            human_bytes(biggest), human_bytes(self.host_budget), human_bytes(biggest),
            "off and onto the device" if self.device.type == "cuda" else "(read in place on the CPU)",
            human_bytes(factor_reads), queries,
            f"{ranks} ranks split the chunks (chunk c on rank c mod {ranks}), rank 0 gathers the scores"
            if ranks > 1 else "one rank")


@dataclass
class _ChunkScores:
    """What rank 0 keeps of a chunked run: ``scores`` (train, queries) and ``train_self`` (train,) float64, the
    ``checkpoint``'s memory-mapped files when there is one (resumable), and per-token scores by (query, train)."""

    scores: np.ndarray
    train_self: np.ndarray
    checkpoint: object | None = None  # if_query.checkpoint.Checkpoint
    tokens: dict = field(default_factory=dict)

    def keep(self, chunk: int, rows: np.ndarray, scores: np.ndarray, train_self: np.ndarray | None,
             tokens: dict | None) -> None:
        """One chunk's (queries, rows) ``scores``, (rows,) ``train_self`` and per-token scores."""
        if self.checkpoint is not None:
            self.checkpoint.record(chunk, rows, scores, train_self)
        else:
            self.scores[rows] = scores.T
            if train_self is not None:
                self.train_self[rows] = train_self
        self.tokens.update(tokens or {})


def _per_token_pairs(per_token: list[list[torch.Tensor]] | None, train_rows) -> dict | None:
    """An engine's per-token scores [query][j] as {(query, train row): scores}."""
    if per_token is None:
        return None
    rows = [int(r) for r in train_rows]
    return {(q, rows[j]): values for q, row in enumerate(per_token) for j, values in enumerate(row)}


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

    def score(self, queries: Sequence[TokenizedExample], train: TrainSequences, checkpoint=None,
              per_token: bool | None = None) -> ScoredSet | None:
        """None on non-main ranks of a torchrun launch (``checkpoint`` and ``per_token`` are the engine's)."""
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
            per_token=_per_token_pairs(pairwise.per_token, range(len(train))),
            damping=None,
        )
