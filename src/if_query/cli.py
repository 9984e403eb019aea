"""Command line: parse options, call the library, print. Exit codes: 0 ok, 2 bad input, 1 failure.

The commands' options, defaults, help and checks are the fields of their config dataclasses
(:mod:`if_query.config`); :func:`config_command` turns a config class into a Typer command, which calls one
function of the Python API (:mod:`if_query.api`) with that config and prints what it returns.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import sys
import textwrap
import traceback
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from if_query import api
from if_query import config as configs
from if_query.config import COMMANDS, GROUPS, cli_fields, misplaced_option, option_name
from if_query.distributed import is_main_rank
from if_query.errors import IfQueryError, first_line

# Click's plain help (no Rich): it wraps at the terminal's width and never cuts an option's name or text.
APP_SETTINGS = {"add_completion": False, "pretty_exceptions_enable": False, "rich_markup_mode": None}
app = typer.Typer(
    help="Which training examples made the model say this? Influence scores for HuggingFace causal LMs.",
    no_args_is_help=True,
    **APP_SETTINGS,
)

def _version(value: bool) -> None:
    if value:
        from if_query import __version__

        typer.echo(f"if-query {__version__}")
        raise typer.Exit()


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs and full tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (no progress bars).")]
Version = Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")]


@app.callback()
def main(version: Version = False) -> None:
    """Which training examples made the model say this? Influence scores for HuggingFace causal LMs."""


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


def error_line(exc: IfQueryError) -> str:
    """An error as the command line says it: the flag of the setting it is about (``exc.option``, see
    :mod:`if_query.errors`), then the library's message; the message alone where it names the setting itself."""
    return f"{option_name(exc.option)} {exc}" if exc.option and exc.flag_first else str(exc)


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
            typer.echo(f"error: {error_line(exc)}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, typer.TyperException):  # Typer's own (its Click is vendored)
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - a runtime failure gets one line unless --verbose
            if verbose:
                traceback.print_exc()
            cause = first_line(exc) if str(exc).strip() else ""
            hint = "" if verbose else " (--verbose for the traceback)"
            typer.echo(f"error: {type(exc).__name__}: {cause}{hint}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def config_command(config_class: type, action: Callable[[Any, bool], None]) -> Callable:
    """A Typer command whose options are ``config_class``'s option fields (:mod:`if_query.config`), plus
    --quiet and --verbose; it builds the config (which checks it) and calls ``action(config, quiet)``."""
    hints = typing.get_type_hints(config_class)
    parameters = []
    for spec in cli_fields(config_class):
        meta = spec.metadata
        kind = (functools.partial(typer.Argument, metavar=spec.name.removesuffix("s").upper()) if meta["argument"]
                else functools.partial(typer.Option, *meta["flags"]))
        info = kind(help=meta["help"], show_default=meta["show_default"])
        default = (spec.default if spec.default is not dataclasses.MISSING
                   else spec.default_factory() if spec.default_factory is not dataclasses.MISSING
                   else inspect.Parameter.empty)
        parameters.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[hints[spec.name], info]))
    parameters += [
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Quiet),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Verbose),
        inspect.Parameter("version", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Version),
    ]

    @reports_errors
    def command(**options) -> None:
        quiet = options.pop("quiet")
        options.pop("verbose")
        options.pop("version")  # eager: printed and exited before the command runs
        action(config_class(**options), quiet)

    # Typer reads a command's options from its signature; **options has none, so the signature built above
    # (one keyword parameter per config field, its help and checks attached) stands in for it.
    command.__signature__ = inspect.Signature(parameters)
    command.__doc__ = config_class.__doc__
    return command


def summary(config_class: type) -> str:
    """The first line of a command's help: ``if-query --help`` lists it whole (Click would cut it to fit)."""
    return " ".join(config_class.__doc__.strip().split("\n\n")[0].split())  # the docstring's wrap undone


def write_options(formatter, records: list[tuple[str, str]], name_width: int = 30) -> None:
    """Click's two-column option list (``HelpFormatter.write_dl``), wrapped at spaces only: Click also breaks
    lines at hyphens, which splits ``--max-length`` or ``single-run`` in two."""
    column = min(max(len(name) for name, _ in records), name_width) + 2
    wrapper = textwrap.TextWrapper(width=max(formatter.width - column - formatter.current_indent, 20),
                                   break_on_hyphens=False, break_long_words=False)
    for name, text in records:
        lines = wrapper.wrap(text) or [""]
        first = f"{'':>{formatter.current_indent}}{name}"
        if len(name) + 2 <= column:
            formatter.write(f"{first:<{column + formatter.current_indent}}{lines[0]}\n")
        else:
            formatter.write(f"{first}\n{'':>{column + formatter.current_indent}}{lines[0]}\n")
        for line in lines[1:]:
            formatter.write(f"{'':>{column + formatter.current_indent}}{line}\n")


