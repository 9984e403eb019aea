"""``if-query plan``: the fit's and the run's plans for a model known only by its ``config.json`` (the fit's alone
when no folder, --sequences or --documents says what would be scored).

The model is built on the meta device (no weights are read, nothing is downloaded when the config is local, no GPU
is needed). Each job is planned by :func:`if_query.plan.run_plan.plan_job` and the jobs are shared out by
:func:`~if_query.plan.run_plan.plan_run`, the functions run-query itself plans with, from stated sizes (the GPUs' and
the host's memory) instead of measured free memory: the chunk count and the rank split printed are a run's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from if_query.config import GB, PlanConfig
from if_query.data.jobs import QueryJob
from if_query.data.records import load_examples
from if_query.data.tokenization import ExampleTokenizer, distinct
from if_query.model import loading
from if_query.model.adapter import find_adapter, meta_adapter
from if_query.model.loading import DTYPES, load_config, load_tokenizer, position_limit, resolve_matmul_precision
from if_query.model.tracking import describe_shared_inputs, find_tracked_modules, shared_inputs_by_name, track_kind
from if_query.plan import sizes
from if_query.plan.estimates import Context, FitPlan, Peak, plan_fit, plan_refine, stated_peaks
from if_query.plan.index_size import index_lines
from if_query.plan.run_plan import Budgets, JobPlan, RunPlan, default_host_budget, plan_job, plan_run
from if_query.plan.sizes import ModelShape, Shape, human_bytes, human_count

NOT_PLANNED = ("run-query: not planned; to plan it, give --sequences N (a folder), --documents N with --queries Q "
               "(a corpus) or query folders, of --tokens tokens")


@dataclass(frozen=True)
class Workload:
    """The distinct sequences of one job, as lengths: the queries, the train rows, the train rows that are queries."""

    name: str
    queries: list[int]
    train: list[int]
    train_queries: list[int]


def _folder_workloads(config: PlanConfig, limit: int | None) -> list[Workload]:
    """Each query folder's distinct sequences, tokenized as run-query would."""
    tokenizer = ExampleTokenizer(load_tokenizer(config.model, config.revision, config.base_model), config.max_length,
                                 position_limit=limit, chat_template=config.chat_template)
    workloads = []
    for folder in config.folders:
        job = QueryJob.from_folder(folder)
        queries, _ = distinct([tokenizer(e, str(job.query_json), every_turn=False)
                               for e in load_examples(job.query_json)])
        train, _ = distinct([tokenizer(e, str(job.train_json)) for e in load_examples(job.train_json)])
        position = set(queries)
        workloads.append(Workload(str(folder), [len(q) for q in queries], [len(t) for t in train],
                                  [j for j, t in enumerate(train) if t in position]))
    return workloads


def _stated_workloads(config: PlanConfig, tokens: int) -> list[Workload]:
    """The workloads --sequences (a folder whose train side is its queries) and --documents (--queries against a
    corpus) describe."""
    workloads = []
    if config.sequences:
        count = config.sequences
        workloads.append(Workload(f"a folder of {count} sequences of {tokens} tokens", [tokens] * count,
                                  [tokens] * count, list(range(count))))
    if config.documents:
        workloads.append(Workload(f"{config.queries} queries against a corpus of {config.documents} documents of "
                                  f"{tokens} tokens", [tokens] * config.queries, [tokens] * config.documents, []))
    return workloads


@dataclass
class Plans:
    """Everything ``if-query plan`` prints."""

    header: list[str]
    fit: FitPlan
    run: RunPlan
    names: list[str]
    gpus: int
    cuda: bool  # planned for GPUs: times at the stated peaks (a GPU's) and bytes moved to and from the device
    tokens: int  # per sequence: --tokens, at most the model's positions
    index: list[str] = field(default_factory=list)  # with --documents: if-query index's size and build time
    refine: Peak | None = None  # --refine-steps' device memory (None without it)

    @property
    def folders(self) -> list[tuple[str, JobPlan]]:
        return list(zip(self.names, self.run.jobs, strict=True))


