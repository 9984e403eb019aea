"""The jobs a run-query config names: each query folder's files (``query.json``, ``train.json``, ``results/``), or the
single-run mode's paths (or records a library caller gave in memory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from if_query.atomic import check_writable_dir
from if_query.config import QueryConfig
from if_query.data.records import Example, load_examples
from if_query.errors import InputError, about


@dataclass(frozen=True)
class QueryJob:
    """One unit of work: queries and a train side (train records, or the corpus) scored into a directory.

    Records come from a file, or are given in memory (``queries``/``train``, validated examples: a library caller's;
    their file is then None). ``output_dir`` None: the results are returned, not written (library callers)."""

    name: str
    query_json: Path | None
    train_json: Path | None  # None, and no train records: the train side is the --train-dataset corpus
    output_dir: Path | None
    queries: list[Example] | None = None
    train: list[Example] | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, corpus: bool = False) -> QueryJob:
        folder = Path(folder)
        return cls(str(folder), folder / "query.json", None if corpus else folder / "train.json", folder / "results")

    @property
    def has_train_records(self) -> bool:
        """Whether the train side is records (a file or in memory), not the corpus."""
        return self.train_json is not None or self.train is not None

    def query_examples(self) -> tuple[list[Example], str]:
        """The query records (read and validated from their file, or as given) and what errors call them."""
        return self._examples(self.queries, self.query_json, "queries")

    def train_examples(self) -> tuple[list[Example], str]:
        """The train records and what errors call them (only when :attr:`has_train_records`)."""
        return self._examples(self.train, self.train_json, "train")

    @staticmethod
    def _examples(given: list[Example] | None, path: Path | None, name: str) -> tuple[list[Example], str]:
        return (given, name) if given is not None else (load_examples(path), str(path))


def query_jobs(config: QueryConfig) -> list[QueryJob]:
    """The jobs a config names: one per query folder, or the single-run mode's one."""
    corpus = config.train_dataset is not None
    if config.folders:
        return [QueryJob.from_folder(folder, corpus) for folder in config.folders]
    return [QueryJob("query", config.query_json, config.train_json, config.output_dir, config.queries, config.train)]


def check_inputs(config: QueryConfig) -> None:
    """What a single run reads and writes, checked before torch is imported (InputError, one line): its records
    files (read and validated), the corpus's path and the output directory (when it writes). With query folders
    each folder's errors are its own and are found as it is prepared."""
    if config.folders:
        return
    for option in ("query_json", "train_json"):
        if (path := getattr(config, option)) is not None:
            with about(option):
                load_examples(path)
    if config.train_dataset is not None and not Path(config.train_dataset).exists():
        raise InputError(f"{config.train_dataset}: not found", option="train_dataset")
    if config.output_dir is not None:
        check_writable_dir(config.output_dir, "output_dir")
