"""A train side larger than the host budget (chunks), a corpus as the train side (--train-dataset, each format),
--top-train, --no-cosine, resuming a killed run, and ranks splitting the chunks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import QUERIES, TRAIN, Reference, assert_close_to_largest, killed_at, score_matrix, write_json

from if_query.score import engine

WORDS = "the a of in is lives works plays city job Alice Bob Carol Dave Paris Rome Oslo Lima and to".split()


def records(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"pair_id": f"r{k:02d}", "prompt": " ".join(rng.choice(WORDS, int(rng.integers(3, 9)))),
             "completion": " " + " ".join(rng.choice(WORDS, 2)), "n": k} for k in range(count)]


def run_query(cli, model, factors, out, *options, train=None, queries=QUERIES, expect=0):
    args = ["run-query", "--model", model, "--factors-dir", factors, "--query-json",
            write_json(out.parent / f"{out.name}-q.json", queries), "--output-dir", out, *options]
    if train is not None:
        args += ["--train-json", write_json(out.parent / f"{out.name}-t.json", train)]
    return cli(*args, expect=expect)


def frame(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "influences.csv", dtype={"train_id": str, "query_id": str})


# 100 KB of token factors (1.3 KB per token of the tiny GPT-2): the queries (about 50 KB), then chunks of a few records
SMALL_BUDGET = "0.0001"


def test_a_train_side_over_the_host_budget_is_scored_in_chunks(cli, tiny_gpt2, fitted, tmp_path):
    train = TRAIN + records(20)
    chunked = run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "chunked", "--host-memory-gb", SMALL_BUDGET,
                        train=train, queries=QUERIES + TRAIN[:1])
    assert "Chunks: 22 train sequences in" in chunked.stderr  # 2 of the 24 are queries (TRAIN[0], TRAIN[1])
    assert "spilled" not in chunked.stderr.split("Chunks:", 1)[1]  # chunks fit: nothing spilled
    whole = run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "whole", train=train, queries=QUERIES + TRAIN[:1])
    assert "Chunks:" not in whole.stderr
    a, b = frame(tmp_path / "chunked"), frame(tmp_path / "whole")
    assert (a[["query_id", "train_id"]] == b[["query_id", "train_id"]]).all().all()
    assert_close_to_largest(a["influence_score"], b["influence_score"], 1e-5)
    assert float((a["influence_cosine"] - b["influence_cosine"]).abs().max()) <= 1e-5
    # and against brute-force gradients (identity factors)
    run_query(cli, tiny_gpt2, fitted["identity"], tmp_path / "identity", "--host-memory-gb", SMALL_BUDGET, train=train)
    reference = Reference(tiny_gpt2)
    expected = (reference.gradients(QUERIES) @ reference.gradients(train).T).numpy()
    got = score_matrix(frame(tmp_path / "identity"), [q["pair_id"] for q in QUERIES], [t["pair_id"] for t in train])
    assert_close_to_largest(got, expected, 1e-4)


def window_gradient(reference: Reference, ids: list[int]) -> torch.Tensor:
    """The gradient of a window's summed loss over every predicted token (a corpus document's loss)."""
    logits = reference.model(torch.tensor([ids])).logits[0]
    loss = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, reference.params)])


def write_corpus(kind: str, directory: Path, tokenizer) -> tuple[Path, list[tuple[str, list[int]]]]:
    """A corpus of each format and the (train_id, token ids) of its windows at --max-length 12."""
    texts = [" ".join(np.random.default_rng(k).choice(WORDS, n)) for k, n in enumerate((5, 20, 8, 30))]
    eos = tokenizer.eos_token_id
    docs = [(f"d{k}", tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]) for k, t in enumerate(texts)]
    if kind == "npy":
        flat = np.array([i for _, ids in docs for i in ids], dtype=np.uint16)
        np.save(directory / "tokens.npy", flat)
        return directory / "tokens.npy", [(str(k), flat[s : s + 12].tolist())
                                         for k, s in enumerate(range(0, len(flat), 12))]
    windows = []
    for name, ids in docs:
        pieces = range(0, len(ids), 12)
        windows += [(f"{name}#{k}" if len(pieces) > 1 else name, ids[s : s + 12]) for k, s in enumerate(pieces)]
    if kind == "dataset":
        import datasets

        datasets.Dataset.from_list([{"id": n, "input_ids": ids, "source": "web"} for n, ids in docs]).save_to_disk(
            str(directory / "ds"))
        return directory / "ds", windows
    rows = [{"id": f"d{k}", "text": t, "source": "web"} for k, t in enumerate(texts)]
    if kind == "parquet":
        pd.DataFrame(rows).to_parquet(directory / "docs.parquet")
        return directory / "docs.parquet", windows
    (directory / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory / "docs.jsonl", windows


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset", "npy"])
def test_a_corpus_as_the_train_side(cli, tiny_gpt2, fitted, tmp_path, kind):
    reference = Reference(tiny_gpt2)
    path, windows = write_corpus(kind, tmp_path, reference.tokenizer)
    out = tmp_path / "out"
    result = run_query(cli, tiny_gpt2, fitted["identity"], out, "--train-dataset", path, "--max-length", 12,
                       "--host-memory-gb", SMALL_BUDGET)
    assert f"{len(windows)} train examples of at most 12 tokens" in result.stderr
    train = pd.read_csv(out / "train.csv", dtype=str, keep_default_na=False)
    assert train["train_id"].tolist() == [name for name, _ in windows]
    assert (train["prompt"] == "").all()
    assert train["completion"].tolist() == [reference.tokenizer.decode(ids) for _, ids in windows]
    if kind != "npy":
        assert (train["source"] == "web").all()  # extra fields carried
    expected = (reference.gradients(QUERIES) @ torch.stack([window_gradient(reference, ids)
                                                           for _, ids in windows]).T).numpy()
    got = score_matrix(frame(out), [q["pair_id"] for q in QUERIES], [name for name, _ in windows])
    assert_close_to_largest(got, expected, 1e-4)


def test_top_train_keeps_the_extremes_and_their_per_token_scores(cli, tiny_gpt2, fitted, tmp_path):
    train = TRAIN + records(12)
    full = run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "full", "--per-token-scores", train=train)
    assert full.exit_code == 0
    top = run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "top", "--per-token-scores", "--top-train", 3,
                    "--rank-by", "score", "--host-memory-gb", SMALL_BUDGET, train=train)
    assert top.exit_code == 0
    everything, kept = frame(tmp_path / "full"), frame(tmp_path / "top")
    for query_id, rows in everything.groupby("query_id"):
        ranked = rows.sort_values(["influence_score", "train_id"], ascending=[False, True])
        lowest = rows.sort_values(["influence_score", "train_id"], ascending=[True, True])
        expected = set(ranked["train_id"][:3]) | set(lowest["train_id"][:3])
        mine = kept[kept["query_id"] == query_id]
        assert set(mine["train_id"]) == expected and len(mine) == 6
        merged = mine.merge(rows, on=["query_id", "train_id"], suffixes=("", "_full"))
        assert_close_to_largest(merged["influence_score"], merged["influence_score_full"], 1e-5)
        got = np.concatenate([json.loads(c) for c in merged["per_token_scores"]])
        assert_close_to_largest(got, np.concatenate([json.loads(c) for c in merged["per_token_scores_full"]]), 1e-5)
    written = pd.read_csv(tmp_path / "top" / "train.csv", dtype=str)
    assert set(written["train_id"]) == set(kept["train_id"])  # only the train examples that appear


def test_no_cosine_drops_the_self_influences(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    train = TRAIN + records(8)
    run_query(cli, tiny_gpt2, fitted["kfac"], tmp_path / "cosine", train=train)
    calls = []
    score = engine.score
    monkeypatch.setattr(engine, "score", lambda *a, **k: calls.append(a[2].cosine) or score(*a, **k))  # a[2]: Setup
    result = run_query(cli, tiny_gpt2, fitted["kfac"], tmp_path / "raw", "--no-cosine", train=train)
    assert calls == [False] and "cos " not in result.stdout
    a, b = frame(tmp_path / "raw"), frame(tmp_path / "cosine")
    assert "influence_cosine" not in a.columns
    assert_close_to_largest(a["influence_score"], b["influence_score"], 1e-5)


def test_a_killed_run_resumes_from_its_last_chunk(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    train = TRAIN + records(20)
    queries = [QUERIES[0], QUERIES[2]]  # none of them a train record: every engine call is a chunk's
    options = ["--host-memory-gb", SMALL_BUDGET]
    run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "whole", *options, train=train, queries=queries)
    score = engine.score
    with monkeypatch.context() as patch:
        patch.setattr(engine, "score", killed_at(score, 4))  # after three chunks
        run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "resumed", *options, train=train, queries=queries,
                  expect=1)
    partial = tmp_path / "resumed" / ".if-query-partial"
    done = np.fromfile(partial / "done.bin", dtype=np.uint8)[: len(train)].astype(bool)
    assert 0 < done.sum() < len(train) and done[: done.sum()].all()  # the first three chunks' rows
    assert not (tmp_path / "resumed" / "influences.csv").exists()
    scored_rows = []
    with monkeypatch.context() as patch:  # another budget: other chunks, the same finished rows
        patch.setattr(engine, "score", lambda *a, **k: scored_rows.append(len(a[1].indices)) or score(*a, **k))
        result = run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "resumed", "--host-memory-gb", "0.00015",
                           train=train, queries=queries)
    assert f"Resuming from {partial}: {done.sum()} of {len(train)} train examples already scored" in result.stderr
    assert sum(scored_rows) == len(train) - done.sum()  # only the rows not done
    assert frame(tmp_path / "resumed").equals(frame(tmp_path / "whole"))
    assert not partial.exists()
    # partial results of other arguments are not reused
    with monkeypatch.context() as patch:
        patch.setattr(engine, "score", killed_at(score, 4))
        run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "other", *options, train=train, queries=queries, expect=1)
    result = run_query(cli, tiny_gpt2, fitted["ekfac"], tmp_path / "other", *options, "--damping", "0.01",
                       train=train, queries=queries)
    assert "Ignoring the partial results" in result.stderr


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside the interpreter")
def test_ranks_split_a_corpus_chunks_and_rank_0_writes(tiny_gpt2, fitted, tmp_path, cli):
    reference = Reference(tiny_gpt2)
    path, windows = write_corpus("jsonl", tmp_path, reference.tokenizer)
    queries = write_json(tmp_path / "q.json", QUERIES)
    common = ["--model", str(tiny_gpt2), "--factors-dir", str(fitted["ekfac"]), "--query-json", str(queries),
              "--train-dataset", str(path), "--max-length", "12", "--host-memory-gb", SMALL_BUDGET]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", "--no-python",
                             str(Path(sys.executable).with_name("run-query")), *common, "--output-dir",
                             str(tmp_path / "ranks")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks split the chunks" in result.stderr
    cli("run-query", *common, "--output-dir", tmp_path / "single", "--quiet")
    a, b = frame(tmp_path / "ranks"), frame(tmp_path / "single")
    assert (a[["query_id", "train_id"]] == b[["query_id", "train_id"]]).all().all()
    assert_close_to_largest(a["influence_score"], b["influence_score"], 1e-5)
