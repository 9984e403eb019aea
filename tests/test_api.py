"""The Python API (``if_query.api``): one loaded Attributor scores several query sets with one model load and the
scores of the command line; results come back as DataFrames and are written only where an output directory is
given; errors name the argument they are about; the public names are importable without torch."""

import functools
import inspect
import json

import pandas as pd
import pytest
from helpers import QUERIES, TRAIN, assert_close_to_largest, score_matrix, write_json

import if_query
from if_query import Attributor, InputError, QueryConfig, fit_hessians, run_query, write_report
from if_query.report.results import read_results
from if_query.run import compatibility

SMALL_BUDGET = 0.0001  # GB of token factors: the train side is scored in chunks (none kept: nothing is written)
CORPUS = [{"id": f"d{k}", "text": text} for k, text in enumerate(
    ["Alice lives in Paris and Bob works as a doctor.", "Carol plays the violin.", "Dave lives in Rome."])]


@pytest.fixture
def counted_loads(monkeypatch):
    """The model loads of run-query's path, counted (``calls[0]``)."""
    calls = [0]
    load = compatibility.load_model

    def counting(*args, **kwargs):
        calls[0] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(compatibility, "load_model", counting)
    return calls


def test_three_query_sets_through_one_attributor_load_the_model_once_and_score_as_the_cli(
        cli, tiny_gpt2, fitted, tmp_path, monkeypatch, counted_loads):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in CORPUS))
    sets = [  # (queries as Attributor.score takes them, as a file, the train side's score() argument and CLI flags)
        (QUERIES, {"train": TRAIN}, ["--train-json", write_json(tmp_path / "train.json", TRAIN)]),
        (pd.DataFrame(TRAIN[:2]), {"train": tmp_path / "train.json"},
         ["--train-json", tmp_path / "train.json"]),
        (write_json(tmp_path / "q3.json", QUERIES[1:]), {"corpus": corpus}, ["--train-dataset", corpus]),
    ]
    with Attributor(model=tiny_gpt2, factors_dir=fitted["ekfac"], host_memory_gb=SMALL_BUDGET,
                    quiet=True) as attributor:
        assert counted_loads[0] == 1
        scored = [attributor.score(queries, **train) for queries, train, _ in sets]
    assert counted_loads[0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "q3.json", "train.json"]  # nothing written

    for number, ((queries, _, flags), results) in enumerate(zip(sets, scored, strict=True)):
        query_file = queries if not isinstance(queries, list | pd.DataFrame) else write_json(
            tmp_path / f"cli-{number}.json", queries if isinstance(queries, list) else queries.to_dict("records"))
        out = tmp_path / f"cli-{number}"
        cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--query-json", query_file,
            "--output-dir", out, "--host-memory-gb", SMALL_BUDGET, "--quiet", *flags)
        written = read_results(out)
        query_ids, train_ids = written.queries["query_id"].tolist(), written.train["train_id"].tolist()
        assert results.queries["query_id"].tolist() == query_ids and results.train["train_id"].tolist() == train_ids
        assert_close_to_largest(score_matrix(results.influences, query_ids, train_ids),
                                score_matrix(written.influences, query_ids, train_ids))
        assert_close_to_largest(results.influences["influence_cosine"], written.influences["influence_cosine"])
        assert_close_to_largest(results.queries["loss_sum"], written.queries["loss_sum"])
        assert results.provenance["identity"] == written.provenance["identity"]  # the same inputs, as tokens
    assert counted_loads[0] == 4  # and each CLI run its own
    assert scored[0].provenance["query_json"] is None and scored[0].provenance["train_json"] is None
    assert scored[0].queries["kind"].tolist() == [q["kind"] for q in QUERIES]  # extra fields carried


