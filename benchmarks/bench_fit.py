"""Fit benchmark: fit-hessians' stages, bare Kronfluence's lambda stage against if-query's, and what a float32
eigendecomposition does to the scores.

    uv run python benchmarks/bench_fit.py                    # 16 blocks, 24 sequences (12 min quiet, 30 busy)
    uv run python benchmarks/bench_fit.py --full-seed-noise  # + a whole second fit with another seed (+15 min)
    uv run python benchmarks/bench_fit.py --quick            # 4 blocks, 8 sequences (about 5 min)

Workload. bench_scale.py's model (its ``build_model``: a random OLMo-2, 16 blocks, hidden 1024, MLP 2816,
16 heads, a word-level vocabulary of about 4k tokens), ``--layer-stride 2`` (24 tracked projections: gate
and up 2816 x 1024, down 1024 x 2816, no bias), EK-FAC, true Fisher, ``--examples`` (24) prompt/completion
records of 150-250 tokens, batches of 4 in both passes (fit-hessians' length-sorted, dynamically padded
order).

Runs (one process; each stage is timed around the very call fit-hessians makes; setup is not timed; the seed-0
stages run ``--repeats`` (2) times, the two eigendecompositions and the two lambda stages alternately, and the
fastest run of each is reported, since the machine may be shared):
    seed 0     covariance (Kronfluence) -> eigendecomposition float64 (Kronfluence) -> lambda twice on copies
               of the same eigenvectors: Kronfluence's ``fit_lambda_matrices`` (what fit-hessians ran before)
               and if-query's ``lambda_stage.fit_lambda_matrices`` (what it runs now). Their lambdas are
               compared (max |difference| / max |Kronfluence's|, worst module).
    float32    eigendecomposition in float32 of the same seed-0 covariances, then if-query's lambda.
    noise      the fit's own noise, the yardstick for the float32 eigendecomposition's effect: if-query's lambda
               again on the seed-0 float64 eigenvectors with label-sampling seed 1 (lambda's noise alone: a
               lower bound of the fit's), and with ``--full-seed-noise`` the whole fit with seed 1 (float64).
Scores. ``--queries`` (8) query and ``--train`` (16) train records (other records, same shape) are scored
with if-query's engine (exact, damping auto) against each fit; each pair of fits is compared by max |score
difference| / max |score|, the mean Spearman correlation of each query's train ranking, and the mean overlap
of each query's top 5. The float32 eigendecomposition is called safe when on every one of these measures
its distance to float64 is at most a tenth of the smallest seed-to-seed distance measured.

FLOP accounting (useful work; per example of T tokens; per tracked module o = out, i = in (+1 with a bias);
P = matmul weights of the blocks; the LM head runs at the few labelled positions only):
    forward + backward   4 P T + 6 L T^2 d   (weights frozen: activation gradients only)
    covariance           2 T (i^2 + o^2) per module
    eigendecomposition   9 (i^3 + o^3) per module (symmetric eigensolver with eigenvectors; an estimate)
    lambda, Kronfluence  2 T o i (per-example gradient) + 2 o i (o + i) (rotating it: Q_g^T G Q_a)
    lambda, if-query     2 T o i + min(2 T (o^2 + i^2), 2 o i (o + i)) (rotate the token vectors when cheaper)
Within each lambda stage, the time spent in its lambda work (Kronfluence: ``compute_per_sample_gradient`` and
``_update_lambda_matrix``; if-query: ``_Accumulator.add``) is timed separately; the rest is the forward and
backward pass. Peak: best float32 2048^3 matmul, before and after. Load average is recorded per stage: the
machine may be shared. Results: printed and written to benchmarks/results/bench_fit.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_query import synthetic_words  # noqa: E402
from bench_scale import build_model, make_records  # noqa: E402
from common import add_fit_and_score_arguments, add_model_arguments, matmul_peak, write_results  # noqa: E402


class Timers:
    """Accumulated wall time of wrapped functions."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def wrap(self, owner, attribute: str, key: str):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, timed)
        try:
            yield
        finally:
            setattr(owner, attribute, original)


