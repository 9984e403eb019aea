"""Quality benchmark: does an influence score find the training record that states a queried fact, and does it
predict what leaving training records out does to a query's loss (LDS)?

    uv run python benchmarks/bench_quality.py                 # facts2 + facts2-early, 10 seeds, every method (~14 min)
    uv run python benchmarks/bench_quality.py --quick         # the same worlds, 2 seeds, 4 methods (~1.5 min)
    uv run python benchmarks/bench_quality.py --world readme --seeds 0 1 2 --output /tmp/readme.md
    uv run python benchmarks/bench_quality.py --from-json /tmp/a.json /tmp/b.json   # one report of earlier runs
    uv run python benchmarks/bench_quality.py --world facts2-early --seeds 0 1 2 --lds 32 --ceiling-subsets 16
                                                              # + LDS over 32 subset models per seed (the LDS methods)
    uv run python benchmarks/bench_quality.py --self-check    # ASTRA against dense matrices (~1 min)
    uv run python benchmarks/bench_quality.py --world facts2-early docs --seeds 0 1 2 3 4 --lds 32 \
        --ceiling-subsets 16 --methods tracks             # --track mlp, attention, all-linear: if-query and Kronfluence

The LDS, its ceiling, BM25 and the ASTRA prototype live in bench_lds.py (its docstring says what each is); this
file is the one entry point.

Worlds (if_query.demo.tiny_world; one world, model and sampling seed per benchmark seed)
    facts2        the headline: 40 made-up people x {city, job}, every fact in ONE phrasing ("Zorvan Quill lives
                  in" -> " Belmora."), a tiny GPT-2 (2 layers, d=64) trained 400 steps; 80 training records. The
                  model memorizes every record (its softmax is nearly one-hot on the training completions).
    facts2-early  the same world and model after 40 steps (greedy accuracy on the facts about 0.3): the model is
                  unsure, its gradients still carry the facts, and sampled labels often differ from the data's.
    facts2-noeos, facts2-early-noeos
                  the same two, but the model is never trained on the EOS after a fact (so it is unsure there).
    readme        the earlier README world: 4 relations, phrasing a for everyone plus phrasing b ("The home city
                  of Zorvan Quill is") for half of the people, 600 steps; 240 training records.
    docs          real text, not facts: 64 prose sentences of CPython's own help topics (pydoc_data.topics, shipped
                  with CPython: nothing is downloaded; the text is the running Python's), drawn per seed. A record
                  is a sentence cut into its lead and continuation (tiny_world.DocSentence): phrasing a is the lead
                  -> the continuation ("Otherwise, "raise" evaluates the first expression" -> " as the exception
                  object."), as a language model is trained on running text. Phrasing b, the other phrasing, asks
                  for the same continuation the way a user who half-remembers a passage would: naming the help
                  topic and quoting only the lead's last 4 words ("From The "raise" statement: ... evaluates the
                  first expression" -> " as the exception object."). A quarter of the sentences also have their
                  phrasing b trained (the format records: they teach that form, as readme's phrasing-b records
                  do, and stay in every LDS subset); the other 48 sentences' phrasing b are the queries (b).
                  80 training records, the same tiny GPT-2 trained 80 steps in batches of 32 (greedy accuracy on
                  the continuations about 0.15-0.25: partly learned, like facts2-early). The continuation is unique
                  text, so finding its record is easy for every Hessian (top-1 (b) is 1.0); the LDS is the test.
    The training records are both the train set and the Hessian-fitting data.

Queries (completion = the true fact); the correct answer is the phrasing-a training record of the same fact
    (a) every fact in phrasing a: the query text equals its training record (same phrasing);
    (b) the facts in phrasing b ("The home city of X is"): every fact for the facts2 worlds, the held-out people's for
        readme (their phrasing-b records are not in the corpus) -- the other phrasing, the informative test.
    Retrieval: the rank of the correct record among all training records by the score (ties count against it:
    rank = 1 + the number of OTHER records scoring >= it); top-1 accuracy and mean reciprocal rank (MRR), for
    influence_cosine (how if-query ranks) and the raw influence score.

Methods (EK-FAC on the 4 MLP projections, damping "auto" = 0.1 x each module's mean eigenvalue, unless named;
"--methods tracks" = the 6 methods of the two --track rows below and the two defaults)
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
    if-query-diagonal, if-query-kfac
                       fit_hessians --strategy diagonal / kfac + run-query's scorer.
    if-query-attention, if-query-all-linear
                       fit-hessians --track attention (the 4 attention projections: c_attn, attn.c_proj of each
                       block) / --track all-linear (those and the MLP's: 8) + run-query's scorer.
    kronfluence-attention, kronfluence-all-linear
                       bare Kronfluence tracking the same modules (kronfluence-all-linear is the kronfluence-attn of
                       earlier tables: the MLP and the attention projections).
    bm25               BM25 (rank_bm25) of each query's text against each record's text: a baseline without a model.
    if-query-astra N   if-query's EK-FAC factors, each inverse-Hessian-vector product refined by N steps of
                       EK-FAC-preconditioned Neumann iteration on the exact Gauss-Newton matrix of the fitting data
                       (ASTRA; bench_lds.refine_ihvp, a prototype refining whichever side has fewer vectors),
                       N in --refine-steps.
    if-query-refine N  run-query --refine-steps N itself (the queries refined, every fitting record in each
                       Gauss-Newton batch), N in --refine-steps.

LDS (--lds M; bench_lds.py): M subset models per seed (random halves of the non-format records, same
initialisation and batch order as the full model); per other-phrasing query (b), the Spearman correlation over the
subsets between -sum_{t in S} raw score(q, t) and the measured summed loss; the mean over queries. The ceiling: the
first --ceiling-subsets subsets trained again from another seed, the same correlation between the two runs.

Statistics: mean +- standard error over seeds; for each method the paired difference to bare Kronfluence (same
world, model, seed) with its standard error, and the number of seeds where the method is above / below it.

Results: printed, and written to benchmarks/results/bench_quality.md (+ .json with the per-seed numbers; with --lds
each method's LDS is results[method]["raw"]["b"]["lds"]).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_T0 = time.perf_counter()
import bench_lds  # noqa: E402
from common import REPO, dump  # noqa: E402
from common import RESULTS as RESULTS_DIR  # noqa: E402

from if_query.demo import tiny_world as tw  # noqa: E402


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    relations: tuple[str, ...]  # facts worlds: tiny_world's relations
    b_fraction: float  # people (docs: sentences) whose phrasing-b records are also trained: the format records
    steps: int
    label_eos: bool = True
    n_people: int = 40
    loss_on: str = "completion"  # tiny_world.train_tiny_gpt2: "completion" (+ EOS) or "all" tokens
    lr: float = 3e-3
    kind: str = "facts"  # "facts" (tiny_world's made-up people) or "docs" (tiny_world.doc_corpus: real text)
    n_sentences: int = 64  # docs worlds
    n_layer: int = 2  # the model (tiny_world.train_tiny_gpt2) and its tokenizer
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 64
    vocab_size: int = 512
    batch_size: int = 64


WORLDS = {
    "facts2": WorldSpec(relations=("city", "job"), b_fraction=0.0, steps=400),
    "facts2-early": WorldSpec(relations=("city", "job"), b_fraction=0.0, steps=40),
    "facts2-noeos": WorldSpec(relations=("city", "job"), b_fraction=0.0, steps=400, label_eos=False),
    "facts2-early-noeos": WorldSpec(relations=("city", "job"), b_fraction=0.0, steps=40, label_eos=False),
    "readme": WorldSpec(relations=tuple(r.name for r in tw.RELATIONS), b_fraction=0.5, steps=600),
    "docs": WorldSpec(relations=(), b_fraction=0.25, steps=80, kind="docs", n_positions=96, batch_size=32),
}
# --self-check: a model small enough for dense matrices (1 block, d=16: 2,128 tracked parameters), 4 records
SELF_CHECK_WORLD = WorldSpec(relations=("city",), b_fraction=0.0, steps=30, n_people=4, n_layer=1, n_embd=16,
                             n_head=2, vocab_size=300)
METHODS = ("identity", "kronfluence", "kronfluence-x4", "kronfluence-noeos", "if-query", "if-query-old",
           "if-query-empirical", "if-query-noeos", "if-query-wholeseq", "if-query-mixed")  # the default run's
TRACKS = ("mlp", "attention", "all-linear")  # fit-hessians --track; the methods below name the others
TRACK_METHODS = tuple(f"{engine}{'' if track == 'mlp' else '-' + track}" for track in TRACKS
                      for engine in ("kronfluence", "if-query"))
EXTRA_METHODS = ("if-query-diagonal", "if-query-kfac", "bm25", "if-query-astra", "if-query-refine",
                 *(m for m in TRACK_METHODS if m not in METHODS))
LDS_METHODS = ("identity", "if-query-diagonal", "if-query-kfac", "if-query", "kronfluence", "kronfluence-x4", "bm25",
               "if-query-mixed", "kronfluence-all-linear", "if-query-astra")
PRESETS = {"tracks": TRACK_METHODS}  # --methods tracks
DEFAULT_REFINE_STEPS = (0, 5, 20, 50)
DEFAULT_CEILING_SUBSETS = 8
QUICK_METHODS = ("kronfluence", "if-query", "if-query-old", "if-query-mixed")
DEFAULT_WORLDS = ("facts2", "facts2-early")
DEFAULT_RELATIVE = (0.01, 1.0, 10.0)
BASELINE = "kronfluence"
QUERY_SETS = ("a", "b")
SCORES = ("cosine", "raw")
FIT_BATCH = 16
SCORE_BATCH = 32


# ---------------------------------------------------------------------------------------------
# One seed: world, model, queries
# ---------------------------------------------------------------------------------------------


def world_records(spec: WorldSpec, seed: int) -> tuple[list[dict], list[dict], set[str]]:
    """(training records, queries, ids of the format records) of a seed's world. Queries are records with
    their "phrasing" (a or b) and "answer" (the pair_id of the phrasing-a training record of the same fact or
    sentence); format records are the trained phrasing-b records (they teach the other phrasing)."""
    if spec.kind == "docs":
        corpus = tw.doc_corpus(seed, n_sentences=spec.n_sentences, b_fraction=spec.b_fraction)
        heldout = set(corpus.heldout_slugs)
        queries = [dict(s.record(phrasing), pair_id=f"q{phrasing}-{s.slug}", answer=f"{s.slug}-a")
                   for phrasing in QUERY_SETS for s in corpus.sentences if phrasing == "a" or s.slug in heldout]
        return corpus.records, queries, {f"{slug}-b" for slug in corpus.format_slugs}
    world = tw.make_world(seed, n_people=spec.n_people)
    world = dataclasses.replace(world, relations=tuple(world.relation(r) for r in spec.relations))
    ts = tw.training_records(world, b_fraction=spec.b_fraction, seed=seed)
    queries = []
    for phrasing, people in (("a", None), ("b", ts.heldout_people)):
        for rec in tw.fact_records(world, phrasing, people):
            slug = world.person(rec["person"]).slug
            queries.append(dict(rec, pair_id=f"q{phrasing}-{slug}-{rec['relation']}",
                                answer=f"{slug}-{rec['relation']}-a"))
    return ts.records, queries, {r["pair_id"] for r in ts.records if r["phrasing"] == "b"}


def train_model(spec: WorldSpec, records: list[dict], tokenizer, threads: int, seed: int, keep=None):
    """The world's model trained with ``seed`` (initialisation and batch order) on ``records`` (the ``keep`` ones)."""
    return tw.train_tiny_gpt2(records, tokenizer, seed=seed, steps=spec.steps, label_eos=spec.label_eos,
                              loss_on=spec.loss_on, lr=spec.lr, num_threads=threads, n_layer=spec.n_layer,
                              n_embd=spec.n_embd, n_head=spec.n_head, n_positions=spec.n_positions,
                              batch_size=spec.batch_size, keep=keep)


