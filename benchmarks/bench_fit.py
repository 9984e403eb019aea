"""Fit benchmark: fit-hessians' stages, bare Kronfluence's lambda stage against if-query's, and what a float32
eigendecomposition does to the scores.

    uv run python benchmarks/bench_fit.py                    # 16 blocks, 24 sequences (12 min quiet, 30 busy)
    uv run python benchmarks/bench_fit.py --full-seed-noise  # + a whole second fit with another seed (+15 min)
    uv run python benchmarks/bench_fit.py --quick            # 4 blocks, 8 sequences (about 5 min)

Workload. The scale benchmarks' model (``common.build_olmo2``: a random OLMo-2, 16 blocks, hidden 1024, MLP 2816,
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
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import (  # noqa: E402
    compare_scores,
    fit_and_score_parser,
    matmul_peak,
    olmo2_and_records,
    olmo2_forward_backward_flops,
    write_results,
)


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


def flops(lengths: list[int], tracked: list[tuple[int, int]], args: argparse.Namespace) -> dict[str, float]:
    from if_query.plan.sizes import lambda_flops

    ours = kronfluence = 0
    for t in lengths:
        for o, i in tracked:
            mine, theirs = lambda_flops(t, o, i, rotated=True)
            ours, kronfluence = ours + mine, kronfluence + theirs
    return {
        "forward_backward": olmo2_forward_backward_flops(lengths, args),
        "covariance": sum(2 * t * (i * i + o * o) for t in lengths for o, i in tracked),
        "eigendecomposition": sum(9 * (i**3 + o**3) for o, i in tracked),
        "lambda_kronfluence": kronfluence,
        "lambda_ifquery": ours,
        "rotations_kronfluence": sum(2 * o * i * (o + i) for _ in lengths for o, i in tracked),
        "rotations_ifquery": sum(min(2 * t * (o * o + i * i), 2 * o * i * (o + i)) for t in lengths
                                 for o, i in tracked),
    }


def lambda_error(directory: Path, reference: Path) -> float:
    from safetensors.torch import load_file

    ours = load_file(directory / "factors_hessian" / "lambda_matrix.safetensors")
    theirs = load_file(reference / "factors_hessian" / "lambda_matrix.safetensors")
    assert set(ours) == set(theirs)
    return max(float((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()) for k in theirs)


def parse_args() -> argparse.Namespace:
    parser = fit_and_score_parser(__doc__, "/tmp/if-query-bench-fit", layers=16)
    parser.add_argument("--batch-size", type=int, default=4, help="covariance and lambda batch size")
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
    return args


@dataclass
class Workload:
    """What fit-hessians sets up before its stages (not timed here), and the records scored against each fit."""

    model: torch.nn.Module  # tracked MLP projections wrapped for Kronfluence
    task: Any  # if_query.kron.fit.CompletionLossTask; its seed and stage are set before each stage
    ordered: list  # the fitting examples (TokenizedExample), shortest first, as fit-hessians orders them
    collate: Any  # if_query.data.tokenization.Collator: dynamic padding
    arguments: Any  # Kronfluence FactorArguments of fit-hessians' defaults (float64 eigendecomposition)
    arguments32: Any  # the same with a float32 eigendecomposition
    tracked: list[tuple[int, int]]  # (out, in + bias) of each tracked module
    scored: list  # the --queries then --train examples scored against each fit (TokenizedExample)
    pad_token_id: int

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.ordered]


def build_workload(args: argparse.Namespace, work: Path) -> Workload:
    """bench_scale's random OLMo-2 and long-prompt records in ``work``, set up the way fit-hessians sets up."""
    from if_query.config import FitConfig
    from if_query.data.hessian_data import load_hessian_examples
    from if_query.data.records import Example
    from if_query.data.tokenization import Collator, ExampleTokenizer
    from if_query.kron.fit import CompletionLossTask, factor_arguments, wrap_tracked_modules
    from if_query.model.loading import load_model, load_tokenizer
    from if_query.model.tracking import find_tracked_modules, make_trackable

    model_dir = work / f"model-{args.layers}"
    records = olmo2_and_records(model_dir, args, args.examples + args.queries + args.train)
    fit_json = work / "fit.json"
    fit_json.write_text(json.dumps(records[: args.examples]))
    tokenizer = load_tokenizer(str(model_dir))
    example_tokenizer = ExampleTokenizer(tokenizer, 512)
    ordered = sorted(load_hessian_examples(str(fit_json), example_tokenizer, None), key=len)
    model = load_model(str(model_dir), None, torch.float32)
    modules = find_tracked_modules(model, args.layer_stride)
    model = make_trackable(model, modules)
    task = CompletionLossTask([m.name for m in modules], seed=0)
    model = wrap_tracked_modules(model, task)
    config = FitConfig(model=str(model_dir), hessian_dataset=str(fit_json), output_dir="", strategy="ekfac",
                       layer_stride=args.layer_stride, factor_batch_size=args.batch_size,
                       lambda_batch_size=args.batch_size)
    arguments = factor_arguments(config.strategy, config.fisher == "empirical", config.module_partitions,
                                 getattr(torch, config.eigendecomposition_dtype))
    scored = [example_tokenizer(Example(r["pair_id"], r["prompt"], r["completion"])) for r in records[args.examples :]]
    return Workload(model, task, ordered, Collator(tokenizer.pad_token_id), arguments,
                    replace(arguments, eigendecomposition_dtype=torch.float32),
                    [(m.out_features, m.in_features + int(m.bias)) for m in modules], scored, tokenizer.pad_token_id)


