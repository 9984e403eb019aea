"""JSON records -> validated examples.

A records file is a JSON list (or JSON Lines) of objects with string fields ``pair_id``,
``prompt`` and ``completion``; every other field is carried through to the CSVs as ``extra``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from if_query.errors import InputError

REQUIRED_FIELDS = ("pair_id", "prompt", "completion")


@dataclass(frozen=True)
class Example:
    """One prompt/completion record; ``extra`` keeps the other JSON fields in file order."""

    pair_id: str
    prompt: str
    completion: str
    extra: dict[str, Any] = field(default_factory=dict)


def _read_json_values(path: Path) -> Any:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read file ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as first_error:
        # Not one JSON document: try JSON Lines (one object per non-blank line).
        values = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError:
                if path.suffix == ".jsonl" or line_number > 1:
                    raise InputError(f"{path}: invalid JSON Lines at line {line_number}") from None
                raise InputError(
                    f"{path}: invalid JSON at line {first_error.lineno} column {first_error.colno}: "
                    f"{first_error.msg}"
                ) from None
        return values


def _describe(index: int, record: Any) -> str:
    pair_id = record.get("pair_id") if isinstance(record, dict) else None
    return f"record {index}" + (f" (pair_id {pair_id!r})" if isinstance(pair_id, str) and pair_id else "")


def parse_records(values: Any, source: str) -> list[Example]:
    """Validate a list of JSON objects and turn them into examples."""
    if not isinstance(values, list):
        raise InputError(f"{source}: expected a JSON list of objects, got {type(values).__name__}")
    if not values:
        raise InputError(f"{source}: no records")
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(values):
        where = f"{source}: {_describe(index, record)}"
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in REQUIRED_FIELDS:
            if name not in record:
                raise InputError(f"{where}: missing field {name!r}")
            if not isinstance(record[name], str):
                raise InputError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
        if not record["pair_id"]:
            raise InputError(f"{where}: empty pair_id")
        if not record["completion"]:
            raise InputError(f"{where}: empty completion")
        pair_id = record["pair_id"]
        if pair_id in seen:
            raise InputError(f"{where}: duplicate pair_id (first seen at record {seen[pair_id]})")
        seen[pair_id] = index
        extra = {key: value for key, value in record.items() if key not in REQUIRED_FIELDS}
        examples.append(Example(pair_id, record["prompt"], record["completion"], extra))
    return examples


def load_examples(path: str | Path) -> list[Example]:
    """Read and validate a ``.json`` (list) or ``.jsonl`` records file."""
    path = Path(path)
    return parse_records(_read_json_values(path), str(path))
