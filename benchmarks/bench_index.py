"""Index benchmark: how good is run-query --index's shortlist, and what do building and answering cost?

    uv run python benchmarks/bench_index.py             # N = 2,000 documents (and 8,000 for the answer time)
    uv run python benchmarks/bench_index.py --quick     # N = 500 (and 2,000), k in {4, 16}, R in {1, 4}

Workload. The bundled demo model (if-query demo's tiny GPT-2: 2 blocks, d = 64, 4 MLP projections, trained on its
world's 240 fact records), EK-FAC fitted on those records (fit-hessians' defaults). The corpus: N JSON Lines
documents, each 1-3 of the world's fact records drawn at random and joined ("Thotro Hand lives in Drellport. ..."),
so a fact is stated by many documents. 16 queries: fact records of the world (the demo's own query form). Windows
of --max-length 64 (the model's positions).

Measured (in this process, one torch thread: CPU seconds, as the machine is shared):
- exact: run-query --train-dataset (every pair): the ranking by influence_cosine (run-query's default) over all N;
- per (k, R): if-query index (CPU s, against one frozen-weight forward and backward pass over the same windows in
  the same batches: the floor), the queries' rows (both query forms), then for M (candidates per query at each
  end): the recall of each query's exact top-10 (by cosine) within its own index top M ("own"), and within the union
  of all queries' candidates, which is what run-query --index re-scores exactly, so its final top-10 holds exactly
  these ("final"); the Spearman correlation of the index's ranking key with the exact cosine (per query, averaged);
- at the chosen defaults: run-query --index itself (its final top-10 against the exact top-10, checking "final"),
  and its CPU time against the exact run's, at N and 4N.
Results: printed and written to benchmarks/results/bench_index.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from if_query import api  # noqa: E402
from if_query.index.store import IndexStore  # noqa: E402

TOP = 10
MAX_LENGTH = 64


def cpu(function, *args, **kwargs):
    start = time.process_time()
    value = function(*args, **kwargs)
    return value, time.process_time() - start


def floor_seconds_per_token(model_dir: Path, documents: list[str], batch: int = 8) -> float:
    """CPU seconds of a frozen-weight forward and backward pass (activation gradients only) per token, in this
    process (bench_corpus.py's floor: no benchmark imports another)."""
    from if_query.data.tokenization import TokenizedExample, collate, prepare_tokenizer
    from if_query.model.loading import load_model, load_tokenizer
    from if_query.score.capture import forward_backward, frozen_weights

    tokenizer = prepare_tokenizer(load_tokenizer(str(model_dir)))
    model = load_model(str(model_dir), None, torch.float32, torch.device("cpu"))
    examples = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(TokenizedExample(tuple(ids[:MAX_LENGTH]), tuple(ids[:MAX_LENGTH])))
    tokens = sum(len(e) for e in examples)
    start = time.process_time()
    with frozen_weights(model):
        for k in range(0, len(examples), batch):
            forward_backward(model, collate(examples[k : k + batch], tokenizer.pad_token_id))
    return (time.process_time() - start) / tokens


def write_corpus(records: list[dict], count: int, path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as file:
        for k in range(count):
            facts = rng.sample(records, rng.randint(1, 3))
            file.write(json.dumps({"id": f"doc{k}", "text": " ".join(r["prompt"] + r["completion"] for r in facts)})
                       + "\n")
    return path


def exact_run(model, factors, corpus, queries, out) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """(cosine, score) (Q, N) of every pair, the train ids, the CPU seconds."""
    [outcome], seconds = cpu(api.run_query, model=model, factors_dir=factors, train_dataset=corpus,
                             query_json=queries, output_dir=out, max_length=MAX_LENGTH, quiet=True)
    frame = outcome.results.influences
    ids = list(dict.fromkeys(frame["train_id"]))
    order = list(dict.fromkeys(frame["query_id"]))
    pick = lambda column: frame.pivot(index="query_id", columns="train_id", values=column).loc[order, ids].to_numpy()  # noqa: E731
    return pick("influence_cosine"), pick("influence_score"), ids, seconds


def spy_rows(run):
    """Runs ``run()`` capturing the query rows run-query --index shortlists with; returns (value, rows)."""
    captured = {}
    original = IndexStore.shortlist

    def shortlist(self, queries, *args, **kwargs):
        captured["rows"] = queries.clone()
        return original(self, queries, *args, **kwargs)

    IndexStore.shortlist = shortlist
    try:
        value = run()
    finally:
        IndexStore.shortlist = original
    return value, captured["rows"]


def top_sets(key: np.ndarray, count: int) -> list[set[int]]:
    return [set(np.argsort(-row, kind="stable")[:count].tolist()) for row in key]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)  # noqa: E731
    return float(np.mean([np.corrcoef(ranks(x), ranks(y))[0, 1] for x, y in zip(a, b, strict=True)]))


def tied_recall(pools: list[set[int]], exact_cos: np.ndarray) -> float:
    """How much of each query's exact top-10 the best 10 of its pool (by exact cosine) hold, averaged over queries,
    counting ties as the exact ranking does not: a window whose exact cosine reaches the 10th best (within 1e-6 of
    the query's largest |cosine|) is a hit. The corpus repeats single-fact documents, whose cosines tie, and which
    of the tied windows an exact top-10 lists is an accident of order."""
    hits = []
    for row, pool in zip(exact_cos, pools, strict=True):
        tenth = np.sort(row)[::-1][TOP - 1] - 1e-6 * np.abs(row).max()
        best = sorted(pool, key=lambda t: -row[t])[:TOP]
        hits.append(sum(row[t] >= tenth for t in best) / TOP)
    return float(np.mean(hits))


def shortlist_quality(estimate_key: np.ndarray, exact_cos: np.ndarray, candidates: list[int]) -> dict:
    """Per M: the recall of each query's exact top-10 (ties counted: :func:`tied_recall`) in the best 10 of its own
    index top M ("own"), and of the union of every query's top and bottom M ("final": what run-query --index scores
    exactly, so its final top-10 holds exactly those); Spearman of the key with the exact cosine."""
    result = {"spearman": spearman(estimate_key, exact_cos)}
    for m in candidates:
        own = top_sets(estimate_key, m)
        union = set().union(*own, *top_sets(-estimate_key, m))
        result[f"own@{m}"] = tied_recall(own, exact_cos)
        result[f"final@{m}"] = tied_recall([union] * len(own), exact_cos)
        result[f"union@{m}"] = len(union)
    return result


def index_options(model, factors, corpus, out, k, rank, kind) -> dict:
    return dict(model=model, factors_dir=factors, train_dataset=corpus, output_dir=out, max_length=MAX_LENGTH,
                sketch=kind, sketch_dim=k, scaling_rank=rank, quiet=True)


def answer(model, factors, corpus, queries, index, m, out, form="symmetric"):
    return api.run_query(model=model, factors_dir=factors, train_dataset=corpus, query_json=queries, output_dir=out,
                         max_length=MAX_LENGTH, index=index, candidates=m, top_train=TOP, index_query_form=form,
                         quiet=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=2000)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--candidates", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--sketches", nargs="+", default=["gaussian", "eigen"])
    parser.add_argument("--default-sketch", default="eigen")
    parser.add_argument("--default-k", type=int, default=64)
    parser.add_argument("--default-rank", type=int, default=4)
    parser.add_argument("--default-candidates", type=int, default=None,
                        help="M for run-query --index itself (default: 1%% of each corpus's documents)")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.documents, args.ks, args.ranks, args.candidates = 500, [4, 16], [1, 4], [5]
        args.default_k = 16
    torch.set_num_threads(1)
    started = time.time()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-index-"))
    model = str(api.demo_model())
    records = json.loads((Path(model) / "training_corpus.json").read_text())
    factors = work / "factors"
    api.fit_hessians(model=model, hessian_dataset=str(Path(model) / "training_corpus.json"), output_dir=str(factors),
                     quiet=True)
    query_records = [{"pair_id": f"q{k}", "prompt": r["prompt"], "completion": r["completion"]}
                     for k, r in enumerate(random.Random(0).sample(records, args.queries))]
    queries = work / "queries.json"
    queries.write_text(json.dumps(query_records))
    corpora = {n: write_corpus(records, n, work / f"corpus-{n}.jsonl", seed=n) for n in (args.documents,
                                                                                     4 * args.documents)}
    n = args.documents
    exact_cos, exact_raw, ids, exact_s = exact_run(model, factors, corpora[n], queries, work / "exact")
    print(f"exact run, N = {n}: {exact_s:.1f} CPU s ({len(query_records)} queries)", flush=True)
    texts = sorted((json.loads(line)["text"] for line in corpora[n].read_text().splitlines()), key=len)  # as the
    # index batches its windows: by length, little padding
    floor_per_token = floor_seconds_per_token(Path(model), texts, batch=8)
    rows = []
    settings = [("gaussian", k, rank) for rank in args.ranks for k in args.ks] + [("eigen", k, 1) for k in args.ks]
    for kind, k, rank in settings:
        if kind not in args.sketches:
            continue
        if True:
            out = work / f"index-{kind}-k{k}-r{rank}"
            manifest, build_s = cpu(api.index_corpus, **index_options(model, factors, corpora[n], out, k, rank, kind))
            tokens = manifest["corpus"]["tokens"]
            store = IndexStore.open(out)
            train_rows, norms = store.rows(), store.norms()
            entry = {"sketch": kind, "k": k, "R": rank, "build_s": build_s, "floor_s": floor_per_token * tokens,
                     "bytes_per_token": store.dim * 2 * store.windows / tokens, "row_bytes": store.dim * 2,
                     "scaling_error": [m["error"] for m in manifest["modules"]]}
            entry["build_ratio"] = entry["build_s"] / entry["floor_s"]
            for form in ("unbiased", "symmetric"):
                (outcomes, answer_s), query = spy_rows(lambda form=form, out=out: cpu(
                    answer, model, factors, corpora[n], queries, out, max(args.candidates), work / "answer", form))
                key = (query.double().numpy() @ train_rows.T.astype(np.float64)) / np.sqrt(np.maximum(norms, 1e-300))
                entry[form] = shortlist_quality(key, exact_cos, args.candidates)
                entry[form]["answer_s"] = answer_s
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    # the defaults: run-query --index's own final top-10, and answer time at N and 4N
    defaults = {}
    m_n = args.default_candidates or max(1, n // 100)
    for size, m in ((n, m_n), (4 * n, args.default_candidates or max(1, 4 * n // 100)), (4 * n, m_n)):
        if (size, m) in defaults:
            continue
        out = work / f"index-default-{size}-{m}"
        manifest, build_s = cpu(api.index_corpus, **index_options(model, factors, corpora[size], out, args.default_k,
                                                                   args.default_rank, args.default_sketch))
        [outcome], answer_s = cpu(answer, model, factors, corpora[size], queries, out, m,
                                  work / f"answer-{size}-{m}")
        cos, _, size_ids, exact_size_s = exact_run(model, factors, corpora[size], queries, work / f"exact-{size}")
        frame = outcome.results.influences
        column = {t: k for k, t in enumerate(size_ids)}
        got = []  # run-query --index's own final top-10 per query (in the exact run's query order)
        for query_id in dict.fromkeys(frame["query_id"]):
            kept = frame[frame["query_id"] == query_id].sort_values("influence_cosine", ascending=False)
            got.append({column[t] for t in kept["train_id"].head(TOP)})
        floor_s = floor_per_token * manifest["corpus"]["tokens"]
        defaults[size, m] = {"build_s": build_s, "build_ratio": build_s / floor_s,
                          "answer_s": answer_s, "exact_s": exact_size_s,
                          "answer_ratio": answer_s / exact_size_s, "final_recall": tied_recall(got, cos),
                          "candidates": m,
                          "shortlisted": outcome.results.provenance["index"]["shortlisted"]}
        print(f"defaults at N = {size}, M = {m}: {json.dumps(defaults[size, m])}", flush=True)
    report = render(rows, defaults, args, exact_s, time.time() - started)
    print(report)
    common.write_results("bench_index", report, {"rows": rows, "defaults": list(defaults.values()),
                                                 "args": vars(args) | {"work": str(work)}})


def render(rows: list[dict], defaults: dict, args, exact_s: float, runtime: float) -> str:
    m = args.candidates
    command = " ".join(["uv run python benchmarks/bench_index.py", *sys.argv[1:]])
    lines = [f"Index benchmark: N = {args.documents} documents, {TOP}-of-N exact top by influence_cosine, "
             f"M = {', '.join(map(str, m))} candidates per query at each end; CPU s with one thread "
             f"(`{command}`, {runtime / 60:.0f} min)", "",
             "| sketch | R | k | error (max) | row bytes | bytes/token | build / floor | Spearman | "
             + " | ".join(f"own@{x} | final@{x} (union)" for x in m)
             + " | symmetric final@" + str(m[-1]) + " |",
             "|" + " --- |" * (9 + 2 * len(m))]
    for r in rows:
        u = r["unbiased"]
        rank = r["R"] if r["sketch"] == "gaussian" else ""
        lines.append(f"| {r['sketch']} | {rank} | {r['k']} | {max(r['scaling_error']):.3f} | {r['row_bytes']} | "
                     f"{r['bytes_per_token']:.1f} | {r['build_ratio']:.2f} | {u['spearman']:.3f} | "
                     + " | ".join(f"{u[f'own@{x}']:.2f} | {u[f'final@{x}']:.2f} ({u[f'union@{x}']})" for x in m)
                     + f" | {r['symmetric'][f'final@{m[-1]}']:.2f} |")
    lines += ["", f"Defaults ({args.default_sketch}, k = {args.default_k}, R = {args.default_rank}, "
              f"M = {args.default_candidates or '1% of N'}), run-query --index itself:", "",
              "| N | M | build CPU s | build / floor | answer CPU s | exact run CPU s | answer / exact "
              "| final top-10 recall | shortlisted |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (size, _), d in defaults.items():
        lines.append(f"| {size} | {d['candidates']} | {d['build_s']:.1f} | {d['build_ratio']:.2f} | "
                     f"{d['answer_s']:.1f} | {d['exact_s']:.1f} | {d['answer_ratio']:.2f} | {d['final_recall']:.2f} "
                     f"| {d['shortlisted']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
