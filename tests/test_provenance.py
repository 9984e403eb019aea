"""run.json: written with the CSVs (all or nothing), recording what produced them; read back by `if-query report`."""

import json
import re

import pytest
import torch

from if_query.data.records import Example
from if_query.fit.metadata import METADATA_FILE
from if_query.report.provenance import RUN_FILE, describe_damping, read_run
from if_query.report.results import ResultTable, TrainSide, write_results
from if_query.score.scored import ScoredSet

RESULT_NAMES = ["influences.csv", "query.csv", "run.json", "train.csv"]


def results(provenance) -> ResultTable:
    example = Example("q", "a", " b")
    scored = ScoredSet(torch.ones(1, 1, dtype=torch.float64), None, None, torch.ones(1, dtype=torch.float64), None,
                       None)
    return ResultTable([example], [1], TrainSide.of_records([example]), scored, provenance=provenance)


@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_while_writing_leaves_neither_new_csvs_nor_new_run_json(tmp_path, existing):
    out = tmp_path / "results"
    if existing:
        write_results(results({"date": "old"}), out)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert sorted(before) == RESULT_NAMES
    with pytest.raises(TypeError):  # run.json is written after the CSVs; it fails to serialize
        write_results(results({"date": "new", "bad": object()}), out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == (before if existing else {})  # old results intact, no temporary files left


def test_run_query_records_what_produced_the_results(cli, tiny_gpt2, fitted, query_files, tmp_path):
    out = tmp_path / "out"
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["kfac"], "--train-json", query_files["train"],
        "--query-json", query_files["query"], "--output-dir", out, "--damping", "0.01", "--max-length", 100,
        "--quiet")
    assert sorted(p.name for p in out.iterdir()) == RESULT_NAMES
    run = json.loads((out / RUN_FILE).read_text())
    metadata = json.loads((fitted["kfac"] / METADATA_FILE).read_text())
    assert run["model"] == str(tiny_gpt2) and run["revision"] is None
    assert run["factors_dir"] == str(fitted["kfac"].resolve()) and run["strategy"] == "kfac"
    assert run["damping"] == 0.01 and run["dtype"] == "float32" and run["max_length"] == 100
    assert run["matmul_precision"] == "ieee" and metadata["fit"]["matmul_precision"] == "ieee"  # auto, on CPU
    assert run["weights_fingerprint"] == metadata["fit"].get("weights_fingerprint")
    assert run["damping_per_module"] is None or set(run["damping_per_module"]) == {
        m["name"] for m in metadata["tracked_modules"]}
    assert run["query_json"] == str(query_files["query"].resolve())
    assert run["versions"]["kronfluence"] and re.match(r"\d{4}-\d\d-\d\dT", run["date"])
    assert isinstance(run["command"], str) and isinstance(run["argv"], list)


def test_report_regenerated_later_reads_its_header_from_run_json(cli, tiny_gpt2, fitted, query_files, tmp_path):
    out = tmp_path / "out"
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json", query_files["train"],
        "--query-json", query_files["query"], "--output-dir", out, "--quiet")
    cli("report", out, "--quiet")  # no --factors-dir
    html = (out / "report.html").read_text(encoding="utf-8")
    header = dict(re.findall(r"<dt>([^<]+)</dt><dd class=\"mono\">([^<]*)</dd>", html))
    assert header["model"] == str(tiny_gpt2) and header["strategy"] == "ekfac"
    assert header["factors dir"] == str(fitted["ekfac"].resolve())
    assert header["damping"].startswith("auto") and header["revision"] == "default (none given)"
    assert header["date"] == json.loads((out / RUN_FILE).read_text())["date"]
    assert "unknown" not in header.values()

    (out / RUN_FILE).unlink()  # results from before run.json: the header says what it does not know
    cli("report", out, "--quiet")
    header = dict(re.findall(r"<dt>([^<]+)</dt><dd class=\"mono\">([^<]*)</dd>", (out / "report.html").read_text()))
    assert header["model"] == "unknown" and header["date"] != "unknown"


def test_damping_description():
    assert describe_damping({"damping": 0.01}) == "0.01"
    auto = describe_damping({"damping": "auto", "damping_per_module": {"a": 1e-5, "b": 3e-4}})
    assert auto.startswith("auto") and "1e-05 to 0.0003 over 2 modules" in auto
    assert describe_damping({"damping": "auto", "damping_per_module": None}).startswith("auto")
    assert describe_damping({}) is None


def test_read_run_of_older_or_damaged_results(tmp_path):
    assert read_run(tmp_path) is None
    (tmp_path / RUN_FILE).write_text("{not json")
    assert read_run(tmp_path) is None
