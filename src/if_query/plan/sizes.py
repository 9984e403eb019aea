"""Every byte and FLOP count, from the shapes alone: factors, token factors, whitened gradients, activations,
the work of each stage. The run-query plan line and ``if-query plan`` both read these.

One unit convention everywhere: decimal, 1 GB = 10^9 bytes (``human_bytes``), as disks and GPU datasheets count
("80 GB"). Per tracked module of weight (out, in): ``width`` = in' = in + 1 with a bias (the bias column of
:mod:`if_query.score.per_example`). Factors and all scoring arithmetic are float32 (``BYTES_PER_FLOAT``); token
factors and activations are in the model's dtype.

The per-example gradient's maths (bias column, rotation order): :mod:`if_query.score.per_example`; its FLOPs:
:func:`rotation_flops` here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BYTES_PER_FLOAT = 4  # float32: factors, whitened gradients, scores
BYTES_PER_DOUBLE = 8  # float64: the curvature while a module's factors are prepared
# Saved activations of one decoder block, per token, in elements of the model's dtype, for a forward and
# backward pass with frozen weights (the backward computes activation gradients only): attention about 11
# hidden-sized tensors (block input, q, k, v and their normed/rotated copies, the attention output, o_proj's
# input, the norms' inputs), the MLP 4 intermediate-sized ones (gate and up outputs, the activation, the
# product fed to down_proj). An estimate (about 8.9 GB for OLMo-2-13B at 2 x 500 tokens), not a measurement.
ACTIVATION_HIDDEN_PER_TOKEN = 11
ACTIVATION_INTERMEDIATE_PER_TOKEN = 4
STAGING_BYTES = 256 * 1024**2  # the least size of each of the two pinned bounce slots (score/transfer.py)
ALIGNMENT = 64  # bytes: where each tensor starts in the pinned landing buffer (score/transfer.py)
COUNT_BYTES = 8  # a module's lambda count (num_lambda_processed): one int64
LOGIT_COPIES = 3  # logits at labelled positions: the model's, their float32 copy, the softmax gradient


def human_bytes(count: float) -> str:
    """Decimal units: 1 KB = 10^3 bytes, 1 GB = 10^9 (never 1024-based)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    raise AssertionError("unreachable")


def human_count(count: int) -> str:
    """A count of parameters: "13.72 B", "124.4 M", or every digit below a million ("172,352")."""
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count:,}"