class FitStages:
    """The calls fit-hessians makes, each run through :func:`stage` (timed into ``results``; the lambda work
    inside them timed by ``timers``) on a factors directory.

    Replayed here by hand rather than through ``fitting.fit_hessians`` on purpose: each stage must be timed on
    its own, bare Kronfluence's lambda stage must run on the very eigenvectors if-query's runs on, and the
    float32 eigendecomposition on the same covariances. Keep the calls in step with ``fitting.py``."""

    def __init__(self, workload: Workload, batch: int):
        from kronfluence.utils.dataset import DataLoaderKwargs

        self.w, self.batch = workload, batch
        self.loader_kwargs = DataLoaderKwargs(collate_fn=workload.collate)
        self.results: dict[str, list[dict]] = {}
        self.timers = Timers()

    def run(self, name: str, call) -> None:
        stage(self.results, name, call, self.timers)

    def _analyzer(self, directory: Path, seed: int | None = None, stage_name: str | None = None):
        from if_query.kron.fit import make_analyzer

        if seed is not None:
            self.w.task.seed = seed
            self.w.task.set_stage(stage_name)
        return make_analyzer(directory, self.w.model, self.w.task, quiet=True)

    def covariance(self, directory: Path, seed: int) -> None:
        from if_query.kron.factors import FACTORS_NAME

        self._analyzer(directory, seed, "covariance").fit_covariance_matrices(
            FACTORS_NAME, self.w.ordered, per_device_batch_size=self.batch, dataloader_kwargs=self.loader_kwargs,
            factor_args=self.w.arguments)

    def eigendecomposition(self, directory: Path, factor_args) -> None:
        from if_query.kron.factors import FACTORS_NAME

        self._analyzer(directory).perform_eigendecomposition(FACTORS_NAME, factor_args=factor_args)

    def ifquery_lambda(self, directory: Path, seed: int, factor_args, prefix: str) -> None:
        from if_query.fit import lambda_stage
        from if_query.kron.factors import FACTORS_NAME

        analyzer = self._analyzer(directory, seed, "lambda")
        with self.timers.wrap(lambda_stage._Accumulator, "add", f"{prefix}: lambda work"):  # noqa: SLF001
            lambda_stage.fit_lambda_matrices(analyzer, self.w.model, FACTORS_NAME, self.w.ordered, self.batch,
                                             self.w.collate, factor_args, seed=seed, quiet=True)

    def kronfluence_lambda(self, directory: Path, seed: int) -> None:
        from kronfluence.module.linear import TrackedLinear
        from kronfluence.module.tracker.factor import LambdaTracker

        from if_query.kron.factors import FACTORS_NAME

        analyzer = self._analyzer(directory, seed, "lambda")
        with self.timers.wrap(LambdaTracker, "_update_lambda_matrix", "kronfluence: lambda work"), \
                self.timers.wrap(TrackedLinear, "compute_per_sample_gradient", "kronfluence: lambda work"):
            analyzer.fit_lambda_matrices(FACTORS_NAME, self.w.ordered, per_device_batch_size=self.batch,
                                         dataloader_kwargs=self.loader_kwargs, factor_args=self.w.arguments)


