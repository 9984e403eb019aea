"""Quality benchmark: does an influence score find the training record that states a queried fact?

    uv run python benchmarks/bench_quality.py                 # facts2 + facts2-early, 10 seeds, every method (~14 min)
    uv run python benchmarks/bench_quality.py --quick         # the same worlds, 2 seeds, 4 methods (~1.5 min)
    uv run python benchmarks/bench_quality.py --world readme --seeds 0 1 2 --output /tmp/readme.md
    uv run python benchmarks/bench_quality.py --from-json /tmp/a.json /tmp/b.json   # one report of earlier runs

Worlds (scripts/tiny_world.py; one world, model and sampling seed per benchmark seed)
    facts2        the headline: 40 made-up people x {city, job}, every fact in ONE phrasing ("Zorvan Quill lives
                  in" -> " Belmora."), a tiny GPT-2 (2 layers, d=64) trained 400 steps; 80 training records. The
                  model memorizes every record (its softmax is nearly one-hot on the training completions).
    facts2-early  the same world and model after 40 steps (greedy accuracy on the facts about 0.3): the model is
                  unsure, its gradients still carry the facts, and sampled labels often differ from the data's.
    facts2-noeos, facts2-early-noeos
                  the same two, but the model is never trained on the EOS after a fact (so it is unsure there).
    readme        the earlier README world: 4 relations, phrasing a for everyone plus phrasing b ("The home city
                  of Zorvan Quill is") for half of the people, 600 steps; 240 training records.
    The training records are both the train set and the Hessian-fitting data.

Queries (completion = the true fact); the correct answer is the phrasing-a training record of the same fact
    (a) every fact in phrasing a: the query text equals its training record (same phrasing);
    (b) the facts in phrasing b ("The home city of X is"): every fact for the facts2 worlds, the held-out people's for
        readme (their phrasing-b records are not in the corpus) -- the other phrasing, the informative test.
    Retrieval: the rank of the correct record among all training records by the score (ties count against it:
    rank = 1 + the number of OTHER records scoring >= it); top-1 accuracy and mean reciprocal rank (MRR), for
    influence_cosine (how if-query ranks) and the raw influence score.

Methods (EK-FAC on the 4 MLP projections, damping "auto" = 0.1 x each module's mean eigenvalue, unless named)
    kronfluence        bare Kronfluence, called directly: a task written as in Kronfluence's examples (true Fisher:
                       labels drawn with torch.multinomial from the global RNG, seeded with the seed), fit_all_factors
                       + compute_pairwise_scores + compute_self_scores on the same model, tokenized data and damping
                       heuristic (ScoreArguments(damping_factor=None)); cosine from its self scores.
    kronfluence-x4     the same with each fitting example used 4 times (4 independent label draws per position).
    kronfluence-noeos  the same as kronfluence, with the EOS token left out of the scored gradients (the query
                       measurement and the train-side loss; the fit keeps it).
    if-query           fit_hessians (defaults: true Fisher, --seed = the seed) + run-query's scorer (QueryRunner).
    if-query-old       if-query with the label sampling it used before (one generator restarted at every stage: the
                       covariance and lambda stages draw the same labels), emulated by patching sample_labels.
    if-query-empirical --fisher empirical (the data's own labels).
    if-query-noeos     if-query scored with run-query's --no-eos-in-loss (the EOS token out of the scored
                       queries and train records, so out of both gradients; the fit keeps EOS).
    if-query-wholeseq  if-query with a train-side loss over the whole sequence (prompt and completion, as for
                       pretraining documents; emulated by relabelling the train records after tokenization): the
                       queries keep the completion loss, the cosine uses each side's own self-influence.
    if-query-mixed     if-query fitted on the training records plus the queries (a "mixed", task-specific Hessian
                       as in TrackStar, Chang et al. 2024; with run-query this is a --hessian-dataset JSON holding
                       both files' records, so one fit per query folder).
    if-query-rel R     if-query's factors scored with one absolute damping = R x the mean eigenvalue averaged over
                       the modules (R in --relative-dampings; auto is 0.1 x each module's own mean).
    identity           plain gradient dot products (no Hessian): the floor.

Statistics: mean +- standard error over seeds; for each method the paired difference to bare Kronfluence (same
world, model, seed) with its standard error, and the number of seeds where the method is above / below it.

Results: printed, and written to benchmarks/results/bench_quality.md (+ .json with the per-seed numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    relations: tuple[str, ...]
    b_fraction: float  # people whose phrasing-b facts are also trained
    steps: int
    label_eos: bool = True
    n_people: int = 40
    loss_on: str = "completion"  # tiny_world.train_tiny_gpt2: "completion" (+ EOS) or "all" tokens
    lr: float = 3e-3


WORLDS = {
    "facts2": WorldSpec(relations=("city", "job"), b_fraction=0.0, steps=400),
    "facts2-early": WorldSpec(relations=("city", "job"), b_fraction=0.0, steps=40),
    "facts2-noeos": WorldSpec(relations=("city", "job"), b_fraction=0.0, steps=400, label_eos=False),
    "facts2-early-noeos": WorldSpec(relations=("city", "job"), b_fraction=0.0, steps=40, label_eos=False),
    "readme": WorldSpec(relations=tuple(r.name for r in tw.RELATIONS), b_fraction=0.5, steps=600),
}
METHODS = ("identity", "kronfluence", "kronfluence-x4", "kronfluence-noeos", "if-query", "if-query-old",
           "if-query-empirical", "if-query-noeos", "if-query-wholeseq", "if-query-mixed")
QUICK_METHODS = ("kronfluence", "if-query", "if-query-old", "if-query-mixed")
DEFAULT_WORLDS = ("facts2", "facts2-early")
DEFAULT_RELATIVE = (0.01, 1.0, 10.0)
BASELINE = "kronfluence"
QUERY_SETS = ("a", "b")
SCORES = ("cosine", "raw")
FIT_BATCH = 16
SCORE_BATCH = 32


def dump(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# One seed: world, model, queries
# ---------------------------------------------------------------------------------------------


def build(spec: WorldSpec, seed: int, work: Path, threads: int) -> dict:
    """Train the seed's model; write model dir, train.json, query.json; return ids and correct answers."""
    world = tw.make_world(seed, n_people=spec.n_people)
    world = dataclasses.replace(world, relations=tuple(world.relation(r) for r in spec.relations))
    ts = tw.training_records(world, b_fraction=spec.b_fraction, seed=seed)
    tokenizer = tw.train_tokenizer(tw.corpus_texts(ts.records), vocab_size=512)
    t = time.perf_counter()
    model = tw.train_tiny_gpt2(ts.records, tokenizer, seed=seed, steps=spec.steps, label_eos=spec.label_eos,
                               loss_on=spec.loss_on, lr=spec.lr, num_threads=threads)
    train_s = time.perf_counter() - t
    model_dir = work / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    dump(ts.records, work / "train.json")

    queries, query_set = [], []
    for phrasing, people in (("a", None), ("b", ts.heldout_people)):
        for rec in tw.fact_records(world, phrasing, people):
            slug = world.person(rec["person"]).slug
            queries.append(dict(rec, pair_id=f"q{phrasing}-{slug}-{rec['relation']}",
                                answer=f"{slug}-{rec['relation']}-a"))
            query_set.append(phrasing)
    dump(queries, work / "query.json")
    train_ids = [r["pair_id"] for r in ts.records]
    column = {t: j for j, t in enumerate(train_ids)}
    b_queries = [q for q, s in zip(queries, query_set, strict=True) if s == "b"]
    return {
        "work": work, "model_dir": model_dir, "train_json": work / "train.json", "query_json": work / "query.json",
        "train_ids": train_ids, "query_ids": [q["pair_id"] for q in queries], "query_set": query_set,
        "answer": [column[q["answer"]] for q in queries], "train_records": ts.records, "queries": queries,
        "info": {"train_records": len(ts.records), "queries": {s: query_set.count(s) for s in QUERY_SETS},
                 "accuracy_a": tw.accuracy(model, tokenizer, tw.fact_records(world, "a")),
                 "accuracy_b": tw.accuracy(model, tokenizer, b_queries), "train_s": train_s},
    }