def build(spec: WorldSpec, seed: int, work: Path, threads: int) -> dict:
    """Train the seed's model; write model dir, train.json, query.json; return ids, correct answers, and what
    the LDS needs (``train(seed=, keep=)`` retrains the world's model, ``is_format`` per training record)."""
    records, queries, format_ids = world_records(spec, seed)
    tokenizer = tw.train_tokenizer(tw.corpus_texts(records), vocab_size=spec.vocab_size)
    train = functools.partial(train_model, spec, records, tokenizer, threads)
    t = time.perf_counter()
    model = train(seed=seed)
    train_s = time.perf_counter() - t
    model_dir = work / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    dump(records, work / "train.json")
    dump(queries, work / "query.json")
    train_ids = [r["pair_id"] for r in records]
    column = {t: j for j, t in enumerate(train_ids)}
    query_set = [q["phrasing"] for q in queries]
    by_set = {name: [q for q in queries if q["phrasing"] == name] for name in QUERY_SETS}
    return {
        "work": work, "model_dir": model_dir, "train_json": work / "train.json", "query_json": work / "query.json",
        "train_ids": train_ids, "query_ids": [q["pair_id"] for q in queries], "query_set": query_set,
        "answer": [column[q["answer"]] for q in queries], "train_records": records, "queries": queries,
        "train": train, "tokenizer": tokenizer, "is_format": [t in format_ids for t in train_ids],
        "info": {"train_records": len(records), "format_records": len(format_ids),
                 "queries": {s: len(by_set[s]) for s in QUERY_SETS},
                 "accuracy_a": tw.accuracy(model, tokenizer, by_set["a"]),
                 "accuracy_b": tw.accuracy(model, tokenizer, by_set["b"]), "train_s": train_s},
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
                 hessian_dataset: Path | None = None, track: str = "mlp") -> Path:
    from if_query.config import FitConfig
    from if_query.fit.fit_hessians import fit_hessians

    factors_dir = built["work"] / f"factors-{name}"
    config = FitConfig(model=str(built["model_dir"]), hessian_dataset=str(hessian_dataset or built["train_json"]),
                       output_dir=str(factors_dir), strategy=strategy, fisher=fisher, seed=seed,
                       factor_batch_size=FIT_BATCH, lambda_batch_size=FIT_BATCH, track=track)
    fit_hessians(config, quiet=True)
    return factors_dir


