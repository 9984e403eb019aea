"""Does TF32 move the scores more than the fit's own noise? --matmul-precision's CUDA default, measured on CPU.

    uv run python benchmarks/bench_precision.py            # 4 blocks, hidden 1024, 24 fitting sequences (~15 min)
    uv run python benchmarks/bench_precision.py --quick    # 2 blocks, hidden 512 (~3 min)

On a GPU with TF32, cuBLAS rounds both operands of every float32 matrix product to TensorFloat-32 (10 mantissa
bits instead of 23) and accumulates in float32. This machine has no TF32, so it is emulated: a
TorchDispatchMode rounds the float32 operands of every matrix product (aten mm, addmm, bmm, baddbmm, and
their out/in-place forms) before the product runs; everything else is untouched. The model runs in bfloat16
(as ``--dtype auto`` does on CUDA), so its own products are bfloat16 and TF32 does not apply to them, exactly
as on a GPU; what TF32 reaches is the float32 work: Kronfluence's covariances, if-query's lambda stage and
every product of the scoring engine (rotations, whitened gradients, Gram matrices). Two roundings: to
nearest (even) and toward zero (truncation: the worst a tensor core could do).

Runs (random OLMo-2 of bench_scale.py's shape family, --layer-stride 2, EK-FAC, true Fisher):
    fits    seed 0 and seed 1 in float32 ("ieee"); seed 0 with the whole fit in emulated TF32
    scores  --queries x --train records scored by the engine from one capture (bfloat16 token factors):
            ieee with each ieee fit; TF32 scoring of the ieee seed-0 fit; TF32 scoring of the TF32 fit
Rule (bench_fit.py's): TF32 is safe when every distance to the ieee seed-0 scores (max |difference| / max
|score|, 1 - mean Spearman per query, 1 - top-5 overlap) stays under a tenth of the seed-1 fit's distance.
Results: printed and written to benchmarks/results/bench_precision.md (+ .json).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import common  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

TF32_DROPPED_BITS = 13  # float32 has 23 mantissa bits, TF32 10
PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default, torch.ops.aten.addmm_.default, torch.ops.aten.mm.out,
            torch.ops.aten.bmm.out, torch.ops.aten.addmm.out, torch.ops.aten.baddbmm.out}


def to_tf32(x: torch.Tensor, nearest: bool) -> torch.Tensor:
    """``x`` (float32) rounded to 10 mantissa bits, to nearest (ties to even) or toward zero."""
    bits = x.contiguous().view(torch.int32)
    low = (1 << TF32_DROPPED_BITS) - 1
    if nearest:
        bits = bits + (low >> 1) + ((bits >> TF32_DROPPED_BITS) & 1)
    return (bits & ~low).view(torch.float32).view(x.shape)


class EmulatedTF32(TorchDispatchMode):
    """Every float32 matrix product gets TF32-rounded operands (the bias term of addmm stays float32)."""

    def __init__(self, nearest: bool = True):
        super().__init__()
        self.nearest = nearest
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            # mm/bmm(a, b); addmm/baddbmm(bias, a, b): the two matrix operands are the last two positionals
            first = 1 if len(args) == 3 else 0
            args = list(args)
            for index in (first, first + 1):
                if isinstance(args[index], torch.Tensor) and args[index].dtype == torch.float32:
                    args[index] = to_tf32(args[index], self.nearest)
            self.products += 1
        return func(*args, **kwargs)


def fit(model_dir: Path, data: Path, out: Path, seed: int, layer_stride: int, mode=None) -> Path:
    from if_query.config import FitConfig
    from if_query.fit.fit_hessians import fit_hessians

    config = FitConfig(model=str(model_dir), hessian_dataset=str(data), output_dir=str(out), layer_stride=layer_stride,
                       seed=seed, dtype="bfloat16", factor_batch_size=4, lambda_batch_size=4)
    if not (out / "metadata.json").exists():
        if mode is None:
            fit_hessians(config, quiet=True)
        else:
            with mode:
                fit_hessians(config, quiet=True)
    return out


def capture(model_dir: Path, records: list[dict], layer_stride: int):
    """(store, modules {name: bias}) of ``records``' token factors under the bfloat16 model."""
    from if_query.data.records import Example
    from if_query.data.tokenization import ExampleTokenizer
    from if_query.model.loading import load_model, load_tokenizer
    from if_query.model.tracking import track_modules
    from if_query.score.capture import capture_token_factors
    from if_query.score.store import TokenFactorStore

    tokenizer = load_tokenizer(str(model_dir))
    make = ExampleTokenizer(tokenizer, 512)
    examples = [make(Example(r["pair_id"], r["prompt"], r["completion"])) for r in records]
    model, modules = track_modules(load_model(str(model_dir), None, torch.bfloat16, torch.device("cpu")),
                                       layer_stride)
    linears = {m.name: model.get_submodule(m.name) for m in modules}
    shared = {m.name: m.input_from for m in modules if m.input_from}
    store = TokenFactorStore({m.name: (m.out_features, m.in_features) for m in modules},
                             [len(e) for e in examples], torch.bfloat16, 8 * 1024**3, shared_inputs=shared)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    capture_token_factors(model, linears, examples, store, [order[k : k + 4] for k in range(0, len(order), 4)],
                          tokenizer.pad_token_id, torch.device("cpu"))
    from if_query.plan.sizes import Shape

    return store, [Shape.of(m) for m in modules]


