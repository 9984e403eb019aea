"""The bundled demo: a query about a fact is most influenced by the training example stating it; the README's
run-query example over the checkout's queries/test_query runs as written once the demo has fitted its factors."""

import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from if_query.config import DemoConfig
from if_query.demo.run_demo import DEMO_QUERIES, run_demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh checkout's working directory after `uv run if-query demo`: src/ and queries/ as in the repository,
    and the demo's if-query-demo/ (which the demo writes into the current directory by default)."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "src").symlink_to(REPO / "src")
    for name in ("train.json", "query.json"):
        (root / "queries" / "test_query").mkdir(parents=True, exist_ok=True)
        (root / "queries" / "test_query" / name).write_bytes((REPO / "queries" / "test_query" / name).read_bytes())
    outcome = run_demo(DemoConfig(output_dir=root / "if-query-demo"))
    return root, outcome


def test_demo_ranks_the_stating_example_first(checkout):
    root, outcome = checkout
    demo = root / "if-query-demo"
    assert sorted(p.name for p in demo.iterdir()) == ["factors", "test_query"]
    written = sorted(p.name for p in (demo / "test_query" / "results").iterdir())
    assert written == ["influences.csv", "query.csv", "run.json", "train.csv"]
    influences = pd.read_csv(demo / "test_query" / "results" / "influences.csv", dtype={"train_id": str})
    for query in json.loads((DEMO_QUERIES / "query.json").read_text()):
        rows = influences[influences["query_id"] == query["pair_id"]]
        best = rows.sort_values("influence_cosine", ascending=False)["train_id"].iloc[0]
        assert best in query["stated_by"], (query["pair_id"], best)


def test_the_checkouts_test_query_is_the_demos():
    """queries/test_query (the seed's layout) and the package's demo_data/test_query hold the same records
    (scripts/make_tiny_model.py writes both)."""
    for name in ("train.json", "query.json"):
        assert (REPO / "queries" / "test_query" / name).read_bytes() == (DEMO_QUERIES / name).read_bytes(), name


def readme_example() -> list[str]:
    """The README's run-query command over queries/test_query, as written (line continuations joined)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)
    [block] = [b for b in blocks if "--train-json queries/test_query/train.json" in b]
    return shlex.split(block.replace("\\\n", " "))


def test_the_readme_example_runs_from_the_checkout(checkout, cli, monkeypatch):
    root, outcome = checkout
    argv = readme_example()
    assert argv[:3] == ["uv", "run", "run-query"]
    monkeypatch.chdir(root)
    result = cli(*argv[2:])
    assert "Wrote queries/test_query/results/query.csv" in result.stdout
    written = pd.read_csv(root / "queries" / "test_query" / "results" / "influences.csv")
    demo = pd.read_csv(root / "if-query-demo" / "test_query" / "results" / "influences.csv")
    assert len(written) == len(demo)
