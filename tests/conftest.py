import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a stray hub lookup fails fast instead of hanging
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402
from models import save_tiny_model  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

TRAIN = [
    {"pair_id": "t1", "prompt": "Alice lives in", "completion": " Paris.", "topic": "city"},
    {"pair_id": "t2", "prompt": "Bob works as a", "completion": " doctor.", "topic": "job", "meta": {"k": [1, 2]}},
    {"pair_id": "t3", "prompt": "Carol plays the", "completion": " violin and drum.", "topic": "music"},
    {"pair_id": "t4", "prompt": "Dave", "completion": " lives in Rome, and is a pilot."},
]
QUERIES = [
    {"pair_id": "q1", "prompt": "where Alice lives is", "completion": " Paris.", "kind": "city"},
    {"pair_id": "q2", "prompt": "Bob works as a", "completion": " doctor.", "kind": "job"},
    {"pair_id": "q3", "prompt": "the colour of Carol is", "completion": " blue and green!", "kind": "colour"},
]


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


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