def test_an_attributor_answers_from_an_index_with_its_one_model_load(tiny_gpt2, fitted, tmp_path, counted_loads):
    from if_query import index_corpus

    documents = CORPUS + [{"id": f"e{k}", "text": f"{name} works as a {job}."} for k, (name, job) in enumerate(
        [("Erin", "baker"), ("Frank", "pilot"), ("Grace", "nurse"), ("Heidi", "judge")])]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in documents))
    index = tmp_path / "index"
    index_corpus(model=tiny_gpt2, factors_dir=fitted["ekfac"], train_dataset=corpus, output_dir=index, sketch_dim=4,
                 quiet=True)
    calls = counted_loads[0]
    with Attributor(model=tiny_gpt2, factors_dir=fitted["ekfac"], top_train=2, quiet=True) as attributor:
        answers = [attributor.score(queries, corpus=corpus, index=index, candidates=1)
                   for queries in (QUERIES, QUERIES[:1])]
        with pytest.raises(InputError, match="give the corpus it was built from"):
            attributor.score(QUERIES, index=index)
    assert counted_loads[0] == calls + 1
    [alone] = run_query(model=tiny_gpt2, factors_dir=fitted["ekfac"], queries=QUERIES, train_dataset=corpus,
                        index=index, candidates=1, top_train=2, quiet=True)
    first = answers[0]
    assert first.provenance["index"]["candidates"] == 1 and first.provenance["index"]["shortlisted"] < len(documents)
    assert first.influences[["query_id", "train_id"]].equals(alone.results.influences[["query_id", "train_id"]])
    assert_close_to_largest(first.influences["influence_score"], alone.results.influences["influence_score"])
    assert set(answers[1].influences["query_id"]) == {QUERIES[0]["pair_id"]}


def test_run_query_returns_every_row_and_writes_only_where_told(tiny_gpt2, fitted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = [{"prompt": q["prompt"], "completion": q["completion"]} for q in QUERIES]  # ids from their index
    [outcome] = run_query(model=tiny_gpt2, factors_dir=fitted["ekfac"], queries=records, train=TRAIN, quiet=True)
    assert list(tmp_path.iterdir()) == [] and outcome.files == []
    assert outcome.results.queries["query_id"].tolist() == ["0", "1", "2"]
    assert len(outcome.results.influences) == len(QUERIES) * len(TRAIN)  # every pair, not the summary's
    config = QueryConfig(model=str(tiny_gpt2), factors_dir=str(fitted["ekfac"]), queries=None,
                         query_json=write_json(tmp_path / "q.json", QUERIES), train_json=tmp_path / "t.json",
                         output_dir=tmp_path / "out", top_train=1)
    write_json(tmp_path / "t.json", TRAIN)
    [written] = run_query(config, quiet=True)
    assert sorted(p.name for p in written.files) == ["influences.csv", "query.csv", "run.json", "train.csv"]
    assert len(written.results.influences) == 2 * len(QUERIES)  # top_train=1: the most helpful and most harmful
    assert written.results.provenance["query_json"] == str(tmp_path / "q.json")


def test_errors_name_the_argument_they_are_about(tiny_gpt2, fitted, tmp_path):
    with pytest.raises(InputError) as raised:
        Attributor(model=tiny_gpt2, factors_dir=fitted["ekfac"], damping="lots")
    assert (raised.value.option, str(raised.value)) == ("damping", "--damping must be a number or 'auto', got 'lots'")
    with pytest.raises(InputError) as raised:
        Attributor(model=tiny_gpt2, factors_dir=tmp_path / "none")
    assert raised.value.option == "factors_dir"
    with pytest.raises(TypeError, match="score"):
        Attributor(model=tiny_gpt2, factors_dir=fitted["ekfac"], folders=[tmp_path])
    with Attributor(model=tiny_gpt2, factors_dir=fitted["ekfac"], quiet=True) as attributor:
        bad = [QUERIES[0], {"pair_id": "x", "prompt": "p", "completion": ""}]
        with pytest.raises(InputError) as raised:
            attributor.score(bad, TRAIN)
        assert (raised.value.option, str(raised.value)) == ("queries", "queries: record 1 (pair_id 'x'): empty "
                                                                       "completion")
        with pytest.raises(InputError) as raised:
            attributor.score(QUERIES, TRAIN, corpus=tmp_path / "c.jsonl")
        assert raised.value.option == "train"
        with pytest.raises(InputError) as raised:
            attributor.score(QUERIES, tmp_path / "missing.json")
        assert (raised.value.option, str(raised.value)) == ("train", f"{tmp_path / 'missing.json'}: file not found")
        with pytest.raises(InputError) as raised:  # the call's argument, not run-query's --train-dataset
            attributor.score(QUERIES, corpus=tmp_path / "missing.jsonl")
        assert raised.value.option == "corpus"
        assert len(attributor.score(QUERIES[:1], TRAIN[:1]).influences) == 1  # still usable after errors


def test_errors_about_files_and_missing_arguments_name_them(cli, tiny_gpt2, fitted, tmp_path):
    """Errors found where a file or folder is read name the argument it was given as (the command line's lines
    unchanged: the message alone)."""
    bad = write_json(tmp_path / "bad.json", [{"pair_id": "a", "prompt": "x"}])
    common = {"model": tiny_gpt2, "factors_dir": fitted["ekfac"], "quiet": True}
    calls = {
        "query_json": lambda: run_query(**common, query_json=tmp_path / "none.json", train=TRAIN),
        "train_json": lambda: run_query(**common, queries=QUERIES, train_json=bad),
        "queries": lambda: run_query(**common, queries=bad, train=TRAIN),
        "train": lambda: run_query(**common, queries=QUERIES),  # no train side
        "hessian_dataset": lambda: fit_hessians(model=tiny_gpt2, hessian_dataset=tmp_path / "none",
                                                output_dir=tmp_path / "factors", quiet=True),
        "results_dir": lambda: write_report(results_dir=tmp_path / "none"),
    }
    for option, call in calls.items():
        with pytest.raises(InputError) as raised:
            call()
        assert raised.value.option == option, (option, str(raised.value))
        assert not raised.value.flag_first  # the message starts with the path: printed as it is
    with pytest.raises(InputError, match=r"^give query folders, or query records \(or --query-json\) and train "
                                         r"records \(or --train-json, or --train-dataset\)$"):  # no --output-dir
        run_query(**common, queries=QUERIES)
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--query-json", bad,
                 "--train-json", bad, "--output-dir", tmp_path / "out", expect=2)
    assert result.stderr.strip() == f"error: {bad}: record 0 (pair_id 'a'): missing field 'completion'"