def make_plans(config: PlanConfig) -> Plans:
    """The fit and run plans of a :class:`~if_query.config.PlanConfig`."""
    hf_config = load_config(config.model, config.revision, config.base_model)
    model = loading.meta_model(hf_config)
    shape = ModelShape.of(model, hf_config)
    adapter = find_adapter(config.model, config.base_model) if config.track == "lora" else None
    tracked = model if adapter is None else meta_adapter(model, adapter)  # the adapter's own matrices
    modules = shared_inputs_by_name(find_tracked_modules(tracked, config.layer_stride, config.track))
    shapes = [Shape.of(m) for m in modules]
    cuda = config.device == "cuda"
    dtype = DTYPES["bfloat16" if cuda else "float32"] if config.dtype == "auto" else DTYPES[config.dtype]
    dtype_bytes = dtype.itemsize
    precision = resolve_matmul_precision(config.matmul_precision, torch.device(config.device))
    peaks = stated_peaks(config.bf16_tflops, config.tf32_tflops, config.fp32_tflops, dtype_bytes)
    limit = position_limit(hf_config)
    tokens = min(config.tokens, limit) if limit else config.tokens
    device_limit = int(config.gpu_memory_gb * GB) if cuda else None
    gpus = config.gpus if cuda else 1
    host_ram = int(config.host_ram_gb * GB)
    host_per_rank = host_ram // gpus
    model_bytes = shape.parameters * dtype_bytes
    workloads = _folder_workloads(config, limit) if config.folders else _stated_workloads(config, tokens)
    header = [
        f"{type(model).__name__} ({hf_config.model_type}): {human_count(shape.parameters)} parameters, "
        f"{human_bytes(model_bytes)} in {str(dtype).removeprefix('torch.')}; {shape.layers} blocks, hidden "
        f"{shape.hidden}, MLP {shape.intermediate}, vocabulary {shape.vocab}",
        f"Tracked: {len(shapes)} {track_kind(config.track).what} of {len({m.layer for m in modules})} blocks "
        f"(--track {config.track}, --layer-stride {config.layer_stride}); token factors "
        f"{human_bytes(sizes.token_factor_bytes_per_token(shapes, dtype_bytes))} per token"
        + (f"; {shared}" if (shared := describe_shared_inputs(modules)) else ""),
        f"Per {'GPU' if cuda else 'process'}: {human_bytes(device_limit) + ' of device memory and ' if cuda else ''}"
        f"{human_bytes(host_per_rank)} of host RAM"
        + (f" (the host's {config.host_ram_gb:g} GB shared by {gpus} ranks)" if gpus > 1 else "")
        + (f"; times at {peaks.model / 1e12:g} TFLOP/s for the model, {peaks.engine(precision) / 1e12:g} for float32 "
           f"work ({precision}), a tenth of float32's for the eigendecompositions" if cuda
           else "; sizes and FLOPs only, no times (the stated peaks are a GPU's)"),
    ]
    fit = plan_fit(shapes, shape, config.strategy, dtype_bytes, config.factor_batch_size, config.lambda_batch_size,
                   config.module_partitions, [tokens] * config.fit_sequences, peaks, precision,
                   device_limit if cuda else host_per_rank, "device" if cuda else "RAM")  # CPU: checked against RAM
    host = config.host_memory_bytes
    budgets = Budgets(default_host_budget(host_ram, gpus) if host is None else host,
                      "--host-memory-gb" if host is not None else f"half of the host's {human_bytes(host_ram)}"
                      + (f" divided among {gpus} ranks" if gpus > 1 else ""),
                      config.workspace_bytes, free_host=host_per_rank - model_bytes,
                      free_device=device_limit - model_bytes if cuda else None)
    context = Context(shapes, shape, config.strategy, dtype_bytes, config.score_batch_size, config.per_token_scores,
                      config.device, peaks, precision, device_limit, host_per_rank, bool(config.refine_steps))
    jobs = [plan_job(w.name, context, budgets, w.queries, np.array(w.train, dtype=np.int64), w.train_queries,
                     world=gpus) for w in workloads]
    index = [] if not config.documents else index_lines(
        shapes, shape, config.documents, tokens, config.queries, config.sketch_dim, config.sketch, config.scaling_rank,
        config.row_dtype, peaks.model if cuda else None, peaks.engine(precision) if cuda else None, gpus)
    refine = plan_refine(shapes, shape, config.strategy, dtype_bytes, config.refine_batch_size * config.max_length,
                         device_limit if cuda else host_per_rank, "device" if cuda else "RAM") \
        if config.refine_steps else None
    return Plans(header, fit, plan_run(budgets, jobs, gpus, keep_allowed=not config.refine_steps),
                 [w.name for w in workloads], gpus, cuda=cuda,
                 tokens=tokens, index=index, refine=refine)