def retrieval(scores, built: dict) -> dict:
    """{query set: {"top1", "mrr"}} for a (queries x train) score matrix."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    answer = np.array(built["answer"])
    own = scores[np.arange(len(answer)), answer][:, None]
    rank = (scores >= own).sum(axis=1)  # counts the correct record itself: ties count against it
    sets = np.array(built["query_set"])
    return {name: {"top1": float((rank[sets == name] == 1).mean()), "mrr": float((1.0 / rank[sets == name]).mean())}
            for name in QUERY_SETS}


# ---------------------------------------------------------------------------------------------
# if-query
# ---------------------------------------------------------------------------------------------


def fit_if_query(built: dict, name: str, strategy: str = "ekfac", fisher: str = "true", seed: int = 0,
                 hessian_dataset: Path | None = None) -> Path:
    from if_query.config import FitConfig
    from if_query.fitting import fit_hessians

    factors_dir = built["work"] / f"factors-{name}"
    config = FitConfig(model=str(built["model_dir"]), hessian_dataset=str(hessian_dataset or built["train_json"]),
                       output_dir=str(factors_dir), strategy=strategy, fisher=fisher, seed=seed,
                       factor_batch_size=FIT_BATCH, lambda_batch_size=FIT_BATCH)
    fit_hessians(config, quiet=True)
    return factors_dir


def score_if_query(built: dict, factors_dir: Path, damping: float | None = None, without_eos: bool = False,
                   train_whole_sequence: bool = False):
    """(raw, cosine) matrices (queries x train) from run-query's scorer, in process. ``without_eos``: run-query's
    --no-eos-in-loss (EOS out of both gradients; the fit keeps it). ``train_whole_sequence``: the train records'
    loss (so their gradients and self-influences) covers every token, prompt included (emulated: their labels
    are replaced after tokenization); the queries' covers the completion, and the fit is unchanged."""
    from if_query.config import QueryConfig
    from if_query.query import QueryRunner, query_jobs

    config = QueryConfig(model=str(built["model_dir"]), factors_dir=str(factors_dir),
                         query_json=built["query_json"], train_json=built["train_json"],
                         output_dir=built["work"] / "out", eos_in_loss=not without_eos,
                         damping="auto" if damping is None else str(damping), score_batch_size=SCORE_BATCH)
    runner = QueryRunner(config, quiet=True)
    [job] = query_jobs(config)
    prepared = runner.prepare(job)
    if train_whole_sequence:
        from if_query.tokenization import TokenizedExample

        prepared.train_tokens = [TokenizedExample(t.input_ids, t.input_ids) for t in prepared.train_tokens]
    influences = runner.score(prepared).influences
    shape = (len(built["query_ids"]), len(built["train_ids"]))
    assert list(influences["query_id"][:: shape[1]]) == built["query_ids"]
    assert list(influences["train_id"][: shape[1]]) == built["train_ids"]
    return (influences["influence_score"].to_numpy().reshape(shape),
            influences["influence_cosine"].to_numpy().reshape(shape))


