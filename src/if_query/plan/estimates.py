"""Memory and time of fit-hessians and run-query, from the shapes: the size model behind run-query's plan line,
fit-hessians' warnings and ``if-query plan`` (:mod:`if_query.plan.command`).

:func:`plan_scoring` sizes one store of token factors (what :mod:`if_query.plan.run_plan` decides with, and run-query
prints before each job); :func:`plan_fit` what fit-hessians warns about. Byte and FLOP counts are
:mod:`if_query.plan.sizes`'s; times are FLOPs at a stated peak (estimates, not measurements).

Device memory, per rank:
- fit, covariance pass: model + one batch's activations + the covariances of one module partition;
  eigendecomposition (rank 0): the largest covariance in float64, its eigenvectors and LAPACK's workspace;
  lambda pass: model + one batch's activations + a partition's eigenvectors and lambdas + per-example
  gradients formed at once (the lambda stage's 1 GB chunk).
- run-query, capture: model + one batch's activations + its output gradients (kept until the batch ends), + every
  module's prepared factors where they are kept on the device (the next chunk's or folder's capture runs beside them);
  scoring, the worst module: model + its factors while prepared + its token factors on the device + the
  whitened gradients of the workspace actually used (+ kept rotations, + per-token scratch).
Host memory, per rank: the folder's token factors (RAM up to the host budget, else a spill file) and the
pinned staging buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from if_query.config import H100_BF16_TFLOPS, H100_FP32_TFLOPS, H100_TF32_TFLOPS
from if_query.plan import sizes
from if_query.plan.sizes import ModelShape, Shape, human_bytes, human_flops

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

    def summary(self) -> str:
        """The total and its parts ("28.3 MB = model 689.2 KB + ...")."""
        parts = " + ".join(f"{p.name} {human_bytes(p.bytes)}" for p in self.parts if p.bytes)
        return f"{human_bytes(self.total)} = {parts}"

    def describe(self) -> str:
        verdict = "" if self.limit is None else (
            f" of {human_bytes(self.limit)}: fits" if self.fits
            else f" of {human_bytes(self.limit)}: DOES NOT FIT; {self.advice}")
        return f"{self.where}: {self.summary()}{verdict}"


@dataclass
class Work:
    """FLOPs of a stage, each at its own peak."""

    name: str
    flops: dict[str, tuple[float, float]] = field(default_factory=dict)  # what -> (FLOPs, peak FLOP/s)

    @property
    def seconds(self) -> float:
        return sum(count / peak for count, peak in self.flops.values())

    def describe(self, timed: bool = True) -> str:
        """The FLOPs of each part, and (``timed``) the seconds they take at the stated peaks."""
        items = ", ".join(f"{what} {human_flops(count)}" for what, (count, _) in self.flops.items())
        return f"{self.name}: {items}" + (f"; {self.seconds:,.0f} s at the stated peaks" if timed else "")


@dataclass(frozen=True)
class Peaks:
    """FLOP/s the times are computed at (datasheet, dense): the model's dtype, float32 work, and TF32."""

    model: float
    float32: float
    tf32: float

    def engine(self, matmul_precision: str) -> float:
        return self.tf32 if matmul_precision == "tf32" else self.float32


def _in_block(name: str) -> str:
    """A tracked module's name within its block, for the plan's lines: ``up_proj``, or a LoRA matrix's layer and
    matrix, ``up_proj.lora_B`` (peft's adapter name, ``.default``, dropped)."""
    parts = name.split(".")
    at = next((i for i, part in enumerate(parts) if part in ("lora_A", "lora_B")), None)
    return parts[-1] if at is None else ".".join(parts[at - 1 : at + 1])


def stated_peaks(bf16_tflops: float, tf32_tflops: float, fp32_tflops: float, dtype_bytes: int) -> Peaks:
    """Peaks from TFLOP/s figures: the model's passes at the bfloat16 one (float32 models: the float32 one)."""
    return Peaks((bf16_tflops if dtype_bytes == 2 else fp32_tflops) * 1e12, fp32_tflops * 1e12, tf32_tflops * 1e12)


