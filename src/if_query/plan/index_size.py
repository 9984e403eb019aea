"""The size and build time of ``if-query index`` for N windows of T tokens, from the shapes (``if-query plan
--documents``): what a row holds, the index on disk, the sketch's FLOPs against the forward and backward pass, and
what a query set's shortlist reads and multiplies."""

from __future__ import annotations

from collections.abc import Sequence

from if_query.plan.sizes import ModelShape, Shape, forward_backward_flops, human_bytes, human_flops

ROW_BYTES = {"float16": 2, "float32": 4}
WINDOW_TOKEN_BYTES = 4  # the index's copy of the windows (int32 token ids; as much again where labels differ)


def row_numbers(shapes: Sequence[Shape], k: int, sketch: str) -> int:
    """Numbers in one window's row: k x k per module (eigen: at most the module's out x in')."""
    if sketch == "eigen":
        return sum(min(k, s.out) * min(k, s.width) for s in shapes)
    return len(shapes) * k * k


def sketch_flops(shapes: Sequence[Shape], tokens: int, k: int, sketch: str, rank: int) -> int:
    """FLOPs of one window's row from its token factors: (T x out)(out x R k), (T x in')(in' x R k), then
    (R k x T)(T x k) (R = 1 for eigen)."""
    r = 1 if sketch == "eigen" else rank
    return sum(2 * tokens * r * k * (s.out + s.width + k) for s in shapes)


def index_lines(shapes: Sequence[Shape], model: ModelShape, windows: int, tokens: int, queries: int, k: int,
                sketch: str, rank: int, row_dtype: str, model_flops_per_s: float | None,
                float32_flops_per_s: float | None, gpus: int) -> list[str]:
    numbers = row_numbers(shapes, k, sketch)
    row = numbers * ROW_BYTES[row_dtype] + 9  # + the squared norm (8) and the done byte
    passes = forward_backward_flops(model, [tokens]) * windows
    sketching = sketch_flops(shapes, tokens, k, sketch, rank) * windows
    shortlist = 2 * queries * numbers * windows
    lines = ["", f"if-query index ({sketch} sketch, k = {k}{f', scaling rank {rank}' if sketch == 'gaussian' else ''},"
             f" rows in {row_dtype}) of {windows} windows of {tokens} tokens:",
             f"  a row: {numbers:,} numbers, {human_bytes(row)}; the index {human_bytes(row * windows)} "
             f"({row / tokens:,.0f} bytes per token) and its copy of the windows "
             f"{human_bytes(WINDOW_TOKEN_BYTES * tokens * windows)}",
             f"  build: the forward and backward passes {human_flops(passes)} + sketches {human_flops(sketching)} "
             f"(+{100 * sketching / passes:.1f}%)"]
    if model_flops_per_s and float32_flops_per_s:
        seconds = (passes / model_flops_per_s + sketching / float32_flops_per_s) / gpus
        lines[-1] += f": {seconds:,.0f} s at the stated peaks" + (f" on {gpus} GPUs" if gpus > 1 else "")
    lines.append(f"  answering {queries} queries: their rows against every row, {human_flops(shortlist)}, reading "
                 f"{human_bytes((row - 1) * windows)} from disk, then their candidates scored exactly "
                 "(run-query --index --candidates M: at most 2 M windows per query)")
    return lines
