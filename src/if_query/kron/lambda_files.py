"""What if-query's lambda stage (:mod:`if_query.fit.lambda_stage`) needs to write Kronfluence's lambda files
(conventions: :mod:`if_query.kron`, "The lambda stage's files")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from kronfluence.factor.config import FactorConfig
from kronfluence.factor.eigen import eigendecomposition_exist, lambda_matrices_exist, lambda_matrices_save_path
from kronfluence.module.tracked_module import TrackedModule
from kronfluence.module.utils import get_tracked_module_names, make_modules_partition
from safetensors.torch import load_file, save_file
from torch import nn

from if_query.atomic import shareable, staged_files
from if_query.errors import RunError
from if_query.kron.constants import LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED

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


def _save_atomic(directory: Path, files: dict[str, dict[str, torch.Tensor]], metadata: dict | None) -> None:
    """Write {path: tensors} safetensors files, each beside its name then renamed into place (the
    ``num_lambda_processed`` file first: the stage counts as done only once both exist)."""
    names = sorted(files, key=lambda path: path.name.startswith(LAMBDA_MATRIX_NAME))
    with staged_files(directory, [path.name for path in names]) as temporaries:
        for path, temporary in zip(names, temporaries, strict=True):
            save_file(tensors=files[path], filename=str(temporary), metadata=metadata)
            shareable(temporary)  # safetensors' writer creates the file private (0600)


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
