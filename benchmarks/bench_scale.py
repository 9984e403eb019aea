"""Scale benchmark: exact scores of a large-model-shaped folder, side by side with Kronfluence's paths.

    uv run python benchmarks/bench_scale.py                      # default engine + rank-32 recipe (~25 min)
    uv run python benchmarks/bench_scale.py --approaches default  # the default engine alone (~3 min)
    uv run python benchmarks/bench_scale.py --with-exact-kronfluence   # + Kronfluence exact (~20 min more)
    uv run python benchmarks/bench_scale.py --quick               # 12 contexts, smaller model (~3 min)

Workload. A randomly initialised OLMo-2 shaped so that the memory ratios of OLMo-2-13B on one GPU hold
on a 2-core, 24 GB machine: 16 blocks, hidden 1024, MLP 2816, 16 heads, a word-level vocabulary of
about 4k tokens (207 M parameters), ``--layer-stride 2`` (24 tracked projections, 69 M tracked
weights: a 48-example folder's dense per-example gradients are 13 GB). One folder of ``--contexts``
(48) prompt/completion records of 150-250 tokens, train.json = query.json. EK-FAC factors are fitted
once with the real fit-hessians (on 16 of the records: fitting is not what is measured here) and
cached in ``--workdir``.

Approaches (each a subprocess of the real run-query CLI, single-run mode, ``--score-batch-size 4``):
    default            if-query's engine (token factors, exact).
    default-spill      the same with ``--host-memory-gb 0``: token factors in a memory-mapped spill file.
    default-blocks     the same with ``--workspace-gb 0.1``: whitened gradients in blocks of 4 queries.
    kronfluence-rank32 ``--engine kronfluence --query-rank 32``: the README's former 13B recipe.
    kronfluence-exact  ``--engine kronfluence`` (exact streaming path; only with --with-exact-kronfluence).
Each records wall time, peak RSS (``ru_maxrss`` of the process) and its influence scores; errors
are max |score - exact| / max |exact|, where "exact" is kronfluence-exact when it ran, else default.

FLOP accounting (useful work for one folder; N distinct sequences, T_n tokens each; per tracked
module i = in + 1 (bias column, absent for OLMo-2: i = in), o = out; P = matmul weights):
    forward + backward  4 P T_n + 6 L T_n^2 d   (backward computes input gradients only: weights are frozen)
    rotations           2 T_n (i^2 + o^2) per module     (token vectors into the eigenbasis)
    whitened gradient   2 T_n o i per module
    Gram                2 N^2 o i per module
Peak: best float32 2048^3 matmul of this process, measured before and after the runs.
Results: printed and written to benchmarks/results/bench_scale.md and .json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    RUN_QUERY_WITH_RSS,
    add_model_arguments,
    build_olmo2,
    fit_hessians_cli,
    long_prompt_records,
    matmul_peak,
    model_shape,
    olmo2_forward_backward_flops,
    synthetic_words,
    write_results,
)

APPROACHES = {
    "default": [],
    "default-spill": ["--host-memory-gb", "0"],  # token factors in a memory-mapped file instead of RAM
    "default-blocks": ["--workspace-gb", "0.1"],  # blocks of 4 gradients: columns formed again per block
    "kronfluence-rank32": ["--engine", "kronfluence", "--query-rank", "32"],
    "kronfluence-exact": ["--engine", "kronfluence"],
}


def run(work: Path, name: str, common: list[str]) -> dict:
    out = work / f"out-{name}"
    rss_file = work / f"rss-{name}.txt"
    env = {**os.environ, "IFQ_RSS_FILE": str(rss_file), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-c", RUN_QUERY_WITH_RSS, *common, "--output-dir", str(out), *APPROACHES[name]]
    print(f"[bench_scale] {name}: {' '.join(APPROACHES[name]) or '(defaults)'}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = {"name": name, "wall_s": wall, "returncode": completed.returncode,
              "stderr_tail": completed.stderr[-2000:]}
    if rss_file.exists():
        result["peak_rss_gb"] = int(rss_file.read_text()) / 1024**2
    if completed.returncode == 0:
        import pandas as pd

        frame = pd.read_csv(out / "influences.csv")
        result["scores"] = frame["influence_score"].tolist()
        result["plan"] = [line for line in completed.stderr.splitlines() if line.startswith("Plan:")]
    return result


def flops(lengths: list[int], args: argparse.Namespace) -> dict[str, float]:
    d, f = args.hidden, args.mlp
    tracked = [(f, d), (f, d), (d, f)] * len(range(0, args.layers, args.layer_stride))  # (out, in), no bias
    n = len(lengths)
    total_t = sum(lengths)
    return {
        "forward_backward": olmo2_forward_backward_flops(lengths, args),
        "rotations": sum(2 * total_t * (i * i + o * o) for o, i in tracked),
        "whitened": sum(2 * total_t * o * i for o, i in tracked),
        "gram": sum(2 * n * n * o * i for o, i in tracked),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/if-query-bench-scale"))
    parser.add_argument("--contexts", type=int, default=48)
    add_model_arguments(parser, layers=16, hidden=1024, mlp=2816, heads=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--approaches", nargs="+", default=["default", "kronfluence-rank32"],
                        choices=list(APPROACHES))
    parser.add_argument("--with-exact-kronfluence", action="store_true")
    parser.add_argument("--quick", action="store_true", help="12 contexts, 8 blocks (about 3 minutes)")
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.layers = 12, 8
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    if args.with_exact_kronfluence and "kronfluence-exact" not in args.approaches:
        args.approaches.append("kronfluence-exact")
    return args


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, list[dict]]:
    """The model, one folder (train = query), EK-FAC factors fitted on 16 of its records (cached in ``work``)."""
    words = synthetic_words(2000, args.seed)
    model = work / "model"
    build_olmo2(model, words, **model_shape(args), seed=args.seed)
    records = long_prompt_records(words, args.contexts, random.Random(args.seed + 1))
    folder = work / "folder"
    folder.mkdir(exist_ok=True)
    for name in ("train.json", "query.json"):
        (folder / name).write_text(json.dumps(records))
    fit_data = work / "fit.json"
    fit_data.write_text(json.dumps(records[:16]))
    factors = work / "factors"
    if not (factors / "metadata.json").exists() or '"complete"' not in (factors / "metadata.json").read_text():
        print("[bench_scale] fitting EK-FAC factors (once; cached in the workdir)", file=sys.stderr, flush=True)
        fit_start = time.perf_counter()
        fit_hessians_cli(model, fit_data, factors, args.layer_stride)
        print(f"[bench_scale] fit: {time.perf_counter() - fit_start:.0f} s", file=sys.stderr)
    return model, folder, factors, records


def report(args: argparse.Namespace, results: dict, lengths: list[int], peak: float) -> tuple[str, dict]:
    """The markdown table (errors against the exact reference) and the FLOP counts."""
    exact_name = "kronfluence-exact" if results.get("kronfluence-exact", {}).get("scores") else "default"
    exact = np.array(results[exact_name]["scores"]) if results.get(exact_name, {}).get("scores") else None
    work_flops = flops(lengths, args)
    useful = sum(work_flops.values())
    lines = [
        f"# bench_scale ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Model: random OLMo-2, {args.layers} blocks, hidden {args.hidden}, MLP {args.mlp}, stride "
        f"{args.layer_stride}. Folder: {len(lengths)} contexts (train = query), {min(lengths)}-{max(lengths)} "
        f"tokens, {sum(lengths)} in all. Peak float32 matmul: {peak / 1e9:.0f} GFLOP/s.",
        f"Useful work: {useful / 1e12:.2f} TFLOP (forward+backward {work_flops['forward_backward'] / 1e12:.2f}, "
        f"rotations {work_flops['rotations'] / 1e12:.2f}, whitened gradients {work_flops['whitened'] / 1e12:.2f},"
        f" Gram {work_flops['gram'] / 1e12:.2f}); at peak: {useful / peak:.0f} s.",
        "",
        "| approach | wall s | peak RSS GB | max rel. error vs exact | useful FLOP/s, % of peak |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        error = "failed" if result["returncode"] else "-"
        if exact is not None and result.get("scores"):
            scores = np.array(result["scores"])
            error = f"{np.abs(scores - exact).max() / np.abs(exact).max():.2e}"
            if name == exact_name:
                error = "(reference)"
        rate = useful / result["wall_s"]
        lines.append(f"| {name} | {result['wall_s']:.0f} | {result.get('peak_rss_gb', float('nan')):.1f} | {error} "
                     f"| {rate / 1e9:.0f} GFLOP/s, {100 * rate / peak:.0f}% |")
    for result in results.values():
        if result["returncode"]:
            lines.append(f"\n{result['name']} failed:\n```\n{result['stderr_tail']}\n```")
        for plan in result.get("plan", []):
            lines.append(f"\n{result['name']}: {plan}")
    return "\n".join(lines), work_flops


def main() -> None:
    args = parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model, folder, factors, records = prepare(args, work)

    from transformers import AutoTokenizer

    from if_query.data.records import Example
    from if_query.data.tokenization import ExampleTokenizer

    tokenizer = ExampleTokenizer(AutoTokenizer.from_pretrained(model), 512)
    lengths = [len(tokenizer(Example(r["pair_id"], r["prompt"], r["completion"]))) for r in records]
    peak_before = matmul_peak()
    common = ["--model", str(model), "--factors-dir", str(factors), "--train-json", str(folder / "train.json"),
              "--query-json", str(folder / "query.json"), "--score-batch-size", "4"]
    results = {name: run(work, name, common) for name in args.approaches}
    peak = max(peak_before, matmul_peak())
    text, work_flops = report(args, results, lengths, peak)
    print(text)
    write_results("bench_scale", text, {
        "args": {k: str(v) for k, v in vars(args).items()}, "lengths": lengths, "peak_flops": peak,
        "flops": work_flops, "results": {k: {kk: vv for kk, vv in v.items() if kk != "scores"}
                                          for k, v in results.items()}})


if __name__ == "__main__":
    main()
