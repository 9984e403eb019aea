"""The default engine's scores equal Kronfluence's own pairwise and self scores on the same factors."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import QUERIES, TRAIN, save_tiny_model, write_json

STRATEGIES = ["ekfac", "kfac", "diagonal", "identity"]


@pytest.fixture(scope="module")
def olmo2_fitted(tmp_path_factory, cli):
    """A tiny OLMo-2 (MLP projections without bias) with factors of every strategy."""
    root = tmp_path_factory.mktemp("olmo2")
    model = save_tiny_model(root / "model", "olmo2")
    data = write_json(root / "hessian.json", TRAIN + QUERIES)
    fitted = {"model": model}
    for strategy in STRATEGIES:
        cli("fit-hessians", "--model", model, "--hessian-dataset", data, "--output-dir", root / strategy,
            "--strategy", strategy, "--factor-batch-size", 3, "--lambda-batch-size", 2, "--quiet")
        fitted[strategy] = root / strategy
    return fitted


def _scores(cli, model, factors, files, out, *options):
    cli("run-query", "--model", model, "--factors-dir", factors, "--train-json", files["train"],
        "--query-json", files["query"], "--output-dir", out, "--quiet", *options)
    return pd.read_csv(out / "influences.csv")


def _assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    """max |difference| <= 1e-4 x max |score| (float32 throughout)."""
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.parametrize("per_token", [False, True], ids=["pairwise", "per-token"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", ["gpt2", "olmo2"])
def test_default_engine_equals_kronfluence(cli, tiny_gpt2, fitted, olmo2_fitted, tmp_path, family, strategy,
                                           per_token):
    model, factors = (tiny_gpt2, fitted[strategy]) if family == "gpt2" else (olmo2_fitted["model"],
                                                                              olmo2_fitted[strategy])
    # Two queries are also train examples: their self-influences come from both sides of each scorer.
    files = {"train": write_json(tmp_path / "t.json", TRAIN),
             "query": write_json(tmp_path / "q.json", QUERIES + TRAIN[:2])}
    options = ["--per-token-scores"] if per_token else []
    ours = _scores(cli, model, factors, files, tmp_path / "ours", *options)
    theirs = _scores(cli, model, factors, files, tmp_path / "theirs", "--engine", "kronfluence", *options)
    _assert_close(ours["influence_score"].to_numpy(), theirs["influence_score"].to_numpy())
    np.testing.assert_allclose(ours["influence_cosine"], theirs["influence_cosine"], atol=1e-4)
    if per_token:
        mine = [json.loads(cell) for cell in ours["per_token_scores"]]
        kron = [json.loads(cell) for cell in theirs["per_token_scores"]]
        assert [len(x) for x in mine] == [len(x) for x in kron]
        _assert_close(np.concatenate(mine), np.concatenate(kron))


def test_kfac_with_tiny_damping_is_the_same_for_both_engines(cli, tiny_gpt2, fitted, tmp_path):
    """K-FAC eigenvalues can come out slightly negative in floating point (how negative depends on the
    processor's LAPACK); both scorers clamp them at 0, so a damping smaller than the negative curvature still
    gives the same finite scores. The premise is built: one activation eigenvalue of a copy of the fitted
    factors is set negative, so some curvature + damping is negative unless it is clamped."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    factors_dir = tmp_path / "kfac"
    shutil.copytree(fitted["kfac"], factors_dir)
    path = factors_dir / "factors_hessian" / "activation_eigenvalues.safetensors"
    with safe_open(str(path), framework="pt") as file:
        metadata, eigen_a = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    module = sorted(eigen_a)[0]
    eigen_a[module][0] = -1e-3 * float(eigen_a[module].abs().max())  # a negative eigenvalue, far below rounding
    save_file(eigen_a, str(path), metadata=metadata)
    with safe_open(str(factors_dir / "factors_hessian" / "gradient_eigenvalues.safetensors"), framework="pt") as file:
        largest_g = float(file.get_tensor(module).max())
    most_negative = float(eigen_a[module][0]) * largest_g
    damping = 1e-3 * -most_negative
    assert largest_g > 0 and most_negative + damping < 0  # without the clamp, curvature + damping < 0 somewhere
    files = {"train": write_json(tmp_path / "t.json", TRAIN), "query": write_json(tmp_path / "q.json", QUERIES)}
    ours = _scores(cli, tiny_gpt2, factors_dir, files, tmp_path / "ours", "--damping", damping)
    theirs = _scores(cli, tiny_gpt2, factors_dir, files, tmp_path / "theirs", "--damping", damping,
                     "--engine", "kronfluence")
    assert np.isfinite(ours["influence_score"]).all()
    _assert_close(ours["influence_score"].to_numpy(), theirs["influence_score"].to_numpy())
