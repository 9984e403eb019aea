"""docs/python.md's examples run as they are written there: each section's python block, verbatim, in a fresh
namespace and an empty working directory (as a user pastes it)."""

import re
from pathlib import Path

import pandas as pd

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python.md"
WORKED, OWN_DATA = "A worked example on the bundled model", "Your own data, from Python"


def examples() -> dict[str, str]:
    """{section heading: its python block}; a section has at most one."""
    found = {}
    for section in re.split(r"^## ", DOCS.read_text(encoding="utf-8"), flags=re.MULTILINE)[1:]:
        blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
        assert len(blocks) <= 1, section.splitlines()[0]
        if blocks:
            found[section.splitlines()[0].strip()] = blocks[0]
    return found


def run_example(heading: str, directory: Path, monkeypatch) -> None:
    monkeypatch.chdir(directory)
    exec(compile(examples()[heading], f"{DOCS}: {heading}", "exec"), {"__name__": "__main__"})  # noqa: S102


def test_the_page_has_the_examples_this_file_runs():
    assert set(examples()) == {WORKED, OWN_DATA}


def test_the_worked_example_scores_three_requests_and_writes_only_its_factors(tmp_path, monkeypatch, capsys):
    run_example(WORKED, tmp_path, monkeypatch)
    assert [p.name for p in tmp_path.iterdir()] == ["demo-factors"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "ekfac factors of 4 modules, fitted on 240 records"
    assert [line.split(":")[0] for line in printed[1:]] == ["job", "city", "city-b", "colour"]
    assert printed[1].startswith("job: quecos_weall-job-a (cosine 1.00")  # the record it repeats


def test_your_own_data_from_python_as_the_readmes_snippet(tmp_path, monkeypatch, capsys):
    """The README's own-data snippet's Python twin writes what the snippet writes (tests/test_docs.py), with the
    same ranking, and returns it."""
    run_example(OWN_DATA, tmp_path, monkeypatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-factors", "my-study"]
    results = tmp_path / "my-study" / "results"
    assert sorted(p.name for p in results.iterdir()) == ["influences.csv", "query.csv", "report.html", "run.json",
                                                         "train.csv"]
    influences = pd.read_csv(results / "influences.csv")
    best = influences.sort_values("influence_cosine", ascending=False).iloc[0]
    assert (best["query_id"], best["train_id"]) == ("q1", "t1")  # the query's own sentence comes first
    assert list(pd.read_csv(results / "train.csv")["source"]) == ["wiki", "forum", "wiki"]  # extra fields kept
    printed = capsys.readouterr().out
    assert printed.startswith("['query.csv', 'train.csv', 'influences.csv', 'run.json', 'report.html']")
    for name, records in readme_records().items():  # the twin's folder holds the snippet's records, as it writes them
        assert records == (tmp_path / "my-study" / name).read_text(encoding="utf-8").strip(), name


def readme_records() -> dict[str, str]:
    """{file: its text} of the records the README's own-data snippet writes (its ``cat > my-study/FILE`` blocks)."""
    readme = (DOCS.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    found = dict(re.findall(r"cat > my-study/(\S+) <<'EOF'\n(.*?)\nEOF", section, flags=re.DOTALL))
    assert set(found) == {"query.json", "train.json"}
    return found
