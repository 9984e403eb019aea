"""What the commands say, and what they leave: progress that says when cached factors or finished stages are reused,
no contradicting transformers warning, scores without a trailing point, --quiet over folders printing errors only,
and factor files readable as the umask allows."""

import json
import logging
import os

import pandas as pd
from helpers import QUERIES, TRAIN, save_tiny_model, write_json

from if_query.report.results import QueryResults
from if_query.report.summary import format_summary


def fit(cli, model, data, out, *extra, expect=0):
    return cli("fit-hessians", "--model", model, "--hessian-dataset", data, "--output-dir", out,
               "--factor-batch-size", 4, "--lambda-batch-size", 4, *extra, expect=expect)


def test_a_second_demo_says_it_uses_its_cached_factors(cli, tmp_path):
    first = cli("demo", "--output-dir", tmp_path / "demo")
    assert "Fitting stage: covariance" in first.stderr and "cached" not in first.stderr
    second = cli("demo", "--output-dir", tmp_path / "demo")
    assert "Using cached factors" in second.stderr
    assert "Fitting" not in second.stderr and "stage" not in second.stderr.replace("every stage done", "")


def test_a_resumed_fit_says_which_stages_it_skips(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    from kronfluence.analyzer import Analyzer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Analyzer, "perform_eigendecomposition", interrupt)  # Ctrl-C after the covariance stage
        fit(cli, tiny_gpt2, fitted["data"], tmp_path / "f", "--quiet", expect=130)
    resumed = fit(cli, tiny_gpt2, fitted["data"], tmp_path / "f")
    assert "Stage covariance done, skipped" in resumed.stderr
    assert "Fitting stage: covariance" not in resumed.stderr
    assert "Fitting stage: eigendecomposition" in resumed.stderr and "Fitting stage: lambda" in resumed.stderr


def test_factor_files_follow_the_umask(cli, tiny_gpt2, fitted, tmp_path):
    previous = os.umask(0o022)
    try:
        fit(cli, tiny_gpt2, fitted["data"], tmp_path / "f", "--quiet")  # ekfac: Kronfluence's stages and ours
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "f").rglob("*") if p.is_file()]
    assert any(p.name.startswith("lambda_matrix") for p in files) and any("covariance" in p.name for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o644) for p in files}


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_transformers_warning_about_the_tokenizers_maximum(cli, tmp_path):
    model = save_tiny_model(tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4}))
    data = write_json(tmp_path / "data.json", TRAIN + QUERIES)  # longer than 4 tokens, within --max-length
    from transformers.utils import logging as hf_logging

    records, verbosity = Records(), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # transformers' default (an earlier --quiet run in this process lowers it)
    logging.getLogger("transformers").addHandler(records)
    try:
        fit(cli, model, data, tmp_path / "f", "--strategy", "identity")
    finally:
        logging.getLogger("transformers").removeHandler(records)
        hf_logging.set_verbosity(verbosity)
    assert not [m for m in records.messages if "Token indices sequence length" in m]


def test_scores_print_without_a_trailing_point():
    results = QueryResults(
        pd.DataFrame([{"query_id": "q", "prompt": "p", "completion": "c", "loss": 1.0}]),
        pd.DataFrame([{"train_id": "a", "prompt": "x", "completion": "y"},
                      {"train_id": "b", "prompt": "x", "completion": "z"}]),
        pd.DataFrame([{"query_id": "q", "train_id": "a", "influence_score": 3498.2},
                      {"query_id": "q", "train_id": "b", "influence_score": -0.1}]))
    text = format_summary(results, top_k=2, width=80)
    assert "+3498  a: xy" in text and "-0.1000  b: xz" in text and "3498." not in text


def test_quiet_over_folders_prints_errors_only(cli, tiny_gpt2, fitted, tmp_path):
    folders = []
    for name in ("a", "b", "bad"):
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / "train.json", TRAIN)
        write_json(folder / "query.json", QUERIES if name != "bad" else [{"pair_id": "x"}])
        folders.append(folder)
    good = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], *folders[:2], "--quiet")
    assert good.stdout == "" and good.stderr == ""
    assert (folders[0] / "results" / "influences.csv").is_file()
    bad = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], *folders, "--quiet",
              expect=2)
    [line] = bad.stderr.splitlines()  # the failed folder's line, and nothing else
    assert bad.stdout == "" and f"{folders[2]}: FAILED: " in line and "missing field 'prompt'" in line
