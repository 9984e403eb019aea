"""if-query: which training examples made the model say this? Influence-function scores for HuggingFace causal LMs.

The public Python API is the names in ``__all__`` (reference: :mod:`if_query.api`; worked examples:
``docs/python.md``); every other module is private by convention. Each name is imported on first use, so
``import if_query`` stays cheap (no torch).
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("if-query")
except PackageNotFoundError:  # run from src/ without being installed (the GPU machine)
    __version__ = "unknown"

# Each public name, and the module that defines it.
_PUBLIC = {
    "fit_hessians": "if_query.api",
    "run_query": "if_query.api",
    "Attributor": "if_query.api",
    "index_corpus": "if_query.api",
    "estimate_plan": "if_query.api",
    "write_report": "if_query.api",
    "demo_model": "if_query.api",
    "FitResult": "if_query.api",
    "PlanReport": "if_query.api",
    "FitConfig": "if_query.config",
    "QueryConfig": "if_query.config",
    "PlanConfig": "if_query.config",
    "IndexConfig": "if_query.config",
    "ReportConfig": "if_query.config",
    "QueryResults": "if_query.report.results",
    "JobOutcome": "if_query.run.outcomes",
    "format_summary": "if_query.report.summary",
    "IfQueryError": "if_query.errors",
    "InputError": "if_query.errors",
    "RunError": "if_query.errors",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'if_query' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
