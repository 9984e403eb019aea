"""Command line: parse options, call the library, print. Exit codes: 0 ok, 2 bad input, 1 failure."""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer

from if_query.distributed import is_main_rank
from if_query.errors import IfQueryError, InputError

app = typer.Typer(
    help="Which training examples made the model say this? Influence scores for HuggingFace causal LMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs and full tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (no progress bars).")]
ModelOption = Annotated[str, typer.Option(help="HuggingFace hub name or local directory of a causal LM.")]
RevisionOption = Annotated[str | None, typer.Option(
    help="Model revision (branch, tag or commit) on the hub. With a local model directory it is not used to load "
         "anything, but is recorded and must match the factors' revision.")]
TopK = Annotated[int, typer.Option(help="Helpful and harmful training examples shown per query.")]
DtypeOption = Annotated[
    str, typer.Option(help="Model weights dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16.")
]


def setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("if_query")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def reports_errors(command):
    """Turn library errors into one line on stderr and an exit code; tracebacks only with --verbose."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        verbose = kwargs.get("verbose", False)
        if not is_main_rank():  # under torchrun, rank 0 alone prints (and writes)
            kwargs["quiet"] = True
        setup_logging(kwargs.get("quiet", False), verbose)
        try:
            return command(*args, **kwargs)
        except IfQueryError as exc:
            if verbose:
                traceback.print_exc()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - a runtime failure gets one line unless --verbose
            if verbose:
                traceback.print_exc()
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            hint = "" if verbose else " (--verbose for the traceback)"
            typer.echo(f"error: {type(exc).__name__}: {cause}{hint}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _gigabytes(value: float | None) -> int | None:
    return None if value is None else int(value * 1024**3)


def parse_damping(value: str) -> float | None:
    if value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise InputError(f"--damping must be a number or 'auto', got {value!r}") from None


@app.command("fit-hessians")
@reports_errors
def fit_hessians_command(
    model: ModelOption,
    hessian_dataset: Annotated[str, typer.Option(
        help="Fitting data: a dataset dir saved with datasets' save_to_disk (input_ids, optional attention_mask "
             "and labels), or a .json/.jsonl file of prompt/completion records.")],
    output_dir: Annotated[str, typer.Option(help="Where the factors and metadata.json are written.")],
    revision: RevisionOption = None,
    factor_batch_size: Annotated[int, typer.Option(help="Batch size for the covariance pass.")] = 8,
    lambda_batch_size: Annotated[int, typer.Option(help="Batch size for the eigenvalue-correction pass.")] = 4,
    strategy: Annotated[str, typer.Option(help="Hessian approximation: ekfac, kfac, diagonal or identity.")] = "ekfac",
    layer_stride: Annotated[int, typer.Option(help="Track the MLP of every Nth transformer block (0, N, 2N...).")] = 1,
    dtype: DtypeOption = "auto",
    max_examples: Annotated[int | None, typer.Option(help="Use only the first N examples (default: all).")] = None,
    max_length: Annotated[int, typer.Option(
        help="Token limit for .json/.jsonl records (prompt cut from the left).")] = 512,
    fisher: Annotated[str, typer.Option(
        help="true: labels sampled from the model (true Fisher); empirical: the data's own labels.")] = "true",
    module_partitions: Annotated[int, typer.Option(
        help="Fit the factors in N groups of modules to lower peak memory.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the label sampling (true Fisher).")] = 0,
    eigendecomposition_dtype: Annotated[str, typer.Option(
        help="Precision of the covariances' eigendecomposition: float64 or float32 (faster; factors are "
             "stored in float32 either way).")] = "float64",
    overwrite: Annotated[bool, typer.Option(help="Replace factors fitted with other arguments.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Fit Hessian factors (EK-FAC, K-FAC, diagonal or identity) on a model's MLP modules.

    Rerun with the same arguments to resume an interrupted fit from its last complete stage.
    """
    from if_query.fitting import FitConfig, fit_hessians

    config = FitConfig(
        model=model, hessian_dataset=hessian_dataset, output_dir=output_dir, revision=revision,
        factor_batch_size=factor_batch_size, lambda_batch_size=lambda_batch_size, strategy=strategy,
        layer_stride=layer_stride, dtype=dtype, max_examples=max_examples, max_length=max_length,
        fisher=fisher, seed=seed, module_partitions=module_partitions, overwrite=overwrite,
        eigendecomposition_dtype=eigendecomposition_dtype,
    )
    metadata = fit_hessians(config, quiet=quiet)
    if not quiet:
        typer.echo(
            f"Fitted {metadata['fit']['strategy']} factors for {len(metadata['tracked_modules'])} modules on "
            f"{metadata['fit']['num_examples']} examples -> {output_dir}"
        )


