"""``run.json``: what produced a results directory (command, model, factors, damping, versions, date).

Written with the CSVs, atomically (see :func:`if_query.report.results.write_results`), and read back by
``if-query report`` so that a report regenerated later still names the model, strategy, factors and
damping.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from if_query.fit.metadata import package_versions

RUN_FILE = "run.json"
RUN_FORMAT = 1


def weights_fingerprint_of(metadata: dict | None) -> str | None:
    """The weights fingerprint the factors' metadata.json records (``fit.weights_fingerprint``), if any."""
    return ((metadata or {}).get("fit") or {}).get("weights_fingerprint")


def _float_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def run_provenance(*, command: list[str] | None, model: str, revision: str | None, factors_dir: str | Path,
                   metadata: dict | None, damping: float | None, resolved_damping: dict[str, Any] | None,
                   dtype: str, matmul_precision: str, max_length: int, eos_in_loss: bool, per_token_scores: bool,
                   chat_template: str | None = None,
                   query_json: str | Path | None, train_json: str | Path | None, plan: dict | None = None,
                   identity: dict | None = None, date: str | None = None, rank_by: str = "score") -> dict[str, Any]:
    """The ``run.json`` of one results directory.

    ``damping`` is the requested damping (None = auto); ``resolved_damping`` the damping each module
    actually used, when the scorer reports it (else ``damping_per_module`` is null); ``plan`` what the run's plan
    decided for the job (:meth:`if_query.plan.run_plan.JobPlan.describe`: budgets, chunks, ranks); ``identity`` what
    determines its numbers (:mod:`if_query.run.identity`), which ``--skip-done`` compares; ``rank_by`` the ranking
    of the summary, the report and --top-train (:mod:`if_query.report.ranking`), which a regenerated report reuses;
    ``query_json``/``train_json`` None: records a library caller gave in memory (recorded as null);
    ``chat_template`` the digest of the chat template the records were rendered with (None: none was).
    """
    fit = (metadata or {}).get("fit") or {}
    per_module = None
    if resolved_damping is not None:
        per_module = {str(name): _float_or_none(value) for name, value in resolved_damping.items()}
    argv = list(command) if command is not None else list(sys.argv)
    return {
        "format": RUN_FORMAT,
        "command": shlex.join(argv),
        "argv": argv,
        "model": model,
        "revision": revision,
        "weights_fingerprint": weights_fingerprint_of(metadata),
        "factors_dir": str(Path(factors_dir).resolve()),
        "strategy": fit.get("strategy"),
        "layer_stride": fit.get("layer_stride"),
        "track": fit.get("track", "mlp") if fit else None,  # which layers (fits that record none tracked the MLP)
        "damping": "auto" if damping is None else damping,
        "damping_per_module": per_module,
        "dtype": dtype,
        "matmul_precision": matmul_precision,
        "max_length": max_length,
        "eos_in_loss": eos_in_loss,
        "chat_template": chat_template,
        "per_token_scores": per_token_scores,
        "rank_by": rank_by,
        "query_json": None if query_json is None else str(Path(query_json).resolve()),
        "train_json": None if train_json is None else str(Path(train_json).resolve()),
        "plan": plan,
        "identity": identity,
        "versions": package_versions(),
        "date": date or datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def read_run(results_dir: str | Path) -> dict | None:
    """A results directory's run.json, or None when it has none or it is unreadable (older results)."""
    try:
        value = json.loads((Path(results_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def describe_damping(run: dict) -> str | None:
    """``auto`` or the number, with the range of the resolved per-module values when known."""
    damping = run.get("damping")
    if damping is None:
        return None
    if damping == "auto":
        text = "auto (0.1 × mean eigenvalue of each module)"
    elif isinstance(damping, (int, float)):
        text = f"{damping:g}"
    else:
        text = str(damping)
    per_module = run.get("damping_per_module")
    if isinstance(per_module, dict):
        values = [v for v in per_module.values() if isinstance(v, (int, float))]
        if values and damping == "auto":
            low, high = min(values), max(values)
            resolved = f"{low:.3g}" if low == high else f"{low:.3g} to {high:.3g}"
            text += f": {resolved} over {len(per_module)} modules"
    return text
