"""Memory and time of fit-hessians and run-query, from the shapes: run-query's plan line and ``if-query plan``.

:func:`plan_scoring` is what run-query prints before each folder (and warns about when it will not fit);
:func:`plan_fit` what fit-hessians warns about; :func:`run_plan` is ``if-query plan``: both, for a model known
only by its ``config.json`` (built on the meta device: no weights are read, nothing is downloaded when the
config is local, no GPU is needed). Byte and FLOP counts are :mod:`if_query.sizes`'s; times are FLOPs at a
stated peak (estimates, not measurements).

Device memory, per rank:
- fit, covariance pass: model + one batch's activations + the covariances of one module partition;
  eigendecomposition (rank 0): the largest covariance in float64, its eigenvectors and LAPACK's workspace;
  lambda pass: model + one batch's activations + a partition's eigenvectors and lambdas + per-example
  gradients formed at once (the lambda stage's 1 GB chunk).
- run-query, capture: model + one batch's activations + its output gradients (kept until the batch ends);
  scoring, the worst module: model + its factors while prepared + its token factors on the device + the
  whitened gradients of the workspace actually used (+ kept rotations, + per-token scratch).
Host memory, per rank: the folder's token factors (RAM up to the host budget, else a spill file) and the
pinned staging buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from if_query import sizes
from if_query.config import H100_BF16_TFLOPS, H100_FP32_TFLOPS, H100_TF32_TFLOPS
from if_query.per_example import rotation_flops
from if_query.sizes import GB, ModelShape, Shape, human_bytes, human_flops
from if_query.transfer import STAGING_BYTES

LAMBDA_CHUNK_BYTES = 1 << 30  # per-example gradients the lambda stage forms at once (lambda_stage.CHUNK_BYTES)
EIGH_COPIES = 3  # a float64 covariance, its eigenvectors, LAPACK's workspace
EIGH_EFFICIENCY = 0.1  # eigendecompositions run far below the float32 peak: timed at a tenth of it


@dataclass
class Part:
    """One named amount of memory."""

    name: str
    bytes: int


@dataclass
class Peak:
    """The parts that are held at once somewhere (a device or the host) at the busiest moment of a stage."""

    where: str
    parts: list[Part]
    limit: int | None = None  # the memory there (None: not checked)
    advice: str = ""  # what to change when it does not fit

    @property
    def total(self) -> int:
        return sum(part.bytes for part in self.parts)

    @property
    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def describe(self) -> str:
        parts = " + ".join(f"{p.name} {human_bytes(p.bytes)}" for p in self.parts if p.bytes)
        verdict = "" if self.limit is None else (
            f" of {human_bytes(self.limit)}: fits" if self.fits
            else f" of {human_bytes(self.limit)}: DOES NOT FIT; {self.advice}")
        return f"{self.where}: {human_bytes(self.total)} = {parts}{verdict}"


@dataclass
class Work:
    """FLOPs of a stage, each at its own peak."""

    name: str
    flops: dict[str, tuple[float, float]] = field(default_factory=dict)  # what -> (FLOPs, peak FLOP/s)

    @property
    def seconds(self) -> float:
        return sum(count / peak for count, peak in self.flops.values())

    def describe(self) -> str:
        items = ", ".join(f"{what} {human_flops(count)}" for what, (count, _) in self.flops.items())
        return f"{self.name}: {items}; {self.seconds:,.0f} s at the stated peaks"


@dataclass(frozen=True)
class Peaks:
    """FLOP/s the times are computed at (datasheet, dense): the model's dtype, float32 work, and TF32."""

    model: float
    float32: float
    tf32: float

    def engine(self, matmul_precision: str) -> float:
        return self.tf32 if matmul_precision == "tf32" else self.float32


def stated_peaks(bf16_tflops: float, tf32_tflops: float, fp32_tflops: float, dtype_bytes: int) -> Peaks:
    """Peaks from TFLOP/s figures: the model's passes at the bfloat16 one (float32 models: the float32 one)."""
    return Peaks((bf16_tflops if dtype_bytes == 2 else fp32_tflops) * 1e12, fp32_tflops * 1e12, tf32_tflops * 1e12)


