"""What every benchmark shares: where results go, JSON files, and the float32 matmul peak FLOPs are compared with.

The benchmarks are scripts (``uv run python benchmarks/NAME.py``): Python puts this folder first on ``sys.path``,
so ``import common`` (and one benchmark importing another's model builder) needs no path juggling.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def dump(value: Any, path: Path) -> None:
    """``value`` as indented JSON (UTF-8, non-ASCII kept), the parent folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_results(name: str, report: str, data: Any) -> Path:
    """A benchmark's report and its numbers: ``results/NAME.md`` and ``results/NAME.json``; the report's path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(report.rstrip("\n") + "\n", encoding="utf-8")
    dump(data, RESULTS / f"{name}.json")
    return path


def matmul_peak(repeats: int = 5, n: int = 2048, threads: int | None = None) -> float:
    """FLOP/s of the best of ``repeats`` float32 (n, n) @ (n, n) products (after one warm-up), with ``threads``
    torch threads (default: the current setting): the peak the benchmarks' FLOP counts are compared with."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(default)
    return 2 * n**3 / best


def add_model_arguments(parser, layers: int, hidden: int, mlp: int, heads: int, layer_stride: int | None = 2) -> None:
    """The random OLMo-2's shape options (bench_scale.build_model reads them), with this benchmark's defaults."""
    parser.add_argument("--layers", type=int, default=layers, help="decoder blocks")
    parser.add_argument("--hidden", type=int, default=hidden, help="hidden size")
    parser.add_argument("--mlp", type=int, default=mlp, help="MLP intermediate size")
    parser.add_argument("--heads", type=int, default=heads, help="attention heads")
    if layer_stride is not None:
        parser.add_argument("--layer-stride", type=int, default=layer_stride, help="track every Nth block's MLP")


def add_fit_and_score_arguments(parser, examples: int = 24, queries: int = 8, train: int = 16) -> None:
    """How many fitting sequences, queries and train examples a fit-then-score benchmark builds."""
    parser.add_argument("--examples", type=int, default=examples, help="fitting sequences")
    parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--train", type=int, default=train)