def score_if_query(built: dict, factors_dir: Path, damping: float | None = None, without_eos: bool = False,
                   train_whole_sequence: bool = False, refine_steps: int = 0):
    """(raw, cosine) matrices (queries x train) from run-query's scorer, in process. ``without_eos``: run-query's
    --no-eos-in-loss (EOS out of both gradients; the fit keeps it). ``train_whole_sequence``: the train records'
    loss (so their gradients and self-influences) covers every token, prompt included (emulated: their labels
    are replaced after tokenization); the queries' covers the completion, and the fit is unchanged.
    ``refine_steps``: run-query's --refine-steps, every fitting record in each Gauss-Newton batch (one exact H)."""
    from if_query.config import QueryConfig
    from if_query.data.jobs import query_jobs
    from if_query.run.run_query import QueryRunner

    config = QueryConfig(model=str(built["model_dir"]), factors_dir=str(factors_dir),
                         query_json=built["query_json"], train_json=built["train_json"],
                         output_dir=built["work"] / "out", eos_in_loss=not without_eos,
                         damping="auto" if damping is None else str(damping), score_batch_size=SCORE_BATCH,
                         refine_steps=refine_steps, refine_batch_size=len(built["train_ids"]))
    runner = QueryRunner(config, quiet=True)
    [job] = query_jobs(config)
    prepared = runner.prepare(job)
    if train_whole_sequence:
        from if_query.data.tokenization import TokenizedExample

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

        from if_query.data.tokenization import IGNORE_INDEX

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


