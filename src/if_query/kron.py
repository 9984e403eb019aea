"""The one module that imports Kronfluence: its task, analyzer, factor files and streaming scorer,
and the conventions if-query's own scoring relies on.

Kronfluence 1.0.1 (pinned) fits the covariances and their eigendecomposition (:func:`fit_covariances`,
:func:`fit_eigendecomposition`); if-query fits lambda itself (:mod:`if_query.lambda_stage`) into
Kronfluence's files. The files are read, and lambda's written, here and nowhere else. Kronfluence's own
pairwise and self-influence scorers (:class:`StreamingScorer`) are the ``--engine kronfluence``
cross-check. Private Kronfluence methods are called in three places, each marked ``# private:`` with its
reason, and ``tests/test_kron_adapter.py`` fails if their signatures change.

The conventions, each checked against Kronfluence's source (``factor/config.py``,
``module/linear.py``, ``module/tracker/factor.py``) and by tests that compare scores:

- **Per-example gradient** of a tracked ``nn.Linear``: ``sum_t g_t a_t^T``, shape (out, in'), where
  ``a_t`` is the layer input at position t with a 1 appended when the layer has a bias
  (in' = in + 1, the *bias column*) and ``g_t`` the gradient of the summed loss w.r.t. the layer
  output at t.
- **Files**: ``<factors-dir>/factors_hessian/<factor>.safetensors``, each a {module name: tensor}
  map: ``activation_eigenvectors`` Q_a (in', in'), ``gradient_eigenvectors`` Q_g (out, out), their
  ``*_eigenvalues``, ``lambda_matrix`` (out, in') and ``num_lambda_processed`` (1,). Strategy and
  dtypes are in ``factor_arguments.json``.
- **Curvature in the eigenbasis** (the diagonal of the preconditioned Hessian approximation):
  EK-FAC and diagonal: ``lambda_matrix / num_lambda_processed`` (the lambda matrix is a *sum* over
  examples of squared rotated, resp. plain, per-example gradients); K-FAC:
  ``outer(gradient_eigenvalues, activation_eigenvalues)``; identity: none.
- **K-FAC eigenvalues are clamped at 0.** The eigenvalues of a covariance are >= 0 in exact
  arithmetic but can come out slightly negative; Kronfluence uses them as they are, which makes the
  preconditioner indefinite (and a tiny damping can turn a score's sign). if-query clamps them for
  both of its scorers (:func:`clamp_kfac_eigenvalues` on Kronfluence's loaded factors), so the same
  factors give the same scores whichever scorer runs.
- **Damping**: a number, or ``auto`` = ``HEURISTIC_DAMPING_SCALE`` (0.1) x the mean curvature of
  each module (Kronfluence's heuristic).
- **Preconditioned score**: ``score(q, t) = sum_ij C_ij^-1 R_q,ij R_t,ij`` with ``R = Q_g^T grad Q_a``
  (``grad`` itself without eigenvectors) and ``C = curvature + damping``.

**The lambda stage's files** (if-query computes lambda itself, :mod:`if_query.lambda_stage`, and writes
what Kronfluence's ``fit_lambda_matrices`` would, so ``load_all_factors`` and scoring read them unchanged):

- ``lambda_matrix.safetensors`` {module: (out, in') float32} and ``num_lambda_processed.safetensors``
  {module: (1,) int64, the number of examples}, with Kronfluence's ``FactorArguments.to_str_dict()`` as
  safetensors metadata. With module partitions, Kronfluence first writes
  ``<name>_data_partition0_module_partition<j>.safetensors`` per group of modules (its own
  ``make_modules_partition`` of its tracked-module order; same metadata), then the union of the groups
  as ``<name>.safetensors`` *without* metadata (its ``aggregate_lambda_matrices``); both are kept.
- ``lambda_dataset_metadata.json`` and the check of ``factor_arguments.json`` are written by Kronfluence's
  own methods (:func:`prepare_lambda_stage`).
- **Done** = both unpartitioned files exist (Kronfluence's ``lambda_matrices_exist``); a finished group
  = its two partition files exist. Every file is written beside its name and renamed into place, so an
  interrupted stage leaves only whole files and reruns what is missing (Kronfluence writes in place).
- safetensors stores metadata in hash order, so two runs' files hold the same tensors and metadata but
  need not be byte-identical (true of Kronfluence's own files too).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.config import FactorConfig
from kronfluence.factor.eigen import eigendecomposition_exist, lambda_matrices_exist, lambda_matrices_save_path
from kronfluence.module.tracked_module import TrackedModule
from kronfluence.module.utils import get_tracked_module_names, make_modules_partition
from kronfluence.score.pairwise import compute_pairwise_scores_with_loaders
from kronfluence.score.self import compute_self_scores_with_loaders
from kronfluence.task import Task
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    ALL_MODULE_NAME,
    FACTOR_ARGUMENTS_NAME,
    FACTOR_SAVE_PREFIX,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    HEURISTIC_DAMPING_SCALE,
    LAMBDA_MATRIX_NAME,
    NUM_LAMBDA_PROCESSED,
)
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.utils.exceptions import FactorsNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils import data

from if_query import loss
from if_query.atomic import staged_files
from if_query.config import EIGENDECOMPOSITION_DTYPES, STRATEGIES, FitConfig, QueryConfig
from if_query.distributed import check_launch, start_data_parallel
from if_query.errors import InputError, RunError
from if_query.metadata import FACTORS_NAME
from if_query.tokenization import Collator, TokenizedExample

# Kronfluence 1.0.1 uses torch.cuda.amp.GradScaler, deprecated in recent torch: not the user's concern.
warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
EIGENDECOMPOSITION_TORCH_DTYPES = {name: getattr(torch, name) for name in EIGENDECOMPOSITION_DTYPES}
_FILES = {
    "ekfac": (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME, LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED),
    "kfac": (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME, ACTIVATION_EIGENVALUES_NAME,
             GRADIENT_EIGENVALUES_NAME),
    "diagonal": (LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED),
    "identity": (),
}


# --- The factor files, read one module at a time for if-query's engine (conventions: module docstring) ---


def factors_path(factors_dir: str | Path) -> Path:
    """Where Kronfluence keeps the factors of a fit-hessians output directory."""
    return Path(factors_dir) / f"{FACTOR_SAVE_PREFIX}{FACTORS_NAME}"


def clamp_kfac_eigenvalues(loaded_factors: dict) -> None:
    """Clamp K-FAC eigenvalues at 0 in factors loaded by Kronfluence (see the module docstring)."""
    for name in (ACTIVATION_EIGENVALUES_NAME, GRADIENT_EIGENVALUES_NAME):
        for tensor in loaded_factors.get(name, {}).values():
            tensor.clamp_min_(0)


@dataclass
class Preconditioner:
    """One module's factors on the scoring device, ready to map per-token vectors and gradients.

    ``rotate_inputs``/``rotate_output_grads`` map token vectors into the eigenbasis (no-ops without
    eigenvectors); ``scale`` is ``C^-1/2`` (out, in') in float32, None for identity.
    """

    q_a: torch.Tensor | None  # (in', in') float32
    q_g: torch.Tensor | None  # (out, out) float32
    scale: torch.Tensor | None  # (out, in') float32
    damping: float | None  # resolved damping (None for identity)

    def rotate_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs if self.q_a is None else inputs @ self.q_a

    def rotate_output_grads(self, output_grads: torch.Tensor) -> torch.Tensor:
        return output_grads if self.q_g is None else output_grads @ self.q_g

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q_a, self.q_g, self.scale) if t is not None)


class FactorReader:
    """Reads a fit's factors one module at a time (memory-mapped safetensors: processes on one host
    share the pages; only the module being scored is copied)."""

    def __init__(self, factors_dir: str | Path):
        self.directory = factors_path(factors_dir)
        arguments = self.directory / f"{FACTOR_ARGUMENTS_NAME}_arguments.json"
        try:
            self.strategy = json.loads(arguments.read_text(encoding="utf-8"))["strategy"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"--factors-dir {factors_dir}: no readable Kronfluence factor arguments ({exc})") from exc
        if self.strategy not in STRATEGIES:
            raise InputError(f"--factors-dir {factors_dir}: unknown strategy {self.strategy!r}")
        self._same: dict[tuple[str, str], bool] = {}
        self._files = {}
        for name in _FILES[self.strategy]:
            path = self.directory / f"{name}.safetensors"
            if not path.is_file():
                raise InputError(f"--factors-dir {factors_dir}: {path.name} is missing (incomplete fit?)")
            self._files[name] = safe_open(str(path), framework="pt", device="cpu")

    def _tensor(self, factor: str, module: str) -> torch.Tensor:
        try:
            return self._files[factor].get_tensor(module)
        except Exception as exc:  # safetensors raises its own error type for a missing key
            raise InputError(f"factors have no {factor} for module {module!r} (fitted for other modules?)") from exc

    def curvature(self, module: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The module's curvature in its eigenbasis, (out, in') float64 on ``device``; None for identity."""
        if self.strategy == "identity":
            return None
        if self.strategy == "kfac":
            eigen_a = self._tensor(ACTIVATION_EIGENVALUES_NAME, module).to(device).double().clamp_min(0)
            eigen_g = self._tensor(GRADIENT_EIGENVALUES_NAME, module).to(device).double().clamp_min(0)
            return torch.outer(eigen_g, eigen_a)
        count = self._tensor(NUM_LAMBDA_PROCESSED, module).to(device).double()
        return self._tensor(LAMBDA_MATRIX_NAME, module).to(device).double().div_(count)

    def preconditioner(self, module: str, damping: float | None, device: torch.device) -> Preconditioner:
        """Factors of ``module`` on ``device``, prepared there (the float64 curvature, its mean, the damping and
        the rsqrt: no host work per module); ``damping`` None means the heuristic (0.1 x mean curvature)."""
        curvature = self.curvature(module, device)
        if curvature is None:
            return Preconditioner(None, None, None, None)
        if damping is None:
            damping = HEURISTIC_DAMPING_SCALE * float(curvature.mean())
        scale = curvature.add_(damping).rsqrt_().float()  # (out, in')
        del curvature
        q_a = q_g = None
        if self.strategy in ("kfac", "ekfac"):
            q_a = self._tensor(ACTIVATION_EIGENVECTORS_NAME, module).to(device, torch.float32)
            q_g = self._tensor(GRADIENT_EIGENVECTORS_NAME, module).to(device, torch.float32)
        return Preconditioner(q_a, q_g, scale, float(damping))

    def same_activation_eigenvectors(self, module: str, other: str) -> bool:
        """Whether two modules' activation eigenvectors are identical (read on the host, from the mapped file;
        False for strategies without eigenvectors)."""
        if self.strategy not in ("kfac", "ekfac"):
            return False
        key = (module, other)
        if key not in self._same:
            self._same[key] = torch.equal(self._tensor(ACTIVATION_EIGENVECTORS_NAME, module),
                                          self._tensor(ACTIVATION_EIGENVECTORS_NAME, other))
        return self._same[key]