def test_quiet_calls_show_no_progress_bar_and_leave_transformers_bars_as_they_were(tiny_gpt2, fitted, capfd):
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()  # a --quiet CLI call in this process turned them off
    hf_logging.enable_progress_bar()
    try:
        with Attributor(model=tiny_gpt2, factors_dir=fitted["ekfac"]) as attributor:  # not quiet: bars shown
            attributor.score(QUERIES[:1], TRAIN[:1])
        assert "Loading weights" in capfd.readouterr().err
        with Attributor(model=tiny_gpt2, factors_dir=fitted["ekfac"], quiet=True) as attributor:
            attributor.score(QUERIES[:1], TRAIN[:1])
        run_query(model=tiny_gpt2, factors_dir=fitted["ekfac"], queries=QUERIES[:1], train=TRAIN[:1], quiet=True)
        err = capfd.readouterr().err
        assert "it/s" not in err and "Loading weights" not in err  # no tqdm bar, transformers' own included
        assert hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()


def test_the_public_names_are_importable_and_listed():
    for name in if_query.__all__:
        assert getattr(if_query, name) is not None, name
    assert {"fit_hessians", "run_query", "Attributor", "estimate_plan", "write_report"} <= set(if_query.__all__)
    with pytest.raises(AttributeError):
        if_query.QueryRunner  # noqa: B018 - private: not re-exported


def test_the_public_names_and_their_public_members_have_reference_docstrings():
    undocumented = []
    for name in if_query.__all__:
        value = getattr(if_query, name)
        if name != "__version__" and not inspect.getdoc(value):
            undocumented.append(name)
        if inspect.isclass(value):
            undocumented += [f"{name}.{member}" for member, attribute in vars(value).items()
                             if not member.startswith("_") and (callable(attribute) or isinstance(
                                 attribute, property | functools.cached_property)) and not inspect.getdoc(attribute)]
    assert undocumented == []