def mean_eigenvalues(factors_dir: Path) -> list[float]:
    """Each module's mean EK-FAC eigenvalue (lambda / n), as Kronfluence's damping heuristic reads it."""
    from kronfluence.factor.eigen import load_lambda_matrices
    from kronfluence.utils.constants import LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED

    lambdas = load_lambda_matrices(output_dir=factors_dir / "factors_hessian")
    return [float((lambdas[LAMBDA_MATRIX_NAME][m].double() / lambdas[NUM_LAMBDA_PROCESSED][m].double()).mean())
            for m in lambdas[LAMBDA_MATRIX_NAME]]


class OldSampling:
    """The label sampling if-query used before LABEL_SAMPLING: one seeded generator restarted at every stage
    (so with equal batches the covariance and lambda stages draw the same labels)."""

    def __init__(self):
        self.stage = None
        self.generator = None

    def __call__(self, logits, labels, batch, stage, seed):
        import torch

        from if_query.tokenization import IGNORE_INDEX

        if stage != self.stage:
            self.stage, self.generator = stage, torch.Generator(device=logits.device).manual_seed(seed)
        with torch.no_grad():
            labelled = labels != IGNORE_INDEX
            probabilities = torch.softmax(logits[labelled].detach().float(), dim=-1)
            drawn = labels.clone()
            drawn[labelled] = torch.multinomial(probabilities, 1, generator=self.generator).squeeze(-1)
        return drawn


# ---------------------------------------------------------------------------------------------
# Bare Kronfluence
# ---------------------------------------------------------------------------------------------