@app.command("run-query")
@reports_errors
def run_query_command(
    model: ModelOption,
    factors_dir: Annotated[str, typer.Option(help="Output directory of fit-hessians.")],
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Query folders, each with train.json and query.json; results go to FOLDER/results/.",
        show_default=False)] = None,
    train_json: Annotated[Path | None, typer.Option(help="Training examples (single-run mode).")] = None,
    query_json: Annotated[Path | None, typer.Option(help="Query examples (single-run mode).")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Where the CSVs go (single-run mode).")] = None,
    revision: RevisionOption = None,
    per_token_scores: Annotated[bool, typer.Option(
        "--per-token-scores", help="Add per-token scores aligned with each train example's tokens.")] = False,
    score_batch_size: Annotated[int, typer.Option(
        help="Batch size for gradients while scoring: the default of --query-batch-size and --train-batch-size.")]
        = 8,
    query_batch_size: Annotated[int | None, typer.Option(
        help="Batch size for query gradients (default: --score-batch-size). Default engine: the queries (an "
             "example that is also a train example counts as a query) go through the model in batches of at most "
             "this many; Kronfluence engine: its query batch size (and the query-loss pass).",
        show_default=False)] = None,
    train_batch_size: Annotated[int | None, typer.Option(
        help="Batch size for train gradients (default: --score-batch-size). Default engine: the train examples "
             "that are not queries go through the model in batches of at most this many; Kronfluence engine: its "
             "train batch size (pairwise and self-influence passes).", show_default=False)] = None,
    damping: Annotated[str, typer.Option(
        help="Damping added to the Hessian approximation: a number, or auto (0.1 x mean eigenvalue per module).")]
        = "auto",
    dtype: DtypeOption = "auto",
    max_length: Annotated[int, typer.Option(help="Token limit per example; prompts are cut from the left.")] = 512,
    engine: Annotated[str, typer.Option(
        help="if-query: exact scores from one forward/backward pass per distinct sequence, in bounded memory "
             "(default); kronfluence: Kronfluence's own streaming scorer, a small-scale cross-check.")] = "if-query",
    workspace_gb: Annotated[float | None, typer.Option(
        help="Memory for whitened gradients formed at once (on the GPU, or RAM on CPU); default: half the free "
             "GPU memory (a quarter of the free RAM on CPU). Smaller is exact but slower.")] = None,
    host_memory_gb: Annotated[float | None, typer.Option(
        help="RAM for the token factors (layer inputs and output gradients) of a folder; beyond it they are "
             "spilled to a memory-mapped file in --spill-dir. Default: half the free RAM.")] = None,
    spill_dir: Annotated[str | None, typer.Option(
        help="Directory of the spill file (default: the system's temp dir; deleted when the run ends).")] = None,
    skip_done: Annotated[bool, typer.Option(
        "--skip-done", help="Skip folders whose results are complete and newer than their inputs and factors "
                            "(resume an interrupted batch of folders).")] = False,
    query_rank: Annotated[int | None, typer.Option(
        help="--engine kronfluence only: low-rank (rank R) query gradients (approximate).")] = None,
    queries_per_pass: Annotated[int | None, typer.Option(
        help="--engine kronfluence only: queries held in memory per pass over the train set (default: all).")]
        = None,
    module_partitions: Annotated[int, typer.Option(
        help="--engine kronfluence only: score in N groups of modules to lower memory.")] = 1,
    report: Annotated[bool, typer.Option(
        "--report", help="Also write report.html (heatmap, top influences, token colours) into each results dir.")]
        = False,
    top_k: TopK = 5,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Score every (query, train) pair and write query.csv, train.csv and influences.csv.

    Prints each query's most helpful and harmful training examples unless --quiet.
    """
    from if_query.query import QueryConfig, QueryJob, QueryRunner
    from if_query.report import header_from_run, write_report
    from if_query.scoring import ScoreConfig
    from if_query.summary import format_summary

    single = [train_json, query_json, output_dir]
    if folders and any(v is not None for v in single):
        raise InputError("give either query folders or --train-json/--query-json/--output-dir, not both")
    if not folders and any(v is None for v in single):
        raise InputError("give query folders, or all of --train-json, --query-json and --output-dir")
    if top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    jobs = ([QueryJob.from_folder(f) for f in folders] if folders
            else [QueryJob("query", query_json, train_json, output_dir)])
    config = QueryConfig(
        model=model, factors_dir=factors_dir, revision=revision, dtype=dtype, max_length=max_length,
        score=ScoreConfig(score_batch_size=score_batch_size, query_batch_size=query_batch_size,
                          train_batch_size=train_batch_size, damping=parse_damping(damping),
                          per_token=per_token_scores, engine=engine,
                          workspace_bytes=_gigabytes(workspace_gb), host_memory_bytes=_gigabytes(host_memory_gb),
                          spill_dir=spill_dir, query_rank=query_rank, queries_per_pass=queries_per_pass,
                          module_partitions=module_partitions),
    )
    runner = QueryRunner(config, quiet=quiet)
    outcomes = runner.run(jobs, stop_on_error=not folders, skip_done=skip_done)
    if not is_main_rank():  # under torchrun every rank knows every outcome; rank 0 alone reports them
        return
    for outcome in outcomes:
        if not outcome.ok or outcome.results is None:
            continue
        if report:
            header = header_from_run(outcome.results.provenance)
            outcome.files.append(write_report(outcome.job.output_dir, header, top_k))
        if not quiet:
            typer.echo((f"== {outcome.job.name}\n" if folders else "") + format_summary(outcome.results, top_k))
    skipped = [o for o in outcomes if o.skipped]
    if folders:
        failed = [o for o in outcomes if not o.ok]
        for outcome in outcomes:
            status = (f"FAILED: {outcome.error}" if outcome.error else
                      f"skipped, results up to date in {outcome.job.output_dir}" if outcome.skipped else
                      f"ok -> {outcome.job.output_dir}")
            typer.echo(f"{outcome.job.name}: {status}", err=bool(outcome.error))
        typer.echo(f"{len(outcomes) - len(failed) - len(skipped)} of {len(outcomes)} folders scored"
                   + (f", {len(skipped)} skipped" if skipped else "") + (f", {len(failed)} failed" if failed else ""))
        if failed:
            raise typer.Exit(max(o.error.exit_code for o in failed))
    elif not quiet:
        typer.echo(f"Skipped: the results in {outcomes[0].job.output_dir} are up to date" if skipped
                   else f"Wrote {', '.join(str(p) for p in outcomes[0].files)}")


@app.command("report")
@reports_errors
def report_command(
    results_dir: Annotated[Path, typer.Argument(
        help="A run-query results directory (query.csv, train.csv, influences.csv).", show_default=False)],
    top_k: TopK = 5,
    factors_dir: Annotated[Path | None, typer.Option(
        help="The fit-hessians directory used, for the page's header (model, revision, strategy); by default "
             "the header comes from the results' run.json.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Write RESULTS_DIR/report.html: one self-contained page (heatmap, top influences, token colours)."""
    from if_query.metadata import read_metadata
    from if_query.provenance import read_run
    from if_query.report import header_from_metadata, header_from_run, results_date, write_report

    if not results_dir.is_dir():
        raise InputError(f"{results_dir}: results directory not found (run run-query first)")
    header = {"date": results_date(results_dir), **header_from_run(read_run(results_dir))}
    if factors_dir is not None:  # named explicitly: its model, revision and strategy win
        header.update(header_from_metadata(read_metadata(factors_dir), factors_dir))
    path = write_report(results_dir, {k: v for k, v in header.items() if v is not None}, top_k)
    if not quiet:
        typer.echo(f"Wrote {path}")


@app.command("demo")
@reports_errors
def demo_command(quiet: Quiet = False, verbose: Verbose = False) -> None:
    """Fit factors on the bundled tiny GPT-2 and score queries/test_query, printing the top influences."""
    from if_query.demo import run_demo

    run_demo(quiet=quiet)


def fit_hessians_app() -> None:
    typer.run(fit_hessians_command)


def run_query_app() -> None:
    typer.run(run_query_command)


if __name__ == "__main__":
    app()