def bare_task(tracked: list[str], eos: int, without_eos: bool):
    """The independent baseline's task: written as in Kronfluence's language-model examples (its own loss and
    label sampling with torch.multinomial), not through if_query.kron, so that it checks if-query's rather than
    repeating it. ``without_eos``: the EOS label is left out when scoring (not when fitting)."""
    import torch
    import torch.nn.functional as F
    from kronfluence.task import Task

    from if_query.data.tokenization import IGNORE_INDEX

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
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return BareTask()


def kronfluence_scores(built: dict, seed: int, name: str, repeats: int = 1, without_eos: bool = False,
                       track: str = "mlp"):
    """(raw, cosine) matrices from Kronfluence's Analyzer on the same model, tokenized data and damping rule.
    ``without_eos``: the EOS label is left out of the measurement and of the train loss when scoring (not
    when fitting). ``track``: the modules tracked, as fit-hessians --track finds them."""
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from if_query.data.records import load_examples
    from if_query.data.tokenization import Collator, ExampleTokenizer
    from if_query.model.loading import load_model, load_tokenizer
    from if_query.model.tracking import find_tracked_modules, make_trackable

    tokenizer = load_tokenizer(str(built["model_dir"]))
    example_tokenizer = ExampleTokenizer(tokenizer, 512)
    train = example_tokenizer.tokenize_all(load_examples(built["train_json"]))
    queries = example_tokenizer.tokenize_all(load_examples(built["query_json"]))
    model = load_model(str(built["model_dir"]), None, torch.float32)
    modules = find_tracked_modules(model, 1, track)
    model = make_trackable(model, modules)

    task = bare_task([m.name for m in modules], tokenizer.eos_token_id, without_eos)
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


class SeedRun:
    """One seed's world, the factors its methods share, and what they scored (raw matrices kept for the LDS)."""

    def __init__(self, world: str, seed: int, built: dict, log):
        self.world, self.seed, self.built, self.log = world, seed, built, log
        self.results, self.seconds, self.raw = {}, {}, {}
        self.damping: dict = {}  # "auto": each module's, "if-query-rel R": the damping used
        self.extra: dict = {}  # timings, ASTRA's and the LDS's per-seed details
        self._default_factors: Path | None = None

    def default_factors(self) -> Path:
        """if-query's default EK-FAC factors, fitted once per seed."""
        if self._default_factors is None:
            started = time.perf_counter()
            self._default_factors = fit_if_query(self.built, "if-query", seed=self.seed)
            self.extra["ekfac_fit_s"] = time.perf_counter() - started
        return self._default_factors

    def record(self, name: str, matrices, seconds: float) -> None:
        raw, cosine = matrices
        self.raw[name] = np.asarray(raw, dtype=np.float64)
        self.results[name] = {"cosine": retrieval(cosine, self.built), "raw": retrieval(raw, self.built)}
        self.seconds[name] = seconds
        r = self.results[name]["cosine"]
        self.log(f"  {name:22s} {seconds:5.1f}s  cosine top-1 a {r['a']['top1']:.3f} b {r['b']['top1']:.3f}")

    def summary(self) -> dict:
        return {"world": self.world, "seed": self.seed, "info": self.built["info"], "results": self.results,
                "seconds": self.seconds, "damping": self.damping, "extra": self.extra}


def _default_ekfac(run: SeedRun):
    factors = run.default_factors()
    started = time.perf_counter()
    scores = score_if_query(run.built, factors)
    run.extra["ekfac_score_s"] = time.perf_counter() - started
    return scores


def _old_sampling(run: SeedRun):
    from if_query.model import sampling

    original, sampling.sample_labels = sampling.sample_labels, OldSampling()
    try:
        factors = fit_if_query(run.built, "if-query-old", seed=run.seed)
    finally:
        sampling.sample_labels = original
    return score_if_query(run.built, factors)


def _mixed(run: SeedRun):
    mixed = run.built["work"] / "mixed.json"
    dump(run.built["train_records"] + run.built["queries"], mixed)
    return score_if_query(run.built, fit_if_query(run.built, "if-query-mixed", seed=run.seed, hessian_dataset=mixed))


def _strategy(strategy: str):
    return lambda run: score_if_query(run.built, fit_if_query(run.built, strategy, strategy=strategy, seed=run.seed))


