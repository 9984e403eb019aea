"""The package's shape: subpackages by stage, each importing only from the stages below it, no import cycle
(function-level imports included), and imports paid only where they are used (--help and input errors without
torch; the run-query path without Kronfluence, pandas or torch._dynamo until it needs them)."""

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import write_json

import if_query

PACKAGE = Path(if_query.__file__).parent
# Lowest first: a module may import from its own stage and the stages before it, never after.
LAYERS = [
    {"errors", "config", "atomic", "distributed"},
    {"data"},
    {"model"},
    {"kron"},
    {"plan"},
    {"score"},
    {"fit"},
    {"report"},
    {"run"},
    {"index"},
    {"demo"},
    {"api"},
    {"cli"},
]
STAGE = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the if_query modules it imports anywhere in its text (functions and TYPE_CHECKING blocks too)}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("if_query"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("if_query"):
                for alias in node.names:
                    found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                              else node.module)
        graph[name] = {m for m in found if m in modules and m != name and m != "if_query"}
    return graph


def stage(module: str) -> str:
    return module.split(".")[1]


def test_no_import_cycle_function_level_imports_included():
    graph, state, cycles = imports(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_each_stage_imports_only_the_stages_below_it():
    wrong = [(module, target) for module, targets in imports().items() if module != "if_query"
             for target in targets if STAGE[stage(target)] > STAGE[stage(module)]]
    assert not wrong, wrong
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    top = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert subpackages | top == set(STAGE)  # every module and subpackage has its stage


def loaded_after(statement: str) -> set[str]:
    """The top-level packages and the few heavy modules a fresh interpreter holds after ``statement``."""
    probe = (f"{statement}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} | "
             "{m for m in sys.modules if m.startswith('torch._dynamo')})))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return set(result.stdout.split())


def test_the_run_query_path_imports_no_kronfluence_pandas_or_dynamo():
    loaded = loaded_after("import if_query.run.run_query")
    assert not loaded & {"kronfluence", "pandas", "torch._dynamo"}, loaded & {"kronfluence", "pandas",
                                                                              "torch._dynamo"}


def test_the_python_api_imports_no_torch_until_it_runs():
    heavy = {"torch", "transformers", "kronfluence", "pandas"}
    assert not loaded_after("import if_query") & heavy
    assert not loaded_after("from if_query import Attributor, fit_hessians, run_query, QueryConfig") & heavy


def test_help_version_and_input_errors_come_back_before_torch(tmp_path):
    assert not loaded_after("import if_query.cli") & {"torch", "transformers", "kronfluence", "pandas"}
    run_query = Path(sys.executable).with_name("run-query")
    write_json(tmp_path / "query.json", [{"pair_id": "a", "prompt": "x", "completion": " y"}])
    write_json(tmp_path / "bad.json", [{"pair_id": "a", "prompt": "x"}])  # no completion
    write_json(tmp_path / "f" / "metadata.json", {"status": "complete"})
    commands = [
        ([str(run_query), "--help"], 0, "Usage"),
        ([str(Path(sys.executable).with_name("if-query")), "--version"], 0, if_query.__version__),
        ([str(run_query), "--model", "m", "--factors-dir", str(tmp_path / "f"), "--train-json",
          str(tmp_path / "missing.json"), "--query-json", str(tmp_path / "query.json"), "--output-dir",
          str(tmp_path / "out")], 2, "missing.json"),
        ([str(run_query), "--model", "m", "--factors-dir", str(tmp_path / "f"), "--train-json",
          str(tmp_path / "bad.json"), "--query-json", str(tmp_path / "query.json"), "--output-dir",
          str(tmp_path / "out")], 2, "completion"),
    ]
    for command, code, text in commands:
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPROFILEIMPORTTIME": "1"})
        seconds = time.perf_counter() - start
        assert result.returncode == code, (command, result.stderr[-2000:])
        assert text in result.stdout + result.stderr, (command, result.stdout, result.stderr[-2000:])
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "torch" not in imported and "transformers" not in imported, (command, seconds)
