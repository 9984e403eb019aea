"""torchrun support: Kronfluence's multi-process path (NCCL, CUDA only); rank 0 alone writes and prints."""

from __future__ import annotations

import os

import torch

from if_query.errors import InputError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_launch() -> None:
    """Refuse a multi-process launch without CUDA: every rank would compute and write everything."""
    if world_size() > 1 and not torch.cuda.is_available():
        raise InputError(
            f"launched with {world_size()} processes but no CUDA GPU: Kronfluence's distributed path "
            "uses NCCL; run a single process on CPU"
        )
