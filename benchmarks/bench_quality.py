"""Quality benchmark: does if-query find the training record that states a queried fact?

    uv run python benchmarks/bench_quality.py            # default: 3 seeds, full damping grid (4-6 min, 2 CPUs)
    uv run python benchmarks/bench_quality.py --quick    # 1 seed, 3 dampings (1-2 min)
    uv run python benchmarks/bench_quality.py --help

Setup (per seed)
    A synthetic world of ``--n-people`` made-up people x 4 relations (scripts/tiny_world.py). The training
    corpus holds every fact in phrasing "a" ("Zorvan Quill lives in" -> " Belmora.") and, for
    ``--b-fraction`` of the people, also in phrasing "b" ("The home city of Zorvan Quill is" -> " Belmora.").
    A tiny GPT-2 (2 layers, d=64) is trained on it (``--steps``, 1 torch thread, deterministic) and saved with
    its tokenizer to a temporary directory. The training records are the train JSON and also the
    Hessian-fitting data.

Queries (completion = the true fact)
    (a)  every fact in phrasing "a": the query text equals its training record's text;
    (a') the same prompts with the model's own greedy completion (differs from (a) only where the model is
         wrong; those queries are scored too, and the table shows how many there are);
    (b)  every fact of the held-out people (whose phrasing-"b" facts are NOT in the corpus) in phrasing "b".
    The correct training record for every query is the phrasing-"a" record of the same (person, relation).

What is measured
    For every strategy (identity, diagonal, kfac, ekfac) the factors are fitted once (if-query's
    ``fit_hessians``); then, for every damping, all queries are scored against all training records
    (``QueryRunner``, if-query's one-gradient-per-example fast path), and for both the raw
    ``influence_score`` and ``influence_cosine`` we compute, per query, the rank of the correct record among
    all training records (ties count against it: rank = 1 + number of OTHER records scoring >= the correct
    one), then top-1 accuracy and mean reciprocal rank (MRR). Identity (plain gradient dot products) has no
    damping, so it is scored once. Numbers are the mean over seeds, +- the sample standard deviation over
    seeds when there are several.

    Dampings: "auto" = Kronfluence's heuristic (if-query's default), 0.1 x the mean eigenvalue of each
    module's curvature (for K-FAC the Kronecker product of the factor eigenvalues, for EK-FAC/diagonal the
    fitted lambdas); absolute values (``--dampings``), as run-query's ``--damping`` takes them; and, as a
    benchmark-only diagnostic, relative values (``--relative-dampings``): "rel r" = r x the mean eigenvalue
    averaged over the modules of that seed's fit (one absolute number per seed and strategy). The tiny
    model fits its corpus almost perfectly, so its curvature is tiny (auto is about 1e-12..1e-10 at 600 steps,
    and moves by orders of magnitude with the number of training steps): the absolute grid brackets that
    scale and does not transfer to other models. The report lists what auto and rel resolve to.

Reading the results
    (a) with influence_cosine is 1.000 by construction (the query IS a training record, cosine 1), and (a')
    equals (a) whenever the model answers every phrasing-a fact correctly (it does at 600 steps); the raw
    influence_score on (a) and everything on (b) are the informative columns. "b, model right/wrong" in the
    diagnostics splits (b) by the model's greedy answer. Robustness checks used while writing this (each
    with ``--strategies identity ekfac --dampings auto 1e-12 --relative-dampings 1e-4 1e-2 1``):
    ``--steps 300``, ``--steps 1200``, ``--b-fraction 0.75``, ``--n-people 80`` (the last makes (a) raw
    non-trivial: identity ~0.69 vs EK-FAC ~0.92-0.98 top-1).

Results: printed, and written to benchmarks/results/bench_quality.md (plus .json with per-seed numbers).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_T0 = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "scripts"))

import tiny_world as tw  # noqa: E402

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
SCORE_TYPES = ("influence_cosine", "influence_score")
SCORE_LABEL = {"influence_cosine": "cosine", "influence_score": "raw"}
QUERY_SETS = ("a", "a'", "b")
GROUPS = (*QUERY_SETS, "b, model right", "b, model wrong")  # metrics are computed for each
# The absolute grid brackets the tiny model's curvature scale (auto ~1e-12..1e-10, see the docstring);
# 1e-6 is far above it (the preconditioner is then nearly a multiple of the identity).
DEFAULT_DAMPINGS = ("auto", "1e-14", "1e-13", "1e-12", "1e-11", "1e-10", "1e-9", "1e-6")
QUICK_DAMPINGS = ("auto", "1e-12", "1e-6")
# Relative dampings (benchmark only: if-query takes "auto" or an absolute value): r x the mean eigenvalue.
DEFAULT_RELATIVE = ("1e-6", "1e-4", "1e-3", "1e-2", "1")
HEURISTIC_DAMPING_SCALE = 0.1  # Kronfluence's (kronfluence.utils.constants), checked in main()


def parse_damping(text: str) -> float | None:
    if text == "auto":
        return None
    value = float(text)
    if value < 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"damping must be 'auto' or a finite number >= 0, got {text!r}")
    return value


def damping_label(value: float | None) -> str:
    return "auto" if value is None else f"{value:g}"


def dump(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# One seed: world, model, queries
# ---------------------------------------------------------------------------------------------


def build_seed(seed: int, args: argparse.Namespace, work: Path) -> dict:
    """Train the model of one seed and write model dir, train.json and query.json under ``work``."""
    world = tw.make_world(seed, n_people=args.n_people)
    ts = tw.training_records(world, b_fraction=args.b_fraction, seed=seed)
    tokenizer = tw.train_tokenizer(tw.corpus_texts(ts.records), vocab_size=512)
    t = time.perf_counter()
    model = tw.train_tiny_gpt2(ts.records, tokenizer, seed=seed, steps=args.steps, num_threads=args.threads)
    train_s = time.perf_counter() - t

    model_dir = work / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    train_json = work / "train.json"
    dump(ts.records, train_json)

    queries: list[dict] = []
    answers: dict[str, str] = {}  # query id -> pair_id of the correct training record
    query_set: dict[str, str] = {}  # query id -> "a", "a'" or "b"
    b_split: dict[str, str] = {}  # (b) query id -> whether the model's greedy answer is right
    scored_as: dict[str, str] = {}  # query id -> id of the scored query with the same text
    greedy_wrong = 0
    for rec in tw.fact_records(world, "a"):  # (a) and (a')
        person = world.person(rec["person"])
        target = f"{person.slug}-{rec['relation']}-a"
        qa = dict(rec, pair_id=f"qa-{person.slug}-{rec['relation']}")
        greedy = tw.greedy_complete(model, tokenizer, rec["prompt"])
        qg = dict(rec, pair_id=f"qg-{person.slug}-{rec['relation']}", completion=greedy or ".")
        queries.append(qa)
        scored_as[qa["pair_id"]] = qa["pair_id"]
        if qg["completion"] != rec["completion"]:
            greedy_wrong += 1
            queries.append(qg)  # only scored where it differs from (a); elsewhere (a') reuses (a)
        scored_as[qg["pair_id"]] = qg["pair_id"] if qg["completion"] != rec["completion"] else qa["pair_id"]
        for q, name in ((qa, "a"), (qg, "a'")):
            answers[q["pair_id"]] = target
            query_set[q["pair_id"]] = name
    facts_b_heldout = tw.fact_records(world, "b", ts.heldout_people)
    for rec in facts_b_heldout:  # (b)
        person = world.person(rec["person"])
        q = dict(rec, pair_id=f"qb-{person.slug}-{rec['relation']}")
        queries.append(q)
        scored_as[q["pair_id"]] = q["pair_id"]
        answers[q["pair_id"]] = f"{person.slug}-{rec['relation']}-a"
        query_set[q["pair_id"]] = "b"
        b_split[q["pair_id"]] = "b, model right" if tw.is_correct(model, tokenizer, rec) else "b, model wrong"
    query_json = work / "query.json"
    dump(queries, query_json)

    train_ids = {r["pair_id"] for r in ts.records}
    assert all(a in train_ids for a in answers.values())
    facts_a = tw.fact_records(world, "a")
    facts_b_trained = tw.fact_records(world, "b", ts.b_people)
    info = {
        "seed": seed,
        "train_records": len(ts.records),
        "queries": {name: sum(v == name for v in query_set.values()) for name in QUERY_SETS},
        "greedy_differs": greedy_wrong,
        "accuracy_a": tw.accuracy(model, tokenizer, facts_a),
        "accuracy_b_trained": tw.accuracy(model, tokenizer, facts_b_trained),
        "accuracy_b_heldout": tw.accuracy(model, tokenizer, facts_b_heldout),
        "train_s": train_s,
    }
    return {
        "model_dir": model_dir, "train_json": train_json, "query_json": query_json,
        "answers": answers, "scored_as": scored_as, "info": info,
        "groups": {name: [q for q in answers if query_set[q] == name or b_split.get(q) == name] for name in GROUPS},
        "train_records": {r["pair_id"]: r for r in ts.records}, "queries": {q["pair_id"]: q for q in queries},
    }


# ---------------------------------------------------------------------------------------------
# Fitting, scoring, metrics
# ---------------------------------------------------------------------------------------------


def fit(strategy: str, built: dict, work: Path) -> Path:
    from if_query.fitting import FitConfig, fit_hessians

    factors_dir = work / f"factors-{strategy}"
    config = FitConfig(
        model=str(built["model_dir"]), hessian_dataset=str(built["train_json"]), output_dir=str(factors_dir),
        strategy=strategy, factor_batch_size=16, lambda_batch_size=16,
    )
    fit_hessians(config, quiet=True)
    return factors_dir


def auto_damping_values(scorer, strategy: str) -> dict[str, float]:
    """0.1 x mean curvature eigenvalue per tracked module: the value "auto" resolves to."""
    import torch
    from kronfluence.utils.constants import (
        ACTIVATION_EIGENVALUES_NAME,
        GRADIENT_EIGENVALUES_NAME,
        HEURISTIC_DAMPING_SCALE,
        LAMBDA_MATRIX_NAME,
        NUM_LAMBDA_PROCESSED,
    )

    factors = scorer.factors
    out = {}
    if strategy == "identity":
        return out
    modules = factors[LAMBDA_MATRIX_NAME] if strategy != "kfac" else factors[ACTIVATION_EIGENVALUES_NAME]
    for module in modules:
        if strategy == "kfac":
            a = factors[ACTIVATION_EIGENVALUES_NAME][module].double()
            g = factors[GRADIENT_EIGENVALUES_NAME][module].double()
            mean = float(torch.kron(a.unsqueeze(0), g.unsqueeze(-1)).mean())
        else:
            lam = factors[LAMBDA_MATRIX_NAME][module].double() / factors[NUM_LAMBDA_PROCESSED][module].double()
            mean = float(lam.mean())
        out[module] = HEURISTIC_DAMPING_SCALE * mean
    return out


def score(built: dict, factors_dir: Path, damping: float | None, strategy: str):
    """Influences of every query against every training record (if-query's QueryRunner, in process;
    ``prepare`` + ``score`` is what ``run`` does per job, minus writing the CSVs)."""
    from if_query.query import QueryConfig, QueryJob, QueryRunner
    from if_query.scoring import ScoreConfig

    config = QueryConfig(model=str(built["model_dir"]), factors_dir=str(factors_dir),
                         score=ScoreConfig(damping=damping, score_batch_size=32))
    runner = QueryRunner(config, quiet=True)
    job = QueryJob("bench", built["query_json"], built["train_json"], built["query_json"].parent / "out")
    results = runner.score(runner.prepare(job))
    return results.influences, auto_damping_values(runner.scorer, strategy)


def resolved_auto(built: dict, factors_dir: Path, strategy: str) -> dict[str, float]:
    """The per-module values "auto" resolves to, read from the loaded factors (no scoring)."""
    from if_query.query import QueryConfig, QueryRunner

    runner = QueryRunner(QueryConfig(model=str(built["model_dir"]), factors_dir=str(factors_dir)), quiet=True)
    return auto_damping_values(runner.load_model(), strategy)


def top1_kind(query: dict, top: dict) -> str:
    """What the best-scoring training record of a query is, relative to the queried fact."""
    if top["person"] == query["person"]:
        return "correct" if top["relation"] == query["relation"] and top["phrasing"] == "a" else "same person"
    if top["relation"] != query["relation"]:
        return "other relation"
    if top["completion"] == query["completion"]:
        return f"same value, phrasing {top['phrasing']}"
    return "other value"


TOP1_KINDS = ("correct", "same person", "same value, phrasing a", "same value, phrasing b", "other value",
              "other relation")


def retrieval_metrics(influences, built: dict) -> dict:
    """{score type: {query set: metrics}} for one scoring run.

    Metrics: ``top1`` and ``mrr`` of the correct record among all training records; ``top1_a``/``mrr_a``
    among the phrasing-a records only (a diagnostic); ``kinds``: what the top-1 record is (counts).
    """
    import numpy as np

    query_ids = list(dict.fromkeys(influences["query_id"]))
    train_ids = list(dict.fromkeys(influences["train_id"]))
    n_q, n_t = len(query_ids), len(train_ids)
    # run-query returns every (query, train) pair, query-major, in file order: reshape directly.
    assert len(influences) == n_q * n_t and list(influences["train_id"][:n_t]) == train_ids
    row = {q: i for i, q in enumerate(query_ids)}
    column = {t: j for j, t in enumerate(train_ids)}
    records = built["train_records"]
    phrasing_a = np.array([records[t]["phrasing"] == "a" for t in train_ids])
    out: dict = {}
    for score_type in SCORE_TYPES:
        matrix = influences[score_type].to_numpy(dtype=np.float64).reshape(n_q, n_t)
        out[score_type] = {}
        for name, ids in built["groups"].items():
            if not ids:
                continue
            rows = np.array([row[built["scored_as"][q]] for q in ids])
            correct = np.array([column[built["answers"][q]] for q in ids])
            sub = matrix[rows]
            own = sub[np.arange(len(ids)), correct][:, None]
            rank = (sub >= own).sum(axis=1)  # counts the correct record itself: ties count against it
            rank_a = (sub[:, phrasing_a] >= own).sum(axis=1)
            kinds = dict.fromkeys(TOP1_KINDS, 0)
            for q, best in zip(ids, sub.argmax(axis=1), strict=True):
                kinds[top1_kind(built["queries"][built["scored_as"][q]], records[train_ids[best]])] += 1
            out[score_type][name] = {
                "top1": float((rank == 1).mean()), "mrr": float((1.0 / rank).mean()),
                "top1_a": float((rank_a == 1).mean()), "mrr_a": float((1.0 / rank_a).mean()),
                "kinds": kinds,
            }
    return out


def run_seed(seed: int, args: argparse.Namespace, log) -> dict:
    from if_query.errors import RunError

    with tempfile.TemporaryDirectory(prefix=f"bench-quality-{seed}-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        built = build_seed(seed, args, work)
        info = built["info"]
        log(f"seed {seed}: trained in {info['train_s']:.1f}s; greedy accuracy a {info['accuracy_a']:.3f}, "
            f"b trained {info['accuracy_b_trained']:.3f}, b held out {info['accuracy_b_heldout']:.3f}; "
            f"{info['greedy_differs']} greedy completions differ from the facts")
        results: dict = {}
        auto: dict = {}
        relative: dict = {}
        timings: dict = {"build_s": time.perf_counter() - t, "fit_s": {}, "score_s": {}}
        for strategy in args.strategies:
            t = time.perf_counter()
            factors_dir = fit(strategy, built, work)
            timings["fit_s"][strategy] = time.perf_counter() - t
            t = time.perf_counter()
            if strategy == "identity":  # no preconditioner: damping does not apply
                runs = [("auto", None)]
            else:
                runs = [(damping_label(d), d) for d in args.dampings]
                if args.relative_dampings:
                    # one absolute value per seed and strategy: r x the mean eigenvalue (mean over modules)
                    auto_values = resolved_auto(built, factors_dir, strategy).values()
                    mean_eigen = statistics.fmean(auto_values) / HEURISTIC_DAMPING_SCALE
                    relative[strategy] = {f"rel {r:g}": r * mean_eigen for r in args.relative_dampings}
                    runs += list(relative[strategy].items())
            for label, damping in runs:
                try:
                    influences, auto_values = score(built, factors_dir, damping, strategy)
                except RunError as exc:  # e.g. a damping below |a slightly negative K-FAC eigenvalue|
                    log(f"seed {seed}: {strategy} damping {label}: {str(exc)[:90]}...")
                    results.setdefault(strategy, {})[label] = {"error": str(exc)}
                    continue
                auto[strategy] = auto_values
                results.setdefault(strategy, {})[label] = retrieval_metrics(influences, built)
            timings["score_s"][strategy] = time.perf_counter() - t
            label, first = next((k, v) for k, v in results[strategy].items() if "error" not in v)
            log(f"seed {seed}: {strategy:8s} fit {timings['fit_s'][strategy]:5.1f}s, "
                f"{len(runs)} damping(s) scored in {timings['score_s'][strategy]:5.1f}s; "
                f"damping {label if strategy != 'identity' else 'none'}: cosine top-1 "
                f"a {first['influence_cosine']['a']['top1']:.3f}, b {first['influence_cosine']['b']['top1']:.3f}")
    return {"info": info, "results": results, "auto_damping": auto, "relative_damping": relative,
            "timings": timings}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean, sd = mean_sd(values)
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"


def failures(per_seed: list[dict], strategy: str, damping: str) -> int:
    """Seeds whose scores were not finite at this damping (if-query refused them)."""
    return sum("error" in s["results"][strategy][damping] for s in per_seed)


def collect(per_seed: list[dict], strategy: str, damping: str, score_type: str, query: str, metric: str):
    """The metric of every seed that has queries in that group."""
    return [s["results"][strategy][damping][score_type][query][metric] for s in per_seed
            if query in s["results"][strategy][damping][score_type]]


def report(per_seed: list[dict], args: argparse.Namespace, command: str, runtime_s: float) -> str:
    n = len(per_seed)
    info = [s["info"] for s in per_seed]

    def mean(strategy, damping, score_type, query, metric):
        return statistics.fmean(collect(per_seed, strategy, damping, score_type, query, metric))

    lines = [
        "## if-query quality benchmark: retrieving the training record that states a fact",
        "",
        f"Command: `{command}`",
        "",
        f"Seeds {', '.join(str(s) for s in args.seeds)}; {args.n_people} people x 4 relations; corpus = all "
        f"facts in phrasing a + phrasing b for {args.b_fraction:g} of the people "
        f"({info[0]['train_records']} records); tiny GPT-2 (2 layers, d=64) trained {args.steps} steps; "
        f"influence over the 4 MLP modules; factors fitted on the corpus (true Fisher). "
        f"Queries per seed: (a) {info[0]['queries']['a']} facts in phrasing a (text = the training record), "
        f"(a') the same prompts with the model's greedy completion, (b) {info[0]['queries']['b']} facts of "
        f"held-out people in phrasing b. Correct record: the phrasing-a training record of the same fact, "
        f"ranked among all {info[0]['train_records']} training records (ties count against it). "
        + ("Values: mean ± sample sd over seeds." if n > 1 else "Values: one seed."),
        "",
        "Model greedy accuracy (mean over seeds): phrasing a {:.3f}, phrasing b trained {:.3f}, phrasing b held "
        "out {:.3f}. Greedy completions that differ from the fact, per seed (the (a') queries that differ from "
        "(a); the others are the same text): {}."
        .format(statistics.fmean(i["accuracy_a"] for i in info),
                statistics.fmean(i["accuracy_b_trained"] for i in info),
                statistics.fmean(i["accuracy_b_heldout"] for i in info),
                ", ".join(str(i["greedy_differs"]) for i in info)),
        "",
        "| strategy | score | damping | top-1 (a) | MRR (a) | top-1 (a') | MRR (a') | top-1 (b) | MRR (b) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy in args.strategies:
        dampings = list(per_seed[0]["results"][strategy])
        for score_type in SCORE_TYPES:
            for damping in dampings:
                if failed := failures(per_seed, strategy, damping):
                    cells = [f"non-finite ({failed}/{n} seeds)"] * (2 * len(QUERY_SETS))
                else:
                    cells = [fmt(collect(per_seed, strategy, damping, score_type, query, metric))
                             for query in QUERY_SETS for metric in ("top1", "mrr")]
                shown = "none" if strategy == "identity" else damping
                lines.append(f"| {strategy} | {SCORE_LABEL[score_type]} | {shown} | " + " | ".join(cells) + " |")

    lines += ["", "\"auto\" resolves to 0.1 x the mean curvature eigenvalue of each module; per strategy, the "
              "range over the 4 modules and the seeds:", ""]
    for strategy in args.strategies:
        values = [v for s in per_seed for v in s["auto_damping"].get(strategy, {}).values()]
        if values:
            lines.append(f"- {strategy}: {min(values):.2g} .. {max(values):.2g}")
    if any(s["relative_damping"] for s in per_seed):
        lines += ["", "\"rel r\" (benchmark only) = one absolute damping per seed and strategy, r x the mean "
                  "eigenvalue averaged over the modules; resolved values (range over seeds):", ""]
        for strategy in args.strategies:
            labels = list(per_seed[0]["relative_damping"].get(strategy, {}))
            if labels:
                parts = []
                for label in labels:
                    values = [s["relative_damping"][strategy][label] for s in per_seed]
                    parts.append(f"{label}: {min(values):.2g} .. {max(values):.2g}")
                lines.append(f"- {strategy}: " + "; ".join(parts))

    # Which damping is best, and how much it matters (by mean MRR on (b); (a) is saturated)
    lines += ["", "### Best damping per strategy (by mean MRR on (b))", "",
              "| strategy | score | best damping | MRR (b) | top-1 (b) | top-1 (a) | auto: MRR (b) | worst in grid: "
              "MRR (b) (damping) |", "|---|---|---|---|---|---|---|---|"]
    for strategy in args.strategies:
        if strategy == "identity":
            continue
        for score_type in SCORE_TYPES:
            by = {d: mean(strategy, d, score_type, "b", "mrr") for d in per_seed[0]["results"][strategy]
                  if not failures(per_seed, strategy, d)}
            best, worst = max(by, key=by.get), min(by, key=by.get)
            auto = f"{by['auto']:.3f}" if "auto" in by else "n/a"
            lines.append(f"| {strategy} | {SCORE_LABEL[score_type]} | {best} | {by[best]:.3f} | "
                         f"{mean(strategy, best, score_type, 'b', 'top1'):.3f} | "
                         f"{mean(strategy, best, score_type, 'a', 'top1'):.3f} | {auto} | {by[worst]:.3f} ({worst}) |")

    # Diagnostics for (b)
    first = {st: next(d for d in sorted(per_seed[0]["results"][st], key=lambda d: d != "auto")
                      if not failures(per_seed, st, d)) for st in args.strategies}
    n_right = [round(i["accuracy_b_heldout"] * i["queries"]["b"]) for i in info]
    lines += ["", "### (b) diagnostics", "",
              "MRR of the correct record split by whether the model's greedy answer to the (b) query is right "
              f"(right: {', '.join(map(str, n_right))} of {info[0]['queries']['b']} queries per seed); the rank "
              "among the phrasing-a records only; and what the top-1 training record is (counts summed over "
              "seeds).", "",
              "| strategy | score | damping | MRR (b), model right | MRR (b), model wrong | top-1 (b), a-records only "
              "| MRR (b), a-records only | " + " | ".join(TOP1_KINDS) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(TOP1_KINDS)]
    for strategy in args.strategies:
        for score_type in SCORE_TYPES:
            damping = first[strategy]
            kinds = {k: sum(s["results"][strategy][damping][score_type]["b"]["kinds"][k] for s in per_seed)
                     for k in TOP1_KINDS}
            shown = "none" if strategy == "identity" else damping
            split = [fmt(collect(per_seed, strategy, damping, score_type, group, "mrr"))
                     for group in ("b, model right", "b, model wrong")]
            lines.append(f"| {strategy} | {SCORE_LABEL[score_type]} | {shown} | {split[0]} | {split[1]} | "
                         f"{fmt(collect(per_seed, strategy, damping, score_type, 'b', 'top1_a'))} | "
                         f"{fmt(collect(per_seed, strategy, damping, score_type, 'b', 'mrr_a'))} | "
                         + " | ".join(str(kinds[k]) for k in TOP1_KINDS) + " |")

    # The targets
    if "ekfac" in args.strategies and "identity" in args.strategies:
        id_b, id_mrr = mean("identity", "auto", "influence_cosine", "b", "top1"), mean(
            "identity", "auto", "influence_cosine", "b", "mrr")
        lines += ["", "### Targets: EK-FAC influence_cosine top-1 (a) >= 0.95, and better than identity (cosine) "
                  f"on (b) (identity: top-1 {id_b:.3f}, MRR {id_mrr:.3f})", ""]
        for damping in per_seed[0]["results"]["ekfac"]:
            if failed := failures(per_seed, "ekfac", damping):
                lines.append(f"- damping {damping}: non-finite scores in {failed}/{n} seeds")
                continue
            a = mean("ekfac", damping, "influence_cosine", "a", "top1")
            b = mean("ekfac", damping, "influence_cosine", "b", "top1")
            b_mrr = mean("ekfac", damping, "influence_cosine", "b", "mrr")
            wins = {metric: sum(
                s["results"]["ekfac"][damping]["influence_cosine"]["b"][metric]
                > s["results"]["identity"]["auto"]["influence_cosine"]["b"][metric] for s in per_seed)
                for metric in ("top1", "mrr")}
            ok = a >= 0.95 and b > id_b and b_mrr > id_mrr
            lines.append(f"- damping {damping}: top-1 (a) {a:.3f}; (b) top-1 {b:.3f}, MRR {b_mrr:.3f} "
                         f"(above identity in {wins['top1']}/{n} seeds by top-1, {wins['mrr']}/{n} by MRR): "
                         f"{'MET' if ok else 'not met'}")
    fit_s = {k: statistics.fmean(s["timings"]["fit_s"][k] for s in per_seed) for k in args.strategies}
    score_s = {k: statistics.fmean(s["timings"]["score_s"][k] for s in per_seed) for k in args.strategies}
    lines += [
        "",
        f"Runtime: {runtime_s:.0f} s total ({os.cpu_count()} CPUs, {args.threads} torch thread(s)); per seed "
        f"(mean): training {statistics.fmean(i['train_s'] for i in info):.1f} s, fits "
        + ", ".join(f"{k} {v:.1f} s" for k, v in fit_s.items()) + "; scoring (all dampings) "
        + ", ".join(f"{k} {v:.1f} s" for k, v in score_s.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="world/model seeds (default 0 1 2)")
    ap.add_argument("--n-people", type=int, default=40)
    ap.add_argument("--b-fraction", type=float, default=0.5, help="fraction of people also trained in phrasing b")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the tiny GPT-2")
    ap.add_argument("--dampings", nargs="+", default=None,
                    help=f"'auto' and/or absolute values (default {' '.join(DEFAULT_DAMPINGS)})")
    ap.add_argument("--relative-dampings", type=float, nargs="*", default=None,
                    help="also score with damping = r x the mean curvature eigenvalue (averaged over modules) of "
                         f"each seed's fit, for each r given (default {' '.join(DEFAULT_RELATIVE)}; "
                         "quick: none; 0.1 is close to auto, which uses each module's own mean)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (training and scoring)")
    ap.add_argument("--quick", action="store_true",
                    help=f"1 seed, dampings {' '.join(QUICK_DAMPINGS)} (unless given explicitly)")
    ap.add_argument("--output", type=Path, default=RESULTS_DIR / "bench_quality.md")
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    raw_dampings = args.dampings or (QUICK_DAMPINGS if args.quick else DEFAULT_DAMPINGS)
    try:
        args.dampings = list(dict.fromkeys(parse_damping(d) for d in raw_dampings))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        ap.error(f"--dampings: {exc}")
    args.strategies = list(dict.fromkeys(args.strategies))
    if args.relative_dampings is None:
        args.relative_dampings = [] if args.quick else [float(r) for r in DEFAULT_RELATIVE]
    if any(r <= 0 or not math.isfinite(r) for r in args.relative_dampings):
        ap.error("--relative-dampings must be finite numbers > 0")

    command = "uv run python " + " ".join(shlex.quote(a) for a in
                                           [os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)])
    print(f"# {command}", flush=True)

    import torch
    from kronfluence.utils import constants

    assert constants.HEURISTIC_DAMPING_SCALE == HEURISTIC_DAMPING_SCALE
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", flush=True)

    per_seed = [run_seed(seed, args, log) for seed in args.seeds]
    runtime = time.perf_counter() - _T0
    text = report(per_seed, args, command, runtime)
    print()
    print(text, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    dump({"command": command, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
          "runtime_s": runtime, "per_seed": per_seed}, args.output.with_suffix(".json"))
    print(f"\nwritten: {args.output} (+ {args.output.with_suffix('.json').name})")


if __name__ == "__main__":
    main()