def _kronfluence_track(track: str):
    return lambda run: kronfluence_scores(run.built, run.seed, f"kronfluence-{track}", track=track)


def _if_query_track(track: str):
    return lambda run: score_if_query(run.built, fit_if_query(run.built, f"if-query-{track}", seed=run.seed,
                                                              track=track))


def _bm25(run: SeedRun):
    scores = bench_lds.bm25_scores(run.built["queries"], run.built["train_records"])
    return scores, scores


METHOD_SCORES = {  # method -> (raw, cosine) matrices (queries x train) of one seed
    "identity": _strategy("identity"),
    "if-query-diagonal": _strategy("diagonal"),
    "if-query-kfac": _strategy("kfac"),
    "kronfluence": lambda run: kronfluence_scores(run.built, run.seed, "kronfluence"),
    "kronfluence-x4": lambda run: kronfluence_scores(run.built, run.seed, "kronfluence-x4", repeats=4),
    "kronfluence-noeos": lambda run: kronfluence_scores(run.built, run.seed, "kronfluence-noeos", without_eos=True),
    **{f"kronfluence-{track}": _kronfluence_track(track) for track in TRACKS[1:]},
    **{f"if-query-{track}": _if_query_track(track) for track in TRACKS[1:]},
    "if-query": _default_ekfac,
    "if-query-old": _old_sampling,
    "if-query-empirical": lambda run: score_if_query(run.built, fit_if_query(run.built, "if-query-empirical",
                                                                              fisher="empirical")),
    "if-query-mixed": _mixed,
    "if-query-wholeseq": lambda run: score_if_query(run.built, run.default_factors(), train_whole_sequence=True),
    "if-query-noeos": lambda run: score_if_query(run.built, run.default_factors(), without_eos=True),
    "bm25": _bm25,
}


def run_astra(run: SeedRun, args: argparse.Namespace) -> None:
    """Rows "if-query-astra N" for N in --refine-steps: the default EK-FAC factors' scores refined (bench_lds);
    their seconds are the EK-FAC fit's plus the refinement's (gradients and steps up to N)."""
    reference = run.raw["if-query"] if "if-query" in run.raw else _default_ekfac(run)[0]
    astra = bench_lds.astra_scores(run.built, run.default_factors(), sorted({0, *args.refine_steps}),
                                   np.asarray(reference), args.refine_batch, run.seed)
    for n in args.refine_steps:
        run.record(f"if-query-astra {n}", astra.scores[n], run.extra["ekfac_fit_s"] + astra.seconds[n])
    refinement = astra.refinement
    run.extra["astra"] = {
        "alpha": refinement.alpha, "largest_eigenvalue": refinement.largest_eigenvalue,
        "refined_side": astra.refined_side, "n0_error": astra.n0_error, "stopped": len(refinement.stopped),
        "vectors": len(refinement.residuals[0]),
        "seconds": {str(n): s for n, s in astra.seconds.items()},
        "residual": {str(n): statistics.fmean(refinement.residuals[n]) for n in sorted({0, *args.refine_steps})},
    }
    run.log(f"  ASTRA: alpha {refinement.alpha:.3g} (largest eigenvalue of P(H+L) {refinement.largest_eigenvalue:.3g}),"
            f" refined side {astra.refined_side}, N=0 vs EK-FAC {astra.n0_error:.1e}, residual/|g| "
            + ", ".join(f"N={n} {r:.3f}" for n, r in run.extra["astra"]["residual"].items())
            + f", {len(refinement.stopped)} stopped")


def run_refine(run: SeedRun, steps: list[int]) -> None:
    """Rows "if-query-refine N": run-query --refine-steps N on the default factors; seconds: fit + scoring."""
    for n in [n for n in steps if n > 0]:  # N = 0 is if-query's own row (tests/test_refine.py)
        started = time.perf_counter()
        scores = score_if_query(run.built, run.default_factors(), refine_steps=n)
        run.record(f"if-query-refine {n}", scores, run.extra["ekfac_fit_s"] + time.perf_counter() - started)


def relative_dampings(run: SeedRun, dampings: list[float]) -> None:
    """Rows "if-query-rel R": the default factors scored with one damping = R x the mean eigenvalue."""
    means = mean_eigenvalues(run.default_factors())
    run.damping["auto"] = [0.1 * m for m in means]
    for r in dampings:
        started = time.perf_counter()
        damping = r * statistics.fmean(means)
        run.damping[f"if-query-rel {r:g}"] = damping
        run.record(f"if-query-rel {r:g}", score_if_query(run.built, run.default_factors(), damping=damping),
                   time.perf_counter() - started)


def measure_lds(run: SeedRun, args: argparse.Namespace) -> None:
    """Train the subset models (and the ceiling's second run), then the LDS of every method scored so far,
    stored as results[method]["raw"]["b"]["lds"] (over all --lds subsets) and ["lds_ceiling_subsets"]."""
    built = run.built
    rows = [i for i, s in enumerate(built["query_set"]) if s == "b"]
    queries = [built["queries"][i] for i in rows]
    subsets = bench_lds.draw_subsets(built["is_format"], args.lds, run.seed)  # (M, train)
    losses, model_s = bench_lds.subset_losses(built["train"], subsets, run.seed, built["tokenizer"], queries, run.log)
    few = min(args.ceiling_subsets, args.lds)
    again, _ = bench_lds.subset_losses(built["train"], subsets[:few], run.seed + bench_lds.CEILING_SEED_OFFSET,
                                       built["tokenizer"], queries, run.log)
    ceiling = float(bench_lds.spearman_rows(losses[:, :few], again).mean())
    run.extra["lds"] = {"subsets": args.lds, "ceiling_subsets": few, "ceiling": ceiling, "subset_model_s": model_s,
                        "loss_spread": float(losses.std(axis=1).mean()), "mean_loss": float(losses.mean())}
    for name, raw in run.raw.items():
        run.results[name]["raw"]["b"]["lds"] = bench_lds.lds(raw[rows], subsets, losses)
        run.results[name]["raw"]["b"]["lds_ceiling_subsets"] = bench_lds.lds(raw[rows], subsets[:few], losses[:, :few])
    run.log(f"  LDS ({args.lds} subsets; ceiling {ceiling:.3f} over {few}): " + ", ".join(
        f"{name} {run.results[name]['raw']['b']['lds']:.3f}" for name in run.raw))


