"""Regenerate the bundled tiny demo model and the test query, deterministically.

    uv run python scripts/make_tiny_model.py [--seed 0] [--out src/if_query/demo_data]

Writes, under --out (default: the package data that `if-query demo` reads)
  tiny-gpt2/                 model + tokenizer (save_pretrained, safetensors),
                             training_corpus.json (the training records) and
                             world.json (the people, their facts, and who is
                             held out of phrasing "b")
  test_query/train.json      ~16 training records from the corpus
  test_query/query.json      4 queries whose stating records are in train.json
(with the default --out, also queries/test_query/{train,query}.json: the same files, in the checkout's
layout that the README's run-query example reads) and prints the greedy-completion accuracies and the runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from if_query.demo import tiny_world as tw  # noqa: E402

DEMO_DATA = Path(__file__).resolve().parent.parent / "src" / "if_query" / "demo_data"
QUERIES_DIR = Path(__file__).resolve().parent.parent / "queries" / "test_query"


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def pick_test_query(world, ts, model, tokenizer, seed: int) -> tuple[list[dict], list[dict]]:
    """4 queries (2 in phrasing "a", 2 in phrasing "b" of people whose "b" facts were trained on),
    one per relation, on 4 different people, each answered correctly by the model; plus ~16
    training records: the records stating each queried fact, other facts of the queried people,
    facts of other people sharing the queried value, and a couple of unrelated ones."""
    rng = random.Random(seed + 1)
    queries = _pick_queries(world, ts, model, tokenizer, rng)
    return _pick_train(world, ts, queries, rng), queries


def _pick_queries(world, ts, model, tokenizer, rng: random.Random) -> list[dict]:
    """The queries of :func:`pick_test_query`, each with the ids of the records that state its fact."""
    relations = [r.name for r in world.relations]
    rng.shuffle(relations)
    phrasings = ["a", "a", "b", "b"][: len(relations)]
    used_people: set[str] = set()
    queries = []
    for rel, ph in zip(relations, phrasings, strict=False):
        pool = list(ts.b_people) if ph == "b" else [p.name for p in world.people]
        rng.shuffle(pool)
        for name in pool:
            if name in used_people:
                continue
            rec = tw.fact_record(world, name, rel, ph)
            if tw.is_correct(model, tokenizer, rec):
                break
        else:
            raise RuntimeError(f"no correctly answered {rel}/{ph} fact to use as a query")
        used_people.add(name)
        person = world.person(name)
        stated_by = [f"{person.slug}-{rel}-a"] + ([f"{person.slug}-{rel}-b"] if ph == "b" else [])
        queries.append(
            {
                "pair_id": f"q-{person.slug}-{rel}",
                "prompt": rec["prompt"],
                "completion": rec["completion"],
                "person": name,
                "relation": rel,
                "phrasing": ph,
                "stated_by": stated_by,
            }
        )
    return queries


def _pick_train(world, ts, queries: list[dict], rng: random.Random) -> list[dict]:
    """The train records of :func:`pick_test_query` for ``queries``, in a shuffled order."""
    corpus = {r["pair_id"]: r for r in ts.records}
    used_people = {q["person"] for q in queries}
    chosen: list[str] = []

    def add(pid: str) -> None:
        if pid in corpus and pid not in chosen:
            chosen.append(pid)

    for q in queries:  # the records stating the queried facts
        for pid in q["stated_by"]:
            add(pid)
    for q in queries:  # another fact of the same person
        person = world.person(q["person"])
        others = [r.name for r in world.relations if r.name != q["relation"]]
        add(f"{person.slug}-{rng.choice(others)}-a")
    for q in queries:  # another person with the same value for the queried relation
        person = world.person(q["person"])
        same = [
            p
            for p in world.people
            if p.name != person.name
            and p.attributes[q["relation"]] == person.attributes[q["relation"]]
            and p.name not in used_people
        ]
        if same:
            add(f"{rng.choice(same).slug}-{q['relation']}-a")
    rest = sorted(pid for pid in corpus if pid not in chosen)
    while len(chosen) < 16 and rest:  # unrelated filler
        add(rest.pop(rng.randrange(len(rest))))
    rng.shuffle(chosen)
    return [dict(corpus[pid]) for pid in chosen]


def save_model(model_dir: Path, model, tokenizer, world, ts, seed: int) -> None:
    """The model and tokenizer (``save_pretrained``, files readable by all), its training corpus and its world."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    for f in model_dir.iterdir():  # save_pretrained writes model.safetensors with mode 0600
        f.chmod(0o644)
    _dump(ts.records, model_dir / "training_corpus.json")
    _dump(
        {
            "seed": seed,
            "relations": {
                r.name: {"values": list(r.values), "prompt_a": r.prompt_a, "prompt_b": r.prompt_b}
                for r in world.relations
            },
            "people": [{"name": p.name, "slug": p.slug, **p.attributes} for p in world.people],
            "b_people": list(ts.b_people),
            "heldout_people": list(ts.heldout_people),
        },
        model_dir / "world.json",
    )



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEMO_DATA, help="folder to write tiny-gpt2/ and test_query/ under")
    ap.add_argument("--n-people", type=int, default=40)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    world = tw.make_world(args.seed, n_people=args.n_people)
    ts = tw.training_records(world, b_fraction=0.5, seed=args.seed)
    tokenizer = tw.train_tokenizer(tw.corpus_texts(ts.records), vocab_size=512)

    t_train = time.perf_counter()
    model = tw.train_tiny_gpt2(ts.records, tokenizer, seed=args.seed)
    train_s = time.perf_counter() - t_train

    facts_a = tw.fact_records(world, "a")
    facts_b_trained = tw.fact_records(world, "b", ts.b_people)
    facts_b_heldout = tw.fact_records(world, "b", ts.heldout_people)
    acc_a = tw.accuracy(model, tokenizer, facts_a)
    acc_b_trained = tw.accuracy(model, tokenizer, facts_b_trained)
    acc_b_heldout = tw.accuracy(model, tokenizer, facts_b_heldout)

    model_dir = args.out / "tiny-gpt2"
    save_model(model_dir, model, tokenizer, world, ts, args.seed)
    train, queries = pick_test_query(world, ts, model, tokenizer, args.seed)
    qdir = args.out / "test_query"
    # The same two files in the package (the demo's) and in the checkout's queries/test_query (the README's
    # run-query example, the seed's layout); tests/test_demo.py keeps them equal.
    for folder in (qdir, QUERIES_DIR) if args.out.resolve() == DEMO_DATA else (qdir,):
        _dump(train, folder / "train.json")
        _dump(queries, folder / "query.json")

    n_params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in model_dir.iterdir())
    print(
        f"world: {len(world.people)} people x {len(world.relations)} relations; "
        f"corpus: {len(ts.records)} records ({len(ts.b_people)} people also in phrasing b)"
    )
    print(f"model: {n_params:,} parameters, {model_dir} = {size / 1e6:.2f} MB")
    print(f"greedy accuracy  phrasing a (trained):   {acc_a:.3f}  ({len(facts_a)} facts)")
    print(f"greedy accuracy  phrasing b (trained):   {acc_b_trained:.3f}  ({len(facts_b_trained)} facts)")
    print(f"greedy accuracy  phrasing b (held out):  {acc_b_heldout:.3f}  ({len(facts_b_heldout)} facts)")
    print(f"test query: {len(train)} train records, {len(queries)} queries -> {qdir}")
    print(f"runtime: training {train_s:.1f}s, total {time.perf_counter() - t_start:.1f}s (after imports)")


if __name__ == "__main__":
    main()