DEFAULT_PEAKS = stated_peaks(H100_BF16_TFLOPS, H100_TF32_TFLOPS, H100_FP32_TFLOPS, 2)


def _eigen(strategy: str) -> bool:
    return strategy in ("kfac", "ekfac")


def module_groups(shapes: Sequence[Shape], partitions: int) -> list[list[Shape]]:
    """Kronfluence's module partitions (``make_modules_partition``): ``partitions`` contiguous groups whose sizes
    differ by one at most, the larger first (5 modules in 3: 2, 2, 1). More partitions than modules: one each."""
    partitions = max(1, min(partitions, len(shapes)))
    div, extra = divmod(len(shapes), partitions)
    return [list(shapes[k * div + min(k, extra) : (k + 1) * div + min(k + 1, extra)]) for k in range(partitions)]


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
    bytes_to_device: int  # one engine call over this store: its token factors and (unless resident) the factors
    bytes_from_device: int  # its token factors, captured (padding is not moved)
    capture: Peak
    scoring: Peak
    host: Peak
    work: Work
    factor_bytes_to_device: int = 0  # of bytes_to_device: every module's factors, as stored
    factor_bytes: int = 0  # every module's factors as the engine copies them (whether moved per call or once)
    resident: bool = False  # every module's prepared factors kept on the device across the job's engine calls
    bounce_bytes: int = 0  # each of the two pinned bounce slots
    landing_bytes: int = 0  # the pinned landing buffer
    registered: bool = False  # its store in RAM page-locked (the run plan's, within its limit): no host copies

    @property
    def pinned_bytes(self) -> int:
        """Pinned host memory: the two bounce slots and the landing buffer."""
        return 2 * self.bounce_bytes + self.landing_bytes

    def line(self) -> str:
        """The one plan line run-query logs before a folder."""
        where = "spilled to a memory-mapped file" if self.spilled else "in RAM"
        layout = ("every gradient of a module at once" if self.at_once
                  else f"blocks of {self.block} gradients, columns formed again per block")
        return (f"Plan: {self.sequences} sequences, {self.tokens} tokens; token factors "
                f"{human_bytes(self.token_factor_bytes)} {where} (budget {human_bytes(self.host_budget)}); "
                f"workspace {human_bytes(self.workspace_used)} of {human_bytes(self.workspace_budget)} ({layout}); "
                f"device peak {human_bytes(max(self.capture.total, self.scoring.total))}; moved "
                f"{human_bytes(self.bytes_from_device)} off the device, {human_bytes(self.bytes_to_device)} onto it "
                f"({self.factors_moved()}); pinned {human_bytes(self.pinned_bytes)}")

    def factors_moved(self) -> str:
        """How the factors travel, in words."""
        if self.resident:
            return f"factors {human_bytes(self.factor_bytes)} once, kept on the device"
        return f"factors {human_bytes(self.factor_bytes_to_device)} of it"

    def peaks(self) -> list[Peak]:
        return [self.capture, self.scoring, self.host]


@dataclass(frozen=True)
class Context:
    """What every job's sizes depend on: the tracked shapes, the model, the factors' strategy, dtype and options."""

    shapes: Sequence[Shape]
    model: ModelShape
    strategy: str
    dtype_bytes: int
    batch_size: int
    per_token: bool
    device_type: str
    peaks: Peaks
    matmul_precision: str
    device_limit: int | None = None
    host_limit: int | None = None
    refine: bool = False  # --refine-steps: the queries refined on every rank that captures them (the bytes moved)

    @property
    def bytes_per_token(self) -> int:
        return sizes.token_factor_bytes_per_token(self.shapes, self.dtype_bytes)

    def store(self, lengths: Sequence[int], workspace: int, host_budget: int) -> ScorePlan:
        return plan_scoring(self, lengths, workspace, host_budget)




