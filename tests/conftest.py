"""Fixtures and environment set-up only; shared helpers and data live in helpers.py."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a stray hub lookup fails fast instead of hanging
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
from helpers import QUERIES, TRAIN, save_tiny_model, write_json  # noqa: E402
from typer.testing import CliRunner  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture
def query_files(tmp_path) -> dict[str, Path]:
    return {
        "train": write_json(tmp_path / "train.json", TRAIN),
        "query": write_json(tmp_path / "query.json", QUERIES),
    }


class Cli:
    """Runs the real Typer app in-process (same code path as the console scripts)."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args, expect: int | None = 0):
        from if_query.cli import app

        result = self.runner.invoke(app, [str(a) for a in args])
        if expect is not None and result.exit_code != expect:
            raise AssertionError(
                f"exit {result.exit_code} != {expect}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
                f"exception: {result.exception!r}"
            )
        return result


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def fitted(tmp_path_factory, tiny_gpt2, cli) -> dict[str, Path]:
    """Factors of every strategy fitted once on the TRAIN records (empirical Fisher: exactly reproducible)."""
    data = write_json(tmp_path_factory.mktemp("hessian") / "hessian.json", TRAIN + QUERIES)
    out = {}
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        directory = tmp_path_factory.mktemp(f"factors-{strategy}")
        cli("fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", data, "--output-dir", directory,
            "--strategy", strategy, "--factor-batch-size", 3, "--lambda-batch-size", 2, "--fisher", "empirical",
            "--quiet")
        out[strategy] = directory
    out["data"] = data
    return out
