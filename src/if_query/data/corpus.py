"""Training corpora (``--train-dataset``) -> windows of tokens, the train side of run-query.

Formats:
- a ``datasets.save_to_disk`` directory: ``input_ids`` (optional ``attention_mask``, read as fit-hessians reads
  it: only the attended block is kept; optional ``labels``: the loss is over the labelled tokens, every token
  when there are none); ``id`` names a row, other columns are carried as extra fields;
- a ``.jsonl`` or ``.parquet`` file of ``{"text": ...}`` documents (optional ``id`` and extra fields): each
  tokenized as the tokenizer encodes text (its BOS when it adds one), the EOS token appended, every token
  labelled; a document with ``messages`` instead of ``text`` is a conversation, tokenized through the chat
  template with every assistant turn labelled (:mod:`if_query.data.chat`);
- a flat ``.npy`` token array (uint16/uint32, the format OLMo's training data ships in): cut into
  consecutive sequences of ``--max-length`` tokens, named by their index.

A document longer than the token limit is cut into consecutive windows of that many tokens, each its own
train example named ``ID#k`` (k from 0). The corpus is read once per run (:meth:`Corpus.locate`: no model, before
any scoring): every document read and tokenized once, its windows' tokens written to an anonymous cache file, never
held in memory; :meth:`Corpus.windows` then reads chosen windows by range, :meth:`Corpus.rows` their train.csv rows
(``train_id``, an empty ``prompt``, the decoded ``completion``, extras), from the cache. :meth:`Corpus.save` keeps the
located windows in a directory (``if-query index`` keeps them with the index) and :meth:`Corpus.saved` reads them back
without reading a document, for the same bytes (:func:`file_digest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from if_query.data.records import messages_of
from if_query.data.tokenization import IGNORE_INDEX, ExampleTokenizer, TokenizedExample, bos_prefix
from if_query.errors import InputError

logger = logging.getLogger(__name__)
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
NPY_DTYPES = (np.uint16, np.uint32, np.int32, np.int64)
BATCH = 1024  # documents read (and tokenized) at a time
SAVED_FILES = {"tokens": "tokens.i32", "labels": "labels.i32", "extra": "extra.jsonl"}
SAVED_INDEX = "windows.json"


def file_digest(path: str | Path) -> str:
    """sha256 of a corpus's bytes: the file's, or a directory's files' (relative names included, in sorted order).
    Reading bytes is far cheaper than tokenizing them: it tells saved windows' corpus from another."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        name = str(file.relative_to(path) if path.is_dir() else "")
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())  # where one file ends and the next begins
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


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

    def __init__(self, path: str | Path, tokenizer: ExampleTokenizer, spill_dir: str | Path | None = None):
        self.path = Path(path)
        self.spill_dir = spill_dir
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
        self._cache: _TokenCache | None = None  # set by locate()
        self._ids: list[str] = []
        self.extra_keys: list[str] = []  # every extra field of the documents, in order first seen
        self.documents_read = 0  # documents read by locate() (each once)

    # --- documents, in order ---

    def _saved_dataset(self) -> Iterator[Document]:
        from if_query.data.hessian_data import open_saved_dataset, tokens_of_row

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
            texts = [r["text"] for r in batch if "messages" not in r]
            encoded = iter(text_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
            for record in batch:
                name = str(record["id"]) if "id" in record and record["id"] is not None else str(index)
                extra = {k: v for k, v in record.items() if k not in ("text", "messages", "id")}
                if "messages" in record:  # a conversation: through the chat template, every assistant turn labelled
                    where = f"{self.path}: document {index}"
                    tokens = self.tokenizer.conversation_tokens(messages_of(record["messages"], where), f"{where}: ")
                    yield Document(name, list(tokens.input_ids), list(tokens.labels), extra)
                else:
                    ids = bos + list(next(encoded)) + eos
                    yield Document(name, ids, ids, extra)
                index += 1
            batch.clear()

        for number, record in enumerate(records):
            if not isinstance(record, dict) or not (isinstance(record.get("text"), str) or "messages" in record):
                raise InputError(f"{self.path}: document {number} has no string field 'text' (nor 'messages')",
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

    # --- windows: located once, read by range ---

    def locate(self) -> None:
        """The one pass over the corpus: every document read and tokenized once, its windows' tokens appended to
        an anonymous cache file (int32; see :class:`_TokenCache`), their names, lengths and documents recorded,
        the documents' extra fields kept in another. Later reads (chunks, train.csv rows) are by range from the
        cache: no document is read or tokenized again, whatever the number of chunks. Logged; a no-op once done."""
        if self._cache is not None:
            return
        cache = _TokenCache(self.spill_dir)
        lengths, documents, keys, cut, skipped = [], [], {}, 0, 0
        for number, document in enumerate(self._documents()):
            pieces = range(0, len(document.input_ids), self.limit)
            cut += len(pieces) > 1
            extra_at = cache.add_extra(document.extra)
            for k, start in enumerate(pieces):
                labels = document.labels[start : start + self.limit]
                if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
                    skipped += 1  # one token, or nothing labelled: nothing to attribute
                    continue
                self._ids.append(f"{document.name}#{k}" if len(pieces) > 1 else document.name)
                cache.add(document.input_ids[start : start + self.limit], labels)
                lengths.append(len(labels))
                documents.append(extra_at)
            keys.update(dict.fromkeys(document.extra))
            self.documents_read = number + 1
        cache.close()
        if not lengths:  # checked before the cache is kept: a second locate() says it again
            raise InputError(f"{self.path}: no document has a token to attribute", option="train_dataset")
        self._cache, self.extra_keys = cache, list(keys)
        self._lengths = np.array(lengths, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)]).astype(np.int64)
        self._extra_at = np.array(documents, dtype=np.int64)
        logger.info("%s (%s): %d documents read once, %d train examples of at most %d tokens, %d tokens; %d documents "
                    "cut into windows%s", self.path, self.kind, self.documents_read, len(self._lengths), self.limit,
                    int(self._lengths.sum()), cut,
                    f"; {skipped} windows with nothing to predict skipped" if skipped else "")

    def save(self, directory: str | Path, read_from: str) -> None:
        """Keep the located windows (tokens, labels, extras, names) in ``directory``, with ``read_from``: the
        corpus's :func:`file_digest` taken before :meth:`locate` read it (bytes changed since then are not these
        windows'). Written beside, flushed to disk, then renamed into place."""
        if self._cache is None or self._cache.tokens_file is None:
            raise ValueError("save() keeps windows this corpus located itself")
        directory = Path(directory)
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        files = {"tokens": self._cache.tokens_file, "labels": self._cache.labels_file, "extra": self._cache.extra_file}
        for name, file in files.items():
            if file is not None:
                file.flush()
                file.seek(0)
                with open(partial / SAVED_FILES[name], "wb") as out:
                    shutil.copyfileobj(file, out)
                    out.flush()
                    os.fsync(out.fileno())
                file.seek(0, 2)
        with open(partial / SAVED_INDEX, "w", encoding="utf-8") as out:
            out.write(json.dumps({
                "file_digest": read_from, "digest": self._cache.digest, "kind": self.kind,
                "documents": self.documents_read, "extra_keys": self.extra_keys, "ids": self._ids,
                "lengths": self._lengths.tolist(), "extra_at": self._extra_at.tolist()}))
            out.flush()
            os.fsync(out.fileno())
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)

    @staticmethod
    def saved_digests(directory: str | Path) -> tuple[str, str] | None:
        """(the windows' :attr:`digest`, the bytes' :func:`file_digest`) of the windows kept in ``directory`` (None:
        none kept, or unreadable)."""
        try:
            kept = json.loads((Path(directory) / SAVED_INDEX).read_text())
            return kept["digest"], kept["file_digest"]
        except (OSError, ValueError, KeyError):
            return None

    @classmethod
    def saved(cls, directory: str | Path, path: str | Path, tokenizer: ExampleTokenizer) -> Corpus | None:
        """The corpus at ``path`` located from the windows :meth:`save` kept in ``directory``, no document read;
        None when nothing is kept there or ``path``'s bytes are not those the windows were cut from."""
        directory = Path(directory)
        corpus = cls(path, tokenizer)
        try:
            kept = json.loads((directory / SAVED_INDEX).read_text())
            if kept["file_digest"] != file_digest(path):
                return None
            tokens = 4 * sum(kept["lengths"])  # int32 files of exactly the windows' tokens, or none of this is read
            labels = directory / SAVED_FILES["labels"]
            if (directory / SAVED_FILES["tokens"]).stat().st_size != tokens or (
                    labels.exists() and labels.stat().st_size != tokens) or len(kept["ids"]) != len(kept["lengths"]):
                logger.warning("%s: the kept windows are incomplete; reading %s again", directory, path)
                return None
            corpus._cache = _TokenCache.opened(directory, kept["digest"])
        except (OSError, ValueError, KeyError):
            return None
        corpus._ids, corpus.extra_keys = kept["ids"], kept["extra_keys"]
        corpus._lengths = np.array(kept["lengths"], dtype=np.int64)
        corpus._offsets = np.concatenate([[0], np.cumsum(corpus._lengths)]).astype(np.int64)
        corpus._extra_at = np.array(kept["extra_at"], dtype=np.int64)
        logger.info("%s (%s): %d windows, %d tokens, read from %s (no document read)", corpus.path, corpus.kind,
                    len(corpus._lengths), int(corpus._lengths.sum()), directory)
        return corpus

    @property
    def digest(self) -> str:
        """sha256 of every window's tokens and labels, in order: what the corpus contributes to the scores."""
        self.locate()
        return self._cache.digest

    def lengths(self) -> np.ndarray:
        """Tokens of every window, (windows,) int64."""
        self.locate()
        return self._lengths

    def ids(self) -> list[str]:
        """Every window's train_id."""
        self.locate()
        return self._ids

    def windows(self, rows: Sequence[int]) -> list[TokenizedExample]:
        """The tokens of windows ``rows`` (any order), read from the cache by range."""
        self.locate()
        return [self._cache.window(int(self._offsets[r]), int(self._offsets[r + 1])) for r in rows]

    def rows(self, wanted: Callable[[int], bool] | None = None) -> Iterator[tuple[int, dict]]:
        """(index, train.csv row) of the wanted windows: train_id, an empty prompt, the decoded completion, extras."""
        self.locate()
        decode = self.tokenizer.tokenizer.decode
        for index in range(len(self._lengths)):
            if wanted is None or wanted(index):
                tokens = self._cache.window(int(self._offsets[index]), int(self._offsets[index + 1]))
                yield index, {"train_id": self._ids[index], "prompt": "", "completion": decode(list(tokens.input_ids)),
                              **self._cache.extra(int(self._extra_at[index]))}