def fit_seed0(fits: FitStages, runs: Path, repeats: int) -> tuple[dict[str, Path], float]:
    """Seed 0's stages, ``repeats`` times each (compared stages alternately, so both see the same load): the
    fits' directories by name, and the lambda error of if-query's stage against Kronfluence's."""
    arguments, arguments32 = fits.w.arguments, fits.w.arguments32
    seed0, float32 = runs / "seed0-float64", runs / "seed0-float32"
    shutil.rmtree(runs, ignore_errors=True)
    covariances = runs / "seed0-covariance"
    for _ in range(repeats):
        shutil.rmtree(covariances, ignore_errors=True)
        fits.run("covariance", lambda: fits.covariance(covariances, 0))
    for _ in range(repeats):
        copy_factors(covariances, seed0)
        fits.run("eigendecomposition float64", lambda: fits.eigendecomposition(seed0, arguments))
        copy_factors(covariances, float32, keep=lambda name: "covariance" in name)  # float32 factor arguments
        fits.run("eigendecomposition float32", lambda: fits.eigendecomposition(float32, arguments32))
    eigenvectors = copy_factors(seed0, runs / "seed0-float64-eigenvectors")
    kron_dir = runs / "seed0-float64-kronfluence-lambda"
    for _ in range(repeats):
        copy_factors(eigenvectors, kron_dir)
        fits.run("lambda, Kronfluence", lambda: fits.kronfluence_lambda(kron_dir, 0))
        copy_factors(eigenvectors, seed0)
        fits.run("lambda, if-query", lambda: fits.ifquery_lambda(seed0, 0, arguments, "if-query"))
    error = lambda_error(seed0, kron_dir)
    fits.run("lambda, if-query (float32 eigenvectors)",
             lambda: fits.ifquery_lambda(float32, 0, arguments32, "if-query float32"))
    lambda1 = copy_factors(eigenvectors, runs / "seed0-float64-lambda-seed1")
    fits.run("noise: lambda, if-query, seed 1", lambda: fits.ifquery_lambda(lambda1, 1, arguments, "lambda seed 1"))
    return {"seed 0, float64, Kronfluence lambda": kron_dir, "seed 0, float64": seed0, "seed 0, float32": float32,
            "lambda seed 1": lambda1}, error


def fit_seed1(fits: FitStages, runs: Path) -> dict[str, Path]:
    """``--full-seed-noise``: the whole fit again with seed 1, float64 and float32 eigendecompositions."""
    arguments, arguments32 = fits.w.arguments, fits.w.arguments32
    seed1 = runs / "seed1-float64"
    fits.run("seed 1: covariance", lambda: fits.covariance(seed1, 1))
    seed1_float32 = copy_factors(seed1, runs / "seed1-float32", keep=lambda name: "covariance" in name)
    fits.run("eigendecomposition float64", lambda: fits.eigendecomposition(seed1, arguments))
    fits.run("seed 1: lambda, if-query", lambda: fits.ifquery_lambda(seed1, 1, arguments, "seed 1"))
    fits.run("eigendecomposition float32", lambda: fits.eigendecomposition(seed1_float32, arguments32))
    fits.run("seed 1: lambda, if-query (float32 eigenvectors)",
             lambda: fits.ifquery_lambda(seed1_float32, 1, arguments32, "seed 1 float32"))
    return {"seed 1, float64": seed1, "seed 1, float32": seed1_float32}