def run_seed(world: str, seed: int, args: argparse.Namespace, log) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-quality-{world}-{seed}-") as tmp:
        built = build(WORLDS[world], seed, Path(tmp), args.threads)
        info = built["info"]
        log(f"{world} seed {seed}: trained in {info['train_s']:.1f}s; greedy accuracy a {info['accuracy_a']:.3f}, "
            f"b {info['accuracy_b']:.3f}")
        run = SeedRun(world, seed, built, log)
        for method in args.methods:
            if method == "if-query-astra":
                run_astra(run, args)
                continue
            if method == "if-query-refine":
                run_refine(run, args.refine_steps)
                continue
            started = time.perf_counter()
            run.record(method, METHOD_SCORES[method](run), time.perf_counter() - started)
        if args.relative_dampings:
            relative_dampings(run, args.relative_dampings)
        if args.lds:
            measure_lds(run, args)
    return run.summary()


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def mean_se(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def paired(runs: list[dict], method: str, score: str, query: str, metric: str, baseline: str = BASELINE) -> str:
    """Mean ± se of (method - baseline, bare Kronfluence by default) over the seeds that ran both, and how many
    seeds are above/below."""
    both = [s["results"] for s in runs if method in s["results"] and baseline in s["results"]
            and metric in s["results"][method][score][query] and metric in s["results"][baseline][score][query]]
    if method == baseline or not both:
        return ""
    differences = [r[method][score][query][metric] - r[baseline][score][query][metric] for r in both]
    above, below = sum(d > 0.0005 for d in differences), sum(d < -0.0005 for d in differences)
    return f"{mean_se(differences).replace('0.', '.').replace('-.', '−.')} ({above}↑ {below}↓)"


def world_title(world: str, runs: list[dict]) -> str:
    spec, info = WORLDS[world], runs[0]["info"]
    if spec.kind == "docs":
        return (f"### World `{world}`: {spec.n_sentences} sentences of CPython's help topics (pydoc_data.topics, "
                f"Python {sys.version.split()[0]}); {info['train_records']} training records (phrasing a + phrasing b "
                f"for {spec.b_fraction:g} of the sentences); {spec.steps} training steps; {len(runs)} seed(s)")
    trained = ("phrasing a only" if not spec.b_fraction
               else f"phrasing a + phrasing b for {spec.b_fraction:g} of the people")
    return (f"### World `{world}`: {spec.n_people} people x {', '.join(spec.relations)}; {info['train_records']} "
            f"training records ({trained}{'; EOS never trained' if not spec.label_eos else ''}); {spec.steps} "
            f"training steps; {len(runs)} seed(s)")


def values(runs: list[dict], method: str, score: str, query: str, metric: str) -> list[float]:
    """One metric of a method over the seeds that have it."""
    return [s["results"][method][score][query][metric] for s in runs
            if method in s["results"] and metric in s["results"][method][score][query]]


def retrieval_lines(runs: list[dict], methods: list[str]) -> list[str]:
    info = runs[0]["info"]
    lines = [
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
        cells = [str(len(values(runs, method, "cosine", "b", "top1"))),
                 mean_se(values(runs, method, "cosine", "b", "top1")), paired(runs, method, "cosine", "b", "top1"),
                 mean_se(values(runs, method, "cosine", "b", "mrr")), paired(runs, method, "cosine", "b", "mrr"),
                 mean_se(values(runs, method, "raw", "b", "top1")), mean_se(values(runs, method, "raw", "a", "top1")),
                 paired(runs, method, "raw", "a", "top1"), mean_se(values(runs, method, "cosine", "a", "top1"))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    auto = [v for s in runs for v in s["damping"].get("auto", [])]
    if auto:
        lines += ["", f"auto damping (0.1 x each module's mean eigenvalue): {min(auto):.2g} .. {max(auto):.2g}; "
                  "if-query-rel R = R x the mean eigenvalue averaged over the modules."]
    seconds = {m: statistics.fmean(s["seconds"][m] for s in runs if m in s["seconds"]) for m in methods}
    return lines + ["", "Seconds per seed (fit + score): " + ", ".join(f"{m} {v:.1f}" for m, v in seconds.items())
                    + f"; model training {statistics.fmean(s['info']['train_s'] for s in runs):.1f}.", ""]


def lds_lines(runs: list[dict], methods: list[str]) -> list[str]:
    """The LDS table of the seeds run with --lds (none: no lines)."""
    runs = [s for s in runs if "lds" in s.get("extra", {})]
    methods = [m for m in methods if values(runs, m, "raw", "b", "lds")]
    if not runs or not methods:
        return []
    details = [s["extra"]["lds"] for s in runs]
    lines = [
        f"#### LDS: {details[0]['subsets']} subsets of half the records per seed, other-phrasing queries (b)", "",
        f"Ceiling: the first {details[0]['ceiling_subsets']} subsets trained again from another seed, mean over "
        f"queries of the Spearman correlation between the two runs' losses: "
        f"{mean_se([d['ceiling'] for d in details])}. "
        f"A subset model trains in {statistics.fmean(d['subset_model_s'] for d in details):.1f} s; a query's summed "
        f"loss is {statistics.fmean(d['mean_loss'] for d in details):.2f} on average, with a standard deviation "
        f"over the subsets of {statistics.fmean(d['loss_spread'] for d in details):.3f}. Seconds: the method's fit "
        "and scoring per seed.", "",
        f"| method | n | LDS (b) | Δ LDS | LDS on the {details[0]['ceiling_subsets']} ceiling subsets | top-1 (b) "
        "cosine | Δ top-1 (b) | top-1 (a) raw | Δ top-1 (a) raw | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        lds = values(runs, method, "raw", "b", "lds")
        cells = [str(len(lds)), mean_se(lds), paired(runs, method, "raw", "b", "lds"),
                 mean_se(values(runs, method, "raw", "b", "lds_ceiling_subsets")),
                 mean_se(values(runs, method, "cosine", "b", "top1")), paired(runs, method, "cosine", "b", "top1"),
                 mean_se(values(runs, method, "raw", "a", "top1")), paired(runs, method, "raw", "a", "top1"),
                 f"{statistics.fmean(s['seconds'][method] for s in runs if method in s['seconds']):.1f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""] + astra_lines(runs)


def track_method(engine: str, track: str) -> str:
    return engine if track == "mlp" else f"{engine}-{track}"


def track_lines(runs: list[dict], methods: list[str]) -> list[str]:
    """Which layers to track: each --track kind's if-query and bare Kronfluence (tracking the same modules), paired
    against each other and against the same engine tracking the MLP (none: fewer than two kinds were run)."""
    tracks = [t for t in TRACKS if all(track_method(e, t) in methods for e in ("if-query", "kronfluence"))]
    if len(tracks) < 2:
        return []
    lds = bool(values(runs, "if-query", "raw", "b", "lds"))
    metrics = ([("raw", "lds", "LDS (b)")] if lds else []) + [("cosine", "top1", "top-1 (b) cosine"),
                                                              ("raw", "top1", "top-1 (a) raw")]
    header = ["--track", "engine", "n"]
    for _, _, label in metrics:
        header += [label, "Δ vs Kronfluence, same modules", "Δ vs --track mlp"]
    lines = ["#### Which layers to track (--track): if-query and bare Kronfluence on the same modules", "",
             "Δ: paired differences over the seeds (↑ / ↓: seeds above / below); the query set of LDS and top-1 "
             "(b) is the other phrasing (b), that of top-1 (a) raw the training phrasing (a). Seconds: fit and "
             "scoring per seed.", "", "| " + " | ".join(header + ["seconds"]) + " |",
             "|" + "---|" * (len(header) + 1)]
    for track in tracks:
        for engine in ("if-query", "kronfluence"):
            method = track_method(engine, track)
            cells = [f"`{track}`", engine, str(len(values(runs, method, "cosine", "b", "top1")))]
            for score, metric, _ in metrics:
                query = "a" if metric == "top1" and score == "raw" else "b"
                cells += [mean_se(values(runs, method, score, query, metric)),
                          paired(runs, method, score, query, metric, track_method("kronfluence", track)),
                          paired(runs, method, score, query, metric, engine)]
            seconds = [s["seconds"][method] for s in runs if method in s["seconds"]]
            lines.append("| " + " | ".join(cells + [f"{statistics.fmean(seconds):.1f}"]) + " |")
    return lines + [""]


def astra_lines(runs: list[dict]) -> list[str]:
    """ASTRA's per-seed diagnostics, averaged: step size, residuals, cost against EK-FAC scoring."""
    astra = [(s["extra"]["astra"], s["extra"]["ekfac_score_s"]) for s in runs if "astra" in s["extra"]]
    if not astra:
        return []
    steps = sorted({n for a, _ in astra for n in a["residual"]}, key=int)

    def mean(key: str, n: str, scale=lambda a, t: 1.0) -> float:  # over the seeds that ran N = n
        return statistics.fmean(a[key][n] / scale(a, t) for a, t in astra if n in a[key])

    def seeds(n: str) -> str:
        have = sum(n in a["residual"] for a, _ in astra)
        return "" if have == len(astra) else f" ({have} seed{'s' if have > 1 else ''})"

    return [
        f"ASTRA (if-query-astra N): refined side {astra[0][0]['refined_side']}; alpha = 1 / the largest eigenvalue "
        f"of P(H+L), {min(a['largest_eigenvalue'] for a, _ in astra):.3g} .. "
        f"{max(a['largest_eigenvalue'] for a, _ in astra):.3g} over the seeds; N = 0 vs if-query's EK-FAC scores "
        f"at most {max(a['n0_error'] for a, _ in astra):.1e} of the largest score; stopped vectors "
        f"{sum(a['stopped'] for a, _ in astra)}. Residual ||g - (H+L) v_N||_P / ||g||_P, mean: "
        + ", ".join(f"N={n} {mean('residual', n):.3g}{seeds(n)}" for n in steps)
        + ". Refinement seconds (gradients + steps) per seed, and x EK-FAC's scoring time "
        f"({statistics.fmean(t for _, t in astra):.2f} s): "
        + ", ".join(f"N={n} {mean('seconds', n):.1f} s ({mean('seconds', n, lambda a, t: t):.0f}x){seeds(n)}"
                    for n in steps)
        + ".", ""]


def report(per_seed: list[dict], args: argparse.Namespace, command: str, runtime_s: float) -> str:
    lines = ["## if-query quality benchmark: retrieving the training record that states a fact; LDS", "",
             f"Command: `{command}`", ""]
    for world in args.worlds:
        runs = [s for s in per_seed if s["world"] == world]
        methods = list(dict.fromkeys(m for s in runs for m in s["results"]))
        lines += [world_title(world, runs), "", *retrieval_lines(runs, methods), *lds_lines(runs, methods),
                  *track_lines(runs, methods)]
    lines.append(f"Runtime: {runtime_s:.0f} s ({os.cpu_count()} CPUs, {args.threads} torch thread(s)).")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the defaults that depend on other options filled in."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", dest="worlds", nargs="+", default=list(DEFAULT_WORLDS), choices=list(WORLDS))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0..9 (quick: 0 1)")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS + EXTRA_METHODS + tuple(PRESETS),
                    help=f"default: {' '.join(METHODS)} (quick: {' '.join(QUICK_METHODS)}; --lds: "
                         f"{' '.join(LDS_METHODS)}); tracks: {' '.join(TRACK_METHODS)}")
    ap.add_argument("--lds", type=int, default=0, metavar="M",
                    help="also train M subset models per seed and report each method's LDS (bench_lds.py)")
    ap.add_argument("--ceiling-subsets", type=int, default=DEFAULT_CEILING_SUBSETS, metavar="C",
                    help="--lds: the first C subsets trained again from another seed: the ceiling")
    ap.add_argument("--refine-steps", type=int, nargs="+", default=list(DEFAULT_REFINE_STEPS), metavar="N",
                    help="if-query-astra: the refinement steps reported")
    ap.add_argument("--refine-batch", type=int, default=None, metavar="B",
                    help="if-query-astra: Gauss-Newton batch size (default: every fitting record, one exact H)")
    ap.add_argument("--self-check", action="store_true",
                    help="run nothing else: check ASTRA against dense matrices on a tiny model (exit 1 on failure)")
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
        args.methods = list(QUICK_METHODS if args.quick else LDS_METHODS if args.lds else METHODS)
    args.methods = list(dict.fromkeys(m for given in args.methods for m in PRESETS.get(given, (given,))))
    if args.relative_dampings is None:
        args.relative_dampings = [] if args.quick else list(DEFAULT_RELATIVE)
    if any(r <= 0 or not math.isfinite(r) for r in args.relative_dampings):
        ap.error("--relative-dampings must be finite numbers > 0")
    if args.lds < 0 or args.ceiling_subsets < 2 or min(args.refine_steps) < 0 or (args.refine_batch or 1) < 1:
        ap.error("--lds must be >= 0, --ceiling-subsets >= 2, --refine-steps >= 0, --refine-batch >= 1")
    return args


def self_check(threads: int, log) -> bool:
    """--self-check: ASTRA against dense matrices on SELF_CHECK_WORLD's model (bench_lds.check_against_dense)."""
    with tempfile.TemporaryDirectory(prefix="bench-quality-self-check-") as tmp:
        built = build(SELF_CHECK_WORLD, 0, Path(tmp), threads)
        factors = fit_if_query(built, "if-query")
        return bench_lds.check_against_dense(built, factors, score_if_query(built, factors)[0], log)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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

    if args.self_check:
        passed = self_check(args.threads, log)
        log("self-check " + ("passed" if passed else "FAILED"))
        sys.exit(0 if passed else 1)
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