def kronfluence_scores(built: dict, seed: int, name: str, repeats: int = 1, without_eos: bool = False):
    """(raw, cosine) matrices from Kronfluence's Analyzer on the same model, tokenized data and damping rule.
    ``without_eos``: the EOS label is left out of the measurement and of the train loss when scoring (not
    when fitting)."""
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    from if_query.modeling import find_mlp_modules, load_model, load_tokenizer, make_trackable
    from if_query.records import load_examples
    from if_query.tokenization import IGNORE_INDEX, Collator, ExampleTokenizer

    tokenizer = load_tokenizer(str(built["model_dir"]))
    example_tokenizer = ExampleTokenizer(tokenizer, 512)
    train = example_tokenizer.tokenize_all(load_examples(built["train_json"]))
    queries = example_tokenizer.tokenize_all(load_examples(built["query_json"]))
    model = load_model(str(built["model_dir"]), None, torch.float32)
    modules = find_mlp_modules(model)
    model = make_trackable(model, modules)
    eos = tokenizer.eos_token_id

    class BareTask(Task):  # as in Kronfluence's language-model examples
        def loss(self, batch, model, sample=False, without_eos=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            if sample:
                with torch.no_grad():
                    probabilities = torch.softmax(logits.detach(), dim=-1)
                    drawn = torch.multinomial(probabilities.view(-1, probabilities.size(-1)), 1)
                    labels = torch.where(labels != IGNORE_INDEX, drawn.view_as(labels), labels)
            if without_eos:
                labels = torch.where(labels == eos, IGNORE_INDEX, labels)
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")

        def compute_train_loss(self, batch, model, sample=False):
            # Kronfluence fits with sample=True (true Fisher) and scores train examples with sample=False.
            return self.loss(batch, model, sample=sample, without_eos=without_eos and not sample)

        def compute_measurement(self, batch, model):
            return self.loss(batch, model, without_eos=without_eos)

        def get_influence_tracked_modules(self):
            return [m.name for m in modules]

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = BareTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name=name, model=model, task=task, output_dir=str(built["work"]),
                        log_level=logging.ERROR, disable_tqdm=True)
    loader = DataLoaderKwargs(collate_fn=Collator(tokenizer.pad_token_id))
    torch.manual_seed(seed)
    analyzer.fit_all_factors("f", train * repeats, per_device_batch_size=FIT_BATCH, dataloader_kwargs=loader,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=None)  # Kronfluence's heuristic = if-query's "auto"
    analyzer.compute_pairwise_scores("pairwise", "f", queries, train, per_device_query_batch_size=SCORE_BATCH,
                                     per_device_train_batch_size=SCORE_BATCH, dataloader_kwargs=loader,
                                     score_args=score_args, overwrite_output_dir=True)
    analyzer.compute_self_scores("train_self", "f", train, per_device_train_batch_size=SCORE_BATCH,
                                 dataloader_kwargs=loader, score_args=score_args, overwrite_output_dir=True)
    query_args = dataclasses.replace(score_args, use_measurement_for_self_influence=True)
    analyzer.compute_self_scores("query_self", "f", queries, per_device_train_batch_size=SCORE_BATCH,
                                 dataloader_kwargs=loader, score_args=query_args, overwrite_output_dir=True)
    raw = analyzer.load_pairwise_scores("pairwise")["all_modules"].double()
    train_self = analyzer.load_self_scores("train_self")["all_modules"].double()
    query_self = analyzer.load_self_scores("query_self")["all_modules"].double()
    cosine = raw / torch.sqrt(query_self.clamp_min(0)[:, None] * train_self.clamp_min(0)[None, :])
    return raw.numpy(), torch.nan_to_num(cosine, nan=0.0).clamp(-1, 1).numpy()


# ---------------------------------------------------------------------------------------------
# Running the methods
# ---------------------------------------------------------------------------------------------


