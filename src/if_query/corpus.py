"""Training corpora (``--train-dataset``) -> windows of tokens, the train side of run-query.

Formats:
- a ``datasets.save_to_disk`` directory: ``input_ids`` (optional ``attention_mask``, read as fit-hessians reads
  it: only the attended block is kept; optional ``labels``: the loss is over the labelled tokens, every token
  when there are none); ``id`` names a row, other columns are carried as extra fields;
- a ``.jsonl`` or ``.parquet`` file of ``{"text": ...}`` documents (optional ``id`` and extra fields): each
  tokenized as the tokenizer encodes text (its BOS when it adds one), the EOS token appended, every token
  labelled;
- a flat ``.npy`` token array (uint16/uint32, the format OLMo's training data ships in): cut into
  consecutive sequences of ``--max-length`` tokens, named by their index.

A document longer than the token limit is cut into consecutive windows of that many tokens, each its own
train example named ``ID#k`` (k from 0). Windows are read in order, as often as needed and never all at once:
:meth:`Corpus.lengths` makes one pass (no model), :meth:`Corpus.windows` streams the tokens of chosen windows,
:meth:`Corpus.rows` their train.csv rows (``train_id``, an empty ``prompt``, the decoded ``completion``, extras).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from if_query.errors import InputError
from if_query.tokenization import IGNORE_INDEX, ExampleTokenizer, TokenizedExample, bos_prefix

logger = logging.getLogger(__name__)
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
NPY_DTYPES = (np.uint16, np.uint32, np.int32, np.int64)
BATCH = 1024  # documents read (and tokenized) at a time


@dataclass
class Document:
    """One document: its name, its tokens and labels, and the fields carried into train.csv."""

    name: str
    input_ids: list[int]
    labels: list[int]
    extra: dict[str, Any]


def _cell(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value.tolist() if isinstance(value, np.ndarray) \
        else value


class Corpus:
    """A training corpus read as windows of at most ``tokenizer.max_length`` tokens (see the module docstring)."""

    def __init__(self, path: str | Path, tokenizer: ExampleTokenizer):
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.limit = tokenizer.max_length
        if not self.path.exists():
            raise InputError(f"{self.path}: not found", option="train_dataset")
        suffix = self.path.suffix.lower()
        if self.path.is_dir():
            self._documents, self.kind = self._saved_dataset, "saved dataset"
        elif suffix == ".jsonl":
            self._documents, self.kind = self._jsonl, "JSON Lines documents"
        elif suffix == ".parquet":
            self._documents, self.kind = self._parquet, "Parquet documents"
        elif suffix == ".npy":
            self._documents, self.kind = self._npy, "token array"
        else:
            raise InputError(f"{self.path}: expected a save_to_disk directory, a .jsonl or .parquet "
                             "file of text documents, or a .npy token array", option="train_dataset")
        self._lengths: np.ndarray | None = None
        self._ids: list[str] = []
        self.extra_keys: list[str] = []  # every extra field of the documents, in order first seen

    # --- documents, in order ---

    def _saved_dataset(self) -> Iterator[Document]:
        from if_query.hessian_data import open_saved_dataset, tokens_of_row

        dataset = open_saved_dataset(self.path, f"--train-dataset {self.path}")
        index = 0
        for batch in dataset.with_format("numpy").iter(batch_size=BATCH):
            for offset in range(len(batch["input_ids"])):
                row = {name: batch[name][offset] for name in batch}
                tokens = tokens_of_row(row, index, str(self.path))
                extra = {k: _cell(v) for k, v in row.items() if k not in (*TOKEN_COLUMNS, "id")}
                name = str(_cell(row["id"])) if "id" in row else str(index)
                yield Document(name, list(tokens.input_ids), list(tokens.labels), extra)
                index += 1

    def _text_documents(self, records: Iterator[dict]) -> Iterator[Document]:
        text_tokenizer = self.tokenizer.tokenizer
        bos, eos = bos_prefix(text_tokenizer), [text_tokenizer.eos_token_id]
        batch: list[dict] = []
        index = 0

        def flush() -> Iterator[Document]:
            nonlocal index
            encoded = text_tokenizer([r["text"] for r in batch], add_special_tokens=False)["input_ids"]
            for record, ids in zip(batch, encoded, strict=True):
                tokens = bos + list(ids) + eos
                name = str(record["id"]) if "id" in record and record["id"] is not None else str(index)
                extra = {k: v for k, v in record.items() if k not in ("text", "id")}
                yield Document(name, tokens, tokens, extra)
                index += 1
            batch.clear()

        for number, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"{self.path}: document {number} has no string field 'text'",
                                 option="train_dataset")
            batch.append(record)
            if len(batch) == BATCH:
                yield from flush()
        if batch:
            yield from flush()

    def _jsonl(self) -> Iterator[Document]:
        def records() -> Iterator[dict]:
            with open(self.path, encoding="utf-8") as file:
                for number, line in enumerate(file, start=1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            raise InputError(f"{self.path}: invalid JSON at line {number}",
                                             option="train_dataset") from None

        return self._text_documents(records())

    def _parquet(self) -> Iterator[Document]:
        import pyarrow.parquet as pq

        def records() -> Iterator[dict]:
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=BATCH):
                yield from batch.to_pylist()

        return self._text_documents(records())

    def _npy(self) -> Iterator[Document]:
        tokens = np.load(self.path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype not in NPY_DTYPES:
            raise InputError(f"{self.path}: expected a flat array of uint16/uint32 token ids, got "
                             f"{tokens.dtype} of shape {tokens.shape}", option="train_dataset")
        for number, start in enumerate(range(0, len(tokens), self.limit)):
            ids = tokens[start : start + self.limit].astype(np.int64).tolist()
            yield Document(str(number), ids, ids, {})

    # --- windows ---

    def _windows(self) -> Iterator[tuple[str, TokenizedExample, dict]]:
        """(train_id, tokens, extra) of every window with something to predict, in order."""
        cut = skipped = 0
        for document in self._documents():
            pieces = range(0, len(document.input_ids), self.limit)
            cut += len(pieces) > 1
            for k, start in enumerate(pieces):
                labels = document.labels[start : start + self.limit]
                if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
                    skipped += 1  # one token, or nothing labelled: nothing to attribute
                    continue
                name = f"{document.name}#{k}" if len(pieces) > 1 else document.name
                yield name, TokenizedExample(tuple(document.input_ids[start : start + self.limit]),
                                             tuple(labels)), document.extra
        self._cut, self._skipped = cut, skipped

    def lengths(self) -> np.ndarray:
        """Tokens of every window, (windows,) int64; one pass over the corpus (logged)."""
        if self._lengths is None:
            lengths, self._ids, keys = [], [], {}
            for name, tokens, extra in self._windows():
                lengths.append(len(tokens))
                self._ids.append(name)
                keys.update(dict.fromkeys(extra))
            self._lengths, self.extra_keys = np.array(lengths, dtype=np.int64), list(keys)
            if not len(self._lengths):
                raise InputError(f"{self.path}: no document has a token to attribute", option="train_dataset")
            logger.info("%s (%s): %d train examples of at most %d tokens, %d tokens; %d documents cut into windows"
                        "%s", self.path, self.kind, len(self._lengths), self.limit, int(self._lengths.sum()),
                        self._cut, f"; {self._skipped} windows with nothing to predict skipped" if self._skipped
                        else "")
        return self._lengths

    def windows(self, wanted: Callable[[int], bool] | None = None) -> Iterator[tuple[int, TokenizedExample]]:
        """(index, tokens) of the windows ``wanted`` accepts (all by default), in order."""
        for index, (_, tokens, _) in enumerate(self._windows()):
            if wanted is None or wanted(index):
                yield index, tokens

    def ids(self) -> list[str]:
        """Every window's train_id (read by the :meth:`lengths` pass)."""
        self.lengths()
        return self._ids

    def rows(self, wanted: Callable[[int], bool] | None = None) -> Iterator[tuple[int, dict]]:
        """(index, train.csv row) of the wanted windows: train_id, an empty prompt, the decoded completion, extras."""
        decode = self.tokenizer.tokenizer.decode
        for index, (name, tokens, extra) in enumerate(self._windows()):
            if wanted is None or wanted(index):
                yield index, {"train_id": name, "prompt": "", "completion": decode(list(tokens.input_ids)), **extra}
