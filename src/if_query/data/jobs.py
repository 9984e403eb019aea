"""The jobs a run-query config names: each query folder's files (``query.json``, ``train.json``, ``results/``), or the
single-run mode's three paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from if_query.atomic import check_writable_dir
from if_query.config import QueryConfig
from if_query.data.records import load_examples
from if_query.errors import InputError


@dataclass(frozen=True)
class QueryJob:
    """One unit of work: a query file and a train side (a train file, or the corpus) scored into a directory."""

    name: str
    query_json: Path
    train_json: Path | None  # None: the train side is the --train-dataset corpus
    output_dir: Path

    @classmethod
    def from_folder(cls, folder: str | Path, corpus: bool = False) -> QueryJob:
        folder = Path(folder)
        return cls(str(folder), folder / "query.json", None if corpus else folder / "train.json", folder / "results")


def query_jobs(config: QueryConfig) -> list[QueryJob]:
    """The jobs a config names: one per query folder, or the single-run mode's one."""
    corpus = config.train_dataset is not None
    if config.folders:
        return [QueryJob.from_folder(folder, corpus) for folder in config.folders]
    return [QueryJob("query", config.query_json, config.train_json, config.output_dir)]


def check_inputs(config: QueryConfig) -> None:
    """What a single run reads and writes, checked before torch is imported (InputError, one line): its records
    files (read and validated), the corpus's path and the output directory. With query folders each folder's
    errors are its own and are found as it is prepared."""
    if config.folders:
        return
    for path in (config.query_json, config.train_json):
        if path is not None:
            load_examples(path)
    if config.train_dataset is not None and not Path(config.train_dataset).exists():
        raise InputError(f"{config.train_dataset}: not found", option="train_dataset")
    check_writable_dir(config.output_dir, "output_dir")
