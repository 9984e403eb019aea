"""config.py declares every option once; cli.py's commands are built from it and check nothing else."""

import dataclasses
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from if_query import cli, config
from if_query.errors import InputError

COMMANDS = {
    "fit-hessians": config.FitConfig,
    "run-query": config.QueryConfig,
    "report": config.ReportConfig,
    "demo": config.DemoConfig,
    "plan": config.PlanConfig,
}
COMMON = {"quiet", "verbose", "version", "help"}


def _default(spec: dataclasses.Field):
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("name", COMMANDS)
def test_each_option_is_a_config_field_with_its_default_and_help(name):
    command = typer.main.get_command(cli.app).commands[name]
    params = {p.name: p for p in command.params if p.name not in COMMON}
    specs = {spec.name: spec for spec in config.cli_fields(COMMANDS[name])}
    assert set(params) == set(specs)
    for field_name, spec in specs.items():
        param, default = params[field_name], _default(spec)
        assert param.required == (default is dataclasses.MISSING), field_name
        if default is not dataclasses.MISSING:
            assert param.default == default or str(param.default) == str(default), field_name
        if hasattr(param, "help"):  # options (arguments' help is rendered by Typer elsewhere)
            assert param.help == spec.metadata["help"], field_name
    assert command.help.strip().startswith(COMMANDS[name].__doc__.strip().splitlines()[0])


def test_the_standalone_scripts_have_the_same_options():
    """fit-hessians and run-query (console scripts, ``typer.run``) serve the same options as the subcommands."""
    for script, name in ((cli.fit_hessians_command, "fit-hessians"), (cli.run_query_command, "run-query")):
        app = typer.Typer()
        app.command()(script)  # what typer.run(script) builds
        completion = {"install_completion", "show_completion"}  # typer.run's own
        standalone = {p.name: p.opts for p in typer.main.get_command(app).params if p.name not in completion}
        subcommand = {p.name: p.opts for p in typer.main.get_command(cli.app).commands[name].params}
        assert standalone == subcommand
        assert set(standalone) - COMMON == {spec.name for spec in config.cli_fields(COMMANDS[name])}


FIT = {"model": "m", "hessian_dataset": "d.json", "output_dir": "out"}
QUERY = {"model": "m", "factors_dir": "f", "folders": [Path("folder")]}


@pytest.mark.parametrize(("config_class", "given", "change", "message"), [
    (config.FitConfig, FIT, {"strategy": "kfc"}, "unknown --strategy 'kfc'; choose one of ekfac, kfac"),
    (config.FitConfig, FIT, {"layer_stride": 0}, "--layer-stride must be at least 1, got 0"),
    (config.FitConfig, FIT, {"max_examples": 0}, "--max-examples must be at least 1, got 0"),
    (config.FitConfig, FIT, {"dtype": "fp8"}, "unknown --dtype 'fp8'"),
    (config.FitConfig, FIT, {"eigendecomposition_dtype": "half"}, "unknown --eigendecomposition-dtype"),
    (config.QueryConfig, QUERY, {"max_length": 0}, "--max-length must be at least 1, got 0"),
    (config.QueryConfig, QUERY, {"workspace_gb": -1.0}, "--workspace-gb must be >= 0, got -1.0"),
    (config.QueryConfig, QUERY, {"damping": "-1"}, "--damping must be a finite number >= 0"),
    (config.QueryConfig, QUERY, {"damping": "lots"}, "--damping must be a number or 'auto'"),
    (config.QueryConfig, QUERY, {"query_rank": 8}, "--query-rank applies only to --engine kronfluence"),
    (config.QueryConfig, QUERY, {"module_partitions": 2}, "--module-partitions applies only to --engine kronfluence"),
    (config.QueryConfig, QUERY, {"output_dir": Path("o")}, "give either query folders or"),
    (config.QueryConfig, QUERY, {"folders": None}, "give query folders, or all of"),
    (config.ReportConfig, {"results_dir": Path("r")}, {"top_k": 0}, "--top-k must be at least 1, got 0"),
])
def test_a_bad_value_is_refused_when_the_config_is_made(config_class, given, change, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_class(**{**given, **change})


@pytest.mark.parametrize(("change", "option"), [
    ({"max_length": 0}, "max_length"), ({"engine": "fast"}, "engine"), ({"damping": "lots"}, "damping"),
    ({"query_rank": 8}, "query_rank"), ({"output_dir": Path("o")}, "folders"), ({"folders": None}, "train_json"),
    ({"folders": None, "train_json": Path("t.json"), "query_json": Path("q.json")}, "output_dir"),
])
def test_a_refused_value_names_its_option_for_python_callers(change, option):
    """``exc.option`` is the field; the message names its flag already, so the command line prints it as it is."""
    with pytest.raises(InputError) as raised:
        config.QueryConfig(**{**QUERY, **change})
    assert raised.value.option == option and not raised.value.flag_first


def test_valid_values_pass_and_convert():
    query = config.QueryConfig(**QUERY, damping="0.5", workspace_gb=0.5, engine="kronfluence", query_rank=8,
                               score_batch_size=6, train_batch_size=2)
    assert query.damping_value == 0.5 and query.workspace_bytes == 5 * 10**8 and query.host_memory_bytes is None
    assert query.batch_sizes() == (6, 2)
    assert config.QueryConfig(**QUERY).damping_value is None  # auto


def test_the_cli_prints_a_config_error_as_one_line(tmp_path):
    result = CliRunner().invoke(cli.app, ["run-query", "--model", "m", "--factors-dir", "f", "--engine", "fast",
                                          str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == "error: unknown --engine 'fast'; choose one of if-query, kronfluence"


@pytest.mark.parametrize("given", [["--strategy", "kfac"], ["--layer-stride=2"]])
def test_run_query_given_a_fit_option_says_it_comes_from_the_factors(tmp_path, given):
    result = CliRunner().invoke(cli.app, ["run-query", "--model", "m", "--factors-dir", "f", *given, str(tmp_path)])
    assert result.exit_code == 2
    flag, words = given[0].split("=")[0], given[0].split("=")[0].removeprefix("--").replace("-", " ")
    assert result.output.strip() == (f"error: {flag} is a fit-hessians option, not run-query's: the {words} comes "
                                     f"from the factors (--factors-dir); to change it, fit other factors with "
                                     f"fit-hessians {flag}")
    assert "No such option: --bogus" in CliRunner().invoke(cli.app, ["run-query", "--bogus"]).output  # as before


def test_the_code_map_lists_every_module():
    """docs/code-map.md names each module of src/if_query once, and each subpackage (``kron/``), and nothing else."""
    import re

    import if_query

    package = Path(if_query.__file__).parent
    page = (package.parents[1] / "docs" / "code-map.md").read_text(encoding="utf-8")
    section = page.split("# Code map", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([\w/]+(?:\.py|/))` \|", section, flags=re.MULTILINE)
    modules = sorted([path.relative_to(package).as_posix() for path in package.rglob("*.py")
                      if path.name != "__init__.py"]
                     + [f"{path.parent.relative_to(package).as_posix()}/" for path in package.glob("*/__init__.py")])
    assert sorted(listed) == modules and len(set(listed)) == len(listed)


def test_no_module_of_the_package_imports_tiny_world():
    """``tiny_world`` builds the demo's and the benchmarks' worlds; the commands never need it."""
    import ast

    import if_query

    importers = []
    for path in Path(if_query.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{alias.name}" for alias in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any("tiny_world" in name for name in names):
                importers.append(path.name)
    assert importers == []
