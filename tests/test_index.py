"""if-query index and run-query --index: rows against the sketch of brute-force autograd gradients, the exact
re-scoring against the engine, refusal of a mismatched index, resume, a 2-rank build, the sketch's maths."""

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
from helpers import QUERIES, Reference, assert_close_to_largest, assert_one_line_error, killed_at, write_json

from if_query.index import build
from if_query.index.sketch import ModuleSketch, low_rank_scaling
from if_query.index.store import IDENTITY_KEYS, IndexStore, mismatch
from if_query.kron.factors import HessianFactors
from if_query.plan.sizes import Shape, human_bytes

WORDS = "the a of in is lives works plays city job Alice Bob Carol Dave Paris Rome Oslo Lima and to".split()
MODULES = [Shape(f"transformer.h.{layer}.mlp.{name}", out, inp, True)
           for layer in (0, 1) for name, out, inp in (("c_fc", 64, 16), ("c_proj", 16, 64))]
SKETCH = ["--sketch", "gaussian", "--sketch-dim", "6", "--scaling-rank", "2", "--row-dtype", "float32"]


def corpus(directory: Path, tokenizer, lengths=(5, 20, 8, 30, 3, 14, 26)) -> tuple[Path, list[list[int]]]:
    """A JSON Lines corpus and its windows' token ids at --max-length 12."""
    texts = [" ".join(np.random.default_rng(k).choice(WORDS, n)) for k, n in enumerate(lengths)]
    (directory / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{k}", "text": t}) + "\n"
                                                  for k, t in enumerate(texts)))
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        windows += [ids[s : s + 12] for s in range(0, len(ids), 12) if len(ids[s : s + 12]) > 1]
    return directory / "docs.jsonl", windows


def index(cli, model, factors, docs, out, *extra, expect=0):
    return cli("index", "--model", model, "--factors-dir", factors, "--train-dataset", docs, "--output-dir", out,
               "--max-length", 12, "--batch-size", 3, "--quiet", *SKETCH, *extra, expect=expect)


def module_gradients(reference: Reference, ids: list[int]) -> list[torch.Tensor]:
    """A window's gradient per tracked module as if-query lays it out: (out, in + 1), the bias last (GPT-2's Conv1D
    weight is (in, out))."""
    logits = reference.model(torch.tensor([ids])).logits[0]
    loss = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
    grads = torch.autograd.grad(loss, reference.params)
    return [torch.cat([grads[i].T, grads[i + 1][:, None]], dim=1) for i in range(0, len(grads), 2)]


@pytest.mark.parametrize("kind", ["gaussian", "eigen"])
def test_rows_are_the_sketch_of_brute_force_gradients(cli, tiny_gpt2, fitted, tmp_path, kind):
    reference = Reference(tiny_gpt2)
    docs, windows = corpus(tmp_path, reference.tokenizer)
    index(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "index", "--sketch", kind)
    store = IndexStore.open(tmp_path / "index")
    manifest = store.manifest
    assert manifest["complete"] and manifest["windows"] == len(windows)
    assert manifest["tracked_modules"] == [s.name for s in MODULES] and manifest["row_dim"] == 4 * 36
    factors = HessianFactors(fitted["ekfac"])
    sketches = [ModuleSketch.make(s, factors.preconditioner(s.name, None, torch.device("cpu")), 6, 2, 0,
                                  torch.device("cpu"), kind) for s in MODULES]
    expected = []
    for ids in windows:
        row = []
        for sketch, gradient in zip(sketches, module_gradients(reference, ids), strict=True):
            rotated = sketch.pre.q_g.double().T @ gradient @ sketch.pre.q_a.double()
            whitened = sketch.scale.double() * rotated
            if kind == "eigen":  # the block of W on the kept eigenvectors: W itself there
                kept_rows, kept_columns = sketch.kept
                row.append(whitened[kept_rows][:, kept_columns].flatten())
            else:
                row.append((sketch.omega_g.double().T @ (sketch.approx.double() * rotated)
                            @ sketch.omega_a.double()).flatten())
        expected.append(torch.cat(row))
    expected = torch.stack(expected).detach()
    assert_close_to_largest(store.rows(), expected, 1e-4)
    assert_close_to_largest(store.norms(), (expected**2).sum(1), 1e-4)


def test_low_rank_scaling_is_the_truncated_svd():
    scale = torch.rand(7, 5, generator=torch.Generator().manual_seed(0)).double() + 0.1
    values = np.linalg.svd(scale.numpy(), compute_uv=False)
    for rank in (1, 2, 5):
        u, v, error = low_rank_scaling(scale, rank)
        assert error == pytest.approx(np.sqrt((values[rank:] ** 2).sum() / (values**2).sum()), abs=1e-6)
        assert float((u.T @ v - scale.float()).norm()) == pytest.approx(error * float(scale.norm()), abs=1e-5)