def _job_lines(name: str, job: JobPlan, cuda: bool) -> list[str]:
    store = job.store
    what = "the queries' token factors" if not job.at_once else "token factors"
    lines = ["", f"run-query, {name} ({store.sequences} distinct sequences{' of queries' if not job.at_once else ''}"
             f", {store.tokens} tokens):",
             f"  {what} {human_bytes(store.token_factor_bytes)}: "
             + (f"spilled to --spill-dir (over the host budget {human_bytes(store.host_budget)})" if store.spilled
                else f"in RAM (budget {human_bytes(store.host_budget)})"),
             f"  workspace {human_bytes(store.workspace_used)} used of {human_bytes(store.workspace_budget)}: "
             + ("every gradient of a module at once" if store.at_once
                else f"blocks of {store.block} gradients (exact; columns formed again per block)")]
    if job.largest_chunk is not None:
        sizes_ = [len(c.rows) for c in job.chunks]
        rounds = -(-len(job.chunks) // job.world) if job.split else len(job.chunks)
        lines.append(f"  train side: {sum(sizes_)} train-only sequences in {len(job.chunks):,} chunks of "
                     f"{min(sizes_)}-{max(sizes_)} (token factors up to "
                     f"{human_bytes(job.largest_chunk.token_factor_bytes)} each, budget "
                     f"{human_bytes(job.chunk_budget)}), {rounds:,} rounds")
    elif not job.at_once:
        lines.append("  train side: every train sequence is a query (no chunk)")
    lines.append(f"  ranks: {job.ranks()}")
    peaks = [*store.peaks(), *(job.largest_chunk.peaks() if job.largest_chunk else [])]
    lines += [f"  {peak.describe()}" for peak in peaks]
    moved = job.moved
    if cuda:
        factors = ("no factors: kept on the device from an earlier folder" if job.factors_here
                   else (f"factors {human_bytes(store.factor_bytes)} once, kept on the device"
                         + (" for the later folders too" if job.keep_factors else "")) if job.resident
                   else f"factors {human_bytes(moved.factors_to_device)} of it: "
                        f"{human_bytes(store.factor_bytes)} per engine call")
        lines.append(f"  moved in all: {human_bytes(moved.from_device)} off the device, {human_bytes(moved.to_device)} "
                     f"onto it ({factors}; {moved.engine_calls:,} engine call{'s' if moved.engine_calls != 1 else ''})"
                     f"; pinned host buffers {human_bytes(job.pinned.total)} (2 bounce slots of "
                     f"{human_bytes(job.pinned.bounce)}, landing {human_bytes(job.pinned.landing)})")
        if moved.refine_to_device or moved.refine_from_device:
            lines.append(f"  of which --refine-steps: {human_bytes(moved.refine_from_device)} off the device (each "
                         f"query's gradient and refined v), {human_bytes(moved.refine_to_device)} onto it (the "
                         "queries' token factors, "
                         + ("" if job.resident else "every module's factors, ")
                         + "each query's gradient, and its refined v with every engine call)"
                         + (f"; each of the {job.world} ranks refines the queries, summed" if job.split else ""))
    lines.append(f"  {store.work.describe(cuda)}" + ("" if job.at_once else " (the queries)"))
    return lines


def plan_text(config: PlanConfig) -> str:
    """``if-query plan``: the text it prints (see the module docstring and :class:`~if_query.config.PlanConfig`)."""
    plans = make_plans(config)
    fit = plans.fit
    lines = plans.header + [
        "", f"fit-hessians ({config.strategy}, {config.fit_sequences} sequences of {plans.tokens} tokens, "
        f"--module-partitions {config.module_partitions}):",
        f"  factors on disk {fit.factors.human()} (covariances {human_bytes(fit.factors.covariance_bytes)}, "
        f"eigenvectors {human_bytes(fit.factors.eigen_bytes)}, lambda {human_bytes(fit.factors.lambda_bytes)}); "
        f"largest module {fit.largest_module[0]}: {human_bytes(fit.largest_module[1])}"]
    lines += [f"  {peak.describe()}" for peak in fit.peaks()]
    split = f" ({fit.work.seconds / plans.gpus:,.0f} s on {plans.gpus} GPUs)" if plans.gpus > 1 else ""
    lines.append(f"  {fit.work.describe(plans.cuda)}{split}")
    failing = [(peak, "fit-hessians") for peak in fit.peaks() if not peak.fits]
    for name, job in plans.folders:
        lines += _job_lines(name, job, plans.cuda)
        peaks = [*job.store.peaks(), *(job.largest_chunk.peaks() if job.largest_chunk else [])]
        failing += [(peak, f"run-query ({name})") for peak in peaks if not peak.fits]
    lines += plans.index
    if plans.refine is not None:
        lines += ["", f"run-query --refine-steps {config.refine_steps} (--refine-batch-size "
                  f"{config.refine_batch_size}, --max-length {config.max_length}):", f"  {plans.refine.describe()}"]
        failing += [(plans.refine, "run-query --refine-steps")] if not plans.refine.fits else []
    if not plans.folders:
        lines += ["", NOT_PLANNED]
    lines.append("")
    if failing:
        lines += ["Does not fit:"] + [f"  {stage}, {peak.where}: {human_bytes(peak.total)} > "
                                      f"{human_bytes(peak.limit)}; {peak.advice}" for peak, stage in failing]
    else:
        lines.append("Everything fits." if plans.folders else "fit-hessians fits; run-query was not planned.")
    return "\n".join(lines) + "\n"
