"""``metadata.json`` of a factors directory: what was fitted, on what, and whether it finished."""

from __future__ import annotations

import json
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

from if_query.atomic import write_text_atomic
from if_query.errors import InputError

METADATA_FILE = "metadata.json"
STATUS_FITTING = "fitting"
STATUS_COMPLETE = "complete"


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that readers see the old or the new file, never a partial one."""

    def write(file) -> None:
        json.dump(value, file, indent=2, ensure_ascii=False)
        file.write("\n")

    write_text_atomic(path, write)


def package_versions() -> dict[str, str]:
    names = ("if-query", "torch", "transformers", "datasets", "kronfluence")
    versions = {}
    for name in names:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def canonical_model(model: str) -> str:
    """A local model directory is identified by its absolute path, a hub model by its name."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def read_metadata(factors_dir: Path) -> dict:
    path = factors_dir / METADATA_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read factors metadata ({exc})") from exc


def load_complete_metadata(factors_dir: str | Path) -> dict:
    """The metadata of a finished fit in ``factors_dir``, or an InputError saying what is wrong with the directory
    (run-query reads it when it starts; :mod:`if_query.run.compatibility` checks the fit against the model)."""
    factors_dir = Path(factors_dir)
    if not factors_dir.is_dir():
        raise InputError(f"{factors_dir}: directory not found (run fit-hessians first)", option="factors_dir")
    if not (factors_dir / METADATA_FILE).is_file():
        raise InputError(f"{factors_dir}: no {METADATA_FILE}; not a fit-hessians output directory",
                         option="factors_dir")
    metadata = read_metadata(factors_dir)
    if metadata.get("status") != STATUS_COMPLETE:
        raise InputError(
            f"{factors_dir}: the fit never finished (status {metadata.get('status')!r}); "
            "rerun fit-hessians with the same arguments to complete it", option="factors_dir"
        )
    return metadata


def describe_mismatch(now: dict, before: dict) -> str:
    """The entries of ``now`` that differ from ``before``: 'key was A, now B; ...'."""
    keys = [key for key in now if now.get(key) != before.get(key)]
    return "; ".join(f"{key} was {before.get(key)!r}, now {now.get(key)!r}" for key in keys)