def frame(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "influences.csv", dtype={"train_id": str, "query_id": str})


def run_query(cli, model, factors, docs, out, *extra, expect=0):
    return cli("run-query", "--model", model, "--factors-dir", factors, "--train-dataset", docs, "--query-json",
               write_json(out.parent / "queries.json", QUERIES), "--output-dir", out, "--max-length", 12,
               "--top-train", 2, "--quiet", *extra, expect=expect)


def test_candidates_are_scored_exactly_and_a_mismatched_index_is_refused(cli, tiny_gpt2, fitted, tmp_path):
    reference = Reference(tiny_gpt2)
    docs, windows = corpus(tmp_path, reference.tokenizer)
    index(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "index")
    run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "exact", "--top-train", len(windows))  # every pair
    exact = frame(tmp_path / "exact").set_index(["query_id", "train_id"])
    run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "short", "--index", tmp_path / "index",
              "--candidates", 2)
    short = frame(tmp_path / "short")
    assert 0 < len(short) < len(exact)
    pairs = list(zip(short["query_id"], short["train_id"], strict=True))
    assert_close_to_largest(short["influence_score"], exact.loc[pairs, "influence_score"], 1e-5)
    assert np.abs(short["influence_cosine"].to_numpy() - exact.loc[pairs, "influence_cosine"].to_numpy()).max() <= 1e-5
    run = json.loads((tmp_path / "short" / "run.json").read_text())
    assert run["index"]["candidates"] == 2 and run["index"]["windows"] == len(windows)
    assert 2 <= run["index"]["shortlisted"] <= 4 * len(QUERIES)
    # every window a candidate: the exact corpus run's results
    run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "all", "--index", tmp_path / "index",
              "--candidates", len(windows))
    run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "corpus")
    a, b = frame(tmp_path / "all"), frame(tmp_path / "corpus")
    assert (a[["query_id", "train_id"]] == b[["query_id", "train_id"]]).all().all()
    assert_close_to_largest(a["influence_score"], b["influence_score"], 1e-5)
    # refused in one line: other factors, another --max-length, another corpus, not an index
    refused = run_query(cli, tiny_gpt2, fitted["kfac"], docs, tmp_path / "r1", "--index", tmp_path / "index",
                        expect=2)
    assert_one_line_error(refused, 2, "was built for other factors", "if-query index")
    refused = run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "r2", "--index", tmp_path / "index",
                        "--max-length", 10, expect=2)
    assert_one_line_error(refused, 2, "was built for another --max-length (12, this run 10)")
    (tmp_path / "other").mkdir()
    other, _ = corpus(tmp_path / "other", reference.tokenizer, (5, 9))
    refused = run_query(cli, tiny_gpt2, fitted["ekfac"], other, tmp_path / "r3", "--index", tmp_path / "index",
                        expect=2)
    assert_one_line_error(refused, 2, "was built for another corpus")
    refused = run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "r4", "--index", tmp_path, expect=2)
    assert_one_line_error(refused, 2, "not an if-query index")
    refused = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-dataset", docs,
                  "--query-json", tmp_path / "queries.json", "--output-dir", tmp_path / "r5", "--index",
                  tmp_path / "index", expect=2)
    assert_one_line_error(refused, 2, "--top-train")


def test_an_index_serves_queries_with_or_without_the_chat_template():
    """A corpus's windows do not depend on --chat-template (text documents ignore it, conversations always go through
    the template): an index built without it serves a run that formats its queries with it."""
    identity = {key: f"value of {key}" for key in IDENTITY_KEYS}
    manifest = {"identity": {**identity, "chat_template": False}, "tracked_modules": ["m"]}  # as indexes recorded it
    assert mismatch(manifest, {**identity, "chat_template": True}, ["m"]) is None
    assert mismatch(manifest, {**identity, "train": "other windows"}, ["m"]) == "built for another corpus (its " \
        "windows' tokens)"


