"""``if-query demo``: the whole workflow on the bundled tiny GPT-2 and queries/test_query."""

from __future__ import annotations

import logging
from pathlib import Path

from if_query.fitting import FitConfig, fit_hessians
from if_query.query import JobOutcome, QueryConfig, QueryJob, QueryRunner
from if_query.summary import format_summary

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO_ROOT / "examples" / "tiny-gpt2"
DEMO_CORPUS = DEMO_MODEL / "training_corpus.json"
DEMO_QUERIES = REPO_ROOT / "queries" / "test_query"
DEMO_FACTORS = REPO_ROOT / ".cache" / "demo-factors"


def run_demo(quiet: bool = False, top_k: int = 3, factors_dir: Path = DEMO_FACTORS,
             results_dir: Path = DEMO_QUERIES / "results") -> JobOutcome:
    """Fit (or reuse) EK-FAC factors for the tiny model, score the demo folder, print the summary."""
    logger.info("Fitting EK-FAC factors for %s (cached in %s)", DEMO_MODEL, factors_dir)
    # The factors directory is a cache: reused while the model's weights and the arguments are unchanged,
    # refitted (not refused) when either changed, e.g. after scripts/make_tiny_model.py.
    fit_hessians(FitConfig(model=str(DEMO_MODEL), hessian_dataset=str(DEMO_CORPUS), output_dir=str(factors_dir),
                           factor_batch_size=16, lambda_batch_size=16, refit_if_changed=True), quiet=True)
    logger.info("Scoring %s", DEMO_QUERIES)
    runner = QueryRunner(QueryConfig(model=str(DEMO_MODEL), factors_dir=str(factors_dir)), quiet=True)
    job = QueryJob(str(DEMO_QUERIES), DEMO_QUERIES / "query.json", DEMO_QUERIES / "train.json", results_dir)
    [outcome] = runner.run([job])
    if not quiet:
        print(format_summary(outcome.results, top_k=top_k))
        print(f"Results in {results_dir}/ (query.csv, train.csv, influences.csv)")
    return outcome