def run_seed(world: str, seed: int, args: argparse.Namespace, log) -> dict:
    from if_query import loss as loss_module

    with tempfile.TemporaryDirectory(prefix=f"bench-quality-{world}-{seed}-") as tmp:
        built = build(WORLDS[world], seed, Path(tmp), args.threads)
        info = built["info"]
        log(f"{world} seed {seed}: trained in {info['train_s']:.1f}s; greedy accuracy a {info['accuracy_a']:.3f}, "
            f"b {info['accuracy_b']:.3f}")
        results, seconds, extra = {}, {}, {}

        def record(name, matrices, started):
            raw, cosine = matrices
            results[name] = {"cosine": retrieval(cosine, built), "raw": retrieval(raw, built)}
            seconds[name] = time.perf_counter() - started
            r = results[name]["cosine"]
            log(f"  {name:22s} {seconds[name]:5.1f}s  cosine top-1 a {r['a']['top1']:.3f} b {r['b']['top1']:.3f}")

        default_factors = None
        for method in args.methods:
            t = time.perf_counter()
            if method == "identity":
                record(method, score_if_query(built, fit_if_query(built, method, strategy="identity")), t)
            elif method == "kronfluence":
                record(method, kronfluence_scores(built, seed, method), t)
            elif method == "kronfluence-x4":
                record(method, kronfluence_scores(built, seed, method, repeats=4), t)
            elif method == "kronfluence-noeos":
                record(method, kronfluence_scores(built, seed, method, without_eos=True), t)
            elif method == "if-query":
                default_factors = fit_if_query(built, method, seed=seed)
                record(method, score_if_query(built, default_factors), t)
            elif method == "if-query-old":
                original, loss_module.sample_labels = loss_module.sample_labels, OldSampling()
                try:
                    factors = fit_if_query(built, method, seed=seed)
                finally:
                    loss_module.sample_labels = original
                record(method, score_if_query(built, factors), t)
            elif method == "if-query-empirical":
                record(method, score_if_query(built, fit_if_query(built, method, fisher="empirical")), t)
            elif method == "if-query-mixed":
                mixed = built["work"] / "mixed.json"
                dump(built["train_records"] + built["queries"], mixed)
                record(method, score_if_query(built, fit_if_query(built, method, seed=seed, hessian_dataset=mixed)), t)
            elif method == "if-query-wholeseq":
                default_factors = default_factors or fit_if_query(built, "if-query", seed=seed)
                record(method, score_if_query(built, default_factors, train_whole_sequence=True), t)
            elif method == "if-query-noeos":
                default_factors = default_factors or fit_if_query(built, "if-query", seed=seed)
                record(method, score_if_query(built, default_factors, without_eos=True), t)
            else:
                raise ValueError(method)
        if args.relative_dampings:
            default_factors = default_factors or fit_if_query(built, "if-query", seed=seed)
            means = mean_eigenvalues(default_factors)
            extra["auto"] = [0.1 * m for m in means]
            for r in args.relative_dampings:
                t = time.perf_counter()
                damping = r * statistics.fmean(means)
                extra[f"if-query-rel {r:g}"] = damping
                record(f"if-query-rel {r:g}", score_if_query(built, default_factors, damping=damping), t)
    return {"world": world, "seed": seed, "info": info, "results": results, "seconds": seconds, "damping": extra}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def paired(runs: list[dict], method: str, score: str, query: str, metric: str) -> str:
    """Mean ± se of (method - bare Kronfluence) over the seeds that ran both, and how many seeds are above/below."""
    both = [s["results"] for s in runs if method in s["results"] and BASELINE in s["results"]]
    if method == BASELINE or not both:
        return ""
    differences = [r[method][score][query][metric] - r[BASELINE][score][query][metric] for r in both]
    above, below = sum(d > 0.0005 for d in differences), sum(d < -0.0005 for d in differences)
    return f"{mean_se(differences).replace('0.', '.').replace('-.', '−.')} ({above}↑ {below}↓)"


def world_title(world: str, runs: list[dict]) -> str:
    spec, info = WORLDS[world], runs[0]["info"]
    trained = ("phrasing a only" if not spec.b_fraction
               else f"phrasing a + phrasing b for {spec.b_fraction:g} of the people")
    return (f"### World `{world}`: {spec.n_people} people x {', '.join(spec.relations)}; {info['train_records']} "
            f"training records ({trained}{'; EOS never trained' if not spec.label_eos else ''}); {spec.steps} "
            f"training steps; {len(runs)} seed(s)")


