"""Scores -> the three normalized CSVs, written completely or not at all."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from if_query.atomic import staged_files
from if_query.records import Example

QUERY_FILE, TRAIN_FILE, INFLUENCES_FILE = "query.csv", "train.csv", "influences.csv"


@dataclass
class QueryResults:
    """Everything run-query writes for one (query set, train set)."""

    queries: pd.DataFrame
    train: pd.DataFrame
    influences: pd.DataFrame


def _cell(value: Any) -> Any:
    """Scalars stay as they are; lists, dicts and None are JSON-encoded (None as empty)."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return value


def examples_frame(examples: Sequence[Example], id_column: str, columns: dict[str, list]) -> pd.DataFrame:
    """``id, prompt, completion, *columns, *extra``; an extra field named like a standard column is
    written as ``extra_<name>``."""
    frame: dict[str, list] = {
        id_column: [e.pair_id for e in examples],
        "prompt": [e.prompt for e in examples],
        "completion": [e.completion for e in examples],
        **columns,
    }
    extra_keys: list[str] = []
    for example in examples:
        extra_keys.extend(key for key in example.extra if key not in extra_keys)
    for key in extra_keys:
        name = key if key not in frame else f"extra_{key}"
        while name in frame:
            name = f"extra_{name}"
        frame[name] = [_cell(e.extra.get(key)) for e in examples]
    return pd.DataFrame(frame)


def write_results(results: QueryResults, output_dir: str | Path) -> list[Path]:
    """Write the CSVs to temporary files, then move each into place (a crash leaves old results)."""
    output_dir = Path(output_dir)
    frames = {QUERY_FILE: results.queries, TRAIN_FILE: results.train, INFLUENCES_FILE: results.influences}
    with staged_files(output_dir, list(frames)) as temporaries:
        for frame, temporary in zip(frames.values(), temporaries, strict=True):
            frame.to_csv(temporary, index=False)
    return [output_dir / name for name in (QUERY_FILE, TRAIN_FILE, INFLUENCES_FILE)]