DEFAULT_PEAKS = stated_peaks(H100_BF16_TFLOPS, H100_TF32_TFLOPS, H100_FP32_TFLOPS, 2)


def _eigen(strategy: str) -> bool:
    return strategy in ("kfac", "ekfac")


def _partitions(shapes: Sequence[Shape], partitions: int) -> list[list[Shape]]:
    """Kronfluence's module partitions: contiguous groups of about equal count."""
    size = -(-len(shapes) // partitions)
    return [list(shapes[i : i + size]) for i in range(0, len(shapes), size)]


# --- run-query ---


@dataclass
class ScorePlan:
    """Memory and work of scoring one set of distinct sequences (a folder)."""

    sequences: int
    tokens: int
    token_factor_bytes: int
    host_budget: int
    spilled: bool
    workspace_budget: int
    workspace_used: int
    at_once: bool
    block: int
    bytes_to_device: int
    bytes_from_device: int
    capture: Peak
    scoring: Peak
    host: Peak
    work: Work

    def line(self) -> str:
        """The one plan line run-query logs before a folder."""
        where = "spilled to a memory-mapped file" if self.spilled else "in RAM"
        layout = ("every gradient of a module at once" if self.at_once
                  else f"blocks of {self.block} gradients, columns formed again per block")
        return (f"Plan: {self.sequences} sequences, {self.tokens} tokens; token factors "
                f"{human_bytes(self.token_factor_bytes)} {where} (budget {human_bytes(self.host_budget)}); "
                f"workspace {human_bytes(self.workspace_used)} of {human_bytes(self.workspace_budget)} ({layout}); "
                f"device peak {human_bytes(max(self.capture.total, self.scoring.total))}; moved "
                f"{human_bytes(self.bytes_from_device)} off the device, {human_bytes(self.bytes_to_device)} onto it")

    def peaks(self) -> list[Peak]:
        return [self.capture, self.scoring, self.host]


def plan_scoring(shapes: Sequence[Shape], model: ModelShape, lengths: Sequence[int], strategy: str,
                 dtype_bytes: int, batch_size: int, workspace_budget: int, host_budget: int, per_token: bool,
                 device_type: str, peaks: Peaks, matmul_precision: str, device_limit: int | None = None,
                 host_limit: int | None = None, labelled: Sequence[int] | None = None) -> ScorePlan:
    """The plan of scoring sequences of ``lengths`` (distinct; ``labelled`` tokens of each, default all)."""
    tokens, longest, count = sum(lengths), max(lengths), len(lengths)
    token_factors = tokens * sizes.token_factor_bytes_per_token(shapes, dtype_bytes)
    spilled = token_factors > host_budget
    on_device = device_type != "cpu"
    model_bytes = model.parameters * dtype_bytes
    batch_tokens = sum(sorted(lengths)[-batch_size:])  # the batch of the longest sequences
    batch_labelled = batch_tokens if labelled is None else sum(sorted(labelled)[-batch_size:])
    output_grads = batch_tokens * dtype_bytes * sum(s.out for s in shapes)
    capture = Peak("device, capturing" if on_device else "RAM, capturing (besides the token factors)", [
        Part("model", model_bytes),
        Part(f"activations of a batch of {batch_tokens} tokens", sizes.activation_bytes(model, batch_tokens,
                                                                                        dtype_bytes, batch_labelled)),
        Part("its output gradients", output_grads)], device_limit if on_device else None,
        "a smaller --score-batch-size")
    worst, worst_total, at_once, block, used = None, -1, True, count, 0
    for shape in shapes:
        scratch = workspace_budget // 4 if per_token else 0
        width_bytes = sizes.whitened_bytes(shape)
        capacity = max(2, (workspace_budget - scratch) // width_bytes)
        module_at_once = capacity >= count
        module_used = (count if module_at_once else 2 * (capacity // 2)) * width_bytes
        parts = [Part("model", model_bytes),
                 Part(f"factors of {shape.name.rsplit('.', 1)[-1]}",
                      sizes.preconditioner_bytes(shape, strategy)[1]),
                 Part("its token factors", sizes.slab_bytes(shape, tokens, dtype_bytes) if on_device else 0),
                 Part("whitened gradients", module_used)]
        if per_token:
            one = sizes.per_token_scratch_bytes(shape, longest)
            parts.append(Part("per-token scratch", min(count, max(1, scratch // one)) * one))
        total = sum(p.bytes for p in parts)
        if total > worst_total:
            worst, worst_total = parts, total
        at_once = at_once and module_at_once
        block = min(block, count if module_at_once else capacity // 2)
        used = max(used, module_used)
    scoring = Peak("device, scoring" if on_device else "RAM, scoring (besides the token factors)", worst,
                   device_limit if on_device else None, "a smaller --workspace-gb (exact, in blocks)")
    host = Peak("host" if on_device else "RAM", [
        Part("token factors" if not spilled else "token factors (spill file: page cache)", 0 if spilled
             else token_factors),
        Part("pinned staging", 2 * STAGING_BYTES + batch_tokens * sizes.token_factor_bytes_per_token(
            shapes, dtype_bytes) if on_device else 0)] + ([] if on_device else [
                Part("capture or scoring", max(capture.total, scoring.total))]), host_limit,
        "a smaller --host-memory-gb (the rest is spilled to --spill-dir)")
    work = Work("run-query FLOPs", {
        "forward and backward": (sizes.forward_backward_flops(model, lengths), peaks.model),
        "rotations and whitened gradients": (sum(rotation_flops(t, s.out, s.width) if _eigen(strategy)
                                                 else 2 * t * s.out * s.width for t in lengths for s in shapes),
                                             peaks.engine(matmul_precision)),
        "Gram": (sum(2 * count * count * s.out * s.width for s in shapes) * (1 if at_once else 2),
                 peaks.engine(matmul_precision)),
    })
    return ScorePlan(count, tokens, token_factors, host_budget, spilled, workspace_budget, used, at_once, block,
                     token_factors if on_device else 0, token_factors if on_device else 0, capture, scoring, host,
                     work)


# --- fit-hessians ---


@dataclass
class FitPlan:
    factors: sizes.FactorSizes
    largest_module: tuple[str, int]
    covariance: Peak
    eigendecomposition: Peak
    lambdas: Peak
    work: Work

    def peaks(self) -> list[Peak]:
        return [self.covariance, self.eigendecomposition, self.lambdas]


def plan_fit(shapes: Sequence[Shape], model: ModelShape, strategy: str, dtype_bytes: int, factor_batch_size: int,
             lambda_batch_size: int, partitions: int, fit_lengths: Sequence[int], peaks: Peaks,
             matmul_precision: str, device_limit: int | None = None) -> FitPlan:
    factors = sizes.estimate_factor_sizes(shapes, strategy)
    per_module = {s.name: sizes.module_factor_sizes(s, strategy).total_bytes for s in shapes}
    largest = max(per_module.items(), key=lambda item: item[1])
    model_bytes = model.parameters * dtype_bytes
    longest = sorted(fit_lengths)[::-1]
    groups = _partitions(shapes, partitions)

    def batch(size: int) -> list[Part]:
        tokens = sum(longest[:size])
        return [Part("model", model_bytes),
                Part(f"activations of a batch of {tokens} tokens", sizes.activation_bytes(model, tokens, dtype_bytes,
                                                                                          tokens))]

    advice = "more --module-partitions, or smaller batches"
    covariance = Peak("device, covariance pass", batch(factor_batch_size) + [Part(
        f"covariances of a partition ({len(groups)})",
        max(sum(sizes.module_factor_sizes(s, strategy).covariance_bytes for s in g) for g in groups))],
        device_limit, advice)
    biggest = max((max(s.width, s.out) for s in shapes), default=0) if _eigen(strategy) else 0
    eigen = Peak("device, eigendecomposition (rank 0)", [Part(
        f"largest covariance ({biggest}²) in float64 x{EIGH_COPIES}", EIGH_COPIES * biggest * biggest *
        sizes.BYTES_PER_DOUBLE)], device_limit, "--eigendecomposition-dtype float32")
    lambda_state = max(sum(sizes.module_factor_sizes(s, strategy).eigen_bytes + sizes.whitened_bytes(s) for s in g)
                       for g in groups)
    lambdas = Peak("device, lambda pass", batch(lambda_batch_size) + [
        Part("eigenvectors and lambdas of a partition", lambda_state if strategy in ("ekfac", "diagonal") else 0),
        Part("per-example gradients", LAMBDA_CHUNK_BYTES if strategy in ("ekfac", "diagonal") else 0)],
        device_limit, advice)
    passes = sizes.forward_backward_flops(model, fit_lengths)
    engine_peak = peaks.engine(matmul_precision)
    flops = {"covariance pass": (passes * partitions, peaks.model),
             "covariances": (sum(2 * t * (s.width**2 + s.out**2) for t in fit_lengths for s in shapes), engine_peak)}
    if _eigen(strategy):
        flops["eigendecompositions (float64)"] = (sizes.eigendecomposition_flops(shapes),
                                                  peaks.float32 * EIGH_EFFICIENCY)
    if strategy in ("ekfac", "diagonal"):
        flops["lambda pass"] = (passes * partitions, peaks.model)
        flops["lambda"] = (sum(rotation_flops(t, s.out, s.width) if strategy == "ekfac"
                               else 2 * t * s.out * s.width for t in fit_lengths for s in shapes), engine_peak)
    return FitPlan(factors, largest, covariance, eigen, lambdas, Work("fit-hessians FLOPs", flops))


# --- if-query plan ---


def _folder_lengths(config, limit: int | None) -> list[tuple[str, list[int]]]:
    """(folder, lengths of its distinct sequences) of each query folder, tokenized as run-query would."""
    from if_query.modeling import load_tokenizer
    from if_query.query import QueryJob
    from if_query.records import load_examples
    from if_query.tokenization import ExampleTokenizer

    tokenizer = ExampleTokenizer(load_tokenizer(config.model, config.revision), config.max_length,
                                 position_limit=limit)
    folders = []
    for folder in config.folders:
        job = QueryJob.from_folder(folder)
        sequences = {tokenizer(e, str(path)) for path in (job.query_json, job.train_json) for e in load_examples(path)}
        folders.append((str(folder), [len(s) for s in sequences]))
    return folders


@dataclass
class Plans:
    """Everything ``if-query plan`` prints."""

    header: list[str]
    fit: FitPlan
    folders: list[tuple[str, ScorePlan]]
    gpus: int


def make_plans(config) -> Plans:
    """The fit and folder plans of a :class:`~if_query.config.PlanConfig`."""
    import torch

    from if_query.errors import InputError
    from if_query.modeling import (
        DTYPES,
        find_mlp_modules,
        load_config,
        meta_model,
        position_limit,
        resolve_matmul_precision,
        shared_inputs_by_name,
    )

    hf_config = load_config(config.model, config.revision)
    model = meta_model(hf_config)
    shape = ModelShape.of(model, hf_config)
    modules = shared_inputs_by_name(find_mlp_modules(model, config.layer_stride))
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
    host_per_rank = int(config.host_ram_gb * GB) // gpus
    model_bytes = shape.parameters * dtype_bytes
    if config.folders:
        folders = _folder_lengths(config, limit)
    elif config.sequences:
        folders = [(f"a folder of {config.sequences} sequences of {tokens} tokens", [tokens] * config.sequences)]
    else:
        raise InputError("give query folders, or --sequences (and --tokens) for the folders to plan")
    header = [
        f"{type(model).__name__} ({hf_config.model_type}): {shape.parameters / 1e9:.2f} B parameters, "
        f"{human_bytes(model_bytes)} in {str(dtype).removeprefix('torch.')}; {shape.layers} blocks, hidden "
        f"{shape.hidden}, MLP {shape.intermediate}, vocabulary {shape.vocab}",
        f"Tracked: {len(shapes)} MLP projections of {len({m.layer for m in modules})} blocks (--layer-stride "
        f"{config.layer_stride}); token factors {human_bytes(sizes.token_factor_bytes_per_token(shapes, dtype_bytes))}"
        f" per token" + ("; up_proj shares gate_proj's input" if any(s.shares_input for s in shapes) else ""),
        f"Per {'GPU' if cuda else 'process'}: {human_bytes(device_limit) + ' of device memory and ' if cuda else ''}"
        f"{human_bytes(host_per_rank)} of host RAM"
        + (f" (the host's {config.host_ram_gb:g} GB shared by {gpus} ranks)" if gpus > 1 else "") + "; times at "
        f"{peaks.model / 1e12:g} TFLOP/s for the model, {peaks.engine(precision) / 1e12:g} for float32 work "
        f"({precision}), a tenth of float32's for the eigendecompositions",
    ]
    fit = plan_fit(shapes, shape, config.strategy, dtype_bytes, config.factor_batch_size, config.lambda_batch_size,
                   config.module_partitions, [tokens] * config.fit_sequences, peaks, precision, device_limit)
    planned = []
    for name, lengths in folders:
        host_budget = (int(config.host_memory_gb * GB) if config.host_memory_gb is not None
                       else host_per_rank // 2)
        token_factors = sum(lengths) * sizes.token_factor_bytes_per_token(shapes, dtype_bytes)
        workspace = (int(config.workspace_gb * GB) if config.workspace_gb is not None
                     else (device_limit - model_bytes) // 2 if cuda
                     else max(0, host_per_rank - model_bytes - min(token_factors, host_budget)) // 4)
        planned.append((name, plan_scoring(shapes, shape, lengths, config.strategy, dtype_bytes,
                                           config.score_batch_size, workspace, host_budget, config.per_token_scores,
                                           config.device, peaks, precision, device_limit, host_per_rank)))
    return Plans(header, fit, planned, gpus)


def run_plan(config) -> str:
    """``if-query plan``: the text it prints (see the module docstring and :class:`~if_query.config.PlanConfig`)."""
    plans = make_plans(config)
    fit = plans.fit
    lines = plans.header + [
        "", f"fit-hessians ({config.strategy}, {config.fit_sequences} sequences of {config.tokens} tokens, "
        f"--module-partitions {config.module_partitions}):",
        f"  factors on disk {fit.factors.human()} (covariances {human_bytes(fit.factors.covariance_bytes)}, "
        f"eigenvectors {human_bytes(fit.factors.eigen_bytes)}, lambda {human_bytes(fit.factors.lambda_bytes)}); "
        f"largest module {fit.largest_module[0]}: {human_bytes(fit.largest_module[1])}"]
    lines += [f"  {peak.describe()}" for peak in fit.peaks()]
    lines.append(f"  {fit.work.describe()}" + (f" ({fit.work.seconds / plans.gpus:,.0f} s on {plans.gpus} GPUs)"
                                                if plans.gpus > 1 else ""))
    failing = [(peak, "fit-hessians") for peak in fit.peaks() if not peak.fits]
    for name, plan in plans.folders:
        lines += ["", f"run-query, {name} ({plan.sequences} distinct sequences, {plan.tokens} tokens):",
                  f"  token factors {human_bytes(plan.token_factor_bytes)}: "
                  + (f"spilled to --spill-dir (over the host budget {human_bytes(plan.host_budget)})" if plan.spilled
                     else f"in RAM (budget {human_bytes(plan.host_budget)})"),
                  f"  workspace {human_bytes(plan.workspace_used)} used of {human_bytes(plan.workspace_budget)}: "
                  + ("every gradient of a module at once" if plan.at_once
                     else f"blocks of {plan.block} gradients (exact; columns formed again per block)")]
        lines += [f"  {peak.describe()}" for peak in plan.peaks()]
        lines.append(f"  moved per folder: {human_bytes(plan.bytes_from_device)} off the device, "
                     f"{human_bytes(plan.bytes_to_device)} onto it")
        lines.append(f"  {plan.work.describe()}")
        failing += [(peak, f"run-query ({name})") for peak in plan.peaks() if not peak.fits]
    lines.append("")
    if failing:
        lines += ["Does not fit:"] + [f"  {stage}, {peak.where}: {human_bytes(peak.total)} > "
                                      f"{human_bytes(peak.limit)}; {peak.advice}" for peak, stage in failing]
    else:
        lines.append("Everything fits.")
    return "\n".join(lines) + "\n"
