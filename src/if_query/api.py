"""if-query as a Python library: the commands as functions, and a model loaded once that scores any number of
query sets.

Every function takes the configuration object of its command (:mod:`if_query.config`: the options the command line
builds, with the same defaults and checks), or the same options as keyword arguments, or a config and keywords
that change it. A refused option raises :class:`~if_query.errors.InputError` with the command line's one-line
message and ``exc.option``, the argument it is about; a failure while running raises
:class:`~if_query.errors.RunError`. The command line (:mod:`if_query.cli`) calls these functions and prints.

- :func:`fit_hessians`: fit a model's Hessian factors into a directory (``fit-hessians``).
- :func:`run_query`: score query folders, files or records given in memory (``run-query``); results come back as
  pandas DataFrames, and are written only where an output directory is given.
- :class:`Attributor`: the model, tokenizer and factors loaded once; :meth:`Attributor.score` scores one query set
  per call, against train records or a corpus, without loading anything again.
- :func:`estimate_plan`: the memory and time a fit and a run would take, from a model's ``config.json`` (``plan``).
- :func:`write_report`: ``report.html`` of a results directory (``report``).
- :func:`demo_model`: the bundled tiny GPT-2 (``if-query demo``'s model).

Records given in memory (``queries=``, ``train=``) are a list of dicts (or a pandas DataFrame) of ``prompt`` and
``completion`` strings (or ``messages``, a conversation: :mod:`if_query.data.chat`), an optional ``pair_id``
(default: the record's index in the list, as a string) and any other
fields, which are carried into the results' columns; they are validated as records files are (one-line errors
naming ``queries`` or ``train``, the record and the problem). A path there is a records file (``.json`` list or
JSON Lines), as ``query_json``/``train_json``. ``docs/python.md`` has worked examples.

Importing this module imports no torch: each function imports what it runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from if_query.config import RECORDS_FILES, FitConfig, IndexConfig, PlanConfig, QueryConfig, ReportConfig
from if_query.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from if_query.data.records import Example
    from if_query.plan.command import Plans
    from if_query.report.results import QueryResults
    from if_query.run.outcomes import JobOutcome

    Records: TypeAlias = "list[Mapping[str, Any]] | pd.DataFrame | str | os.PathLike[str]"  # queries=, train=

Config = TypeVar("Config")
RESULTS = ("all", "summary")  # run_query(results=...)
JOB_FIELDS = ("folders", "query_json", "train_json", "train_dataset", "output_dir", "queries", "train")


def _config(config_class: type[Config], config: Config | None, options: dict[str, Any]) -> Config:
    """``config`` with ``options`` changed, or a ``config_class`` made of ``options``: its checks run either way."""
    if config is None:
        return config_class(**options)
    if not isinstance(config, config_class):
        raise TypeError(f"expected a {config_class.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **options)


@contextmanager
def _progress_bars(quiet: bool) -> Iterator[None]:
    """With ``quiet``, transformers' own progress bars (its "Loading weights") off while a call runs, as the
    command line's ``--quiet`` turns them off; as they were afterwards."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


# --- fit-hessians ---


@dataclass(frozen=True)
class FitResult:
    """A finished fit: the factors directory (give it to :func:`run_query` or :class:`Attributor` as
    ``factors_dir``) and its ``metadata.json`` (what was fitted, on what, with which arguments and weights)."""

    factors_dir: Path
    metadata: dict

    @property
    def strategy(self) -> str:
        """``ekfac``, ``kfac``, ``diagonal`` or ``identity``."""
        return self.metadata["fit"]["strategy"]

    @property
    def modules(self) -> list[str]:
        """The tracked modules' names (``track``: the MLPs' by default), in the model's order."""
        return list(self.metadata["tracked_modules"])

    @property
    def num_examples(self) -> int:
        """The fitting examples used."""
        return self.metadata["fit"]["num_examples"]


def fit_hessians(config: FitConfig | None = None, /, *, quiet: bool = False, **options: Any) -> FitResult:
    """Fit a model's Hessian factors (``fit-hessians``).

    ``config``/``options``: a :class:`~if_query.config.FitConfig`, or its fields as keywords: ``model`` (hub name or
    local folder), ``hessian_dataset`` (a ``save_to_disk`` folder, or a ``.json``/``.jsonl`` records file) and
    ``output_dir`` are required; ``strategy`` (``"ekfac"``), ``layer_stride`` (1), ``factor_batch_size`` (8),
    ``lambda_batch_size`` (4), ``dtype``, ``max_length`` (512 tokens), ... as the command's options. ``quiet``: no
    progress bars.

    Writes the factors (Kronfluence's safetensors files, ``factors_hessian/``) and ``metadata.json`` into
    ``output_dir``; rerun with the same arguments, it resumes an interrupted fit or reuses a finished one. Returns
    the :class:`FitResult`. Raises InputError (bad input; ``exc.option`` names the argument) or RunError.
    """
    config = _config(FitConfig, config, options)
    from if_query.fit.fit_hessians import fit_hessians as fit

    with _progress_bars(quiet):
        return FitResult(Path(config.output_dir), fit(config, quiet=quiet))