def stage(results: dict, name: str, call, timers: Timers) -> float:
    """Run and time ``call``; ``results[name]`` lists every run (seconds, load average, timed work inside)."""
    load = os.getloadavg()[0]
    print(f"[bench_fit] {name} ...", file=sys.stderr, flush=True)
    before = dict(timers.seconds)
    start, cpu = time.perf_counter(), time.process_time()
    call()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    work = {key: value - before.get(key, 0.0) for key, value in timers.seconds.items() if value != before.get(key)}
    results.setdefault(name, []).append({"s": seconds, "cpu_s": cpu, "load_before": load,
                                         "load_after": os.getloadavg()[0],
                                         "work_s": sum(work.values())})
    print(f"[bench_fit] {name}: {seconds:.1f} s, CPU {cpu:.1f} s (load {load:.1f} -> {os.getloadavg()[0]:.1f})",
          file=sys.stderr, flush=True)
    return seconds


def best(results: dict, name: str) -> dict:
    """The fastest run of a stage (the machine is shared: the least disturbed one)."""
    return min(results[name], key=lambda run: run["s"])


def eigh_timings(sizes: list[int], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of torch.linalg.eigh on a random covariance of each size, float64 and
    float32 interleaved (so both see the same machine load)."""
    seconds: dict[str, float] = {}
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        x = torch.randn(n, 2 * n, generator=generator)
        covariance = (x @ x.T / (2 * n)).double()
        for _ in range(repeats):
            for dtype in (torch.float64, torch.float32):
                matrix = covariance.to(dtype)
                start = time.perf_counter()
                torch.linalg.eigh(matrix)
                key = f"{n} {str(dtype).removeprefix('torch.')}"
                seconds[key] = min(seconds.get(key, float("inf")), time.perf_counter() - start)
    return seconds


def copy_factors(source: Path, target: Path, keep=lambda name: True) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    (target / "factors_hessian").mkdir(parents=True)
    for path in (source / "factors_hessian").iterdir():
        if keep(path.name):
            shutil.copy2(path, target / "factors_hessian" / path.name)
    return target


def flops(lengths: list[int], tracked: list[tuple[int, int]], args) -> dict[str, float]:
    from if_query.lambda_stage import lambda_flops

    d, f, layers = args.hidden, args.mlp, args.layers
    weights = layers * (4 * d * d + 3 * d * f)
    ours = kronfluence = 0
    for t in lengths:
        for o, i in tracked:
            mine, theirs = lambda_flops(t, o, i, rotated=True)
            ours, kronfluence = ours + mine, kronfluence + theirs
    return {
        "forward_backward": sum(4 * weights * t + 6 * layers * t * t * d for t in lengths),
        "covariance": sum(2 * t * (i * i + o * o) for t in lengths for o, i in tracked),
        "eigendecomposition": sum(9 * (i**3 + o**3) for o, i in tracked),
        "lambda_kronfluence": kronfluence,
        "lambda_ifquery": ours,
        "rotations_kronfluence": sum(2 * o * i * (o + i) for _ in lengths for o, i in tracked),
        "rotations_ifquery": sum(min(2 * t * (o * o + i * i), 2 * o * i * (o + i)) for t in lengths
                                 for o, i in tracked),
    }


def ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort(dim=-1).argsort(dim=-1).double()


def compare(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Distance of ``scores`` (queries, train) from ``reference``."""
    a, b = ranks(scores), ranks(reference)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    spearman = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))
    k = min(5, scores.shape[1])
    top = [len(set(x.tolist()) & set(y.tolist())) / k
           for x, y in zip(scores.topk(k, dim=1).indices, reference.topk(k, dim=1).indices, strict=True)]
    return {"max_rel_error": float((scores - reference).abs().max() / reference.abs().max()),
            "spearman_mean": float(spearman.mean()), "spearman_min": float(spearman.min()),
            "top5_overlap": sum(top) / len(top)}


