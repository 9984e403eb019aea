"""``if-query demo``: the whole workflow on the tiny GPT-2 and the test query bundled in ``if_query/demo_data``.

The bundled data is package data (it ships in the wheel) and is only read; everything the demo writes goes
under ``output_dir`` (``--output-dir``, default ``./if-query-demo``): ``factors/`` and ``test_query/`` (a copy of the
bundled query folder) with its ``results/``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import as_file, files
from pathlib import Path

from if_query.atomic import check_writable_dir
from if_query.config import DemoConfig, FitConfig, QueryConfig
from if_query.fit.fit_hessians import fit_hessians
from if_query.run.outcomes import JobOutcome
from if_query.run.run_query import QueryRunner

logger = logging.getLogger(__name__)
DEMO_DATA = files("if_query") / "demo_data"
DEMO_MODEL = DEMO_DATA / "tiny-gpt2"  # model + tokenizer, training_corpus.json (its training records), world.json
DEMO_QUERIES = DEMO_DATA / "test_query"  # query.json, train.json
DEMO_CORPUS_FILE = "training_corpus.json"


@contextmanager
def demo_model_dir() -> Iterator[Path]:
    """The bundled tiny GPT-2's folder as a real path (``from_pretrained`` needs one)."""
    with as_file(DEMO_MODEL) as path:
        yield path


def run_demo(config: DemoConfig) -> JobOutcome:
    """Fit (or reuse) EK-FAC factors for the tiny model into ``output_dir/factors``, copy the bundled query
    folder to ``output_dir/test_query`` and score it into ``output_dir/test_query/results`` (the CLI prints
    the summary)."""
    output_dir = Path(config.output_dir)
    check_writable_dir(output_dir, "output_dir")
    factors_dir = output_dir / "factors"
    queries_dir = output_dir / "test_query"
    queries_dir.mkdir(parents=True, exist_ok=True)
    for name in ("query.json", "train.json"):
        (queries_dir / name).write_bytes((DEMO_QUERIES / name).read_bytes())
    with demo_model_dir() as model:
        logger.info("EK-FAC factors of %s: %s", model, factors_dir)  # fit_hessians says whether it fits or reuses
        # The factors directory is a cache: reused while the model's weights and the arguments are unchanged,
        # refitted (not refused) when either changed, e.g. after scripts/make_tiny_model.py.
        fit_hessians(FitConfig(model=str(model), hessian_dataset=str(model / DEMO_CORPUS_FILE),
                               output_dir=str(factors_dir), factor_batch_size=16, lambda_batch_size=16,
                               refit_if_changed=True), quiet=True)
        logger.info("Scoring %s", queries_dir)
        [outcome] = QueryRunner(QueryConfig(model=str(model), factors_dir=str(factors_dir), folders=[queries_dir]),
                                quiet=True).run()
    if outcome.error is not None:
        raise outcome.error
    return outcome
