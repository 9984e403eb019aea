"""The bundled demo: a query about a fact is most influenced by the training example stating it."""

import json

from if_query.config import DemoConfig
from if_query.demo import DEMO_QUERIES, run_demo


def test_demo_ranks_the_stating_example_first(tmp_path):
    outcome = run_demo(DemoConfig(output_dir=tmp_path), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors", "test_query"]
    written = sorted(p.name for p in (tmp_path / "test_query" / "results").iterdir())
    assert written == ["influences.csv", "query.csv", "run.json", "train.csv"]
    influences = outcome.results.influences
    for query in json.loads((DEMO_QUERIES / "query.json").read_text()):
        rows = influences[influences["query_id"] == query["pair_id"]]
        best = rows.sort_values("influence_cosine", ascending=False)["train_id"].iloc[0]
        assert best in query["stated_by"], (query["pair_id"], best)