# --- run-query ---


def _empty_cell(value: Any) -> bool:
    """A DataFrame's cell that a record did not have: None or NaN, which pandas puts where a row lacks a column
    (records of both kinds, ``messages`` and ``prompt``/``completion``, in one frame)."""
    return value is None or (isinstance(value, float) and value != value)


def _examples(records: Any, name: str) -> list[Example]:
    """Records given in memory (see the module docstring) as validated examples; InputError naming ``name``."""
    from if_query.data.records import parse_records

    if hasattr(records, "to_dict"):  # a pandas DataFrame: one record per row, without the cells it leaves empty
        records = [{key: value for key, value in row.items() if not _empty_cell(value)}
                   for row in records.to_dict("records")]
    if isinstance(records, Mapping) or not isinstance(records, Iterable):
        raise InputError(f"{name}: expected a list of records (dicts), a DataFrame or a records file, got "
                         f"{type(records).__name__}", name, flag_first=False)
    named = [{"pair_id": str(index), **record} if isinstance(record, Mapping) and "pair_id" not in record
             else dict(record) if isinstance(record, Mapping) else record for index, record in enumerate(records)]
    try:
        return parse_records(named, name)
    except InputError as exc:
        raise InputError(str(exc), name, flag_first=False) from None


def _records_options(options: dict[str, Any]) -> dict[str, Any]:
    """``queries``/``train`` as a caller gave them, as QueryConfig's fields: a path is the records file
    (``query_json``/``train_json``), records are validated examples."""
    options = dict(options)
    for name, file_field in RECORDS_FILES.items():
        value = options.get(name)
        if isinstance(value, str | os.PathLike):
            if options.get(file_field) is not None:
                raise InputError(f"give {name} or {file_field}, not both", name, flag_first=False)
            options[file_field], options[name] = value, None
        elif value is not None:
            options[name] = _examples(value, name)
    return options


def _query_config(config: QueryConfig | None, options: dict[str, Any]) -> QueryConfig:
    """The QueryConfig of a library call: records normalized, results written only where an output directory is
    given (``output_required=False``), inputs checked. An error about a records file given as ``queries`` or
    ``train`` names that argument, not ``query_json`` or ``train_json``."""
    as_given = {file_field: name for name, file_field in RECORDS_FILES.items()
                if isinstance(options.get(name), str | os.PathLike)}
    try:
        return _checked(_config(QueryConfig, config, {"output_required": False, **_records_options(options)}))
    except InputError as exc:
        exc.option = as_given.get(exc.option, exc.option)
        raise


def _checked(config: QueryConfig) -> QueryConfig:
    """``config``, once what it reads and writes is checked (records files, the corpus's path, the output
    directory, the factors' metadata): input errors come back before torch is imported."""
    from if_query.data.jobs import check_inputs
    from if_query.fit.metadata import load_complete_metadata

    check_inputs(config)
    load_complete_metadata(config.factors_dir)
    return config


def run_query(config: QueryConfig | None = None, /, *, quiet: bool = False, results: str = "all",
              **options: Any) -> list[JobOutcome]:
    """Score every (query, train) pair of query folders, records files or records given in memory (``run-query``).

    ``config``/``options``: a :class:`~if_query.config.QueryConfig`, or its fields as keywords: ``model`` and
    ``factors_dir`` (a :func:`fit_hessians` output) are required; then either ``folders`` (each with
    ``query.json`` and ``train.json``; results written to ``FOLDER/results/``), or one query set: ``queries``
    (records, or a records file; or ``query_json``) against ``train`` (records or a file; or ``train_json``) or
    ``train_dataset`` (a corpus), written to ``output_dir`` when it is given and not written at all when it is not.
    Every other option as the command's (``damping="auto"``, ``max_length=512``, ``top_train``, ``cosine``,
    ``per_token_scores``, ``rank_by``, ...). ``quiet``: no progress bars. ``results``: what each outcome holds in
    memory, ``"all"`` (every pair) or ``"summary"`` (each query's ``top_k`` most helpful and harmful pairs: what the
    command prints, small whatever the corpus).

    Returns one :class:`~if_query.run.outcomes.JobOutcome` per job (one per folder; one in single-run mode):
    ``results`` (a :class:`~if_query.report.results.QueryResults`: DataFrames ``queries``, ``train``,
    ``influences`` and the ``provenance`` that ``run.json`` holds), ``files`` (what was written), ``skipped``
    (``skip_done``), ``error`` (a folder that failed; the others go on). In single-run mode an error is raised
    instead: InputError (bad input; ``exc.option`` names the argument) or RunError. The model loads once per call;
    to score many query sets with one load, use :class:`Attributor`.
    """
    if results not in RESULTS:
        raise ValueError(f"results must be one of {', '.join(RESULTS)}, got {results!r}")
    config = _query_config(config, options)
    if config.index is not None:  # the corpus's index shortlists, the engine scores the candidates
        from if_query.index.answer import IndexRunner

        with _progress_bars(quiet):
            return IndexRunner(config, quiet=quiet, results=results).run()
    from if_query.run.run_query import QueryRunner

    with _progress_bars(quiet):
        return QueryRunner(config, quiet=quiet, results=results).run()


