"""JSON records -> validated examples.

A records file is a JSON list (or JSON Lines) of objects with a string ``pair_id`` and either string
fields ``prompt`` and ``completion``, or ``messages``: a conversation, a list of ``{"role", "content"}``
strings ending with an assistant turn (tokenized through the chat template: :mod:`if_query.data.chat`).
Every other field is carried through to the CSVs as ``extra``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from if_query.data.chat import Messages
from if_query.errors import InputError

REQUIRED_FIELDS = ("pair_id", "prompt", "completion")
CONVERSATION_FIELDS = ("pair_id", "messages")


@dataclass(frozen=True)
class Example:
    """One record; ``extra`` keeps the other JSON fields in file order. A conversation keeps its turns in
    ``messages`` ((role, content), ...), its last assistant turn as ``completion`` and an empty ``prompt``
    until the chat template renders it (:meth:`~if_query.data.tokenization.ExampleTokenizer.shown`)."""

    pair_id: str
    prompt: str
    completion: str
    extra: dict[str, Any] = field(default_factory=dict)
    messages: Messages | None = None


def messages_of(value: Any, where: str) -> Messages:
    """A record's ``messages``, checked: a non-empty list of {"role", "content"} strings ending with an assistant
    turn (the one a query is scored on)."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    turns = []
    for number, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise InputError(f"{where}: message {number} must be an object with string 'role' and 'content'")
        turns.append((turn["role"], turn["content"]))
    if turns[-1][0] != "assistant":
        raise InputError(f"{where}: the conversation must end with an assistant turn (the one scored), not "
                         f"{turns[-1][0]!r}")
    return tuple(turns)


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
        conversation = "messages" in record
        if conversation and ("prompt" in record or "completion" in record):
            raise InputError(f"{where}: give 'messages' or 'prompt' and 'completion', not both")
        required = CONVERSATION_FIELDS if conversation else REQUIRED_FIELDS
        for name in required:
            if name not in record:
                raise InputError(f"{where}: missing field {name!r}")
            if name != "messages" and not isinstance(record[name], str):
                raise InputError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
        if not record["pair_id"]:
            raise InputError(f"{where}: empty pair_id")
        messages = messages_of(record["messages"], where) if conversation else None
        if not (messages[-1][1] if conversation else record["completion"]):
            raise InputError(f"{where}: empty completion")
        pair_id = record["pair_id"]
        if pair_id in seen:
            raise InputError(f"{where}: duplicate pair_id (first seen at record {seen[pair_id]})")
        seen[pair_id] = index
        extra = {key: value for key, value in record.items() if key not in required}
        if conversation:
            examples.append(Example(pair_id, "", messages[-1][1], extra, messages))
        else:
            examples.append(Example(pair_id, record["prompt"], record["completion"], extra))
    return examples


def load_examples(path: str | Path) -> list[Example]:
    """Read and validate a ``.json`` (list) or ``.jsonl`` records file."""
    path = Path(path)
    return parse_records(_read_json_values(path), str(path))
