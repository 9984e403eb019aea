"""A drop-in replacement for the earlier if-query tool: its clients' exact commands, run as subprocesses.

Clients call fit-hessians and run-query with the earlier tool's flags, read query.csv, train.csv and
influences.csv with csv.DictReader (or pandas), show stderr as progress and read the summary from stdout.
"""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import QUERIES, TRAIN, Reference, assert_close_to_largest, reference_tokens, write_json

from if_query.config import QueryConfig
from if_query.score.engine_scorer import gradient_batches

BIN = Path(sys.executable).parent
REVISION = "v1-client"
# Every line run-query may print on stdout: the summary of each query, then where the results went.
SUMMARY_LINE = re.compile(
    r"^(query \S+ \(loss [^)]+\): .*"
    r"|  most (helpful|harmful):( none \(no (positive|negative) score\))?"
    r"|\s+[+-]\S+  cos [+-]\d\.\d\d  \S+: .*"
    r"|Wrote \S+(, \S+)*"
    r"|)$"
)


def run(*args, cwd):
    """One command exactly as a client script runs it (a fresh process, the console script)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="160")
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def assert_clean_stdout(stdout: str):
    bad = [line for line in stdout.splitlines() if not SUMMARY_LINE.match(line)]
    assert not bad, f"unexpected stdout lines (logging or progress bars?): {bad[:5]}"


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_gpt2):
    """A client's working directory: run/train.json, run/query.json, and factors fitted with every
    fit-hessians flag of the earlier tool."""
    root = tmp_path_factory.mktemp("client")
    write_json(root / "run" / "train.json", TRAIN)
    write_json(root / "run" / "query.json", QUERIES)
    write_json(root / "fit.json", TRAIN + QUERIES)
    fit = run("fit-hessians", "--model", tiny_gpt2, "--revision", REVISION, "--hessian-dataset", "fit.json",
              "--output-dir", "factors", "--factor-batch-size", 3, "--lambda-batch-size", 2, "--max-examples", 6,
              "--strategy", "ekfac", "--dtype", "bfloat16", "--layer-stride", 1, cwd=root)
    assert fit.returncode == 0, fit.stderr
    assert fit.stdout.splitlines() == ["Fitted ekfac factors for 4 modules on 6 examples -> factors"]
    assert "Fitting stage: covariance" in fit.stderr  # progress on stderr
    metadata = json.loads((root / "factors" / "metadata.json").read_text())
    assert metadata["fit"]["revision"] == REVISION and metadata["fit"]["dtype"] == "bfloat16"
    assert metadata["fit"]["num_examples"] == 6 and metadata["fit"]["layer_stride"] == 1
    return root


def test_earlier_tools_command_works_unchanged(client, tiny_gpt2):
    result = run("run-query", "--model", tiny_gpt2, "--revision", REVISION, "--factors-dir", "factors",
                 "--train-json", "run/train.json", "--query-json", "run/query.json", "--output-dir", "run/results",
                 "--query-batch-size", 4, "--train-batch-size", 2, "--dtype", "bfloat16", "--max-length", 512,
                 cwd=client)
    assert result.returncode == 0, result.stderr
    assert_clean_stdout(result.stdout)
    assert f"query {QUERIES[0]['pair_id']} (loss " in result.stdout and "Wrote " in result.stdout
    assert "Scoring" in result.stderr and "Traceback" not in result.stderr

    out = client / "run" / "results"
    queries, train, influences = (read_rows(out / name) for name in ("query.csv", "train.csv", "influences.csv"))
    assert [r["query_id"] for r in queries] == [q["pair_id"] for q in QUERIES]
    assert [r["train_id"] for r in train] == [t["pair_id"] for t in TRAIN]
    assert [(r["query_id"], r["train_id"]) for r in influences] == [
        (q["pair_id"], t["pair_id"]) for q in QUERIES for t in TRAIN]
    assert list(queries[0])[:5] == ["query_id", "prompt", "completion", "loss", "loss_sum"]
    assert list(influences[0]) == ["query_id", "train_id", "influence_score", "influence_cosine"]
    assert [r["prompt"] for r in queries] == [q["prompt"] for q in QUERIES]
    assert [r["kind"] for r in queries] == [q["kind"] for q in QUERIES]  # extra fields carried
    reference = Reference(tiny_gpt2)
    for row, query in zip(queries, QUERIES, strict=True):
        loss, loss_sum = float(row["loss"]), float(row["loss_sum"])
        ids, labels = reference_tokens(reference.tokenizer, query["prompt"], query["completion"])
        assert loss_sum / loss == pytest.approx(sum(label != -100 for label in labels[1:]))
        assert loss == pytest.approx(reference.mean_loss(query), rel=2e-2)  # bfloat16 weights
    for row in influences:
        assert math.isfinite(float(row["influence_score"]))
        assert -1 <= float(row["influence_cosine"]) <= 1

    run_json = json.loads((out / "run.json").read_text())
    assert run_json["model"] == str(tiny_gpt2) and run_json["revision"] == REVISION
    assert run_json["strategy"] == "ekfac" and run_json["factors_dir"] == str((client / "factors").resolve())
    assert run_json["damping"] == "auto" and run_json["dtype"] == "bfloat16"
    assert "--query-batch-size" in run_json["command"] and {"torch", "transformers", "kronfluence"} <= set(
        run_json["versions"])
    assert "weights_fingerprint" in run_json and "damping_per_module" in run_json
    assert sorted(p.name for p in out.iterdir()) == ["influences.csv", "query.csv", "run.json", "train.csv"]


def test_per_token_scores_as_clients_read_them(client, tiny_gpt2):
    result = run("run-query", "--model", tiny_gpt2, "--revision", REVISION, "--factors-dir", "factors",
                 "--train-json", "run/train.json", "--query-json", "run/query.json", "--output-dir", "run/per-token",
                 "--per-token-scores", "--score-batch-size", 3, "--dtype", "float32", "--max-length", 64, cwd=client)
    assert result.returncode == 0, result.stderr
    assert_clean_stdout(result.stdout)
    out = client / "run" / "per-token"
    train = {r["train_id"]: r for r in read_rows(out / "train.csv")}
    tokenizer = Reference(tiny_gpt2).tokenizer
    for record in TRAIN:
        ids, _ = reference_tokens(tokenizer, record["prompt"], record["completion"])
        assert json.loads(train[record["pair_id"]]["tokens"]) == [tokenizer.decode([i]) for i in ids]
    influences = read_rows(out / "influences.csv")
    assert len(influences) == len(QUERIES) * len(TRAIN)
    sums = []
    for row in influences:
        values = json.loads(row["per_token_scores"])
        assert len(values) == len(json.loads(train[row["train_id"]]["tokens"]))
        assert all(isinstance(v, float) and math.isfinite(v) for v in values)
        sums.append(sum(values))
    assert_close_to_largest(sums, [float(row["influence_score"]) for row in influences], 1e-4)
    queries = read_rows(out / "query.csv")
    reference = Reference(tiny_gpt2)
    np.testing.assert_allclose([float(r["loss"]) for r in queries], [reference.mean_loss(q) for q in QUERIES],
                               rtol=1e-5)


def test_revision_must_match_the_factors_in_one_line(client, tiny_gpt2):
    result = run("run-query", "--model", tiny_gpt2, "--revision", "other", "--factors-dir", "factors",
                 "--train-json", "run/train.json", "--query-json", "run/query.json", "--output-dir", "run/other",
                 cwd=client)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()  # progress first (loading the model), then one error line
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert (f"fitted with revision {REVISION!r}, this run passes revision 'other'; pass --revision {REVISION}, "
            "or refit with --revision other") in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (client / "run" / "other").exists()


@pytest.mark.parametrize(("fitted", "given", "words"), [
    (None, "main", "fitted with no revision, this run passes revision 'main'; drop --revision from this run, "
                   "or refit with --revision main"),
    ("v1", None, "fitted with revision 'v1', this run passes no revision; add --revision v1 to this run"),
])
def test_a_revision_mismatch_says_what_to_do(fitted, given, words):
    from if_query.run.compatibility import describe_model_mismatch

    assert describe_model_mismatch({"model": "m", "revision": fitted}, {"revision": given}).endswith(words)
    assert describe_model_mismatch({"model": "m", "revision": fitted}, {"revision": fitted}) == ""


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_dtypes_on_cpu_are_close_to_float32(cli, tiny_gpt2, fitted, query_files, tmp_path, dtype):
    """--dtype float16/bfloat16 also run on CPU, giving the float32 brute-force scores up to their precision."""
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], "--train-json", query_files["train"],
        "--query-json", query_files["query"], "--output-dir", tmp_path / "out", "--dtype", dtype, "--quiet")
    rows = read_rows(tmp_path / "out" / "influences.csv")
    got = np.array([float(r["influence_score"]) for r in rows]).reshape(len(QUERIES), len(TRAIN))
    reference = Reference(tiny_gpt2)
    expected = (reference.gradients(QUERIES) @ reference.gradients(TRAIN).T).numpy()
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.02 * np.abs(expected).max())
    losses = [float(r["loss"]) for r in read_rows(tmp_path / "out" / "query.csv")]
    np.testing.assert_allclose(losses, [reference.mean_loss(q) for q in QUERIES], rtol=2e-2)


# ---- --query-batch-size / --train-batch-size


def _config(**options) -> QueryConfig:
    return QueryConfig(model="m", factors_dir="f", folders=[Path("folder")], **options)


def test_batch_sizes_default_to_score_batch_size():
    assert _config(score_batch_size=5).batch_sizes() == (5, 5)
    assert _config(score_batch_size=5, query_batch_size=4, train_batch_size=2).batch_sizes() == (4, 2)
    assert _config(score_batch_size=5, train_batch_size=3).batch_sizes() == (5, 3)


def test_gradient_batches_split_queries_and_train_only_examples():
    lengths = [7, 3, 5, 9, 1, 4, 8, 2, 6]
    config = _config(query_batch_size=2, train_batch_size=3)
    batches = gradient_batches(lengths, 4, config)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))  # each example once
    queries = [b for b in batches if set(b) <= {0, 1, 2, 3}]
    train_only = [b for b in batches if set(b) <= {4, 5, 6, 7, 8}]
    assert len(queries) + len(train_only) == len(batches)  # no batch mixes the two groups
    assert max(map(len, queries)) <= 2 and max(map(len, train_only)) <= 3
    assert [lengths[i] for b in queries for i in b] == sorted(lengths[:4])  # little padding
    assert gradient_batches([], 0, config) == []


def test_bad_batch_sizes_are_one_line_errors(cli, tiny_gpt2, fitted, query_files, tmp_path):
    for option in ("--query-batch-size", "--train-batch-size"):
        result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], "--train-json",
                     query_files["train"], "--query-json", query_files["query"], "--output-dir", tmp_path / "out",
                     option, 0, expect=2)
        assert result.stderr.strip() == f"error: {option} must be at least 1, got 0"
        assert not (tmp_path / "out").exists()


def test_kronfluence_engine_uses_query_and_train_batch_sizes(cli, tiny_gpt2, fitted, query_files, tmp_path,
                                                            monkeypatch):
    import if_query.kron.streaming as kron

    seen = {"query": set(), "train": set(), "self": set()}
    pairwise, self_scores = kron.compute_pairwise_scores_with_loaders, kron.compute_self_scores_with_loaders

    def spy_pairwise(**kwargs):
        seen["query"] |= {len(batch["input_ids"]) for batch in kwargs["query_loader"]}
        seen["train"] |= {len(batch["input_ids"]) for batch in kwargs["train_loader"]}
        assert kwargs["per_device_query_batch_size"] == 1
        return pairwise(**kwargs)

    def spy_self(**kwargs):
        seen["self"] |= {len(batch["input_ids"]) for batch in kwargs["train_loader"]}
        return self_scores(**kwargs)

    monkeypatch.setattr(kron, "compute_pairwise_scores_with_loaders", spy_pairwise)
    monkeypatch.setattr(kron, "compute_self_scores_with_loaders", spy_self)
    args = ["run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json", query_files["train"],
            "--query-json", query_files["query"], "--quiet"]
    cli(*args, "--output-dir", tmp_path / "kronfluence", "--engine", "kronfluence", "--query-batch-size", 1,
        "--train-batch-size", 3)
    assert seen["query"] == {1} and seen["train"] == {3, len(TRAIN) % 3} and max(seen["self"]) == 3
    cli(*args, "--output-dir", tmp_path / "default")
    scores = [[float(r["influence_score"]) for r in read_rows(tmp_path / name / "influences.csv")]
              for name in ("kronfluence", "default")]
    assert_close_to_largest(scores[0], scores[1], 2e-4)


# ---- `uv run run-query ...` as the earlier tool's clients launch it


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not installed")
def test_uv_run_adds_nothing_to_stderr():
    """Clients show a failed run's stderr: `uv run` itself must add nothing to it (no "Bytecode compiled
    12356 files" from uv's compile-bytecode setting, which it printed on every run)."""
    repo = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("UV_")}
    result = subprocess.run(["uv", "run", "--frozen", "python", "-c", "pass"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
