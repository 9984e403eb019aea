"""The decisions of a run-query run, made once before any scoring and followed by every rank.

Under torchrun rank 0 makes the plan (the only free-memory reads of a run are :func:`resolve_budgets`'s, on rank 0)
and broadcasts it; no rank decides anything another rank must agree with. ``if-query plan`` makes the same objects
from stated sizes (:func:`plan_job`), so what it prints is what a run does.

For each job (a folder, or every folder's queries against a corpus):
- **at once**: the queries' and train-only sequences' token factors fit the host budget together: one store;
- **in chunks**: the queries' store (in RAM, or spilled when they alone exceed the budget), then the train-only
  rows not yet done in consecutive chunks that each fit what the queries leave of the budget;
- **which ranks**: a job with at least two chunks to do is split across the ranks (chunk k on rank k mod N, rank
  0 gathers and writes); any other job is scored, in blocks or spilled, by one rank alone, jobs shared out in
  turn. Its workspace (whitened gradients at once) is set here too.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from if_query.plan import memory, sizes
from if_query.plan.estimates import Context, ScorePlan
from if_query.plan.sizes import human_bytes

HOST_SHARE = 0.5  # default --host-memory-gb: this fraction of the available RAM, divided among the host's ranks
PAGE_LOCK_SHARE = 0.25  # stores in RAM page-locked (unswappable) up to this fraction of it, divided among the ranks
DEVICE_WORKSPACE_SHARE = 0.5  # default --workspace-gb on CUDA: this fraction of the free device memory
HOST_WORKSPACE_SHARE = 0.25  # ... on CPU: this fraction of the available RAM after the token factors
MIN_WORKSPACE_BYTES = 64 * 10**6


@dataclass(frozen=True)
class Budgets:
    """Memory a rank may use, resolved once: ``host`` bytes of token factors in RAM; the workspace (``workspace``
    when given, else each job's default from the free memory read once)."""

    host: int
    host_from: str  # how ``host`` was set, for the log
    workspace: int | None
    free_host: int  # MemAvailable when the plan was made (rank 0)
    free_device: int | None  # free device memory then (CUDA; cached blocks counted as free)
    local_ranks: int = 1  # ranks sharing this host's RAM

    @property
    def page_lock_limit(self) -> int:
        """Bytes of token-factor stores in RAM a rank may page-lock at once (the device copies straight from and
        into them; past it a store goes through the bounce slots and the landing buffer): ``PAGE_LOCK_SHARE`` of
        the free RAM, divided among the host's ranks."""
        return int(self.free_host * PAGE_LOCK_SHARE) // self.local_ranks

    def workspace_for(self, reserved: int) -> int:
        """The workspace of a job that keeps ``reserved`` bytes of token factors in RAM."""
        if self.workspace is not None:
            return self.workspace
        if self.free_device is not None:
            return max(MIN_WORKSPACE_BYTES, int(self.free_device * DEVICE_WORKSPACE_SHARE))
        return max(MIN_WORKSPACE_BYTES, int((self.free_host - reserved) * HOST_WORKSPACE_SHARE) // self.local_ranks)


def default_host_budget(free_host: int, local_ranks: int) -> int:
    """The default --host-memory-gb: half the available RAM, divided among the host's ranks."""
    return int(free_host * HOST_SHARE) // local_ranks


def resolve_budgets(host: int | None, workspace: int | None, device: torch.device, local_ranks: int) -> Budgets:
    """The budgets of a run (``host``/``workspace``: the options in bytes, None for the defaults), reading the
    free memory once: call it on one rank and broadcast the result."""
    free_host = memory.host_memory_available()
    free_device = memory.device_memory_free(device) if device.type == "cuda" else None
    if host is None:
        source = (f"half the free RAM ({human_bytes(free_host)})"
                  + (f" divided among {local_ranks} ranks" if local_ranks > 1 else ""))
        host = default_host_budget(free_host, local_ranks)
    else:
        source = "--host-memory-gb"
    return Budgets(host, source, workspace, free_host, free_device, local_ranks)


@dataclass(frozen=True)
class Chunk:
    rows: np.ndarray  # (sequences,) int64 train rows, consecutive among those to do
    rank: int  # the rank that scores it


@dataclass(frozen=True)
class Moved:
    """Bytes a job moves across the bus, every engine call of it together and every rank that takes part summed
    (the token factors captured off the device; onto it, each call's token factors and, unless resident, every
    module's factors; with --refine-steps what refinement moves), as the run counts them (``run.json``: ``moved``,
    planned, and ``moved_counted``, every rank's count summed)."""

    to_device: int = 0
    factors_to_device: int = 0
    from_device: int = 0
    engine_calls: int = 0
    direct_to_device: int = 0  # of to_device: straight from page-locked stores (the rest through the bounce slots)
    direct_from_device: int = 0  # of from_device: straight into page-locked stores (the rest through the landing)
    refine_to_device: int = 0  # of to_device: what --refine-steps moves (sizes.refine_moved)
    refine_from_device: int = 0  # of from_device: the same

    def describe(self) -> dict:
        return {"to_device_bytes": self.to_device, "factor_bytes_to_device": self.factors_to_device,
                "from_device_bytes": self.from_device, "engine_calls": self.engine_calls,
                "direct_to_device_bytes": self.direct_to_device, "direct_from_device_bytes": self.direct_from_device,
                "refine_bytes_to_device": self.refine_to_device, "refine_bytes_from_device": self.refine_from_device}

    def with_refinement(self, context: Context, store: ScorePlan, queries: int, ranks: int, resident: bool) -> Moved:
        """These bytes and those of refining the ``queries`` of ``store`` on each of ``ranks`` ranks (their engine
        calls: this job's): the factors with it unless kept on the device (then copied, once per rank, by
        refinement as they would have been by the engine's first call)."""
        if not context.refine or store.bytes_from_device == 0:  # without it, or on the CPU: nothing moves
            return self
        factors = 0 if resident else store.factor_bytes
        onto, off = sizes.refine_moved(context.shapes, queries, store.token_factor_bytes, factors, ranks,
                                       self.engine_calls)
        return replace(self, to_device=self.to_device + onto, from_device=self.from_device + off,
                       direct_to_device=self.direct_to_device + (ranks * store.token_factor_bytes
                                                                 if store.registered else 0),
                       refine_to_device=onto, refine_from_device=off)


@dataclass(frozen=True)
class Pinned:
    """The pinned host buffers of a run, sized once from every job's plan (the largest): two bounce slots and the
    landing buffer of one batch."""

    bounce: int = 0
    landing: int = 0

    @property
    def total(self) -> int:
        return 2 * self.bounce + self.landing


@dataclass(frozen=True)
class JobPlan:
    """One job's decisions (see the module docstring)."""

    name: str
    train_rows: int
    done_rows: int  # resumed from partial results
    store: ScorePlan | None  # at once: every sequence; in chunks: the queries' (None: Kronfluence's scorer)
    at_once: bool = True
    chunks: tuple[Chunk, ...] = ()
    chunk_budget: int = 0
    largest_chunk: ScorePlan | None = None  # None: no chunk (at once, or every train row is a query or done)
    split: bool = False  # chunks shared among the ranks
    rank: int = 0  # the rank that scores it alone, or (split) gathers and writes it
    world: int = 1
    moved: Moved = Moved()
    pinned: Pinned = Pinned()  # the run's (plan_run sets it: every job's the same)
    keep_factors: bool = False  # the run's: prepared factors stay on each rank's device from job to job (plan_run)
    factors_here: bool = False  # the rank that writes it holds them from an earlier job: ``moved`` has no factors
    run_id: str = ""  # the run plan it belongs to: factors are kept across jobs of one plan only
    refines: bool = False  # --refine-steps: every rank that captures the queries refines them
    page_lock_limit: int = 0  # stores in RAM page-locked up to these bytes together (Budgets.page_lock_limit)

    @property
    def resident(self) -> bool:
        """Whether every module's prepared factors stay on the device across the job's engine calls."""
        plans = [p for p in (self.store, self.largest_chunk) if p is not None]
        return bool(plans) and all(p.resident for p in plans)

    def with_rank(self, rank: int) -> JobPlan:
        """This job given to ``rank`` (a split job's chunks keep their ranks)."""
        chunks = self.chunks if self.split else tuple(replace(c, rank=rank) for c in self.chunks)
        return replace(self, rank=rank, chunks=chunks)

    def scored_by(self, rank: int) -> bool:
        """Whether ``rank`` takes part in scoring this job."""
        return self.split or self.rank == rank

    def ranks(self) -> str:
        """Which ranks score it, in words."""
        if self.split:
            return (f"{self.world} ranks split the chunks (chunk k on rank k mod {self.world}), rank 0 gathers the "
                    "scores")
        return (f"rank {self.rank} alone (jobs that are not split are shared out among the {self.world} ranks in "
                "turn)" if self.world > 1 else "one rank")

    def line(self) -> str:
        """The plan line run-query logs before the job."""
        text = self.store.line()
        if not self.at_once:
            sizes = [len(c.rows) for c in self.chunks]
            biggest = 0 if self.largest_chunk is None else self.largest_chunk.token_factor_bytes
            text = (f"{text} (the queries); Chunks: {sum(sizes)} train sequences in {len(self.chunks)} chunks of "
                    f"{min(sizes, default=0)}-{max(sizes, default=0)} sequences (token factors up to "
                    f"{human_bytes(biggest)} each, budget {human_bytes(self.chunk_budget)}"
                    + (f"; {self.done_rows} train examples already scored" if self.done_rows else "") + ")")
        kept = ("; the factors are on the device already (kept from an earlier job)" if self.factors_here
                else "; the factors stay on the device for the later jobs" if self.keep_factors else "")
        return f"{text}; {self.ranks()}{kept}"

    def describe(self, budgets: Budgets) -> dict:
        """What run.json records of it (and of the ``budgets`` it was made with)."""
        sizes = [len(c.rows) for c in self.chunks]
        if self.store is None:
            return {"mode": "kronfluence", "world_size": self.world}
        return {
            "host_budget_bytes": budgets.host,
            "host_budget_from": budgets.host_from,
            "world_size": self.world,
            "mode": "at once" if self.at_once else "chunks",
            "token_factor_bytes": self.store.token_factor_bytes,
            "spilled": self.store.spilled,
            "workspace_bytes": self.store.workspace_budget,
            "workspace_blocks": None if self.store.at_once else self.store.block,
            "chunks": len(self.chunks),
            "chunk_sequences": [min(sizes), max(sizes)] if sizes else None,
            "chunk_budget_bytes": self.chunk_budget or None,
            "resumed_rows": self.done_rows,
            "ranks": self.ranks(),
            "factors_resident": self.resident,
            "factors_kept_across_jobs": self.keep_factors,
            "factors_already_on_device": self.factors_here,
            "moved": self.moved.describe(),
            "pinned_bytes": self.pinned.total,
            "page_lock_limit_bytes": self.page_lock_limit,
            "page_locked_bytes": sum(p.token_factor_bytes for p in (self.store, self.largest_chunk)
                                     if p is not None and p.registered),  # the most at once
        }


@dataclass(frozen=True)
class RunPlan:
    """Every job's plan, the budgets they were made with and the number of ranks (broadcast as one object)."""

    budgets: Budgets
    world: int
    jobs: tuple[JobPlan, ...]
    extra: dict = field(default_factory=dict)  # what the ranks check they agree on (e.g. the corpus's digest)
    pinned: Pinned = Pinned()  # the pinned host buffers, sized once for every job


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


def plan_job(name: str, context: Context, budgets: Budgets, query_lengths: Sequence[int], train_lengths: np.ndarray,
             train_queries: Sequence[int] = (), done: np.ndarray | None = None, world: int = 1) -> JobPlan:
    """The plan of one job: ``query_lengths`` of its distinct queries, ``train_lengths`` of its distinct train rows
    (``train_queries``: the rows that are queries, scored from their token factors), ``done``: (train,) bool rows
    already scored. The rank of a job not split is set by :func:`plan_run`."""
    per_token = context.bytes_per_token
    train_only = np.ones(len(train_lengths), dtype=bool)
    train_only[list(train_queries)] = False
    done = np.zeros(len(train_lengths), dtype=bool) if done is None else done
    query_tokens = int(sum(query_lengths))
    everything = (query_tokens + int(train_lengths[train_only].sum())) * per_token
    if not done.any() and everything <= budgets.host:
        lengths = [*query_lengths, *train_lengths[train_only].tolist()]
        store = context.store(lengths, budgets.workspace_for(everything), budgets.host)
        store.registered = _page_locked(store, budgets.page_lock_limit)
        direct = store.token_factor_bytes if store.registered else 0
        moved = Moved(store.bytes_to_device, store.factor_bytes_to_device, store.bytes_from_device, 1, direct, direct)
        return JobPlan(name, len(train_lengths), 0, store, world=world,
                       moved=moved.with_refinement(context, store, len(query_lengths), 1, store.resident),
                       page_lock_limit=budgets.page_lock_limit, refines=context.refine)
    query_bytes = query_tokens * per_token
    query_spilled = query_bytes > budgets.host
    chunk_budget = max(budgets.host - (0 if query_spilled else query_bytes), per_token)
    todo = np.flatnonzero(train_only & ~done)
    groups = [todo[g] for g in plan_chunks(train_lengths[todo], per_token, chunk_budget)]
    split = world > 1 and len(groups) >= 2
    workspace = budgets.workspace_for((0 if query_spilled else query_bytes) + chunk_budget)
    largest = None
    if groups:
        biggest = max(groups, key=lambda rows: int(train_lengths[rows].sum()))
        largest = context.store(train_lengths[biggest].tolist(), workspace, chunk_budget)
    chunks = tuple(Chunk(rows, k % world if split else 0) for k, rows in enumerate(groups))
    store = context.store(list(query_lengths), workspace, budgets.host)
    store.registered = _page_locked(store, budgets.page_lock_limit)
    if largest is not None:  # the largest chunk beside the queries' store: every chunk fits the rest of the limit
        largest.registered = _page_locked(largest, budgets.page_lock_limit - (store.token_factor_bytes
                                                                              if store.registered else 0))
    ranks = world if split else 1  # each captures (and refines) the queries
    moved = _chunked_moved(store, largest, groups, train_lengths, per_token, train_queries, done, ranks,
                           len(_loading_ranks(chunks, split, context.refine, world)))
    return JobPlan(name, len(train_lengths), int(done.sum()), store, False, chunks, chunk_budget, largest, split, 0,
                   world, moved.with_refinement(context, store, len(query_lengths), ranks,
                                                 store.resident and (largest is None or largest.resident)),
                   page_lock_limit=budgets.page_lock_limit, refines=context.refine)


def _loading_ranks(chunks: Sequence[Chunk], split: bool, refines: bool, world: int, rank: int = 0) -> set[int]:
    """The ranks that copy a job's factors to their device at least once: the rank that scores it; a split job's
    ranks with a chunk, and with --refine-steps every rank (each refines the queries)."""
    if not split:
        return {rank}
    return set(range(world)) if refines else {0} | {c.rank for c in chunks}


def _page_locked(store: ScorePlan, limit: int) -> bool:
    """Whether a store's memory is page-locked: in RAM, on a device (there are copies to save) and within
    ``limit``."""
    return not store.spilled and store.bytes_from_device > 0 and 0 < store.token_factor_bytes <= limit


def _chunked_moved(queries: ScorePlan, largest: ScorePlan | None, groups: list[np.ndarray], train_lengths: np.ndarray,
                   per_token: int, train_queries: Sequence[int], done: np.ndarray, ranks: int = 1,
                   loading: int = 1) -> Moved:
    """What a chunked job moves, its ``ranks`` together (a split job's each capture the queries): its queries'
    token factors off the device once per rank and onto it with every engine call (each chunk, the train rows that
    are queries, or the queries alone when nothing else is left), each chunk's token factors once each way, and the
    factors with every call (when resident, once on each of the ``loading`` ranks that copy them)."""
    if queries.bytes_from_device == 0:  # the CPU: nothing moves
        return Moved(engine_calls=len(groups))
    queries_call = bool(len(train_queries)) and not done[list(train_queries)].all()
    calls = len(groups) + int(queries_call) + int(not groups and not queries_call)
    chunk_bytes = sum(int(train_lengths[rows].sum()) for rows in groups) * per_token
    resident = queries.resident and (largest is None or largest.resident)
    factors = queries.factor_bytes * (loading if resident else calls)
    chunks_direct = chunk_bytes if largest is not None and largest.registered else 0
    queries_direct = queries.token_factor_bytes if queries.registered else 0
    return Moved(chunk_bytes + calls * queries.token_factor_bytes + factors, factors,
                 ranks * queries.bytes_from_device + chunk_bytes, calls, chunks_direct + calls * queries_direct,
                 chunks_direct + ranks * queries_direct)


def plan_run(budgets: Budgets, jobs: Sequence[JobPlan], world: int, extra: dict | None = None,
             keep_allowed: bool = True) -> RunPlan:
    """The run's plan: split jobs stay with rank 0 (which gathers), the others are shared out in turn.

    Where every job's factors fit kept beside the model (each job ``resident``, on a device) and ``keep_allowed``
    (not with --refine-steps, whose inverse puts its own copy of every module's factors on the device), they are kept
    from job to job (``keep_factors``): a rank copies them once, with its first job; a job whose writing rank scored
    an earlier one (in the order run-query scores them: split jobs first) moves no factors (``factors_here``)."""
    alone = 0
    planned = []
    stores = [p for job in jobs for p in (job.store, job.largest_chunk) if p is not None]
    pinned = Pinned(max((p.bounce_bytes for p in stores), default=0),  # a page-locked store needs no landing buffer
                    max((p.landing_bytes for p in stores if not p.registered), default=0))
    engine_jobs = [job for job in jobs if job.store is not None]
    keep = keep_allowed and bool(engine_jobs) and all(job.resident and job.moved.factors_to_device > 0
                                                       for job in engine_jobs)
    run_id = uuid.uuid4().hex
    for job in jobs:
        job = replace(job, pinned=pinned, keep_factors=keep and job.store is not None, run_id=run_id)
        if job.split:
            planned.append(job.with_rank(0))
        else:
            planned.append(job.with_rank(alone % world))
            alone += 1
    if keep:
        holding: set[int] = set()  # ranks whose device holds the factors
        for index in sorted(range(len(planned)), key=lambda k: not planned[k].split):
            job = planned[index]
            if job.store is None:
                continue
            loading = _loading_ranks(job.chunks, job.split, job.refines, job.world, job.rank)
            if loading & holding:  # those ranks copy no factors for this job
                factors = job.store.factor_bytes * len(loading - holding)
                moved = replace(job.moved, to_device=job.moved.to_device - job.moved.factors_to_device + factors,
                                factors_to_device=factors)
                planned[index] = replace(job, factors_here=loading <= holding, moved=moved)
            holding |= loading
    return RunPlan(budgets, world, tuple(planned), dict(extra or {}), pinned)
