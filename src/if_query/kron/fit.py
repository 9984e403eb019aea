"""Kronfluence's extension point (the task), the prepared model, the analyzer and the covariance and
eigendecomposition stages of fit-hessians (the lambda stage: :mod:`if_query.fit.lambda_stage`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments
from kronfluence.factor.config import FactorConfig
from kronfluence.factor.covariance import covariance_matrices_exist
from kronfluence.factor.eigen import eigendecomposition_exist, lambda_matrices_exist
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import nn

from if_query.data.tokenization import Collator, TokenizedExample
from if_query.distributed import check_launch, start_data_parallel
from if_query.kron.factors import FACTORS_NAME
from if_query.model import loss, sampling


class CompletionLossTask(Task):
    """Training loss and measurement are both the summed cross-entropy over completion tokens.

    For the true Fisher (``sample=True``) the labels come from :func:`if_query.model.sampling.sample_labels` under the
    current ``stage`` (set by the fitting code with :meth:`set_stage` before each stage) and ``seed``.
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
            labels = sampling.sample_labels(logits, labels, batch, self.stage, self.seed)
        return loss.summed_token_losses(logits, labels).sum()

    def compute_measurement(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.tracked_modules

    def get_attention_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]


def wrap_tracked_modules(model: nn.Module, task: CompletionLossTask) -> nn.Module:
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


def factor_arguments(strategy: str, empirical_fisher: bool, module_partitions: int,
                     eigendecomposition_dtype: torch.dtype) -> FactorArguments:
    """Kronfluence's factor arguments of a fit (the same for every stage)."""
    return FactorArguments(
        strategy=strategy,
        use_empirical_fisher=empirical_fisher,
        covariance_max_examples=None,
        lambda_max_examples=None,
        covariance_module_partitions=module_partitions,
        lambda_module_partitions=module_partitions,
        eigendecomposition_dtype=eigendecomposition_dtype,
    )


def fit_covariances(analyzer: Analyzer, examples: Sequence[TokenizedExample], batch_size: int,
                    collate: Collator, arguments: FactorArguments) -> None:
    """Kronfluence's covariance stage over ``examples`` (skipped when its files exist)."""
    analyzer.fit_covariance_matrices(FACTORS_NAME, list(examples), per_device_batch_size=batch_size,
                                     dataloader_kwargs=DataLoaderKwargs(collate_fn=collate), factor_args=arguments)


def fit_eigendecomposition(analyzer: Analyzer, arguments: FactorArguments) -> None:
    """Kronfluence's eigendecomposition stage (skipped when its files exist)."""
    analyzer.perform_eigendecomposition(FACTORS_NAME, factor_args=arguments)


def stage_done(directory: Path, stage: str, strategy: str) -> bool:
    """Whether fit stage ``stage`` (covariance, eigendecomposition, lambda) has nothing left to do in the factors
    directory ``directory``: ``strategy`` does not need it, or its files are there (Kronfluence then skips it)."""
    config = FactorConfig.CONFIGS[strategy]
    needed, exists = {
        "covariance": (config.requires_covariance_matrices, covariance_matrices_exist),
        "eigendecomposition": (config.requires_eigendecomposition, eigendecomposition_exist),
        "lambda": (config.requires_lambda_matrices, lambda_matrices_exist),
    }[stage]
    return not needed or exists(output_dir=directory)