def lambda_error(directory: Path, reference: Path) -> float:
    from safetensors.torch import load_file

    ours = load_file(directory / "factors_hessian" / "lambda_matrix.safetensors")
    theirs = load_file(reference / "factors_hessian" / "lambda_matrix.safetensors")
    assert set(ours) == set(theirs)
    return max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/if-query-bench-fit"))
    add_fit_and_score_arguments(parser)
    add_model_arguments(parser, layers=16, hidden=1024, mlp=2816, heads=16)
    parser.add_argument("--batch-size", type=int, default=4, help="covariance and lambda batch size")
    parser.add_argument("--seed", type=int, default=0, help="model and records")
    parser.add_argument("--full-seed-noise", action="store_true",
                        help="also refit everything with seed 1 (float64 and float32 eigendecompositions)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each seed-0 stage (compared ones alternately; the fastest is reported)")
    parser.add_argument("--eigh-repeats", type=int, default=2, help="runs of each eigh size and dtype")
    parser.add_argument("--quick", action="store_true", help="4 blocks, 8 sequences, 4 x 8 scored (about 5 min)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.examples, args.queries, args.train, args.repeats = 4, 8, 4, 8, 1
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")

    from kronfluence.module.linear import TrackedLinear
    from kronfluence.module.tracker.factor import LambdaTracker
    from kronfluence.utils.dataset import DataLoaderKwargs

    from if_query import engine, lambda_stage
    from if_query.capture import TokenFactorStore, capture_token_factors
    from if_query.config import FitConfig
    from if_query.hessian_data import load_hessian_examples
    from if_query.kron.factors import FACTORS_NAME, HessianFactors
    from if_query.kron.fit import CompletionLossTask, factor_arguments, make_analyzer, wrap_tracked_modules
    from if_query.kron.lambda_files import tracked_linears
    from if_query.modeling import find_mlp_modules, load_model, load_tokenizer, make_trackable
    from if_query.tokenization import Collator, ExampleTokenizer

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    words = synthetic_words(2000, args.seed)
    model_dir = work / f"model-{args.layers}"
    build_model(model_dir, words, args)
    records = make_records(words, args.examples + args.queries + args.train, random.Random(args.seed + 1))
    fit_json = work / "fit.json"
    fit_json.write_text(json.dumps(records[: args.examples]))
    scored = records[args.examples :]

    # --- the setup fit-hessians does (not timed) ---
    tokenizer = load_tokenizer(str(model_dir))
    example_tokenizer = ExampleTokenizer(tokenizer, 512)
    ordered = sorted(load_hessian_examples(str(fit_json), example_tokenizer, None), key=len)
    lengths = [len(e) for e in ordered]
    model = load_model(str(model_dir), None, torch.float32)
    modules = find_mlp_modules(model, args.layer_stride)
    model = make_trackable(model, modules)
    task = CompletionLossTask([m.name for m in modules], seed=0)
    model = wrap_tracked_modules(model, task)
    collate = Collator(tokenizer.pad_token_id)
    loader_kwargs = DataLoaderKwargs(collate_fn=collate)
    config = FitConfig(model=str(model_dir), hessian_dataset=str(fit_json), output_dir="", strategy="ekfac",
                       layer_stride=args.layer_stride, factor_batch_size=args.batch_size,
                       lambda_batch_size=args.batch_size)
    arguments = factor_arguments(config.strategy, config.fisher == "empirical", config.module_partitions,
                                 getattr(torch, config.eigendecomposition_dtype))
    arguments32 = replace(arguments, eigendecomposition_dtype=torch.float32)
    tracked = [(m.out_features, m.in_features + int(m.bias)) for m in modules]
    batch = args.batch_size
    print(f"[bench_fit] {len(ordered)} sequences, {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all); "
          f"{len(modules)} tracked modules", file=sys.stderr, flush=True)

    peak = matmul_peak()
    stages: dict[str, dict] = {}
    timers = Timers()
    runs = work / "runs"

    def analyzer_for(directory: Path):
        return make_analyzer(directory, model, task, quiet=True)

    def covariance(directory: Path, seed: int):
        task.seed = seed
        task.set_stage("covariance")
        analyzer_for(directory).fit_covariance_matrices(FACTORS_NAME, ordered, per_device_batch_size=batch,
                                                        dataloader_kwargs=loader_kwargs, factor_args=arguments)

    def eigendecomposition(directory: Path, factor_args):
        analyzer_for(directory).perform_eigendecomposition(FACTORS_NAME, factor_args=factor_args)

    def ifquery_lambda(directory: Path, seed: int, factor_args, prefix: str):
        task.seed = seed
        task.set_stage("lambda")
        with timers.wrap(lambda_stage._Accumulator, "add", f"{prefix}: lambda work"):  # noqa: SLF001
            lambda_stage.fit_lambda_matrices(analyzer_for(directory), model, FACTORS_NAME, ordered, batch, collate,
                                             factor_args, seed=seed, quiet=True)

    def kronfluence_lambda(directory: Path, seed: int):
        task.seed = seed
        task.set_stage("lambda")
        with timers.wrap(LambdaTracker, "_update_lambda_matrix", "kronfluence: lambda work"), \
                timers.wrap(TrackedLinear, "compute_per_sample_gradient", "kronfluence: lambda work"):
            analyzer_for(directory).fit_lambda_matrices(FACTORS_NAME, ordered, per_device_batch_size=batch,
                                                        dataloader_kwargs=loader_kwargs, factor_args=arguments)

    seed0 = runs / "seed0-float64"
    shutil.rmtree(runs, ignore_errors=True)
    covariances = runs / "seed0-covariance"
    for _ in range(args.repeats):  # every stage runs --repeats times, alternating where two are compared
        shutil.rmtree(covariances, ignore_errors=True)
        stage(stages, "covariance", lambda: covariance(covariances, 0), timers)
    float32 = runs / "seed0-float32"
    for _ in range(args.repeats):
        copy_factors(covariances, seed0)
        stage(stages, "eigendecomposition float64", lambda: eigendecomposition(seed0, arguments), timers)
        copy_factors(covariances, float32, keep=lambda name: "covariance" in name)  # float32 factor arguments
        stage(stages, "eigendecomposition float32", lambda: eigendecomposition(float32, arguments32), timers)
    eigenvectors = copy_factors(seed0, runs / "seed0-float64-eigenvectors")
    kron_dir = runs / "seed0-float64-kronfluence-lambda"
    for _ in range(args.repeats):  # alternately, so that both see the same load
        copy_factors(eigenvectors, kron_dir)
        stage(stages, "lambda, Kronfluence", lambda: kronfluence_lambda(kron_dir, 0), timers)
        copy_factors(eigenvectors, seed0)
        stage(stages, "lambda, if-query", lambda: ifquery_lambda(seed0, 0, arguments, "if-query"), timers)
    error = lambda_error(seed0, kron_dir)
    stage(stages, "lambda, if-query (float32 eigenvectors)",
          lambda: ifquery_lambda(float32, 0, arguments32, "if-query float32"), timers)
    lambda1 = copy_factors(eigenvectors, runs / "seed0-float64-lambda-seed1")
    stage(stages, "noise: lambda, if-query, seed 1",
          lambda: ifquery_lambda(lambda1, 1, arguments, "lambda seed 1"), timers)
    fits = {"seed 0, float64, Kronfluence lambda": kron_dir, "seed 0, float64": seed0, "seed 0, float32": float32,
            "lambda seed 1": lambda1}
    if args.full_seed_noise:
        seed1 = runs / "seed1-float64"
        stage(stages, "seed 1: covariance", lambda: covariance(seed1, 1), timers)
        seed1_float32 = copy_factors(seed1, runs / "seed1-float32", keep=lambda name: "covariance" in name)
        stage(stages, "eigendecomposition float64", lambda: eigendecomposition(seed1, arguments), timers)
        stage(stages, "seed 1: lambda, if-query", lambda: ifquery_lambda(seed1, 1, arguments, "seed 1"), timers)
        stage(stages, "eigendecomposition float32", lambda: eigendecomposition(seed1_float32, arguments32), timers)
        stage(stages, "seed 1: lambda, if-query (float32 eigenvectors)",
              lambda: ifquery_lambda(seed1_float32, 1, arguments32, "seed 1 float32"), timers)
        fits["seed 1, float64"] = seed1
        fits["seed 1, float32"] = seed1_float32
    print("[bench_fit] eigh alone, float64 and float32 interleaved ...", file=sys.stderr, flush=True)
    eigh = eigh_timings(sorted({n for shape in tracked for n in shape}), args.eigh_repeats)
    peak = max(peak, matmul_peak())

    # --- scores of each fit (one capture of the scored examples' token factors) ---
    from if_query.records import Example
    from if_query.sizes import Shape

    examples = [example_tokenizer(Example(r["pair_id"], r["prompt"], r["completion"])) for r in scored]
    linears = tracked_linears(model)
    store = TokenFactorStore({n: (m.out_features, m.in_features) for n, m in linears.items()},
                             [len(e) for e in examples], torch.float32, host_budget=8 * 1024**3)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    capture_token_factors(model, linears, examples, store, [order[k : k + batch] for k in range(0, len(order), batch)],
                          tokenizer.pad_token_id, torch.device("cpu"))
    queries, train = list(range(args.queries)), list(range(args.queries, len(examples)))
    shapes = [Shape(n, m.out_features, m.in_features, m.bias is not None) for n, m in linears.items()]
    scores = {name: engine.score(engine.Side(store, queries), engine.Side(store, train), HessianFactors(directory),
                                 shapes, None, False, 4 * 1024**3, torch.device("cpu")).pairwise
              for name, directory in fits.items()}
    comparisons = {"if-query lambda vs Kronfluence lambda (float64)":
                   compare(scores["seed 0, float64"], scores["seed 0, float64, Kronfluence lambda"]),
                   "float32 vs float64 eigendecomposition (seed 0)":
                   compare(scores["seed 0, float32"], scores["seed 0, float64"])}
    if "seed 1, float32" in scores:
        comparisons["float32 vs float64 eigendecomposition (seed 1)"] = compare(scores["seed 1, float32"],
                                                                                scores["seed 1, float64"])
    noises = ["lambda labels seed 1 vs seed 0 (float64): lambda's noise"]
    comparisons[noises[0]] = compare(scores["lambda seed 1"], scores["seed 0, float64"])
    if "seed 1, float64" in scores:
        noises.append("whole fit seed 1 vs seed 0 (float64): the fit's noise")
        comparisons[noises[1]] = compare(scores["seed 1, float64"], scores["seed 0, float64"])

    # --- report ---
    work_flops = flops(lengths, tracked, args)
    fb = work_flops["forward_backward"]
    kron_flops, ours_flops = work_flops["lambda_kronfluence"], work_flops["lambda_ifquery"]
    sizes = sorted({int(key.split()[0]) for key in eigh})
    eigh_fit = {dtype: sum(eigh[f"{o} {dtype}"] + eigh[f"{i} {dtype}"] for o, i in tracked)
                for dtype in ("float64", "float32")}

    def gflop(value: float) -> str:
        return f"{value / 1e9:,.0f}"

    def rate(value: float, seconds: float) -> str:
        return f"{100 * value / seconds / peak:.0f}%"

    def table(key: str) -> list[str]:
        """Per-stage table of the fastest run of each stage, by wall time (``s``) or CPU time (``cpu_s``)."""
        v = {name: min(run[key] for run in runs) for name, runs in stages.items()}
        threads = 1 if key == "s" else torch.get_num_threads()  # a CPU second is 1/threads of the peak's second

        def share(value: float, seconds: float) -> str:
            return rate(value, seconds / threads)

        cov, eig64, eig32 = v["covariance"], v["eigendecomposition float64"], v["eigendecomposition float32"]
        kron, ours = v["lambda, Kronfluence"], v["lambda, if-query"]
        kron_total, ours_total, ours32_total = cov + eig64 + kron, cov + eig64 + ours, cov + eig32 + ours
        rows = [
            f"| covariance (same code) | {cov:.0f} | {cov:.0f} | {gflop(fb + work_flops['covariance'])} | "
            f"{share(fb + work_flops['covariance'], cov)} |",
            f"| eigendecomposition float64 (same code) | {eig64:.0f} | {eig64:.0f} | "
            f"{gflop(work_flops['eigendecomposition'])} (estimate) | "
            f"{share(work_flops['eigendecomposition'], eig64)} |",
            f"| lambda | {kron:.0f} | **{ours:.0f}** ({kron / ours:.1f}x) | {gflop(fb + kron_flops)} / "
            f"{gflop(fb + ours_flops)} ({(fb + kron_flops) / (fb + ours_flops):.1f}x) | "
            f"{share(fb + kron_flops, kron)} / {share(fb + ours_flops, ours)} |",
        ]
        if key == "s":
            kron_work = best(stages, "lambda, Kronfluence")["work_s"]
            ours_work = best(stages, "lambda, if-query")["work_s"]
            rows += [
                f"| – of which lambda work (per-example gradients, rotations) | {kron_work:.0f} | {ours_work:.0f} "
                f"({kron_work / ours_work:.1f}x) | {gflop(kron_flops)} / {gflop(ours_flops)} "
                f"({kron_flops / ours_flops:.1f}x; rotations alone "
                f"{work_flops['rotations_kronfluence'] / work_flops['rotations_ifquery']:.1f}x) | "
                f"{share(kron_flops, kron_work)} / {share(ours_flops, ours_work)} |",
                f"| – the rest: forward and backward, labels | {kron - kron_work:.0f} | {ours - ours_work:.0f} | "
                f"{gflop(fb)} | {share(fb, kron - kron_work)} / {share(fb, ours - ours_work)} |",
            ]
        rows += [
            f"| **whole fit** | {kron_total:.0f} | **{ours_total:.0f}** ({kron_total / ours_total:.2f}x) | | |",
            f"| eigendecomposition float32 (`--eigendecomposition-dtype float32`) | | {eig32:.0f} "
            f"({eig64 / eig32:.1f}x faster) | | {share(work_flops['eigendecomposition'], eig32)} |",
            f"| **whole fit, float32 eigendecomposition** | {kron_total:.0f} | **{ours32_total:.0f}** "
            f"({kron_total / ours32_total:.2f}x) | | |",
        ]
        unit = "wall s" if key == "s" else "CPU s"
        return [f"| stage | bare Kronfluence {unit} | fit-hessians {unit} | useful GFLOP (Kronfluence / fit-hessians) "
                f"| % of peak{'' if key == 's' else ' (of CPU time)'} |", "| --- | --- | --- | --- | --- |", *rows]

    lines = [
        f"# bench_fit ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Model: random OLMo-2, {args.layers} blocks, hidden {args.hidden}, MLP {args.mlp}, stride "
        f"{args.layer_stride} ({len(modules)} tracked modules), EK-FAC, true Fisher. Fitting data: {len(ordered)} "
        f"sequences of {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all), batches of {batch}. "
        f"Peak float32 matmul: {peak / 1e9:.0f} GFLOP/s; {torch.get_num_threads()} threads; the machine may be "
        "shared (load average per stage in the JSON).",
        "",
        *table("s"),
        "",
        "The same in process CPU time (less disturbed by other processes than wall time; % of peak counts "
        f"{torch.get_num_threads()} busy threads):",
        "",
        *table("cpu_s"),
        "",
        "Stage times are the fastest run of each stage; every run: "
        + "; ".join(f"{name} " + ", ".join(f"{run['s']:.0f}" for run in runs) for name, runs in stages.items()) + " s.",
        "",
        f"eigh alone (best of {args.eigh_repeats}, float64 and float32 interleaved): "
        + ", ".join(f"{n}: {eigh[f'{n} float64']:.1f} s vs {eigh[f'{n} float32']:.1f} s "
                    f"({eigh[f'{n} float64'] / eigh[f'{n} float32']:.1f}x)" for n in sizes)
        + f"; the {len(tracked)} modules' eighs: {eigh_fit['float64']:.0f} s vs {eigh_fit['float32']:.0f} s "
        f"({eigh_fit['float64'] / eigh_fit['float32']:.1f}x).",
        "",
        f"Lambda, if-query vs Kronfluence (same eigenvectors, data, labels): max |difference| / max |Kronfluence| = "
        f"{error:.1e} (worst module).",
        "",
        f"Scores ({args.queries} queries x {args.train} train records, damping auto) of one fit against another:",
        "",
        "| comparison | max rel. difference | Spearman per query, mean (min) | top-5 overlap |",
        "| --- | --- | --- | --- |",
    ]
    for name, value in comparisons.items():
        lines.append(f"| {name} | {value['max_rel_error']:.1e} | {value['spearman_mean']:.6f} "
                     f"({value['spearman_min']:.6f}) | {value['top5_overlap']:.3f} |")
    effects = [value for name, value in comparisons.items() if name.startswith("float32 vs float64")]
    safe = all(f32["max_rel_error"] <= comparisons[n]["max_rel_error"] / 10
               and 1 - f32["spearman_mean"] <= (1 - comparisons[n]["spearman_mean"]) / 10
               and 1 - f32["top5_overlap"] <= (1 - comparisons[n]["top5_overlap"]) / 10
               for n in noises for f32 in effects)
    verdict = "safe" if safe else "not shown safe"
    lines += ["", f"float32 eigendecomposition: **{verdict}** (safe = every distance to float64 at most a tenth of "
                  "the smallest seed-to-seed distance measured)."]
    report = "\n".join(lines)
    print(report)
    write_results("bench_fit", report, {
        "args": {k: str(v) for k, v in vars(args).items()}, "lengths": lengths, "peak_flops": peak,
        "stages": stages, "timers": timers.seconds, "eigh_s": eigh, "flops": work_flops, "lambda_max_rel_error": error,
        "comparisons": comparisons, "float32_verdict": verdict})


if __name__ == "__main__":
    main()
