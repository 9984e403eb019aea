"""Scores -> the three CSVs and run.json, streamed and written completely or not at all.

:class:`ResultTable` is one job's results before they are written: the query records and their losses, the
train side (records or a corpus, read row by row), the scores (queries, train) with the self-influences behind
``influence_cosine``, and with ``--top-train`` the train examples kept for each query. :func:`write_results`
streams ``query.csv``, ``train.csv`` and ``influences.csv`` (query-major, one row per written pair; no frame of
every pair is ever built) into temporary files beside their names and moves them, then ``run.json``, into place
only when all are written. :meth:`ResultTable.summary` is what the terminal summary reads; :func:`read_results`
is the one reader of written results (the summary of another rank's folder, report.html): frames of the three
CSVs, checked, with the per-token scores left on disk until :meth:`QueryResults.per_token_scores` asks for some.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from if_query.atomic import staged_files
from if_query.data.records import Example
from if_query.errors import InputError, first_line
from if_query.report import ranking
from if_query.report.provenance import RUN_FILE, read_run

if TYPE_CHECKING:  # pandas is imported where a table is built, not with the run-query path
    import pandas as pd

    from if_query.score.scored import ScoredSet

QUERY_FILE, TRAIN_FILE, INFLUENCES_FILE = "query.csv", "train.csv", "influences.csv"
RESULT_FILES = (QUERY_FILE, TRAIN_FILE, INFLUENCES_FILE)  # everything write_results writes
REPORT_FILE = "report.html"  # the page of the results beside it (--report, if-query report)
REPORT_TITLE = "Influence report"  # its <title>, which tells if-query's page from another file of that name
TRAIN_COLUMNS = ("train_id", "prompt", "completion")
REQUIRED_COLUMNS = {
    QUERY_FILE: ("query_id", "prompt", "completion"),
    TRAIN_FILE: TRAIN_COLUMNS,
    INFLUENCES_FILE: ("query_id", "train_id", "influence_score"),
}
NUMERIC_COLUMNS = {QUERY_FILE: ("loss", "loss_sum"), INFLUENCES_FILE: ("influence_score", "influence_cosine")}
PER_TOKEN_COLUMN = "per_token_scores"
CHUNK_ROWS = 200_000  # rows of influences.csv read at a time when collecting per-token scores


@dataclass
class QueryResults:
    """One job's results as frames, with the CSVs' columns (the Python API returns it; the terminal summary and the
    report read it): every row (``run_query``'s default, ``Attributor.score``, :func:`read_results`) or a summary's.

    - ``queries``: one row per query record: ``query_id``, ``prompt``, ``completion``, ``loss`` (mean cross-entropy
      per predicted completion token, nats), ``loss_sum`` (their sum: the loss attributed), extra fields.
    - ``train``: one row per train example written: ``train_id``, ``prompt``, ``completion``, ``tokens`` (with
      per-token scores: JSON text), extra fields.
    - ``influences``: one row per (query, train) pair written, query-major: ``query_id``, ``train_id``,
      ``influence_score``, ``influence_cosine`` (in [-1, 1]; unless --no-cosine), ``per_token_scores`` (JSON text).
    """

    queries: pd.DataFrame
    train: pd.DataFrame
    influences: pd.DataFrame
    provenance: dict | None = None  # run.json (see if_query.report.provenance); None: not written
    per_token_file: Path | None = None  # read_results: influences.csv, whose per_token_scores it left out

    @property
    def has_cosine(self) -> bool:
        """Whether ``influences`` has an influence_cosine column."""
        return "influence_cosine" in self.influences.columns

    @property
    def has_per_token(self) -> bool:
        """Whether there are per-token scores (in ``influences``, or left in ``per_token_file``)."""
        return self.per_token_file is not None or PER_TOKEN_COLUMN in self.influences.columns

    def per_token_scores(self, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """{(query_id, train_id): its raw per_token_scores cell (JSON text)} for those of ``pairs`` that have one;
        read from ``per_token_file`` a chunk at a time when read_results left them there."""
        import pandas as pd

        if not self.has_per_token or not pairs:
            return {}
        found: dict[tuple[str, str], str] = {}
        try:
            chunks: Iterable[pd.DataFrame] = [self.influences] if self.per_token_file is None else pd.read_csv(
                self.per_token_file, keep_default_na=False, usecols=["query_id", "train_id", PER_TOKEN_COLUMN],
                dtype=str, chunksize=CHUNK_ROWS)
            for chunk in chunks:
                for query_id, train_id, cell in zip(chunk["query_id"], chunk["train_id"], chunk[PER_TOKEN_COLUMN],
                                                    strict=True):
                    if (query_id, train_id) in pairs:
                        found[(query_id, train_id)] = cell
        except (OSError, pd.errors.ParserError, ValueError) as exc:
            raise InputError(f"{self.per_token_file}: cannot read per-token scores ({exc})") from exc
        return found


def _cell(value: Any) -> Any:
    """Scalars stay as they are; lists, dicts and None are JSON-encoded (None as empty)."""
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return value


def extra_columns(standard: Sequence[str], keys: Iterable[str]) -> dict[str, str]:
    """{extra field: its column}: an extra field named like a standard column is written as ``extra_<name>``."""
    taken, columns = set(standard), {}
    for key in keys:
        name = key
        while name in taken:
            name = f"extra_{name}"
        taken.add(name)
        columns[key] = name
    return columns


def extra_keys(examples: Iterable[Example]) -> list[str]:
    keys: list[str] = []
    for example in examples:
        keys.extend(key for key in example.extra if key not in keys)
    return keys


@dataclass
class TrainSide:
    """The train examples as train.csv writes them: ids, and rows read on demand (records or a corpus)."""

    ids: list[str]
    rows: Callable[[Callable[[int], bool] | None], Iterator[tuple[int, dict]]]  # (index, {field: value})
    extra_keys: list[str]

    @classmethod
    def of_records(cls, examples: Sequence[Example]) -> TrainSide:
        def rows(wanted=None):
            for index, e in enumerate(examples):
                if wanted is None or wanted(index):
                    yield index, {"train_id": e.pair_id, "prompt": e.prompt, "completion": e.completion, **e.extra}

        return cls([e.pair_id for e in examples], rows, extra_keys(examples))


@dataclass
class ResultTable:
    """One job's results, unwritten (see the module docstring)."""

    queries: list[Example]
    labelled: list[int]  # each query's predicted (labelled) tokens
    train: TrainSide
    scored: ScoredSet  # one row per query record, one column per train example
    kept: list[np.ndarray] | None = None  # --top-train: the train indices kept for each query
    tokens: Callable[[int], list[str]] | None = None  # with per-token scores: a train example's token pieces
    # (one per token, "" inside a split character: if_query.data.token_text)
    provenance: dict | None = None

    def written(self, query: int) -> np.ndarray:
        """The train indices of ``query``'s rows in influences.csv."""
        return np.arange(len(self.train.ids)) if self.kept is None else self.kept[query]

    def query_frame(self) -> pd.DataFrame:
        import pandas as pd

        losses = self.scored.query_losses.tolist()
        frame: dict[str, list] = {
            "query_id": [e.pair_id for e in self.queries], "prompt": [e.prompt for e in self.queries],
            "completion": [e.completion for e in self.queries],
            "loss": [loss / count for loss, count in zip(losses, self.labelled, strict=True)], "loss_sum": losses}
        for key, column in extra_columns(frame, extra_keys(self.queries)).items():
            frame[column] = [_cell(e.extra.get(key)) for e in self.queries]
        return pd.DataFrame(frame)

    def _train_header(self) -> tuple[list[str], dict[str, str]]:
        standard = [*TRAIN_COLUMNS, *(["tokens"] if self.tokens is not None else [])]
        extras = extra_columns(standard, self.train.extra_keys)
        return standard + list(extras.values()), extras

    def train_rows(self, wanted: Callable[[int], bool] | None = None) -> Iterator[list]:
        """train.csv's rows (every train example, or those ``wanted`` accepts)."""
        _, extras = self._train_header()
        for index, row in self.train.rows(wanted):
            cells = [row["train_id"], row["prompt"], row["completion"]]
            if self.tokens is not None:
                cells.append(json.dumps(self.tokens(index), ensure_ascii=False))
            yield cells + [_cell(row.get(key)) for key in extras]

    def influence_header(self) -> list[str]:
        return (["query_id", "train_id", "influence_score"]
                + (["influence_cosine"] if self.scored.query_self is not None else [])
                + (["per_token_scores"] if self.scored.per_token is not None else []))

    def influence_rows(self, selection: Iterable[tuple[int, Sequence[int]]] | None = None) -> Iterator[list]:
        """influences.csv's rows, query-major: every written pair, or the (query, train indices) of ``selection``."""
        scores, cosine = self.scored.scores.numpy(), self.scored.cosine()
        cosine = None if cosine is None else cosine.numpy()
        ids = self.train.ids
        if selection is None:
            selection = ((q, self.written(q).tolist()) for q in range(len(self.queries)))
        for q, train in selection:
            query_id = self.queries[q].pair_id
            for t in train:
                row = [query_id, ids[t], float(scores[q, t])]
                if cosine is not None:
                    row.append(float(cosine[q, t]))
                if self.scored.per_token is not None:
                    row.append(json.dumps(self.scored.per_token[q, t].tolist()))
                yield row

    def summary(self, top_k: int) -> QueryResults:
        """The rows the terminal summary shows (each query's ``top_k`` most helpful and harmful, by
        :mod:`if_query.report.ranking` and the run.json's ``rank_by``), as small frames."""
        import pandas as pd

        cosine = self.scored.cosine() if ranking.rank_by_of(self.provenance) == "cosine" else None
        values = (self.scored.scores if cosine is None else cosine).numpy()
        shown: dict[int, list[int]] = {}
        for q in range(len(self.queries)):
            written = self.written(q)
            helpful, harmful = ranking.helpful_and_harmful(values[q, written], [self.train.ids[t] for t in written],
                                                           top_k)
            shown[q] = [int(written[i]) for i in (*helpful, *harmful)]
        header = self.influence_header()
        rows = list(self.influence_rows(shown.items()))
        needed = {t for ts in shown.values() for t in ts}
        train_header, _ = self._train_header()
        train = pd.DataFrame(list(self.train_rows(needed.__contains__)), columns=train_header)
        return QueryResults(self.query_frame(), train, pd.DataFrame(rows, columns=header), self.provenance)

    @property
    def influences(self) -> pd.DataFrame:
        """Every written row as a frame (folder-sized results: benchmarks and tests)."""
        import pandas as pd

        return pd.DataFrame(list(self.influence_rows()), columns=self.influence_header())

    def frames(self) -> QueryResults:
        import pandas as pd

        train_header, _ = self._train_header()
        wanted = None if self.kept is None else set(np.concatenate(self.kept).tolist()).__contains__
        return QueryResults(self.query_frame(), pd.DataFrame(list(self.train_rows(wanted)), columns=train_header),
                            self.influences, self.provenance)


def _write_csv(path: Path, header: list[str], rows: Iterable[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_results(results: ResultTable, output_dir: str | Path) -> list[Path]:
    """Write the CSVs (and run.json when there is provenance) to temporary files, then move each into
    place only once all are written (a crash leaves the old results, none of the new files); a report.html of the
    results they replace is removed (the caller writes the new results' page where it is asked for), never another
    file of that name."""
    output_dir = Path(output_dir)
    names = [*RESULT_FILES, *([RUN_FILE] if results.provenance is not None else [])]
    kept = None if results.kept is None else set(np.concatenate(results.kept).tolist()) if results.kept else set()
    with staged_files(output_dir, names) as temporaries:
        results.query_frame().to_csv(temporaries[0], index=False)
        _write_csv(temporaries[1], results._train_header()[0],
                   results.train_rows(None if kept is None else kept.__contains__))
        _write_csv(temporaries[2], results.influence_header(), results.influence_rows())
        if results.provenance is not None:
            with open(temporaries[3], "w", encoding="utf-8") as file:
                json.dump(results.provenance, file, indent=2, ensure_ascii=False)
                file.write("\n")
        if _is_report(output_dir / REPORT_FILE):  # an earlier run's page, of results about to be replaced
            (output_dir / REPORT_FILE).unlink()
    return [output_dir / name for name in names]


def _is_report(path: Path) -> bool:
    """Whether ``path`` is a page if-query wrote (its title, near the start), not a file of the user's."""
    try:
        with open(path, "rb") as file:
            return f"<title>{REPORT_TITLE}:".encode() in file.read(1024)
    except OSError:
        return False


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` of a results file, empty cells kept as text; InputError (one line) when it cannot be read."""
    import pandas as pd

    try:
        return pd.read_csv(path, keep_default_na=False, **kwargs)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({first_line(exc)})") from exc


def _checked_columns(output_dir: Path) -> dict[str, list[str]]:
    """{result file: its columns}, once every file is found and has its required columns (else InputError)."""
    if not output_dir.is_dir():
        raise InputError(f"{output_dir}: results directory not found (run run-query first)")
    for name in RESULT_FILES:
        if not (output_dir / name).is_file():
            raise InputError(f"{output_dir / name}: file not found; not a complete run-query results directory")
    columns = {name: list(_read_csv(output_dir / name, nrows=0).columns) for name in RESULT_FILES}
    for name in RESULT_FILES:
        missing = [c for c in REQUIRED_COLUMNS[name] if c not in columns[name]]
        if missing:
            raise InputError(f"{output_dir / name}: missing column(s) {', '.join(missing)}; not a run-query "
                             "results file")
    return columns


def _numeric(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """``frame`` (read from result file ``name``) with its numeric columns as floats (unparsable cells: NaN)."""
    import pandas as pd

    for column in NUMERIC_COLUMNS.get(name, ()):
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


def read_results(output_dir: str | Path) -> QueryResults:
    """The results a run wrote into ``output_dir``: query.csv and train.csv with every cell as the text written
    (extras too) but the losses (floats); influences.csv with ids as text and the scores as floats, without its
    per_token_scores (the bulk of the file: :meth:`QueryResults.per_token_scores` reads the pairs asked for);
    run.json's provenance (None when missing or unreadable). InputError when a CSV is missing, unreadable or lacks
    a required column."""
    output_dir = Path(output_dir)
    columns = _checked_columns(output_dir)
    queries, train = (_numeric(_read_csv(output_dir / name, dtype=str), name) for name in (QUERY_FILE, TRAIN_FILE))
    kept = [c for c in columns[INFLUENCES_FILE] if c != PER_TOKEN_COLUMN]
    influences = _read_csv(output_dir / INFLUENCES_FILE, usecols=kept,
                           dtype={c: str for c in ("query_id", "train_id")})
    per_token = output_dir / INFLUENCES_FILE if PER_TOKEN_COLUMN in columns[INFLUENCES_FILE] else None
    return QueryResults(queries, train, _numeric(influences, INFLUENCES_FILE), read_run(output_dir), per_token)