def score_fits(w: Workload, fits: dict[str, Path], queries: int, batch: int) -> dict[str, torch.Tensor]:
    """Each fit's (queries, train) scores of the scored examples, from one capture of their token factors."""
    from if_query.kron.factors import HessianFactors
    from if_query.kron.lambda_files import tracked_linears
    from if_query.plan.sizes import Shape
    from if_query.score import engine
    from if_query.score.capture import capture_token_factors
    from if_query.score.store import TokenFactorStore

    examples = w.scored
    linears = tracked_linears(w.model)
    store = TokenFactorStore({n: (m.out_features, m.in_features) for n, m in linears.items()},
                             [len(e) for e in examples], torch.float32, host_budget=8 * 1024**3)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [order[k : k + batch] for k in range(0, len(order), batch)]
    capture_token_factors(w.model, linears, examples, store, batches, w.pad_token_id, torch.device("cpu"))
    query_side, train_side = list(range(queries)), list(range(queries, len(examples)))
    shapes = [Shape(n, m.out_features, m.in_features, m.bias is not None) for n, m in linears.items()]
    return {name: engine.score(engine.Side(store, query_side), engine.Side(store, train_side),
                               engine.Setup(HessianFactors(directory), shapes, None, torch.device("cpu")),
                               4 * 1024**3, False).pairwise
            for name, directory in fits.items()}


def compare_fits(scores: dict[str, torch.Tensor]) -> tuple[dict[str, dict], list[str]]:
    """The comparisons of the report, and the names of those that measure the fit's noise."""
    comparisons = {"if-query lambda vs Kronfluence lambda (float64)":
                   compare_scores(scores["seed 0, float64"], scores["seed 0, float64, Kronfluence lambda"]),
                   "float32 vs float64 eigendecomposition (seed 0)":
                   compare_scores(scores["seed 0, float32"], scores["seed 0, float64"])}
    if "seed 1, float32" in scores:
        comparisons["float32 vs float64 eigendecomposition (seed 1)"] = compare_scores(scores["seed 1, float32"],
                                                                                       scores["seed 1, float64"])
    noises = ["lambda labels seed 1 vs seed 0 (float64): lambda's noise"]
    comparisons[noises[0]] = compare_scores(scores["lambda seed 1"], scores["seed 0, float64"])
    if "seed 1, float64" in scores:
        noises.append("whole fit seed 1 vs seed 0 (float64): the fit's noise")
        comparisons[noises[1]] = compare_scores(scores["seed 1, float64"], scores["seed 0, float64"])
    return comparisons, noises


def gflop(value: float) -> str:
    return f"{value / 1e9:,.0f}"


def stage_table(stages: dict, work_flops: dict, peak: float, key: str) -> list[str]:
    """Per-stage table of the fastest run of each stage, by wall time (``s``) or CPU time (``cpu_s``)."""
    v = {name: min(run[key] for run in runs) for name, runs in stages.items()}
    threads = 1 if key == "s" else torch.get_num_threads()  # a CPU second is 1/threads of the peak's second

    def share(value: float, seconds: float) -> str:
        return f"{100 * value / (seconds / threads) / peak:.0f}%"

    fb, cov_flops = work_flops["forward_backward"], work_flops["covariance"]
    kron_flops, ours_flops, eig_flops = (work_flops[k] for k in ("lambda_kronfluence", "lambda_ifquery",
                                                                 "eigendecomposition"))
    cov, eig64, eig32 = v["covariance"], v["eigendecomposition float64"], v["eigendecomposition float32"]
    kron, ours = v["lambda, Kronfluence"], v["lambda, if-query"]
    kron_total, ours_total, ours32_total = cov + eig64 + kron, cov + eig64 + ours, cov + eig32 + ours
    rows = [
        f"| covariance (same code) | {cov:.0f} | {cov:.0f} | {gflop(fb + cov_flops)} | {share(fb + cov_flops, cov)} |",
        f"| eigendecomposition float64 (same code) | {eig64:.0f} | {eig64:.0f} | {gflop(eig_flops)} (estimate) | "
        f"{share(eig_flops, eig64)} |",
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
        f"({eig64 / eig32:.1f}x faster) | | {share(eig_flops, eig32)} |",
        f"| **whole fit, float32 eigendecomposition** | {kron_total:.0f} | **{ours32_total:.0f}** "
        f"({kron_total / ours32_total:.2f}x) | | |",
    ]
    unit = "wall s" if key == "s" else "CPU s"
    return [f"| stage | bare Kronfluence {unit} | fit-hessians {unit} | useful GFLOP (Kronfluence / fit-hessians) "
            f"| % of peak{'' if key == 's' else ' (of CPU time)'} |", "| --- | --- | --- | --- | --- |", *rows]


