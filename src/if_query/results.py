"""Scores -> the three normalized CSVs and run.json, written completely or not at all."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from if_query.atomic import staged_files
from if_query.provenance import RUN_FILE
from if_query.records import Example

if TYPE_CHECKING:
    from if_query.scorer import ScoredSet

QUERY_FILE, TRAIN_FILE, INFLUENCES_FILE = "query.csv", "train.csv", "influences.csv"
RESULT_FILES = (QUERY_FILE, TRAIN_FILE, INFLUENCES_FILE)  # everything write_results writes


@dataclass
class QueryResults:
    """Everything run-query writes for one (query set, train set)."""

    queries: pd.DataFrame
    train: pd.DataFrame
    influences: pd.DataFrame
    provenance: dict | None = None  # run.json (see if_query.provenance); None: not written


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


def make_results(queries: Sequence[Example], train: Sequence[Example], scored: ScoredSet,
                 labelled_counts: Sequence[int], train_tokens: Sequence[list[str]] | None) -> QueryResults:
    """The three tables of one job: ``scored`` holds one row per query record and one column per train
    record (:meth:`ScoredSet.select`), ``labelled_counts`` each query's number of labelled (predicted)
    tokens, ``train_tokens`` each train record's token strings (with per-token scores only)."""
    query_ids = [e.pair_id for e in queries]
    train_ids = [e.pair_id for e in train]
    losses = scored.query_losses.tolist()
    influences = {
        "query_id": [q for q in query_ids for _ in train_ids],
        "train_id": [t for _ in query_ids for t in train_ids],
        "influence_score": scored.scores.flatten().tolist(),
        "influence_cosine": scored.cosine().flatten().tolist(),
    }
    train_columns: dict[str, list] = {}
    if scored.per_token is not None:
        influences["per_token_scores"] = [json.dumps(values.tolist()) for row in scored.per_token for values in row]
        train_columns["tokens"] = [json.dumps(tokens, ensure_ascii=False) for tokens in train_tokens]
    return QueryResults(
        queries=examples_frame(queries, "query_id", {
            "loss": [loss / count for loss, count in zip(losses, labelled_counts, strict=True)],
            "loss_sum": losses,
        }),
        train=examples_frame(train, "train_id", train_columns),
        influences=pd.DataFrame(influences),
    )


def write_results(results: QueryResults, output_dir: str | Path) -> list[Path]:
    """Write the CSVs (and run.json when there is provenance) to temporary files, then move each into
    place only once all are written (a crash leaves the old results, none of the new files)."""
    output_dir = Path(output_dir)
    frames = {QUERY_FILE: results.queries, TRAIN_FILE: results.train, INFLUENCES_FILE: results.influences}
    names = list(frames) + ([RUN_FILE] if results.provenance is not None else [])
    with staged_files(output_dir, names) as temporaries:
        for frame, temporary in zip(frames.values(), temporaries, strict=False):
            frame.to_csv(temporary, index=False)
        if results.provenance is not None:
            with open(temporaries[-1], "w", encoding="utf-8") as file:
                json.dump(results.provenance, file, indent=2, ensure_ascii=False)
                file.write("\n")
    return [output_dir / name for name in names]


def read_results(output_dir: str | Path) -> QueryResults:
    """The results a run wrote into ``output_dir`` (ids and text read as strings, as written)."""
    output_dir = Path(output_dir)
    text = {"query_id": str, "train_id": str, "prompt": str, "completion": str}
    frames = [pd.read_csv(output_dir / name, dtype=text, keep_default_na=False) for name in RESULT_FILES]
    run_file = output_dir / RUN_FILE
    provenance = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else None
    return QueryResults(*frames, provenance=provenance)