def human_flops(count: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(count) < 1000 or unit == "P":
            return f"{count:.1f} {unit}FLOP"
        count /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Shape:
    """A tracked module's shape: its weight (out, in), whether it has a bias, and whether it reads the input of
    an earlier module (then its token factors keep no inputs of their own)."""

    name: str
    out: int
    inp: int
    bias: bool
    shares_input: bool = False

    @property
    def width(self) -> int:
        return self.inp + int(self.bias)

    @classmethod
    def of(cls, module) -> Shape:
        """From a :class:`~if_query.model.tracking.TrackedModule`."""
        return cls(module.name, module.out_features, module.in_features, module.bias, module.input_from is not None)


# --- the rotation rule ---


# --- factors (fit-hessians' files) ---


@dataclass(frozen=True)
class FactorSizes:
    covariance_bytes: int
    eigen_bytes: int
    lambda_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.covariance_bytes + self.eigen_bytes + self.lambda_bytes

    def human(self) -> str:
        return human_bytes(self.total_bytes)


def module_factor_sizes(shape: Shape, strategy: str) -> FactorSizes:
    """Bytes of one module's factors in Kronfluence's files for ``strategy``."""
    a, g = shape.width, shape.out
    covariance = (a * a + g * g) * BYTES_PER_FLOAT
    eigen = (a * a + g * g + a + g) * BYTES_PER_FLOAT
    lambdas = a * g * BYTES_PER_FLOAT
    return {"ekfac": FactorSizes(covariance, eigen, lambdas), "kfac": FactorSizes(covariance, eigen, 0),
            "diagonal": FactorSizes(0, 0, lambdas)}.get(strategy, FactorSizes(0, 0, 0))


def estimate_factor_sizes(modules: Sequence, strategy: str) -> FactorSizes:
    """Bytes of the factors Kronfluence stores for ``strategy`` (modules: TrackedModule or Shape)."""
    sizes = [module_factor_sizes(m if isinstance(m, Shape) else Shape.of(m), strategy) for m in modules]
    return FactorSizes(sum(s.covariance_bytes for s in sizes), sum(s.eigen_bytes for s in sizes),
                       sum(s.lambda_bytes for s in sizes))


def preconditioner_bytes(shape: Shape, strategy: str) -> tuple[int, int]:
    """(resident, peak while prepared) device bytes of one module's factors while it is scored: Q_a, Q_g and
    S in float32; while S is made, the float32 lambda (or eigenvalues) and the float64 curvature too."""
    a, g = shape.width, shape.out
    if strategy == "identity":
        return 0, 0
    scale = g * a * BYTES_PER_FLOAT
    eigenvectors = (a * a + g * g) * BYTES_PER_FLOAT if strategy in ("kfac", "ekfac") else 0
    preparing = g * a * (BYTES_PER_FLOAT + BYTES_PER_DOUBLE)
    return eigenvectors + scale, eigenvectors + scale + preparing


def factor_read_bytes(shape: Shape, strategy: str) -> int:
    """Bytes of one module's factors as the engine copies them to the device, as stored: float32 eigenvectors
    (K-FAC, EK-FAC), the lambda and its count (EK-FAC, diagonal) or the eigenvalues (K-FAC)."""
    a, g = shape.width, shape.out
    eigenvectors = (a * a + g * g) * BYTES_PER_FLOAT if strategy in ("kfac", "ekfac") else 0
    if strategy in ("ekfac", "diagonal"):
        return eigenvectors + g * a * BYTES_PER_FLOAT + COUNT_BYTES
    return eigenvectors + (a + g) * BYTES_PER_FLOAT if strategy == "kfac" else 0


def bounce_slot_bytes(shapes: Sequence[Shape], strategy: str) -> int:
    """Each of the two pinned bounce slots: one module's factors as stored (the largest), at least
    ``STAGING_BYTES`` (a spilled slab goes through in slot-sized pieces)."""
    return max([STAGING_BYTES, *(factor_read_bytes(s, strategy) for s in shapes)])


def landing_bytes(lengths: Sequence[int], shapes: Sequence[Shape], dtype_bytes: int) -> int:
    """The pinned landing buffer for one batch of sequences of ``lengths``: each example's inputs (each input once)
    and output gradients of every module, each view starting ``ALIGNMENT``-aligned."""
    def aligned(count: int) -> int:
        return -(-count // ALIGNMENT) * ALIGNMENT

    return sum(aligned(t * dtype_bytes * (s.out if kind else s.inp)) for t in lengths for s in shapes
               for kind in (0, 1) if kind or not s.shares_input)


# --- token factors and the engine's working memory ---


def token_factor_bytes_per_token(shapes: Sequence[Shape], dtype_bytes: int) -> int:
    """Bytes of one token's factors: every module's output gradient, and each input once (shared inputs)."""
    return dtype_bytes * sum(s.out + (0 if s.shares_input else s.inp) for s in shapes)


def whitened_bytes(shape: Shape) -> int:
    """One example's whitened gradient W (out, in') in float32."""
    return shape.out * shape.width * BYTES_PER_FLOAT


def slab_bytes(shape: Shape, tokens: int, dtype_bytes: int) -> int:
    """One module's token factors (inputs and output gradients of ``tokens`` tokens) on the device."""
    return tokens * (shape.inp + shape.out) * dtype_bytes


def per_token_scratch_bytes(shape: Shape, longest: int) -> int:
    """One query's per-token scratch: its preconditioned W and the mapped output gradients (T, in')."""
    return whitened_bytes(shape) + longest * shape.width * BYTES_PER_FLOAT


# --- --refine-steps ---

REFINE_COPIES = 4  # float32 copies of the tracked weights held at once for one query (measured: tests/test_refine.py)
REFINE_MODULE_TEMPORARIES = 2  # ... and of the largest module's block while P maps one block (its rotations)


def refine_moved(shapes: Sequence[Shape], queries: int, slabs: int, factors: int, ranks: int, engine_calls: int
                 ) -> tuple[int, int]:
    """(bytes onto the device, bytes off it) of refining ``queries`` queries on each of ``ranks`` ranks, whose store's
    slabs take ``slabs`` bytes (score/refine.py, score/engine.py). On each rank: the slabs once (the gradients are
    formed from them), ``factors`` (every module's, unless the plan keeps them on the device), the power iterations'
    random start and each query's g onto the device; each query's gradient and refined v off it. And each query's
    refined v onto the device once per module in every one of the job's ``engine_calls``. All but the slabs and the
    factors are float32 vectors the size of the tracked weights."""
    vector = tracked_vector_bytes(shapes)
    return (ranks * (slabs + factors + vector + queries * vector) + engine_calls * queries * vector,
            ranks * 2 * queries * vector)


def tracked_vector_bytes(shapes: Sequence[Shape]) -> int:
    """Every tracked module's (out, in') block in float32: one query's g or refined v."""
    return sum(whitened_bytes(s) for s in shapes)


def refine_vector_bytes(shapes: Sequence[Shape]) -> int:
    """Device bytes of one query's refinement vectors (g, v, the residual and the update, or H v's pullback) and
    P's temporaries (score/refine.py)."""
    blocks = [s.out * s.width * BYTES_PER_FLOAT for s in shapes]
    return REFINE_COPIES * sum(blocks) + REFINE_MODULE_TEMPORARIES * max(blocks, default=0)


# --- model passes ---


@dataclass(frozen=True)
class ModelShape:
    """What activation and FLOP counts need of a model (read off its config and its meta-device modules)."""

    parameters: int  # every weight (bytes = parameters x dtype bytes)
    matmul_parameters: int  # weights used in matrix products, the LM head included: 2 FLOPs per token each
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, model, config) -> ModelShape:
        from torch import nn
        from transformers.pytorch_utils import Conv1D

        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)))
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
        layers = getattr(config, "num_hidden_layers", None) or config.n_layer
        return cls(sum(p.numel() for p in model.parameters()), matmul, layers, hidden, intermediate,
                   config.vocab_size)