def float32_verdict(comparisons: dict[str, dict], noises: list[str]) -> str:
    """Safe when, on every measure, the float32 eigendecomposition's distance to float64 is at most a tenth of
    the smallest seed-to-seed distance."""
    effects = [value for name, value in comparisons.items() if name.startswith("float32 vs float64")]
    safe = all(f32["max_rel_error"] <= comparisons[n]["max_rel_error"] / 10
               and 1 - f32["spearman_mean"] <= (1 - comparisons[n]["spearman_mean"]) / 10
               and 1 - f32["top5_overlap"] <= (1 - comparisons[n]["top5_overlap"]) / 10
               for n in noises for f32 in effects)
    return "safe" if safe else "not shown safe"


def report(args: argparse.Namespace, w: Workload, stages: dict, measured: dict, work_flops: dict) -> str:
    """The markdown report; ``measured`` holds ``peak``, ``eigh``, ``lambda_error``, ``comparisons``, ``verdict``."""
    peak, eigh, comparisons = measured["peak"], measured["eigh"], measured["comparisons"]
    lengths, tracked, threads = w.lengths, w.tracked, torch.get_num_threads()
    sizes = sorted({int(key.split()[0]) for key in eigh})
    eigh_fit = {dtype: sum(eigh[f"{o} {dtype}"] + eigh[f"{i} {dtype}"] for o, i in tracked)
                for dtype in ("float64", "float32")}
    lines = [
        f"# bench_fit ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Model: random OLMo-2, {args.layers} blocks, hidden {args.hidden}, MLP {args.mlp}, stride "
        f"{args.layer_stride} ({len(tracked)} tracked modules), EK-FAC, true Fisher. Fitting data: {len(lengths)} "
        f"sequences of {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all), batches of {args.batch_size}. "
        f"Peak float32 matmul: {peak / 1e9:.0f} GFLOP/s; {threads} threads; the machine may be "
        "shared (load average per stage in the JSON).",
        "",
        *stage_table(stages, work_flops, peak, "s"),
        "",
        "The same in process CPU time (less disturbed by other processes than wall time; % of peak counts "
        f"{threads} busy threads):",
        "",
        *stage_table(stages, work_flops, peak, "cpu_s"),
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
        f"{measured['lambda_error']:.1e} (worst module).",
        "",
        f"Scores ({args.queries} queries x {args.train} train records, damping auto) of one fit against another:",
        "",
        "| comparison | max rel. difference | Spearman per query, mean (min) | top-5 overlap |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {value['max_rel_error']:.1e} | {value['spearman_mean']:.6f} ({value['spearman_min']:.6f}) "
              f"| {value['top5_overlap']:.3f} |" for name, value in comparisons.items()]
    lines += ["", f"float32 eigendecomposition: **{measured['verdict']}** (safe = every distance to float64 at most a "
                  "tenth of the smallest seed-to-seed distance measured)."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    w = build_workload(args, work)
    lengths = w.lengths
    print(f"[bench_fit] {len(lengths)} sequences, {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all); "
          f"{len(w.tracked)} tracked modules", file=sys.stderr, flush=True)

    peak = matmul_peak()
    fits = FitStages(w, args.batch_size)
    directories, error = fit_seed0(fits, work / "runs", args.repeats)
    if args.full_seed_noise:
        directories |= fit_seed1(fits, work / "runs")
    print("[bench_fit] eigh alone, float64 and float32 interleaved ...", file=sys.stderr, flush=True)
    eigh = eigh_timings(sorted({n for shape in w.tracked for n in shape}), args.eigh_repeats)
    peak = max(peak, matmul_peak())

    comparisons, noises = compare_fits(score_fits(w, directories, args.queries, args.batch_size))
    measured = {"peak": peak, "eigh": eigh, "lambda_error": error, "comparisons": comparisons,
                "verdict": float32_verdict(comparisons, noises)}
    work_flops = flops(lengths, w.tracked, args)
    text = report(args, w, fits.results, measured, work_flops)
    print(text)
    write_results("bench_fit", text, {
        "args": {k: str(v) for k, v in vars(args).items()}, "lengths": lengths, "peak_flops": peak,
        "stages": fits.results, "timers": fits.timers.seconds, "eigh_s": eigh, "flops": work_flops,
        "lambda_max_rel_error": error, "comparisons": comparisons, "float32_verdict": measured["verdict"]})


if __name__ == "__main__":
    main()