def test_an_answer_reads_no_document_of_the_corpus_the_index_keeps(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    from if_query.data.corpus import Corpus

    reference = Reference(tiny_gpt2)
    docs, windows = corpus(tmp_path, reference.tokenizer)
    read = []
    original = Corpus._jsonl

    def counted(self):
        for document in original(self):
            read.append(document.name)
            yield document

    monkeypatch.setattr(Corpus, "_jsonl", counted)
    index(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "index")
    assert len(read) == 7  # the build reads each document once
    read.clear()
    run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "kept", "--index", tmp_path / "index",
              "--candidates", 2)
    assert read == []  # the candidates' windows came from the index's copy
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    tokens = manifest["corpus"]["tokens"]
    per_token = (tmp_path / "index" / "corpus" / "tokens.i32").stat().st_size / tokens
    # if-query plan counts the same row and the same bytes per token of the windows' copy
    plan = cli("plan", "--model", tiny_gpt2, "--documents", 3, "--tokens", 10, *SKETCH).stdout
    assert f"a row: {manifest['row_dim']:,} numbers" in plan
    assert f"copy of the windows {human_bytes(per_token * 30)}" in plan
    tokens_file = tmp_path / "index" / "corpus" / "tokens.i32"
    whole = tokens_file.read_bytes()
    tokens_file.write_bytes(whole[:-4])  # a copy cut short (a partial copy of the index): not trusted, read again
    run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "cut", "--index", tmp_path / "index",
              "--candidates", 2)
    assert len(read) == 7
    tokens_file.write_bytes(whole)
    read.clear()
    # the same documents written with other spacing: other bytes, so the corpus is read again (each document once)
    # and its windows checked against the index's: the same results
    lines = [json.loads(line) for line in docs.read_text().splitlines()]
    docs.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in lines))
    run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "read", "--index", tmp_path / "index",
              "--candidates", 2)
    assert sorted(read) == sorted(f"d{k}" for k in range(7))
    kept, again = frame(tmp_path / "kept"), frame(tmp_path / "read")
    assert (kept[["query_id", "train_id"]] == again[["query_id", "train_id"]]).all().all()
    assert_close_to_largest(kept["influence_score"], again["influence_score"], 1e-6)
    kept_rows = pd.read_csv(tmp_path / "kept" / "train.csv").sort_values("train_id")
    again_rows = pd.read_csv(tmp_path / "read" / "train.csv").sort_values("train_id")
    assert kept_rows["completion"].tolist() == again_rows["completion"].tolist()


def test_a_killed_build_resumes_and_other_arguments_are_refused(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    reference = Reference(tiny_gpt2)
    docs, windows = corpus(tmp_path, reference.tokenizer)
    index(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "whole", "--shard-rows", 4)
    sketch_batch = build.sketch_batch
    with monkeypatch.context() as patch:
        patch.setattr(build, "sketch_batch", killed_at(sketch_batch, 3))  # after shard 0 (batches of 3 and 1)
        index(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "resumed", "--shard-rows", 4, expect=1)
    store = IndexStore.open(tmp_path / "resumed")
    assert store.done_count() == 4 and not store.manifest["complete"]
    refused = run_query(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "r", "--index", tmp_path / "resumed",
                        expect=2)
    assert_one_line_error(refused, 2, "is incomplete (4 of")
    batches = []
    with monkeypatch.context() as patch:
        patch.setattr(build, "sketch_batch", lambda *a: batches.append(1) or sketch_batch(*a))
        result = cli("index", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-dataset", docs,
                     "--output-dir", tmp_path / "resumed", "--max-length", 12, "--batch-size", 3, "--shard-rows", 4,
                     *SKETCH)
    assert f"4 of {len(windows)} windows already indexed" in result.stderr
    assert len(batches) < -(-len(windows) // 3) + 1
    resumed, whole = IndexStore.open(tmp_path / "resumed"), IndexStore.open(tmp_path / "whole")
    assert resumed.manifest["complete"]
    assert_close_to_largest(resumed.rows(), whole.rows(), 1e-5)
    refused = index(cli, tiny_gpt2, fitted["ekfac"], docs, tmp_path / "whole", "--shard-rows", 4, "--seed", 1,
                    expect=2)
    assert_one_line_error(refused, 2, "holds an index built with other arguments (sketch differ)", "--overwrite")


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside the interpreter")
def test_two_ranks_build_the_index_one_rank_builds(cli, tiny_gpt2, fitted, tmp_path):
    reference = Reference(tiny_gpt2)
    docs, windows = corpus(tmp_path, reference.tokenizer)
    common = ["--model", str(tiny_gpt2), "--factors-dir", str(fitted["ekfac"]), "--train-dataset", str(docs),
              "--max-length", "12", "--batch-size", "3", "--shard-rows", "4", *SKETCH]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", "--no-python",
                             str(Path(sys.executable).with_name("if-query")), "index", *common, "--output-dir",
                             str(tmp_path / "ranks")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ranks, shard s on rank s mod 2" in result.stderr
    cli("index", *common, "--output-dir", tmp_path / "single", "--quiet")
    ranks, single = IndexStore.open(tmp_path / "ranks"), IndexStore.open(tmp_path / "single")
    assert ranks.manifest == single.manifest and ranks.manifest["complete"] and ranks.shards >= 3
    assert_close_to_largest(ranks.rows(), single.rows(), 1e-5)
    assert_close_to_largest(ranks.norms(), single.norms(), 1e-5)