def report(per_seed: list[dict], args: argparse.Namespace, command: str, runtime_s: float) -> str:
    lines = ["## if-query quality benchmark: retrieving the training record that states a fact", "",
             f"Command: `{command}`", ""]
    for world in args.worlds:
        runs = [s for s in per_seed if s["world"] == world]
        info = runs[0]["info"]
        methods = list(dict.fromkeys(m for s in runs for m in s["results"]))

        def values(method, score, query, metric, runs=runs):
            return [s["results"][method][score][query][metric] for s in runs if method in s["results"]]

        lines += [
            world_title(world, runs), "",
            f"Queries per seed: (a) {info['queries']['a']} in the training phrasing, (b) {info['queries']['b']} in "
            f"the other phrasing. Model greedy accuracy: (a) "
            f"{statistics.fmean(s['info']['accuracy_a'] for s in runs):.3f}, (b) "
            f"{statistics.fmean(s['info']['accuracy_b'] for s in runs):.3f}. Mean ± standard error over seeds "
            f"(n); Δ = paired difference to bare Kronfluence, with the seeds above ↑ / below ↓ it.",
            "",
            "| method | n | top-1 (b) cosine | Δ top-1 (b) | MRR (b) cosine | Δ MRR (b) | top-1 (b) raw "
            "| top-1 (a) raw | Δ top-1 (a) raw | top-1 (a) cosine |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method in methods:
            cells = [str(len(values(method, "cosine", "b", "top1"))),
                     mean_se(values(method, "cosine", "b", "top1")), paired(runs, method, "cosine", "b", "top1"),
                     mean_se(values(method, "cosine", "b", "mrr")), paired(runs, method, "cosine", "b", "mrr"),
                     mean_se(values(method, "raw", "b", "top1")), mean_se(values(method, "raw", "a", "top1")),
                     paired(runs, method, "raw", "a", "top1"), mean_se(values(method, "cosine", "a", "top1"))]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        auto = [v for s in runs for v in s["damping"].get("auto", [])]
        if auto:
            lines += ["", f"auto damping (0.1 x each module's mean eigenvalue): {min(auto):.2g} .. {max(auto):.2g}; "
                      "if-query-rel R = R x the mean eigenvalue averaged over the modules."]
        seconds = {m: statistics.fmean(s["seconds"][m] for s in runs if m in s["seconds"]) for m in methods}
        lines += ["", "Seconds per seed (fit + score): " + ", ".join(f"{m} {v:.1f}" for m, v in seconds.items())
                  + f"; model training {statistics.fmean(s['info']['train_s'] for s in runs):.1f}.", ""]
    lines.append(f"Runtime: {runtime_s:.0f} s ({os.cpu_count()} CPUs, {args.threads} torch thread(s)).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", dest="worlds", nargs="+", default=list(DEFAULT_WORLDS), choices=list(WORLDS))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0..9 (quick: 0 1)")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                    help=f"default: all (quick: {' '.join(QUICK_METHODS)})")
    ap.add_argument("--relative-dampings", type=float, nargs="*", default=None,
                    help=f"if-query-rel R rows (default {' '.join(map(str, DEFAULT_RELATIVE))}; quick: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="2 seeds, the main methods, no relative dampings")
    ap.add_argument("--output", type=Path, default=RESULTS_DIR / "bench_quality.md")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="run nothing: report the per-seed results saved by earlier runs (.json), together")
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else list(range(10))
    if args.methods is None:
        args.methods = list(QUICK_METHODS if args.quick else METHODS)
    if args.relative_dampings is None:
        args.relative_dampings = [] if args.quick else list(DEFAULT_RELATIVE)
    if any(r <= 0 or not math.isfinite(r) for r in args.relative_dampings):
        ap.error("--relative-dampings must be finite numbers > 0")
    command = "uv run python " + " ".join(shlex.quote(a) for a in
                                           [os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)])
    print(f"# {command}", flush=True)

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", flush=True)

    if args.from_json:
        saved = [json.loads(path.read_text(encoding="utf-8")) for path in args.from_json]
        per_seed = [run for one in saved for run in one["per_seed"]]
        args.worlds = list(dict.fromkeys(run["world"] for run in per_seed))
        command = "; ".join(one["command"] for one in saved)
        runtime = sum(one["runtime_s"] for one in saved)
    else:
        per_seed = [run_seed(world, seed, args, log) for world in args.worlds for seed in args.seeds]
        runtime = time.perf_counter() - _T0
    text = report(per_seed, args, command, runtime)
    print()
    print(text, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    dump({"command": command, "args": json.loads(json.dumps(vars(args), default=str)),
          "runtime_s": runtime, "per_seed": per_seed}, args.output.with_suffix(".json"))
    print(f"\nwritten: {args.output} (+ {args.output.with_suffix('.json').name})")


if __name__ == "__main__":
    main()