def command_class(config_class: type) -> type[typer.core.TyperCommand]:
    """The Click command class of ``config_class``'s command: an option of another command that it is given
    (run-query given ``--strategy``) is said in one line, where it belongs (:func:`~if_query.config.misplaced_option`),
    not as Click's bare "No such option"."""

    class ConfigCommand(typer.core.TyperCommand):
        def parse_args(self, ctx, args: list[str]) -> list[str]:
            known = {flag for param in self.params for flag in (*param.opts, *param.secondary_opts)}
            for arg in args[: args.index("--") if "--" in args else len(args)]:
                flag = arg.split("=", 1)[0]
                if flag.startswith("--") and flag not in known and (message := misplaced_option(config_class, flag)):
                    typer.echo(f"error: {message}", err=True)
                    raise typer.Exit(2)
            return super().parse_args(ctx, args)

        def format_options(self, ctx, formatter) -> None:
            """The options in sections, in :data:`~if_query.config.GROUPS` order; --quiet, --verbose and --help
            last."""
            groups = {spec.name: spec.metadata["group"] for spec in cli_fields(config_class)}
            sections: dict[str, list[tuple[str, str]]] = {group: [] for group in (*GROUPS, "Other")}
            for param in self.get_params(ctx):
                if (record := param.get_help_record(ctx)) is None:
                    continue
                if param.param_type_name == "argument":  # its name alone: "FOLDER...", not "FOLDER <list[Path]>"
                    record = (param.metavar + ("..." if param.nargs == -1 else ""), record[1])
                sections[groups.get(param.name, "Other")].append(record)
            for group, records in sections.items():
                if records:
                    with formatter.section(group):
                        write_options(formatter, records)

    return ConfigCommand


def fit(config: configs.FitConfig, quiet: bool) -> None:
    fitted = api.fit_hessians(config, quiet=quiet)
    if not quiet:
        typer.echo(f"Fitted {fitted.strategy} factors for {len(fitted.modules)} modules on {fitted.num_examples} "
                   f"examples -> {config.output_dir}")


def query(config: configs.QueryConfig, quiet: bool) -> None:
    outcomes = api.run_query(config, quiet=quiet, results="summary")  # inputs checked before torch is imported
    from if_query.report.summary import format_summary

    if not is_main_rank():  # under torchrun every rank knows every outcome; rank 0 alone reports them
        return
    if not quiet:
        for outcome in outcomes:
            if outcome.results is not None:
                typer.echo((f"== {outcome.job.name}\n" if config.folders else "")
                           + format_summary(outcome.results, config.top_k, rank_by=config.ranking))
    skipped = [o for o in outcomes if o.skipped]
    if config.folders:
        failed = [o for o in outcomes if not o.ok]
        for outcome in outcomes:
            if quiet and not outcome.error:  # --quiet: errors only
                continue
            status = (f"FAILED: {error_line(outcome.error)}" if outcome.error else
                      f"skipped, results up to date in {outcome.job.output_dir}" if outcome.skipped else
                      f"ok -> {outcome.job.output_dir}")
            typer.echo(f"{outcome.job.name}: {status}", err=bool(outcome.error))
        if not quiet:
            typer.echo(f"{len(outcomes) - len(failed) - len(skipped)} of {len(outcomes)} folders scored"
                       + (f", {len(skipped)} skipped" if skipped else "")
                       + (f", {len(failed)} failed" if failed else ""))
        if failed:
            raise typer.Exit(max(o.error.exit_code for o in failed))
    elif not quiet:
        typer.echo(f"Skipped: the results in {outcomes[0].job.output_dir} are up to date" if skipped
                   else f"Wrote {', '.join(str(p) for p in outcomes[0].files)}")


def index(config: configs.IndexConfig, quiet: bool) -> None:
    manifest = api.index_corpus(config, quiet=quiet)
    if not quiet and is_main_rank():
        typer.echo(f"Indexed {manifest['windows']} windows of {config.train_dataset} -> {config.output_dir}")


def report(config: configs.ReportConfig, quiet: bool) -> None:
    path = api.write_report(config)
    if not quiet:
        typer.echo(f"Wrote {path}")


def plan(config: configs.PlanConfig, quiet: bool) -> None:
    typer.echo(api.estimate_plan(config).text, nl=False)


def demo(config: configs.DemoConfig, quiet: bool) -> None:
    from if_query.demo.run_demo import run_demo
    from if_query.report.summary import format_summary

    outcome = run_demo(config)
    if not quiet:
        typer.echo(format_summary(outcome.results, top_k=config.top_k))
        typer.echo(f"Results in {outcome.job.output_dir}/ (query.csv, train.csv, influences.csv)")


def add_command(name: str, action: Callable[[Any, bool], None]) -> Callable:
    """``if-query NAME``: the command of its configuration (``config.COMMANDS``) running ``action`` (returned for the
    console scripts)."""
    config_class = COMMANDS[name]
    command = config_command(config_class, action)
    app.command(name, cls=command_class(config_class), short_help=summary(config_class))(command)
    return command


fit_hessians_command = add_command("fit-hessians", fit)
run_query_command = add_command("run-query", query)
index_command = add_command("index", index)
report_command = add_command("report", report)
plan_command = add_command("plan", plan)
demo_command = add_command("demo", demo)


def _run_alone(command: Callable, config_class: type) -> None:
    """A command as a console script of its own (what ``typer.run`` does, with the command's class)."""
    alone = typer.Typer(**APP_SETTINGS)
    alone.command(cls=command_class(config_class))(command)
    alone()


def fit_hessians_app() -> None:
    _run_alone(fit_hessians_command, COMMANDS["fit-hessians"])


def run_query_app() -> None:
    _run_alone(run_query_command, COMMANDS["run-query"])


if __name__ == "__main__":
    app()