def index_corpus(config: IndexConfig | None = None, /, *, quiet: bool = False, **options: Any) -> dict:
    """Index a corpus once for many query sets (``if-query index``; docs/index.md). ``config``/``options``: an
    :class:`~if_query.config.IndexConfig` or its fields (``model``, ``factors_dir``, ``train_dataset``,
    ``output_dir``; ``sketch_dim``, ``scaling_rank``, ...). Resumes an interrupted build. Returns the index's
    manifest (what it was built for, the sketch, the windows)."""
    config = _config(IndexConfig, config, options)
    from if_query.fit.metadata import load_complete_metadata

    load_complete_metadata(config.factors_dir)  # before torch is imported
    from if_query.index.build import build_index

    with _progress_bars(quiet):
        return build_index(config, quiet=quiet)


class Attributor:
    """A model, its tokenizer and its factors loaded once, scoring any number of query sets.

    ``Attributor(model=..., factors_dir=..., **options)`` (or a :class:`~if_query.config.QueryConfig`) takes
    run-query's options that say how to score (``damping``, ``dtype``, ``max_length``, ``top_train``, ``cosine``,
    ``per_token_scores``, ``score_batch_size``, ...; their defaults are the command's), checks them, the factors
    and the model, and loads them: the time a run-query process spends before scoring, paid once. What to score
    comes with each :meth:`score` call. ``quiet``: no progress bars.

    Use it as a context manager (or call :meth:`close`) to release the model. Not for concurrent calls: one
    :meth:`score` at a time (a web server serializes its requests on it, or holds one per worker).
    """

    def __init__(self, config: QueryConfig | None = None, /, *, quiet: bool = False, **options: Any):
        given = sorted(set(options) & set(JOB_FIELDS))
        if given:
            raise TypeError(f"Attributor takes what to score in score(), not {', '.join(given)}")
        if options.get("index") is not None or (config is not None and config.index is not None):
            raise TypeError("Attributor takes an index with each score() call, not index=")
        jobs = {name: None for name in JOB_FIELDS} | {"queries": [], "train": []}  # none yet: score() gives them
        self.config = _checked(_config(QueryConfig, config, {"output_required": False, **options, **jobs}))
        from if_query.run.run_query import QueryRunner

        self._quiet = quiet
        with _progress_bars(quiet):
            runner = QueryRunner(self.config, quiet=quiet, results="all")
            runner.load_scorer()
        self._runner: QueryRunner | None = runner

    def score(self, queries: Records, train: Records | None = None, *, corpus: str | os.PathLike | None = None,
              index: str | os.PathLike | None = None, candidates: int | None = None,
              output_dir: str | os.PathLike | None = None) -> QueryResults:
        """Score every (query, train) pair of one query set, with the loaded model and factors.

        ``queries``: records (a list of dicts or a DataFrame; see :mod:`if_query.api`) or a records file. Against
        ``train`` (records or a records file) or ``corpus`` (run-query's ``--train-dataset``: a ``save_to_disk``
        folder, a ``.jsonl``/``.parquet`` file of ``{"text": ...}`` documents or a ``.npy`` token array, read and
        tokenized by this call). ``index``: an ``if-query index`` of that corpus (run-query's ``--index``): each
        query's ``candidates`` best and worst windows (default: run-query's ``--candidates``) shortlisted from it and
        scored exactly, no document read when the corpus's bytes are those indexed. ``output_dir``: where to write
        ``query.csv``, ``train.csv``, ``influences.csv`` and ``run.json`` (and ``report.html`` with ``report=True``);
        None writes nothing, and a corpus run scored in chunks then keeps no partial results to resume from.

        Returns a :class:`~if_query.report.results.QueryResults` (the CSVs' columns, in memory):

        - ``queries``: one row per query record: ``query_id``, ``prompt``, ``completion``, ``loss`` (mean cross-entropy
          per predicted completion token, nats), ``loss_sum`` (their sum: the loss being attributed), then the
          records' other fields.
        - ``train``: one row per train example (with ``top_train``, those kept): ``train_id``, ``prompt``,
          ``completion``, ``tokens`` (with ``per_token_scores``: JSON text), other fields.
        - ``influences``: one row per (query, train) pair, query-major (with ``top_train``, each query's kept pairs):
          ``query_id``, ``train_id``, ``influence_score`` (∇L_qᵀ (G + λI)⁻¹ ∇L_t, unnormalized: comparable within
          one call only; positive = training on the example lowers the query's loss), ``influence_cosine`` (in
          [-1, 1]; unless ``cosine=False``), ``per_token_scores`` (with ``per_token_scores=True``: JSON text of a list
          aligned with the train example's tokens, summing to the score).
        - ``provenance``: ``run.json``'s contents (``query_json``/``train_json`` null for records given in memory).

        Raises InputError (bad records, ``exc.option`` naming ``queries`` or ``train``; a bad path) or RunError;
        the Attributor stays usable after either.
        """
        if self._runner is None:
            raise RuntimeError("this Attributor is closed")
        if index is not None and corpus is None:
            raise InputError("an index answers for its corpus: give the corpus it was built from (corpus)", "index",
                             flag_first=False)
        if (train is None) == (corpus is None):
            raise InputError("give train records (train) or a corpus (corpus), one of them", "train",
                             flag_first=False)
        job = {"queries": queries, "train": train, "query_json": None, "train_json": None, "train_dataset": corpus,
               "output_dir": output_dir, "index": index}
        try:
            config = _query_config(self.config, job | ({"candidates": candidates} if candidates is not None else {}))
            if index is not None:
                from if_query.index.answer import IndexRunner

                runner = IndexRunner.sharing(self._runner, config)
            else:
                runner = self._runner.for_jobs(config)
            with _progress_bars(self._quiet):
                [outcome] = runner.run()
        except InputError as exc:  # named as this call's argument: the corpus, not --train-dataset
            exc.option = "corpus" if exc.option == "train_dataset" else exc.option
            raise
        return outcome.results

    def close(self) -> None:
        """Release the model, tokenizer and factors (and the device memory they hold)."""
        if self._runner is not None:
            from if_query.plan.memory import release_memory

            self._runner = None
            release_memory(self.device)

    @property
    def device(self):
        """The torch device the model is on (the rank's GPU, else the CPU)."""
        from if_query import distributed

        return distributed.device()

    def __enter__(self) -> Attributor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- plan and report ---


