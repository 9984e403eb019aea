"""run-query under torchrun with a free memory of this rank's own, counting what this rank does.

Launched by tests (``torchrun --nproc_per_node=2 tests/torchrun_probe.py RUN-QUERY ARGS``), not collected by pytest.
Each rank reads another MemAvailable, and another on each read (``PROBE_FREE_BYTES`` x (rank + 1), plus 4 KB per
earlier read); at exit it writes ``PROBE_OUT/rank<r>.json``: its reads of MemAvailable, the sequences it captured
per store and the train rows it scored per engine call. With ``PROBE_FAIL_FIRST_SCORE`` set, rank 0's first engine
call runs out of memory. With ``PROBE_STAGED`` set, the run is planned as on a GPU of 1 TB and copies through the
device path's buffers on the CPU (staged transfers), counting the bytes it moves.
"""

import atexit
import json
import os
import sys
from pathlib import Path

import torch

from if_query.plan import memory
from if_query.score import engine, engine_scorer

RANK = int(os.environ.get("RANK", "0"))
BASE = int(float(os.environ["PROBE_FREE_BYTES"]))
reads, captured, scored = [], [], []


def free_memory() -> int:
    value = BASE * (RANK + 1) + 4096 * len(reads)
    reads.append(value)
    return value


def counting_capture(model, linears, sequences, *args, **kwargs):
    captured.append(len(sequences))
    return capture(model, linears, sequences, *args, **kwargs)


def counting_score(queries, train, *args, **kwargs):
    if RANK == 0 and not scored and os.environ.get("PROBE_FAIL_FIRST_SCORE"):  # rank 0 alone runs out of memory
        scored.append(0)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    scored.append(len(train.indices))
    return score(queries, train, *args, **kwargs)


capture, score = engine_scorer.capture_token_factors, engine.score
memory.host_memory_available = free_memory
engine_scorer.capture_token_factors = counting_capture
engine.score = counting_score
if os.environ.get("PROBE_STAGED"):
    import dataclasses

    class Staged(engine_scorer.Transfers):
        def __init__(self, device, **options):
            super().__init__(device, staged=True, **options)

    context = engine_scorer.EngineScorer.context
    engine_scorer.Transfers = Staged
    engine_scorer.EngineScorer.context = lambda self: dataclasses.replace(context(self), device_type="cuda",
                                                                          device_limit=10**12)
atexit.register(lambda: (Path(os.environ["PROBE_OUT"]) / f"rank{RANK}.json").write_text(
    json.dumps({"reads": reads, "captured": captured, "scored": scored})))

from if_query.cli import run_query_app  # noqa: E402

sys.argv = ["run-query", *sys.argv[1:]]
run_query_app()