class _TokenCache:
    """The windows' token ids (and labels, where a document labels fewer tokens than it has) as int32, and the
    documents' extra fields as JSON lines, in anonymous files in ``directory`` (the spill directory; the system's
    temp dir by default): written once while the corpus is read, then memory-mapped; gone with the process, even a
    killed one. 4 bytes per token (2 GB for 10^6 documents of 500 tokens; twice that with labels)."""

    def __init__(self, directory: str | Path | None):
        self._directory = Path(directory or tempfile.gettempdir())
        self._directory.mkdir(parents=True, exist_ok=True)
        self._files = {name: tempfile.TemporaryFile(dir=self._directory, prefix=f".if-query-corpus-{name}.")
                       for name in ("tokens", "extra")}
        self._labels = None  # a file of its own from the first window whose labels are not its tokens
        self._tokens = 0
        self._extra_bytes = 0
        self._hash = hashlib.sha256()
        self.tokens = self.labels = None

    def add(self, input_ids: Sequence[int], labels: Sequence[int]) -> None:
        ids = np.asarray(input_ids, dtype=np.int32)
        marks = np.asarray(labels, dtype=np.int32)
        if self._labels is None and not np.array_equal(ids, marks):
            self._labels = tempfile.TemporaryFile(dir=self._directory, prefix=".if-query-corpus-labels.")
            self._files["tokens"].flush()
            self._files["tokens"].seek(0)
            shutil.copyfileobj(self._files["tokens"], self._labels)  # every earlier window labels its tokens
            self._files["tokens"].seek(0, 2)
        self._files["tokens"].write(ids.tobytes())
        if self._labels is not None:
            self._labels.write(marks.tobytes())
        self._hash.update(np.array([len(ids)], dtype=np.int64).tobytes() + ids.tobytes() + marks.tobytes())
        self._tokens += len(ids)

    def add_extra(self, extra: dict) -> int:
        """Stores a document's extra fields; their offset (-1: none)."""
        if not extra:
            return -1
        line = (json.dumps(extra, ensure_ascii=False, default=_cell) + "\n").encode("utf-8")
        at = self._extra_bytes
        self._files["extra"].write(line)
        self._extra_bytes += len(line)
        return at

    @property
    def tokens_file(self):
        return self._files.get("tokens")  # None for a cache opened from kept files

    @property
    def labels_file(self):
        return self._labels

    @property
    def extra_file(self):
        return self._files["extra"]

    @classmethod
    def opened(cls, directory: Path, digest: str) -> _TokenCache:
        """The cache :meth:`Corpus.save` kept in ``directory``, mapped for reading."""
        cache = cls.__new__(cls)
        cache._directory, cache.digest = directory, digest
        cache._files = {"extra": open(directory / SAVED_FILES["extra"], "rb")}
        size = (directory / SAVED_FILES["tokens"]).stat().st_size // 4
        cache._tokens, cache._extra_bytes, cache._hash = size, 0, None
        cache.tokens = np.memmap(directory / SAVED_FILES["tokens"], np.int32, "r", shape=(size,)) if size else None
        labels = directory / SAVED_FILES["labels"]
        cache._labels = None
        cache.labels = np.memmap(labels, np.int32, "r", shape=(size,)) if labels.exists() and size else None
        return cache

    def close(self) -> None:
        """Writing is over: map the token files."""
        self.digest = self._hash.hexdigest()
        for file in (*self._files.values(), *([self._labels] if self._labels is not None else [])):
            file.flush()
        if self._tokens:
            self.tokens = np.memmap(self._files["tokens"], np.int32, "r", shape=(self._tokens,))
            if self._labels is not None:
                self.labels = np.memmap(self._labels, np.int32, "r", shape=(self._tokens,))

    def window(self, start: int, stop: int) -> TokenizedExample:
        ids = tuple(self.tokens[start:stop].tolist())
        return TokenizedExample(ids, ids if self.labels is None else tuple(self.labels[start:stop].tolist()))

    def extra(self, at: int) -> dict:
        if at < 0:
            return {}
        file = self._files["extra"]
        file.seek(at)
        return json.loads(file.readline().decode("utf-8"))