@dataclass
class PlanReport:
    """What ``if-query plan`` prints (``text``) and the plans it is made of (``plans``, computed on first use)."""

    config: PlanConfig
    text: str

    @cached_property
    def plans(self) -> Plans:
        """The fit's plan (``fit``: sizes, peaks, time) and the run's (``run``: budgets, each job's plan)."""
        from if_query.plan.command import make_plans

        return make_plans(self.config)


def estimate_plan(config: PlanConfig | None = None, /, **options: Any) -> PlanReport:
    """The memory and time of fit-hessians and run-query from a model's ``config.json`` alone (``if-query plan``;
    named so because ``if_query.plan`` is the subpackage). ``config``/``options``: a
    :class:`~if_query.config.PlanConfig` or its fields (``model``; ``folders``, or ``sequences``, or ``documents``
    with ``queries``, of ``tokens`` tokens; ``gpus``, ``gpu_memory_gb``, ``host_ram_gb`` in GB of 10⁹ bytes, ...).
    Reads no weights. Returns a :class:`PlanReport`."""
    config = _config(PlanConfig, config, options)
    from if_query.plan.command import plan_text

    return PlanReport(config, plan_text(config))


def write_report(config: ReportConfig | None = None, /, **options: Any) -> Path:
    """Write ``report.html`` into a results directory (``if-query report``) and return its path.
    ``config``/``options``: a :class:`~if_query.config.ReportConfig` or its fields: ``results_dir`` (a directory
    :func:`run_query` or :meth:`Attributor.score` wrote), ``top_k`` (5), ``factors_dir`` (for the header)."""
    config = _config(ReportConfig, config, options)
    from if_query.report.html import report_results_dir

    return report_results_dir(config.results_dir, config.factors_dir, config.top_k)


def demo_model() -> Path:
    """The bundled tiny GPT-2's folder (2 blocks, 64 positions; model, tokenizer, ``training_corpus.json``: the 240
    records it was trained on, ``world.json``), as ``if-query demo`` uses it. A folder of the installed package:
    read it, do not write into it."""
    from if_query.demo.run_demo import demo_model_dir

    with demo_model_dir() as path:
        return Path(path)