def activation_bytes(model: ModelShape, batch_tokens: int, dtype_bytes: int, labelled_tokens: int) -> int:
    """Device memory of one batch's forward and backward pass (an estimate: see the constants above)."""
    per_token = ACTIVATION_HIDDEN_PER_TOKEN * model.hidden + ACTIVATION_INTERMEDIATE_PER_TOKEN * model.intermediate
    logits = labelled_tokens * model.vocab * BYTES_PER_FLOAT * LOGIT_COPIES
    return model.layers * batch_tokens * per_token * dtype_bytes + logits


def forward_backward_flops(model: ModelShape, lengths: Sequence[int]) -> int:
    """A forward and a backward pass with frozen weights (no weight gradients): 4 FLOPs per matrix weight and
    token, plus attention's 2 T² d per layer forward and twice that backward."""
    return sum(4 * model.matmul_parameters * t + 6 * model.layers * t * t * model.hidden for t in lengths)


def eigendecomposition_flops(shapes: Sequence[Shape]) -> int:
    """About 9 n³ per symmetric eigendecomposition (both covariances of every module)."""
    return sum(9 * (s.width**3 + s.out**3) for s in shapes)


def rotation_flops(tokens: int, out: int, width: int) -> int:
    """FLOPs of one example's rotated gradient ``Q_gᵀ (Gᵀ [A, 1]) Q_a`` (out, in'), the cheaper order."""
    gradient = 2 * tokens * out * width
    return gradient + min(2 * tokens * (out * out + width * width), 2 * out * width * (out + width))


def workspace_split(workspace_bytes: int, shape: Shape, per_token: bool, kept: int = 0) -> tuple[int, int]:
    """How one module uses the workspace: (per-token scratch bytes: a quarter of it with per-token scores, whose
    queries are taken in chunks; the whitened gradients that fit at once in the rest, less ``kept`` bytes of kept
    rotations, at least 2). The engine works so, and the plan counts so."""
    scratch = workspace_bytes // 4 if per_token else 0
    return scratch, max(2, (workspace_bytes - scratch - kept) // whitened_bytes(shape))


def lambda_flops(tokens: int, out: int, width: int, rotated: bool) -> tuple[int, int]:
    """(if-query's, Kronfluence's) FLOPs of one example's lambda work for one module of ``out`` x
    ``width`` (= in') over ``tokens`` positions, beyond the forward and backward pass."""
    gradient = 2 * tokens * out * width
    if not rotated:
        return gradient, gradient
    return rotation_flops(tokens, out, width), gradient + 2 * out * width * (out + width)
