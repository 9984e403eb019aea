"""Many query folders in one run: one model load, failing folders reported and skipped."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from helpers import QUERIES, TRAIN, assert_close_to_largest, write_json


def make_folder(root: Path, name: str, train, queries) -> Path:
    folder = root / name
    write_json(folder / "train.json", train)
    write_json(folder / "query.json", queries)
    return folder


def test_folders_scored_in_one_run_and_a_failing_folder_is_skipped(cli, tiny_gpt2, fitted, tmp_path):
    good_a = make_folder(tmp_path, "a", TRAIN, TRAIN)  # train = query, as in the real workflow
    bad = make_folder(tmp_path, "b", TRAIN, [{"pair_id": "x", "prompt": "p"}])
    good_c = make_folder(tmp_path, "c", TRAIN[:2], QUERIES)
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], good_a, bad, good_c,
                 expect=None)  # not --quiet, which prints only the failure
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "2 of 3 folders scored, 1 failed" in result.stdout
    assert "missing field 'completion'" in result.stderr and str(bad) in result.stderr
    assert not (bad / "results").exists()
    for folder, n in ((good_a, len(TRAIN) ** 2), (good_c, 2 * len(QUERIES))):
        assert len(pd.read_csv(folder / "results" / "influences.csv")) == n

    # Each folder's scores equal a single-folder run of the same files.
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json", good_c / "train.json",
        "--query-json", good_c / "query.json", "--output-dir", tmp_path / "single", "--quiet")
    folder_run, single = (pd.read_csv(path / "influences.csv") for path in (good_c / "results", tmp_path / "single"))
    assert (folder_run[["query_id", "train_id"]] == single[["query_id", "train_id"]]).all().all()
    assert_close_to_largest(folder_run["influence_score"], single["influence_score"], 1e-5)


def test_a_mistyped_folder_and_a_results_file_fail_alone_saying_so(cli, tiny_gpt2, fitted, tmp_path):
    good = make_folder(tmp_path, "a", TRAIN, QUERIES)
    typo = tmp_path / "aa"  # no such folder: said so, not "aa/query.json: file not found"
    blocked = make_folder(tmp_path, "b", TRAIN, QUERIES)
    (blocked / "results").write_text("a file where the results folder goes")
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], good, typo, blocked,
                 expect=None)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "1 of 3 folders scored, 2 failed" in result.stdout
    assert f"{typo}: FAILED: {typo}: folder not found\n" in result.stderr and "query.json" not in result.stderr
    assert f"{blocked}: FAILED: {blocked / 'results'}: is a file, not a directory" in result.stderr
    assert (good / "results" / "influences.csv").exists() and not typo.exists()


def test_all_folders_ok_exit_zero(cli, tiny_gpt2, fitted, tmp_path):
    folders = [make_folder(tmp_path, name, TRAIN, QUERIES) for name in ("x", "y")]
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], *folders)
    assert "2 of 2 folders scored" in result.stdout


def test_folders_and_single_mode_options_are_exclusive(cli, tiny_gpt2, fitted, tmp_path):
    folder = make_folder(tmp_path, "a", TRAIN, QUERIES)
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], folder,
                 "--output-dir", tmp_path / "o", expect=2)
    assert "not both" in result.stderr
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], expect=2)
    assert "give query folders" in result.stderr


def test_console_scripts_are_installed():
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for script in ("fit-hessians", "run-query", "if-query"):
        result = subprocess.run([str(bin_dir / script), "--help"], capture_output=True, text=True, env=env,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout
