"""Bad input: one line, exit code 2, nothing written. Faults: resumable fits, never half-written results."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import QUERIES, TRAIN, assert_one_line_error, factors, fit_args, save_tiny_model, tree, write_json

from if_query.errors import InputError
from if_query.fit.metadata import METADATA_FILE, load_complete_metadata


@pytest.fixture
def query_args(tiny_gpt2, fitted, query_files, tmp_path):
    return ["run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json",
            query_files["train"], "--query-json", query_files["query"], "--output-dir", tmp_path / "out", "--quiet"]


def replace(args, option, value):
    args = list(args)
    args[args.index(option) + 1] = value
    return args


BAD_FILES = [
    ("missing", None, "file not found"),
    ("not-utf8", b"\xff\xfe\x00", "not UTF-8"),
    ("not-json", b"[{", "invalid JSON"),
    ("empty", b"  ", "empty"),
    ("not-list", b'{"a": 1}', "expected a JSON list"),
    ("no-pair-id", json.dumps([{"prompt": "p", "completion": "c"}]).encode(), "missing field 'pair_id'"),
    ("not-string", json.dumps([{"pair_id": "x", "prompt": 1, "completion": "c"}]).encode(), "must be a string"),
    ("empty-completion", json.dumps([{"pair_id": "x", "prompt": "p", "completion": ""}]).encode(),
     "empty completion"),
    ("duplicate", json.dumps([TRAIN[0], TRAIN[0]]).encode(), "duplicate pair_id"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
@pytest.mark.parametrize("which", ["--train-json", "--query-json"])
def test_bad_json_files(cli, query_args, tmp_path, name, content, message, which):
    path = tmp_path / f"{name}.json"
    if content is not None:
        path.write_bytes(content)
    result = cli(*replace(query_args, which, path), expect=None)
    assert_one_line_error(result, 2, str(path), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--score-batch-size", "0", "--score-batch-size must be at least 1"),
     ("--max-length", "0", "--max-length must be at least 1"),
     ("--max-length", "3", "longer than --max-length 3"),
     ("--dtype", "float8", "unknown --dtype"),
     ("--damping", "lots", "--damping must be a number"),
     ("--damping", "-1", "--damping must be a finite number")],
)
def test_bad_query_options(cli, query_args, tmp_path, option, value, message):
    result = cli(*query_args, option, value, expect=None)
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--layer-stride", "0", "--layer-stride must be at least 1"),
     ("--factor-batch-size", "0", "--factor-batch-size must be at least 1"),
     ("--lambda-batch-size", "-2", "--lambda-batch-size must be at least 1"),
     ("--strategy", "newton", "unknown --strategy"),
     ("--dtype", "int8", "unknown --dtype")],
)
def test_bad_fit_options(cli, tiny_gpt2, query_files, tmp_path, option, value, message):
    result = cli("fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", query_files["train"],
                 "--output-dir", tmp_path / "f", option, value, expect=None)
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "f").exists()


def test_bad_hessian_datasets(cli, tiny_gpt2, tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "no-ids"))
    datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]).save_to_disk(
        str(tmp_path / "unlabelled"))
    for name, message in [("no-ids", "no 'input_ids' column"), ("unlabelled", "no labelled token"),
                          ("missing", "not found")]:
        result = cli("fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", tmp_path / name,
                     "--output-dir", tmp_path / "f", expect=None)
        assert_one_line_error(result, 2, message)
        assert not (tmp_path / "f").exists()


def test_factors_dir_missing_without_metadata_or_unfinished(cli, query_args, fitted, tmp_path):
    result = cli(*replace(query_args, "--factors-dir", tmp_path / "none"), expect=None)
    assert_one_line_error(result, 2, f"error: --factors-dir {tmp_path / 'none'}: directory not found")
    with pytest.raises(InputError) as raised:  # the library names the setting; the command line adds its flag
        load_complete_metadata(tmp_path / "none")
    assert raised.value.option == "factors_dir" and str(raised.value).startswith(f"{tmp_path / 'none'}: ")
    (tmp_path / "empty").mkdir()
    result = cli(*replace(query_args, "--factors-dir", tmp_path / "empty"), expect=None)
    assert_one_line_error(result, 2, "no metadata.json")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(fitted["ekfac"], unfinished)
    metadata = json.loads((unfinished / METADATA_FILE).read_text())
    (unfinished / METADATA_FILE).write_text(json.dumps(dict(metadata, status="fitting")))
    result = cli(*replace(query_args, "--factors-dir", unfinished), expect=None)
    assert_one_line_error(result, 2, "never finished")
    (unfinished / METADATA_FILE).write_text(json.dumps(metadata))
    shutil.rmtree(unfinished / "factors_hessian" / "lambda_matrix.safetensors", ignore_errors=True)
    (unfinished / "factors_hessian" / "lambda_matrix.safetensors").unlink(missing_ok=True)
    result = cli(*replace(query_args, "--factors-dir", unfinished), expect=None)
    assert_one_line_error(result, 2, "lambda_matrix.safetensors is missing")
    assert not (tmp_path / "out").exists()


def test_factors_of_another_model_are_refused(cli, query_args, tmp_path):
    other = save_tiny_model(tmp_path / "other", "gpt2", layers=3)
    result = cli(*replace(query_args, "--model", other), expect=None)
    assert_one_line_error(result, 2, "does not fit this model", "were fitted for the model",
                          f"this run passes {str(other)!r}")  # refused before the model loads
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model fails the test: what is checked must be checked before."""
    from if_query.model import loading
    from if_query.run import compatibility

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(compatibility, "load_model", refuse)


@pytest.mark.parametrize("command", ["fit-hessians", "run-query", "spill-dir", "demo"])
def test_outputs_that_cannot_be_written_are_refused_before_the_model_loads(cli, query_args, tiny_gpt2, fitted,
                                                                           tmp_path, no_model_loading, command):
    blocker = tmp_path / "a-file"  # a regular file where a directory would have to be (root writes anywhere else)
    blocker.write_text("not a directory")
    under = blocker / "out"
    flag = "--spill-dir" if command == "spill-dir" else "--output-dir"
    args = {"fit-hessians": fit_args(tiny_gpt2, fitted["data"], under),
            "run-query": replace(query_args, "--output-dir", under),
            "spill-dir": [*query_args, flag, under], "demo": ["demo", flag, under]}[command]
    assert_one_line_error(cli(*args, expect=None), 2, f"error: {flag} {under}: cannot be created: {blocker} is a file")
    if command == "run-query":
        result = cli(*replace(query_args, flag, blocker), expect=None)
        assert_one_line_error(result, 2, f"error: {flag} {blocker}: is a file, not a directory")
    assert blocker.read_text() == "not a directory"


def test_read_only_outputs_are_refused_before_the_work(cli, query_args, tmp_path, monkeypatch):
    cli(*query_args)
    results, readonly = tmp_path / "out", tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access  # tests run as root, who may write anywhere: the permission is denied here

    def access(path, mode, **kwargs):
        return not (mode & os.W_OK and Path(path) in (results, readonly)) and real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    result = cli(*replace(query_args, "--output-dir", readonly / "out"), expect=None)
    assert_one_line_error(result, 2, f"--output-dir {readonly / 'out'}: cannot be created: {readonly} is not "
                                     "writable")
    assert_one_line_error(cli("report", results, expect=None), 2, f"{results}: is not writable")
    assert not (results / "report.html").exists() and not any(readonly.iterdir())


def test_a_missing_model_folder_is_said_to_be_missing(cli, fitted, query_args, tmp_path):
    missing = tmp_path / "no-such" / "model"  # a path, not a hub name: not the hub's complaint about repo ids
    assert_one_line_error(cli(*fit_args(missing, fitted["data"], tmp_path / "f"), expect=None), 2,
                          f"error: --model {missing}: model folder not found")
    assert_one_line_error(cli(*replace(query_args, "--model", missing), expect=None), 2,
                          f"error: --model {missing}: model folder not found")


def test_a_model_folder_without_a_tokenizer_is_refused_saying_what_to_do(cli, tiny_gpt2, fitted, tmp_path):
    bare = tmp_path / "bare"  # config and weights only (transformers would make up an empty GPT-2 tokenizer)
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2 / name, bare)
    result = cli(*fit_args(bare, fitted["data"], tmp_path / "f"), expect=None)
    assert_one_line_error(result, 2, f"--model {bare}: the model folder has no tokenizer", "tokenizer.save_pretrained")
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("engine", ["if-query", "kronfluence"])
def test_a_truncated_factor_file_is_named(cli, query_args, fitted, tmp_path, no_model_loading, engine):
    damaged = shutil.copytree(fitted["ekfac"], tmp_path / "damaged")
    path = damaged / "factors_hessian" / "lambda_matrix.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # cut off mid-header, as by a full disk or an interrupted copy
    result = cli(*replace(query_args, "--factors-dir", damaged), "--engine", engine, expect=None)
    assert_one_line_error(result, 2, f"--factors-dir {path}: cannot read this factor file", "truncated or damaged",
                          "--overwrite")
    assert not (tmp_path / "out").exists()


def test_extra_fields_and_unicode_round_trip(cli, query_args, tmp_path):
    text = "emoji 😀 / עברית / \u0007 bell, \"quotes\", comma\nnewline"
    train = [dict(TRAIN[0], prompt=text, nested={"a": [1, {"b": None}]}, note=text)] + TRAIN[1:]
    path = write_json(tmp_path / "unicode.json", train)
    cli(*replace(query_args, "--train-json", path))
    frame = pd.read_csv(tmp_path / "out" / "train.csv", keep_default_na=False)
    assert frame.loc[0, "prompt"] == text and frame.loc[0, "note"] == text
    assert json.loads(frame.loc[0, "nested"]) == {"a": [1, {"b": None}]}


def test_failed_query_run_leaves_previous_results_intact(cli, query_args, tmp_path, monkeypatch):
    cli(*query_args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    from if_query.score import engine

    def explode(*args, **kwargs):
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(engine, "score", explode)
    result = cli(*replace(query_args, "--query-json", write_json(tmp_path / "q.json", QUERIES[:1])), expect=None)
    assert_one_line_error(result, 1, "killed mid-way", "--verbose")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    result = cli(*query_args, "--verbose", expect=None)
    assert result.exit_code == 1 and "Traceback" in result.stderr


def hot_model(tiny_gpt2, directory):
    """The tiny GPT-2 with logits that overflow float16 (not float32), checked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1e6)
    model.save_pretrained(directory)
    shutil.copy(tiny_gpt2 / "tokenizer.json", directory)
    shutil.copy(tiny_gpt2 / "tokenizer_config.json", directory)
    for dtype, finite in ((torch.float16, False), (torch.float32, True)):
        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        with torch.no_grad():
            assert bool(loaded(input_ids=torch.tensor([[5, 6]])).logits.isfinite().all()) == finite, dtype
    return directory


def test_non_finite_losses_stop_the_run(cli, tiny_gpt2, fitted, query_files, tmp_path):
    hot_model(tiny_gpt2, tmp_path / "hot")
    cli("fit-hessians", "--model", tmp_path / "hot", "--hessian-dataset", query_files["train"], "--output-dir",
        tmp_path / "f", "--strategy", "identity", "--quiet")
    result = cli("run-query", "--model", tmp_path / "hot", "--factors-dir", tmp_path / "f", "--train-json",
                 query_files["train"], "--query-json", query_files["query"], "--output-dir", tmp_path / "out",
                 "--dtype", "float16", "--quiet", expect=None)
    assert_one_line_error(result, 1, "non-finite", "--dtype float32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_overflow_stops_the_fit_at_its_first_batch(cli, tiny_gpt2, query_files, tmp_path, fisher):
    """Logits that overflow float16 stop fit-hessians at the first batch in one line with the hint, leaving no
    half-written fit: the advised rerun (other arguments, same --output-dir) is not refused."""
    args = fit_args(hot_model(tiny_gpt2, tmp_path / "hot"), query_files["train"], tmp_path / "f", "--fisher", fisher)
    result = cli(*args, "--dtype", "float16", expect=None)
    assert_one_line_error(result, 1, "non-finite logits", "batch 1 of the covariance stage", "float16",
                          "try --dtype float32")
    assert not (tmp_path / "f").exists()
    cli(*args, "--dtype", "float32")
    assert json.loads((tmp_path / "f" / METADATA_FILE).read_text())["status"] == "complete"


def test_interrupted_fit_resumes_to_the_same_factors(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    from kronfluence.analyzer import Analyzer

    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "whole"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Analyzer, "perform_eigendecomposition", interrupt)  # Ctrl-C after the covariance stage
        result = cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "resumed"), expect=None)
    assert result.exit_code == 130
    assert json.loads((tmp_path / "resumed" / METADATA_FILE).read_text())["status"] == "fitting"
    assert set(factors(tmp_path / "resumed")) == {"activation_covariance.safetensors",
                                                 "gradient_covariance.safetensors",
                                                 "num_activation_covariance_processed.safetensors",
                                                 "num_gradient_covariance_processed.safetensors"}
    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "resumed"))
    whole, resumed = factors(tmp_path / "whole"), factors(tmp_path / "resumed")
    assert set(whole) == set(resumed) and len(whole) > 4
    for name in whole:
        for key in whole[name]:
            torch.testing.assert_close(resumed[name][key], whole[name][key], rtol=0, atol=0)


def test_rerun_with_other_arguments_is_refused_unless_overwrite(cli, tiny_gpt2, fitted, tmp_path):
    out = tmp_path / "f"
    cli(*fit_args(tiny_gpt2, fitted["data"], out, "--strategy", "diagonal"))
    before = tree(out)
    result = cli(*fit_args(tiny_gpt2, fitted["data"], out, "--strategy", "kfac"), expect=None)
    assert_one_line_error(result, 2, "other arguments", "strategy", "--overwrite")
    assert tree(out) == before
    cli(*fit_args(tiny_gpt2, fitted["data"], out, "--strategy", "kfac", "--overwrite"))
    assert json.loads((out / METADATA_FILE).read_text())["fit"]["strategy"] == "kfac"
    assert "lambda_matrix.safetensors" not in factors(out)  # no leftovers of the diagonal fit


def test_a_fit_stopped_before_any_stage_finished_never_blocks_its_rerun(cli, tiny_gpt2, fitted, tmp_path):
    """A fit killed before any stage finished (metadata.json says "fitting", no factor file) holds nothing to
    resume: a rerun with other arguments (here the fixed data) replaces it without --overwrite."""
    out = shutil.copytree(fitted["kfac"], tmp_path / "f")
    metadata = json.loads((out / METADATA_FILE).read_text())
    metadata["status"], metadata["fit"]["hessian_dataset_fingerprint"] = "fitting", "0" * 16
    (out / METADATA_FILE).write_text(json.dumps(metadata))
    for path in (out / "factors_hessian").glob("*.safetensors"):
        path.unlink()
    cli(*fit_args(tiny_gpt2, fitted["data"], out, "--strategy", "kfac", "--fisher", "empirical"))
    assert json.loads((out / METADATA_FILE).read_text())["status"] == "complete"
    assert "gradient_eigenvalues.safetensors" in factors(out)


def test_multi_process_launch_without_cuda_is_refused(cli, tiny_gpt2, query_files, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = cli(*fit_args(tiny_gpt2, query_files["train"], tmp_path / "f"), expect=None)
    assert_one_line_error(result, 2, "no CUDA GPU")
    assert not (tmp_path / "f" / METADATA_FILE).exists()
