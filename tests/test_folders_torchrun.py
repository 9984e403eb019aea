"""Folder sharding under torchrun (default engine, gloo, CPU) and --skip-done."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import QUERIES, TRAIN, assert_close_to_largest, write_json

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _folder(root: Path, name: str, queries) -> Path:
    write_json(root / name / "train.json", TRAIN)
    write_json(root / name / "query.json", queries)
    return root / name


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside the interpreter")
def test_torchrun_shards_folders_and_rank0_prints_all(tiny_gpt2, fitted, tmp_path, cli):
    folders = [_folder(tmp_path, f"f{i}", QUERIES[: i + 1]) for i in range(3)]
    run_query = Path(sys.executable).with_name("run-query")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node=2", "--no-python", str(run_query), "--model", str(tiny_gpt2),
         "--factors-dir", str(fitted["ekfac"]), *map(str, folders)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in folders:
        assert folder.name in result.stdout  # rank 0's combined summary names every folder
    assert "3 of 3 folders scored" in result.stdout
    # Each folder's scores equal a plain single-process run's (which runs with another thread count, so float32
    # sums in another order: equal within a tolerance relative to the largest score).
    for folder in folders:
        single = tmp_path / "single" / folder.name
        cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json",
            folder / "train.json", "--query-json", folder / "query.json", "--output-dir", single, "--quiet")
        a = pd.read_csv(folder / "results" / "influences.csv")
        b = pd.read_csv(single / "influences.csv")
        assert (a[["query_id", "train_id"]] == b[["query_id", "train_id"]]).all().all()
        assert_close_to_largest(a["influence_score"], b["influence_score"], 1e-5)
        assert float((a["influence_cosine"] - b["influence_cosine"]).abs().max()) <= 1e-5


def test_skip_done_skips_complete_folders_only(tiny_gpt2, fitted, tmp_path, cli):
    done, todo = _folder(tmp_path, "done", QUERIES), _folder(tmp_path, "todo", QUERIES[:1])
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], done, "--quiet")
    first = (done / "results" / "influences.csv").stat().st_mtime_ns
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], done, todo, "--skip-done")
    assert (done / "results" / "influences.csv").stat().st_mtime_ns == first
    assert (todo / "results" / "influences.csv").exists()
    assert "Skipping" in result.stderr
    assert "done: skipped" in result.stdout and "1 of 2 folders scored, 1 skipped" in result.stdout
    # A newer file with the same content changes nothing: the folder is still up to date.
    os.utime(done / "query.json")
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], done, "--skip-done")
    assert "done: skipped" in result.stdout
    # Settings that change the numbers make it due again, saying which.
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], done, "--skip-done",
                 "--damping", "0.5", "--no-eos-in-loss")
    assert f"Scoring {done} again: scored with other damping ('auto', now 0.5), eos-in-loss (True, now False)" \
        in result.stderr
    assert (done / "results" / "influences.csv").stat().st_mtime_ns > first
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], done, "--skip-done",
                 "--damping", "0.50", "--no-eos-in-loss")
    assert "done: skipped" in result.stdout  # the same settings, spelled otherwise
    # So do other inputs: a query record changed in place.
    write_json(done / "query.json", [{**QUERIES[0], "completion": " Rome."}, *QUERIES[1:]])
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], done, "--skip-done",
                 "--damping", "0.5", "--no-eos-in-loss")
    assert f"Scoring {done} again: scored with other query records (their tokens)" in result.stderr
    shutil.rmtree(todo / "results")


def test_a_report_follows_the_results_beside_it(tiny_gpt2, fitted, tmp_path, cli):
    """A rerun without --report leaves no page of the results it replaced; --skip-done --report writes the page of
    the results it keeps (as asked now: --top-k), without scoring again."""
    folder = _folder(tmp_path, "f", QUERIES)
    report, influences = folder / "results" / "report.html", folder / "results" / "influences.csv"
    common = ("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], folder, "--quiet")
    cli(*common, "--report")
    assert report.exists()
    cli(*common, "--damping", "0.5")  # other results, no page asked for
    assert not report.exists()
    scored = influences.stat().st_mtime_ns
    result = cli(*common[:-1], "--damping", "0.5", "--skip-done", "--report", "--top-k", "1")
    assert "f: skipped" in result.stdout and influences.stat().st_mtime_ns == scored
    assert "top 1 helpful and harmful shown per query" in report.read_text(encoding="utf-8")
    report.write_text("<html><title>my notes</title></html>", encoding="utf-8")  # a file of the user's, not a page
    cli(*common, "--damping", "0.25")
    assert report.read_text(encoding="utf-8") == "<html><title>my notes</title></html>"
