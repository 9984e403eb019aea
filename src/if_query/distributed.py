"""torchrun support: which rank this is, its device, and the process groups (torch is imported only when they are
used: the command line reads the rank before torch is loaded).

- fit-hessians (Kronfluence's covariance stage, if-query's lambda stage) and ``run-query --engine
  kronfluence`` are data parallel (NCCL, CUDA only): each rank takes its share of the examples, sums
  are reduced onto rank 0, which writes and prints. :func:`start_data_parallel` starts the NCCL group
  before Kronfluence's ``State`` would (it reuses an initialised group): with the rank's GPU set, its
  ``device_id`` bound and a long timeout, because in the eigendecomposition stage rank 0 alone works
  (every ``eigh`` and about 52 GB of files at 13B, stride 2) while the others wait in a barrier, and
  NCCL's default 10 minutes would abort them, and with them the fit.
- ``run-query`` with the default engine follows the run's plan (:mod:`if_query.plan.run_plan`), which rank 0
  makes and :func:`broadcast` sends: a job with two or more chunks is split across the ranks (rounds of
  :func:`gather`), the others are shared out; every rank gathers the outcomes at the end (gloo, so this also
  runs on CPU).

torchrun stops every rank as soon as one fails, so a long timeout never keeps a crashed run alive: it
only stops cutting off ranks that wait for a slow one.
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING

from if_query.errors import InputError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
# How long a rank may wait for the others: folder-sharding ranks meet only at the end (one may wait there for
# hours while another scores its last folder); data-parallel ranks wait while rank 0 eigendecomposes and writes.
PROCESS_GROUP_TIMEOUT = timedelta(days=7)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this host (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun): they share its RAM."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its own GPU (``cuda:LOCAL_RANK``) when there is CUDA, else the CPU."""
    import torch

    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def start_data_parallel() -> None:
    """Under torchrun on CUDA: pin this rank to its GPU and start the NCCL group Kronfluence will use, with
    ``PROCESS_GROUP_TIMEOUT`` instead of NCCL's 10 minutes (see the module docstring). A no-op otherwise
    (one process, CPU, or a group already started)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized() or not torch.cuda.is_available():
        return
    gpu = device()
    torch.cuda.set_device(gpu)
    dist.init_process_group(backend="nccl", timeout=PROCESS_GROUP_TIMEOUT, device_id=gpu)


def check_launch() -> None:
    """Refuse a multi-process Kronfluence launch without CUDA: every rank would compute and write everything."""
    import torch

    if world_size() > 1 and not torch.cuda.is_available():
        raise InputError(
            f"launched with {world_size()} processes but no CUDA GPU: Kronfluence's distributed path "
            "uses NCCL; run a single process on CPU"
        )


def start_folder_sharding() -> None:
    """Under torchrun: pin this rank to its GPU (if any) and join the group the plan's broadcast, split jobs'
    rounds and the final gather use (gloo, so this also runs on CPU)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    atexit.register(_stop_group)


def _stop_group() -> None:
    """Tear the group down before the interpreter does, once every rank is there: a gloo group left to the
    interpreter's shutdown, or torn down while another rank still receives, can abort the process ("terminate called
    without an active exception", seen on a rank that finished first, and on rank 0 after a split job)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:  # every rank at its exit before any closes its connections (a rank that failed: one minute at most)
            dist.monitored_barrier(timeout=timedelta(minutes=1))
        except RuntimeError:
            pass
        dist.destroy_process_group()


def gather(value: object) -> list[object]:
    """Every rank's ``value``, in rank order (just ``[value]`` without torchrun)."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    values: list[object] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (just ``value`` without torchrun)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]