def scores(store, modules: dict, factors_dir: Path, queries: int, mode=None) -> torch.Tensor:
    from if_query.kron.factors import HessianFactors
    from if_query.score import engine

    def run():
        train = engine.Side(store, range(queries, len(store.lengths)))
        setup = engine.Setup(HessianFactors(factors_dir), modules, None, torch.device("cpu"))
        return engine.score(engine.Side(store, range(queries)), train, setup, 4 * 1024**3, False).pairwise

    if mode is None:
        return run()
    with mode:
        return run()


def verdict(distances: dict[str, dict], noise: dict) -> dict[str, bool]:
    """Whether each run's distance from the reference stays under a tenth of the seed noise on every measure."""
    def gaps(d):
        return {"max_rel_error": d["max_rel_error"], "1 - spearman": 1 - d["spearman_mean"],
                "1 - top5": 1 - d["top5_overlap"]}
    limit = {key: value / 10 for key, value in gaps(noise).items()}
    return {name: all(gaps(d)[key] <= limit[key] for key in limit) for name, d in distances.items()}


def report(results: dict, args) -> str:
    lines = [f"# bench_precision ({args.layers} blocks, hidden {args.hidden}, MLP {args.mlp}, stride "
             f"{args.layer_stride}, {args.examples} fitting sequences, {args.queries} x {args.train} scored)", "",
             "| compared with ieee seed 0 | max \\|difference\\| / max \\|score\\| | Spearman per query (mean, min) "
             "| top-5 overlap | under a tenth of the seed noise |", "| --- | --- | --- | --- | --- |"]
    for name, d in results["distances"].items():
        safe = results["safe"].get(name, "(the noise)")
        lines.append(f"| {name} | {d['max_rel_error']:.2e} | {d['spearman_mean']:.5f}, {d['spearman_min']:.5f} | "
                     f"{d['top5_overlap']:.3f} | {safe} |")
    lines += ["", f"Matrix products seen under the emulation: {results['products']}; wall {results['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = common.fit_and_score_parser(__doc__, "/tmp/if-query-bench-precision", layers=4)
    parser.add_argument("--quick", action="store_true", help="2 blocks, hidden 512, MLP 1408, 12 sequences")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.mlp, args.heads, args.examples = 2, 512, 1408, 8, 12
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    start = time.perf_counter()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    records = common.olmo2_and_records(model_dir, args, args.examples + args.queries + args.train)
    data = work / "fit.json"
    data.write_text(json.dumps(records[: args.examples]))
    nearest, truncated = EmulatedTF32(nearest=True), EmulatedTF32(nearest=False)
    fits = {"ieee seed 0": fit(model_dir, data, work / "f-ieee-0", 0, args.layer_stride),
            "ieee seed 1": fit(model_dir, data, work / "f-ieee-1", 1, args.layer_stride),
            "tf32 seed 0": fit(model_dir, data, work / "f-tf32-0", 0, args.layer_stride, nearest),
            "tf32-truncated seed 0": fit(model_dir, data, work / "f-tf32t-0", 0, args.layer_stride, truncated)}
    store, modules = capture(model_dir, records[args.examples :], args.layer_stride)
    reference = scores(store, modules, fits["ieee seed 0"], args.queries)
    runs = {
        "ieee, fit with seed 1 (the seed noise)": scores(store, modules, fits["ieee seed 1"], args.queries),
        "TF32 scoring, ieee fit": scores(store, modules, fits["ieee seed 0"], args.queries, nearest),
        "TF32 fit and scoring": scores(store, modules, fits["tf32 seed 0"], args.queries, nearest),
        "TF32 truncated: scoring, ieee fit": scores(store, modules, fits["ieee seed 0"], args.queries, truncated),
        "TF32 truncated: fit and scoring": scores(store, modules, fits["tf32-truncated seed 0"], args.queries,
                                                  truncated),
    }
    distances = {name: common.compare_scores(value, reference) for name, value in runs.items()}
    noise_name = next(iter(runs))
    safe = verdict({k: v for k, v in distances.items() if k != noise_name}, distances[noise_name])
    results = {"distances": distances, "safe": safe, "products": nearest.products + truncated.products,
               "wall_s": time.perf_counter() - start, "args": {k: str(v) for k, v in vars(args).items()}}
    text = report(results, args)
    print(text)
    common.write_results("bench_precision", text, results)


if __name__ == "__main__":
    main()