# --- The lambda stage (see the module docstring): what if-query needs to write Kronfluence's lambda files ---

LAMBDA_DATASET_NAME = "lambda"  # Kronfluence's <name>_dataset_metadata.json of the lambda stage


@dataclass(frozen=True)
class LambdaStrategy:
    """Whether a strategy has a lambda stage, and whether its per-example gradients are rotated into
    the eigenbasis (EK-FAC) or not (diagonal)."""

    fitted: bool
    rotated: bool


def lambda_strategy(strategy: str) -> LambdaStrategy:
    config = FactorConfig.CONFIGS[strategy]
    return LambdaStrategy(config.requires_lambda_matrices, config.requires_eigendecomposition_for_lambda)


def tracked_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` inside each of Kronfluence's tracked modules, by Kronfluence's module name, in
    Kronfluence's order (the order its module partitions split)."""
    wrapped = {m.name: m.original_module for m in model.modules() if isinstance(m, TrackedModule)}
    return {name: wrapped[name] for name in get_tracked_module_names(model)}


def module_groups(names: list[str], partitions: int) -> list[list[str]]:
    """Kronfluence's module partitions of ``names``."""
    return make_modules_partition(total_module_names=names, partition_size=partitions)


def _partition(group: int | None) -> tuple[int, int] | None:
    return None if group is None else (0, group)


def lambda_files_exist(directory: Path, group: int | None = None) -> bool:
    """Whether the lambda stage is done (``group`` None) or module group ``group`` of it is."""
    return lambda_matrices_exist(output_dir=directory, partition=_partition(group))


def prepare_lambda_stage(analyzer, factors_name: str, factor_args, dataset) -> Path | None:
    """Kronfluence's preamble of ``fit_lambda_matrices``: the factors directory, or None when there is
    nothing to do (lambda already fitted, or a strategy without lambda). Saves (or checks) the factor
    arguments and the lambda dataset's metadata with Kronfluence's own methods, as its stage would."""
    directory = analyzer.factors_output_dir(factors_name=factors_name)
    directory.mkdir(parents=True, exist_ok=True)
    if lambda_files_exist(directory):
        return None
    # private: Kronfluence's lambda stage saves (or checks) its arguments this way; ours must too.
    analyzer._configure_and_save_factor_args(  # noqa: SLF001
        factor_args=factor_args, factors_output_dir=directory, overwrite_output_dir=False)
    strategy = lambda_strategy(factor_args.strategy)
    if not strategy.fitted:
        return None
    if factor_args.lambda_data_partitions != 1:
        raise RunError("if-query's lambda stage does not support Kronfluence's data partitions")
    if analyzer.state.is_main_process:
        # private: the lambda dataset's metadata file, as Kronfluence's own stage writes it.
        analyzer._save_dataset_metadata(  # noqa: SLF001
            dataset_name=LAMBDA_DATASET_NAME, dataset=dataset, output_dir=directory, overwrite_output_dir=False)
    if strategy.rotated and not eigendecomposition_exist(output_dir=directory):
        raise RunError(f"{directory}: no eigendecomposition to fit lambda with (incomplete fit?)")
    return directory


def read_eigenvectors(directory: Path, module: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_a (in', in'), Q_g (out, out)) of ``module``, float32 on ``device`` (one module read from disk)."""
    loaded = []
    for factor in (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME):
        with safe_open(str(directory / f"{factor}.safetensors"), framework="pt", device="cpu") as file:
            loaded.append(file.get_tensor(module).to(device, torch.float32))
    return loaded[0], loaded[1]


def _save_atomic(directory: Path, files: dict[str, dict[str, torch.Tensor]], metadata: dict | None) -> None:
    """Write {path: tensors} safetensors files, each beside its name then renamed into place (the
    ``num_lambda_processed`` file first: the stage counts as done only once both exist)."""
    names = sorted(files, key=lambda path: path.name.startswith(LAMBDA_MATRIX_NAME))
    with staged_files(directory, [path.name for path in names]) as temporaries:
        for path, temporary in zip(names, temporaries, strict=True):
            save_file(tensors=files[path], filename=str(temporary), metadata=metadata)


def write_lambda_matrices(directory: Path, lambdas: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                          factor_args, group: int | None = None) -> None:
    """Kronfluence's lambda files of the whole stage (``group`` None) or of module group ``group``:
    ``lambdas`` {module: (out, in') float32}, ``counts`` {module: (1,) int64}, on the host."""
    partition = _partition(group)
    files = {
        lambda_matrices_save_path(output_dir=directory, factor_name=LAMBDA_MATRIX_NAME, partition=partition):
            {name: tensor.contiguous() for name, tensor in lambdas.items()},
        lambda_matrices_save_path(output_dir=directory, factor_name=NUM_LAMBDA_PROCESSED, partition=partition):
            {name: tensor.contiguous() for name, tensor in counts.items()},
    }
    _save_atomic(directory, files, factor_args.to_str_dict())


def aggregate_lambda_matrices(directory: Path, groups: int) -> None:
    """Kronfluence's aggregation of the module groups' files into the stage's files (their union; no
    metadata, as Kronfluence's ``aggregate_lambda_matrices`` writes them)."""
    files = {}
    for factor in (LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED):
        merged: dict[str, torch.Tensor] = {}
        for group in range(groups):
            merged.update(load_file(lambda_matrices_save_path(output_dir=directory, factor_name=factor,
                                                              partition=_partition(group))))
        files[lambda_matrices_save_path(output_dir=directory, factor_name=factor)] = merged
    _save_atomic(directory, files, None)


# --- Kronfluence's extension point: the task, the prepared model and the analyzer ---

class CompletionLossTask(Task):
    """Training loss and measurement are both the summed cross-entropy over completion tokens.

    For the true Fisher (``sample=True``) the labels come from :func:`if_query.loss.sample_labels` under the current
    ``stage`` (set by the fitting code with :meth:`set_stage` before each stage) and ``seed``.
    """

    def __init__(self, tracked_modules: list[str], seed: int = 0):
        self.tracked_modules = list(tracked_modules)
        self.seed = seed
        self.stage = "covariance"

    def set_stage(self, stage: str) -> None:
        self.stage = stage

    def compute_train_loss(self, batch: dict, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits, labels = loss.shifted_logits_and_labels(batch, model)
        if sample:
            labels = loss.sample_labels(logits, labels, batch, self.stage, self.seed)
        return loss.summed_token_losses(logits, labels).sum()

    def compute_measurement(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.tracked_modules

    def get_attention_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


def prepare(model: nn.Module, task: CompletionLossTask) -> nn.Module:
    """The model with Kronfluence's tracked wrappers around ``task``'s modules (``nn.Linear`` only)."""
    return prepare_model(model, task)


def make_analyzer(directory: Path, model: nn.Module, task: CompletionLossTask, quiet: bool) -> Analyzer:
    """A Kronfluence Analyzer whose factors live in ``directory/factors_hessian`` (under torchrun, on the NCCL
    group :func:`~if_query.distributed.start_data_parallel` starts, which its State then reuses)."""
    check_launch()
    start_data_parallel()
    directory = directory.resolve()
    return Analyzer(
        analysis_name=directory.name,
        model=model,
        task=task,
        output_dir=str(directory.parent),
        log_level=logging.WARNING,
        disable_tqdm=quiet,
    )


def factor_arguments(config: FitConfig) -> FactorArguments:
    """Kronfluence's factor arguments of a fit (the same for every stage)."""
    return FactorArguments(
        strategy=config.strategy,
        use_empirical_fisher=config.fisher == "empirical",
        covariance_max_examples=None,
        lambda_max_examples=None,
        covariance_module_partitions=config.module_partitions,
        lambda_module_partitions=config.module_partitions,
        eigendecomposition_dtype=EIGENDECOMPOSITION_TORCH_DTYPES[config.eigendecomposition_dtype],
    )


def fit_covariances(analyzer: Analyzer, examples: Sequence[TokenizedExample], batch_size: int,
                    collate: Collator, arguments: FactorArguments) -> None:
    """Kronfluence's covariance stage over ``examples`` (skipped when its files exist)."""
    analyzer.fit_covariance_matrices(FACTORS_NAME, list(examples), per_device_batch_size=batch_size,
                                     dataloader_kwargs=DataLoaderKwargs(collate_fn=collate), factor_args=arguments)


def fit_eigendecomposition(analyzer: Analyzer, arguments: FactorArguments) -> None:
    """Kronfluence's eigendecomposition stage (skipped when its files exist)."""
    analyzer.perform_eigendecomposition(FACTORS_NAME, factor_args=arguments)


# --- Kronfluence's streaming scorer (--engine kronfluence) ---


@dataclass
class PairwiseScores:
    scores: torch.Tensor  # (num_queries, num_train)
    per_token: list[list[torch.Tensor]] | None  # [query][train] -> (train length,)


def _length_order(examples: Sequence[TokenizedExample]) -> list[int]:
    """Indices sorted by length (stable), so batches carry little padding."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i]))


def _inverse(order: list[int]) -> torch.Tensor:
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return inverse


def load_dataloader(analyzer: Analyzer, examples: Sequence[TokenizedExample], batch_size: int, collate: Collator,
                    stack: bool) -> data.DataLoader:
    """A loader over ``examples`` with the samplers of Kronfluence's own scoring (its distributed sampler
    under torchrun, every example once otherwise)."""
    # private: the public score methods take datasets, not loaders; the *_with_loaders functions need
    # loaders built exactly as Kronfluence builds them (checked in tests/test_kron_adapter.py).
    return analyzer._get_dataloader(  # noqa: SLF001
        dataset=list(examples), per_device_batch_size=batch_size,
        dataloader_params=DataLoaderKwargs(collate_fn=collate).to_dict(), allow_duplicates=True, stack=stack,
    )


class StreamingScorer:
    """Kronfluence's pairwise and self-influence scorers on a prepared model and loaded factors.

    On the non-main ranks of a torchrun launch every method returns None (they take part in the
    passes; rank 0 holds the result)."""

    def __init__(self, model: nn.Module, module_names: list[str], config: QueryConfig, pad_token_id: int,
                 quiet: bool = False):
        self.task = CompletionLossTask(module_names)
        self.config = config
        self.pad_token_id = pad_token_id
        self.quiet = quiet
        self.analyzer = make_analyzer(Path(config.factors_dir), prepare(model, self.task), self.task, quiet)
        self.factor_args = self.analyzer.load_factor_args(FACTORS_NAME)
        if self.factor_args is None:
            raise InputError(f"--factors-dir {config.factors_dir}: no Kronfluence factors found (incomplete fit?)")
        try:
            self.factors = self.analyzer.load_all_factors(FACTORS_NAME)
        except (FactorsNotFoundError, FileNotFoundError) as exc:
            raise InputError(f"--factors-dir {config.factors_dir}: incomplete factors ({exc})") from exc
        clamp_kfac_eigenvalues(self.factors)
        self.score_args = ScoreArguments(
            damping_factor=config.damping_value,
            compute_per_token_scores=config.per_token_scores,
            query_gradient_low_rank=config.query_rank,
        )
        self.module_groups = make_modules_partition(get_tracked_module_names(self.model), config.module_partitions)

    @property
    def model(self) -> nn.Module:
        return self.analyzer.model

    @property
    def device(self) -> torch.device:
        return self.analyzer.state.device

    @property
    def is_main_process(self) -> bool:
        return self.analyzer.state.is_main_process

    @property
    def distributed(self) -> bool:
        return self.analyzer.state.use_distributed

    def _loader(self, examples: Sequence[TokenizedExample], batch_size: int, pad_to: int | None = None,
                stack: bool = True) -> data.DataLoader:
        return load_dataloader(self.analyzer, examples, batch_size, Collator(self.pad_token_id, pad_to), stack)

    def pairwise(self, queries: Sequence[TokenizedExample], train: Sequence[TokenizedExample]
                 ) -> PairwiseScores | None:
        """Scores of every (query, train) pair; train gradients are computed once per pass over the
        train set, and one pass holds all queries unless ``queries_per_pass`` limits it."""
        query_order, train_order = _length_order(queries), _length_order(train)
        sorted_queries = [queries[i] for i in query_order]
        sorted_train = [train[i] for i in train_order]
        per_token = self.config.per_token_scores
        pad_to = max(len(t) for t in train) if per_token else None
        query_size, train_size = self.config.batch_sizes()
        batches = math.ceil(len(queries) / query_size)
        per_pass = self.config.queries_per_pass or len(queries)
        self.score_args.query_gradient_accumulation_steps = max(1, min(batches, math.ceil(per_pass / query_size)))
        total = None
        for modules in self.module_groups:
            result = compute_pairwise_scores_with_loaders(
                loaded_factors=self.factors, model=self.model, state=self.analyzer.state, task=self.task,
                query_loader=self._loader(sorted_queries, query_size, stack=False),
                per_device_query_batch_size=query_size,
                train_loader=self._loader(sorted_train, train_size, pad_to=pad_to),
                score_args=self.score_args, factor_args=self.factor_args,
                tracked_module_names=modules, disable_tqdm=self.quiet,
            )
            if self.is_main_process:
                scores = result[ALL_MODULE_NAME]
                total = scores if total is None else total + scores
        if not self.is_main_process:
            return None
        total = total[_inverse(query_order)][:, _inverse(train_order)]
        if not per_token:
            return PairwiseScores(total, None)
        tokens = [[total[q, t, : len(train[t])].clone() for t in range(len(train))] for q in range(len(queries))]
        return PairwiseScores(total.sum(dim=-1), tokens)

    def self_scores(self, examples: Sequence[TokenizedExample]) -> torch.Tensor | None:
        """``g^T (G + damping)^-1 g`` of each example (exact, never low-rank), (examples,)."""
        if not examples:
            return torch.empty(0) if self.is_main_process else None
        order = _length_order(examples)
        arguments = ScoreArguments(damping_factor=self.config.damping_value)
        total = None
        for modules in self.module_groups:
            result = compute_self_scores_with_loaders(
                loaded_factors=self.factors, model=self.model, state=self.analyzer.state, task=self.task,
                train_loader=self._loader([examples[i] for i in order], self.config.batch_sizes()[1]),
                score_args=arguments,
                factor_args=self.factor_args, tracked_module_names=modules, disable_tqdm=self.quiet,
            )
            if self.is_main_process:
                scores = result[ALL_MODULE_NAME]
                total = scores if total is None else total + scores
        if not self.is_main_process:
            return None
        return total[_inverse(order)]

    @torch.no_grad()
    def completion_losses(self, examples: Sequence[TokenizedExample]) -> torch.Tensor:
        """Summed cross-entropy over the labelled tokens, (examples,) float64."""
        order = _length_order(examples)
        collate = Collator(self.pad_token_id)
        sums = torch.empty(len(examples), dtype=torch.float64)
        size = self.config.batch_sizes()[0]  # the queries' losses
        for start in range(0, len(order), size):
            indices = order[start : start + size]
            batch = {k: v.to(self.device) for k, v in collate([examples[i] for i in indices]).items()}
            logits, labels = loss.shifted_logits_and_labels(batch, self.model)
            sums[indices] = loss.summed_token_losses(logits, labels).double().cpu()
        return sums


PRIVATE_API = {  # the private Kronfluence methods called above, and the parameters passed to them
    "_get_dataloader": ("dataset", "per_device_batch_size", "dataloader_params", "allow_duplicates", "stack"),
    "_configure_and_save_factor_args": ("factor_args", "factors_output_dir", "overwrite_output_dir"),
    "_save_dataset_metadata": ("dataset_name", "dataset", "output_dir", "overwrite_output_dir"),
}


def private_api_changes() -> list[str]:
    """The private Kronfluence methods whose parameters no longer include what this module passes."""
    changed = []
    for method, passed in PRIVATE_API.items():
        function = getattr(Analyzer, method, None)
        parameters = inspect.signature(function).parameters if function is not None else {}
        if function is None or any(name not in parameters for name in passed):
            changed.append(method)
    return changed
