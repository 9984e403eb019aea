"""torchrun support.

- fit-hessians (Kronfluence's covariance stage, if-query's lambda stage) and ``run-query --engine
  kronfluence`` are data parallel (NCCL, CUDA only): each rank takes its share of the examples, sums
  are reduced onto rank 0, which writes and prints.
- ``run-query`` with the default engine shards *folders*: rank r scores folders r, r + N, ...,
  each on its own device, and writes their results itself; a single folder is scored by rank 0
  alone. Ranks exchange nothing but a final summary of outcomes (gloo, so this also runs on CPU).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from if_query.errors import InputError

logger = logging.getLogger(__name__)
# Ranks meet only at the end; one may wait there for hours while another scores its last folder.
GATHER_TIMEOUT = timedelta(days=7)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_rank() -> bool:
    return rank() == 0


def check_launch() -> None:
    """Refuse a multi-process Kronfluence launch without CUDA: every rank would compute and write everything."""
    if world_size() > 1 and not torch.cuda.is_available():
        raise InputError(
            f"launched with {world_size()} processes but no CUDA GPU: Kronfluence's distributed path "
            "uses NCCL; run a single process on CPU"
        )


def folder_shard(count: int) -> list[int]:
    """Indices of the folders (of ``count``) this rank scores; one folder goes to rank 0 alone."""
    if world_size() == 1:
        return list(range(count))
    if count == 1:
        if rank() != 0:
            logger.info("rank %d: a single folder is scored by rank 0 alone", rank())
        return [0] if rank() == 0 else []
    return list(range(rank(), count, world_size()))


def start_folder_sharding() -> None:
    """Under torchrun: pin this rank to its GPU (if any) and join the group used for the final gather."""
    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)


def gather(value: object) -> list[object]:
    """Every rank's ``value``, in rank order (just ``[value]`` without torchrun)."""
    if world_size() == 1:
        return [value]
    values: list[object] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
