"""How much memory this rank may use: host RAM (its share of the host), free device memory, and where a
spill file would really live.

- :func:`host_memory_available`: MemAvailable from ``/proc/meminfo``, read once per run by rank 0
  (:func:`if_query.plan.run_plan.resolve_budgets` divides its share among the ranks on the host: torchrun's
  LOCAL_WORLD_SIZE, so 8 ranks never ask for 4x the host); :func:`host_memory_total`: the physical memory.
- :func:`device_memory_free`: free CUDA memory, counting the caching allocator's reserved-but-unused
  blocks as free (``torch.cuda.mem_get_info`` counts them as used: after one folder about 42 GB stay
  reserved at 13B, and a plan sized from ``mem_get_info`` alone shrank for every later folder).
- :func:`ram_filesystem`: whether a directory is on tmpfs/ramfs, where a "spill" file takes RAM anyway.
- :func:`return_freed_memory_to_the_os`: glibc's mmap threshold fixed, so freed tensors leave the process.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

RAM_FILESYSTEMS = ("tmpfs", "ramfs")
OUT_OF_MEMORY_HINT = ("a smaller --workspace-gb or --score-batch-size (--query-batch-size, --train-batch-size) "
                      "needs less")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def host_memory_available() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or physical memory if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return host_memory_total()


def host_memory_total() -> int:
    """Bytes of physical memory: the same on every rank of a host, whenever it is read."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_free(device: torch.device) -> int:
    """Bytes a new allocation on CUDA ``device`` can take: free memory plus the caching allocator's reserved
    but unallocated blocks (which it hands out before asking the driver for more)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def ram_filesystem(directory: str | Path, mounts: str | None = None) -> str | None:
    """The filesystem type ("tmpfs", "ramfs") when ``directory`` is on one held in RAM, else None.
    ``mounts``: the text of /proc/mounts (read when None; None is returned where there is none)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    path = str(Path(directory).resolve())
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in RAM_FILESYSTEMS else None


def return_freed_memory_to_the_os() -> None:
    """Keep glibc from holding freed tensor buffers in its heap.

    glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which
    tensors of that size come from the heap and freed ones stay in the process: peak RSS grew by
    about a third on the scale benchmark. Fixing the threshold at 128 KB (its initial value) maps
    every large tensor separately and unmaps it when freed (measured: peak RSS 3.5 -> 2.7 GB on
    bench_scale --quick, wall time within noise). No effect off glibc.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc))


def describe_out_of_memory(exc: BaseException) -> str:
    """The allocator's first sentence (e.g. "CUDA out of memory. Tried to allocate 20.00 GiB")."""
    text = " ".join(str(exc).split())
    first = text.split(". GPU", 1)[0].split("; ", 1)[0]
    return first[:160] or type(exc).__name__


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand the CUDA caching allocator's free blocks back (after an out-of-memory error)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