def plan_scoring(context: Context, lengths: Sequence[int], workspace_budget: int, host_budget: int,
                 labelled: Sequence[int] | None = None) -> ScorePlan:
    """The plan of scoring sequences of ``lengths`` (distinct; ``labelled`` tokens of each, default all) with a
    workspace and a host budget, in ``context``."""
    shapes, model, strategy, dtype_bytes = context.shapes, context.model, context.strategy, context.dtype_bytes
    batch_size, per_token, device_type = context.batch_size, context.per_token, context.device_type
    peaks = context.peaks
    matmul_precision, device_limit, host_limit = context.matmul_precision, context.device_limit, context.host_limit
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
    factor_bytes = sum(sizes.factor_read_bytes(s, strategy) for s in shapes) if on_device else 0
    prepared = sum(sizes.preconditioner_bytes(s, strategy)[0] for s in shapes)
    worst, worst_total, at_once, block, used = None, -1, True, count, 0
    for resident in ((True, False) if on_device and device_limit is not None else (False,)):
        worst, worst_total, at_once, block, used = None, -1, True, count, 0
        for index, shape in enumerate(shapes):
            following = shapes[index + 1] if index + 1 < len(shapes) else None
            width_bytes = sizes.whitened_bytes(shape)
            scratch, capacity = sizes.workspace_split(workspace_budget, shape, per_token)
            module_at_once = capacity >= count
            module_used = (count if module_at_once else 2 * (capacity // 2)) * width_bytes
            factors_part = (Part("every module's factors, kept", prepared + sizes.preconditioner_bytes(
                shape, strategy)[1] - sizes.preconditioner_bytes(shape, strategy)[0]) if resident else
                Part(f"factors of {_in_block(shape.name)}", sizes.preconditioner_bytes(shape, strategy)[1]))
            parts = [Part("model", model_bytes), factors_part,
                     Part("the next module's factors, arriving", 0 if resident or following is None or not on_device
                          else sizes.factor_read_bytes(following, strategy)),
                     Part("its token factors", sizes.slab_bytes(shape, tokens, dtype_bytes) if on_device else 0),
                     Part("the next module's", 0 if following is None or not on_device else tokens * dtype_bytes * (
                         following.out + (0 if following.shares_input else following.inp))),
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
        if not resident or (worst_total <= device_limit and capture.total + prepared <= device_limit):
            break  # the factors kept where that fits (scoring, and the next capture beside them), else copied per call
    if resident:  # later captures (the next chunk or folder) run beside the kept factors
        capture.parts.append(Part("every module's factors, kept", prepared))
    scoring = Peak("device, scoring" if on_device else "RAM, scoring (besides the token factors)", worst,
                   device_limit if on_device else None, "a smaller --workspace-gb (exact, in blocks)")
    bounce = sizes.bounce_slot_bytes(shapes, strategy) if on_device else 0
    landing = sizes.landing_bytes(sorted(lengths)[-batch_size:], shapes, dtype_bytes) if on_device else 0
    host = Peak("host" if on_device else "RAM", [
        Part("token factors" if not spilled else "token factors (spill file: page cache)", 0 if spilled
             else token_factors),
        Part("pinned bounce slots and landing buffer", 2 * bounce + landing)] + ([] if on_device else [
            Part("capture or scoring", max(capture.total, scoring.total))]), host_limit,
        "a smaller --host-memory-gb (the rest is spilled to --spill-dir)")
    work = Work("run-query FLOPs", {
        "forward and backward": (sizes.forward_backward_flops(model, lengths), peaks.model),
        "rotations and whitened gradients": (sum(sizes.rotation_flops(t, s.out, s.width) if _eigen(strategy)
                                                 else 2 * t * s.out * s.width for t in lengths for s in shapes),
                                             peaks.engine(matmul_precision)),
        "Gram": (sum(2 * count * count * s.out * s.width for s in shapes) * (1 if at_once else 2),
                 peaks.engine(matmul_precision)),
    })
    moved_factors = factor_bytes if on_device else 0
    return ScorePlan(count, tokens, token_factors, host_budget, spilled, workspace_budget, used, at_once, block,
                     token_factors + moved_factors if on_device else 0, token_factors if on_device else 0, capture,
                     scoring, host, work, moved_factors, factor_bytes, resident, bounce, landing)


def plan_refine(shapes: Sequence[Shape], model: ModelShape, strategy: str, dtype_bytes: int, batch_tokens: int,
                limit: int | None, where: str = "device") -> Peak:
    """``--refine-steps``' device memory, from what it holds (:mod:`if_query.score.refine`): the model, every module's
    prepared factors (P), one fitting batch's activations (the VJP's forward keeps them; the JVP's forward carries
    tangents beside its activations but keeps none) and one query's vectors."""
    factors = sum(sizes.preconditioner_bytes(s, strategy)[0] for s in shapes)
    preparing = max((sizes.preconditioner_bytes(s, strategy)[1] - sizes.preconditioner_bytes(s, strategy)[0]
                     for s in shapes), default=0)
    return Peak(f"{where}, --refine-steps", [
        Part("model", model.parameters * dtype_bytes),
        Part("every module's factors", factors + preparing),
        Part(f"activations of a fitting batch of {batch_tokens} tokens", sizes.activation_bytes(
            model, batch_tokens, dtype_bytes, batch_tokens)),
        Part(f"one query's vectors ({sizes.REFINE_COPIES} x the tracked weights in float32)",
             sizes.refine_vector_bytes(shapes))], limit,
        "track fewer blocks (--layer-stride), a smaller --refine-batch-size, or run without --refine-steps")


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


@dataclass(frozen=True)
class FitPasses:
    """The fit's two data passes, whose device memory depends on the module partitions: the covariance pass holds a
    partition's covariances, the lambda pass its eigenvectors and lambdas (besides the model and a batch's
    activations). :meth:`fewest_partitions` is the one answer to "how many partitions would fit", for ``if-query
    plan`` and fit-hessians' warning alike (both read it from :func:`plan_fit`'s advice)."""

    shapes: Sequence[Shape]
    model: ModelShape
    strategy: str
    dtype_bytes: int
    factor_batch_size: int
    lambda_batch_size: int
    fit_lengths: Sequence[int]
    device_limit: int | None = None
    where: str = "device"  # "RAM" on the CPU

    @cached_property
    def _longest(self) -> list[int]:
        return sorted(self.fit_lengths, reverse=True)

    def _batch(self, size: int) -> list[Part]:
        tokens = sum(self._longest[:size])  # the batch of the longest sequences
        return [Part("model", self.model.parameters * self.dtype_bytes),
                Part(f"activations of a batch of {tokens} tokens",
                     sizes.activation_bytes(self.model, tokens, self.dtype_bytes, tokens))]

    def covariance(self, partitions: int) -> Peak:
        """The covariance pass with ``partitions`` module partitions (advice: see :meth:`advice`)."""
        groups = module_groups(self.shapes, partitions)
        held = max(sum(sizes.module_factor_sizes(s, self.strategy).covariance_bytes for s in g) for g in groups)
        return Peak(f"{self.where}, covariance pass", self._batch(self.factor_batch_size) + [
            Part(f"covariances of a partition ({len(groups)})", held)], self.device_limit)

    def lambdas(self, partitions: int) -> Peak:
        """The lambda pass with ``partitions`` module partitions (nothing but the batch unless lambdas are fitted)."""
        fitted = self.strategy in ("ekfac", "diagonal")
        held = max(sum(sizes.module_factor_sizes(s, self.strategy).eigen_bytes + sizes.whitened_bytes(s) for s in g)
                   for g in module_groups(self.shapes, partitions))
        return Peak(f"{self.where}, lambda pass", self._batch(self.lambda_batch_size) + [
            Part("eigenvectors and lambdas of a partition", held if fitted else 0),
            Part("per-example gradients", LAMBDA_CHUNK_BYTES if fitted else 0)], self.device_limit)

    def fewest_partitions(self) -> int | None:
        """The fewest module partitions, from 1 to one module each, at which both passes fit; None when none do.
        Searched in order, not bisected: a partition's largest group need not shrink with each partition added."""
        return next((count for count in range(1, len(self.shapes) + 1)
                     if self.covariance(count).fits and self.lambdas(count).fits), None)

    def advice(self, batch_option: str) -> str:
        """What to change when a pass does not fit (``batch_option``: the batch size of that pass)."""
        fewest = self.fewest_partitions()
        if fewest is not None:
            return f"--module-partitions {fewest} (the fewest that fit both passes), or a smaller {batch_option}"
        each = len(self.shapes)
        over = [(peak, option) for peak, option in ((self.covariance(each), "--factor-batch-size"),
                                                    (self.lambdas(each), "--lambda-batch-size")) if not peak.fits]
        return (f"no --module-partitions fits: with one module per partition ({each}), "
                + "; ".join(f"the {peak.where.split(', ')[-1]} needs {peak.summary()}" for peak, _ in over)
                + f"; a smaller {' or '.join(option for _, option in over)}, shorter sequences or more memory")


def plan_fit(shapes: Sequence[Shape], model: ModelShape, strategy: str, dtype_bytes: int, factor_batch_size: int,
             lambda_batch_size: int, partitions: int, fit_lengths: Sequence[int], peaks: Peaks,
             matmul_precision: str, device_limit: int | None = None, where: str = "device") -> FitPlan:
    """The fit's factor sizes, its stages' peak memory (``where``: "device", or "RAM" for a fit on the CPU) and
    FLOPs. A pass that does not fit ``device_limit`` names the fewest module partitions that would
    (:meth:`FitPasses.fewest_partitions`)."""
    factors = sizes.estimate_factor_sizes(shapes, strategy)
    per_module = {s.name: sizes.module_factor_sizes(s, strategy).total_bytes for s in shapes}
    largest = max(per_module.items(), key=lambda item: item[1])
    stages = FitPasses(shapes, model, strategy, dtype_bytes, factor_batch_size, lambda_batch_size, fit_lengths,
                        device_limit, where)
    covariance, lambdas = stages.covariance(partitions), stages.lambdas(partitions)
    for peak, option in ((covariance, "--factor-batch-size"), (lambdas, "--lambda-batch-size")):
        if not peak.fits:
            peak.advice = stages.advice(option)
    biggest = max((max(s.width, s.out) for s in shapes), default=0) if _eigen(strategy) else 0
    eigen = Peak(f"{where}, eigendecomposition (rank 0)", [
        Part("model", model.parameters * dtype_bytes),  # still on the device while rank 0 decomposes
        Part(f"largest covariance ({biggest}²) in float64 x{EIGH_COPIES}", EIGH_COPIES * biggest * biggest *
             sizes.BYTES_PER_DOUBLE)], device_limit, "--eigendecomposition-dtype float32")
    passes = sizes.forward_backward_flops(model, fit_lengths)
    groups = len(module_groups(shapes, partitions))  # a data pass per group
    engine_peak = peaks.engine(matmul_precision)
    flops = {"covariance pass": (passes * groups, peaks.model),
             "covariances": (sum(2 * t * (s.width**2 + s.out**2) for t in fit_lengths for s in shapes), engine_peak)}
    if _eigen(strategy):
        flops["eigendecompositions (float64)"] = (sizes.eigendecomposition_flops(shapes),
                                                  peaks.float32 * EIGH_EFFICIENCY)
    if strategy in ("ekfac", "diagonal"):
        flops["lambda pass"] = (passes * groups, peaks.model)
        flops["lambda"] = (sum(sizes.rotation_flops(t, s.out, s.width) if strategy == "ekfac"
                               else 2 * t * s.out * s.width for t in fit_lengths for s in shapes), engine_peak)
    return FitPlan(factors, largest, covariance, eigen, lambdas, Work("fit-hessians FLOPs", flops))
