"""Memory options give the same scores as the plain path; size estimates match the files written."""

import json

import numpy as np
import pytest
import torch
from helpers import QUERIES, TRAIN, assert_close_to_largest, run_query, score_matrix, write_json

from if_query.fit.metadata import METADATA_FILE

Q = [q["pair_id"] for q in QUERIES]
T = [t["pair_id"] for t in TRAIN]


@pytest.fixture(scope="module")
def exact(cli, tiny_gpt2, fitted, tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    files = {"train": write_json(root / "t.json", TRAIN), "query": write_json(root / "q.json", QUERIES)}
    return files, score_matrix(run_query(cli, tiny_gpt2, fitted["ekfac"], files, root / "out"), Q, T)


@pytest.mark.parametrize(
    "options",
    [["--module-partitions", "2"], ["--queries-per-pass", "1", "--score-batch-size", "1"],
     ["--query-rank", "17"]],  # rank 17 = min(out, in + bias) of the tiny model's MLP: lossless
    ids=["module-partitions", "queries-per-pass", "full-query-rank"],
)
def test_streaming_options_equal_exact_scores(cli, tiny_gpt2, fitted, exact, tmp_path, options):
    files, expected = exact
    frame = run_query(cli, tiny_gpt2, fitted["ekfac"], files, tmp_path / "out", "--engine", "kronfluence", *options)
    assert_close_to_largest(score_matrix(frame, Q, T), expected, 1e-4)


@pytest.mark.parametrize(
    "options",
    [["--workspace-gb", "1e-9"], ["--host-memory-gb", "0"], ["--host-memory-gb", "0", "--workspace-gb", "1e-9"]],
    ids=["workspace-blocks", "spill-file", "both"],
)
def test_engine_memory_limits_give_the_same_scores(cli, tiny_gpt2, fitted, exact, tmp_path, options):
    """A workspace of two gradients (blocks re-formed per query block) and token factors spilled to a
    memory-mapped file change nothing but speed."""
    files, expected = exact
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json", files["train"],
                 "--query-json", files["query"], "--output-dir", tmp_path / "out", "--per-token-scores", *options)
    assert "Plan:" in result.stderr
    if "--host-memory-gb" in options:
        assert "spilled to a memory-mapped file" in result.stderr
    if "--workspace-gb" in options:
        assert "blocks of 1 gradients" in result.stderr
    import pandas as pd

    frame = pd.read_csv(tmp_path / "out" / "influences.csv")
    assert_close_to_largest(score_matrix(frame, Q, T), expected, 1e-5)
    assert not list(tmp_path.rglob(".if-query-token-factors.*"))


@pytest.mark.parametrize("option", [["--query-rank", "4"], ["--queries-per-pass", "2"], ["--module-partitions", "2"]])
def test_kronfluence_only_options_need_the_kronfluence_engine(cli, tiny_gpt2, fitted, exact, tmp_path, option):
    files, _ = exact
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json", files["train"],
                 "--query-json", files["query"], "--output-dir", tmp_path / "out", *option, expect=2)
    assert "--engine kronfluence" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_low_query_rank_is_an_approximation(cli, tiny_gpt2, fitted, exact, tmp_path):
    files, expected = exact
    frame = run_query(cli, tiny_gpt2, fitted["ekfac"], files, tmp_path / "out", "--engine", "kronfluence",
                      "--query-rank", "1")
    got = score_matrix(frame, Q, T)
    assert np.isfinite(got).all() and not np.allclose(got, expected, rtol=1e-3)
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.5


def test_fit_in_module_partitions_equals_single_fit(cli, tiny_gpt2, fitted, tmp_path):
    from safetensors.torch import load_file

    cli("fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", fitted["data"], "--output-dir", tmp_path / "f",
        "--strategy", "ekfac", "--fisher", "empirical", "--factor-batch-size", "3", "--lambda-batch-size", "2",
        "--module-partitions", "2", "--quiet")
    # Each module's covariances come from the same batches and operations with or without partitions (only which
    # modules are tracked in a pass differs), so they are bitwise equal; then so are their eigendecompositions and,
    # from the same batches again, the lambdas.
    for name in ("activation_covariance", "gradient_covariance", "activation_eigenvectors", "lambda_matrix"):
        a = load_file(tmp_path / "f" / "factors_hessian" / f"{name}.safetensors")
        b = load_file(fitted["ekfac"] / "factors_hessian" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_size_estimate_matches_written_factors(fitted, strategy):
    metadata = json.loads((fitted[strategy] / METADATA_FILE).read_text())
    written = sum(p.stat().st_size for p in (fitted[strategy] / "factors_hessian").glob("*.safetensors"))
    assert 0.8 * written <= metadata["estimated_factor_bytes"] <= 1.05 * written


def test_more_module_partitions_than_modules_are_refused_before_the_model_loads(cli, tiny_gpt2, fitted, tmp_path,
                                                                             monkeypatch):
    from helpers import assert_one_line_error

    from if_query.model import loading

    loads = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a))
    result = cli("fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", fitted["data"], "--output-dir",
                 tmp_path / "f", "--module-partitions", "5", expect=2)  # the tiny model tracks 4 MLP projections
    assert_one_line_error(result, 2, "--module-partitions 5 is more than the 4 tracked modules")
    assert loads == [] and not (tmp_path / "f").exists()
