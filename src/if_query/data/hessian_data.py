"""The data the Hessian factors are fitted on.

Either a dataset saved with ``datasets.Dataset.save_to_disk`` (``input_ids`` and optionally
``attention_mask`` and ``labels``; padded on the left or the right, or ragged), or a ``.json`` /
``.jsonl`` file of prompt/completion records tokenized exactly as ``run-query`` tokenizes them.

A saved row keeps only its attended tokens (the one contiguous block of ones of its
``attention_mask``): padding is stripped whichever side it is on, and batches are re-padded on the
right to their own longest sequence, so left- and right-padded copies of a dataset fit the same
factors. Labels stay aligned with the kept tokens (the task predicts ``labels[t]`` from position
``t - 1``, so the first kept label is never predicted).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from if_query.data.records import load_examples
from if_query.data.tokenization import IGNORE_INDEX, ExampleTokenizer, TokenizedExample
from if_query.errors import InputError

logger = logging.getLogger(__name__)


def tokens_of_row(row: dict, index: int, source: str) -> TokenizedExample:
    """The real tokens of one saved row: the attended block of ``attention_mask`` (padding stripped,
    on whichever side it is), with the row's labels at those positions (``input_ids`` where the
    dataset has no ``labels``). A row with no attended token gives an empty example."""
    input_ids = np.asarray(row["input_ids"])
    if input_ids.ndim != 1:
        raise InputError(f"{source}: row {index}: input_ids must be a list of token ids")
    mask = row.get("attention_mask")
    mask = np.ones(len(input_ids), dtype=np.int64) if mask is None else np.asarray(mask)
    labels = row.get("labels")
    labels = input_ids if labels is None else np.asarray(labels)
    for name, values in (("attention_mask", mask), ("labels", labels)):
        if values.shape != input_ids.shape:
            raise InputError(f"{source}: row {index}: {name} and input_ids differ in length")
    if input_ids.size and not (np.issubdtype(input_ids.dtype, np.integer)
                               and np.issubdtype(labels.dtype, np.integer)):
        raise InputError(f"{source}: row {index}: input_ids and labels must be integers")
    if ((mask != 0) & (mask != 1)).any():
        raise InputError(f"{source}: row {index}: attention_mask values must be 0 or 1")
    attended = np.flatnonzero(mask)
    if not attended.size:
        return TokenizedExample((), ())
    start, stop = int(attended[0]), int(attended[-1]) + 1
    if stop - start != attended.size:
        raise InputError(
            f"{source}: row {index}: attention_mask is not one contiguous block of ones "
            f"(masked-out positions between {start} and {stop - 1}); only padding may be masked out"
        )
    return TokenizedExample(tuple(input_ids[start:stop].tolist()), tuple(labels[start:stop].tolist()))


def open_saved_dataset(path: Path, where: str = ""):
    """A ``save_to_disk`` dataset of one split with an ``input_ids`` column (``where``: how errors name it)."""
    import datasets

    where = where or str(path)
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{where}: not a dataset saved with save_to_disk ({exc})") from exc
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise InputError(f"{where}: a DatasetDict with splits {list(dataset)}; save a single split")
        dataset = next(iter(dataset.values()))
    if "input_ids" not in dataset.column_names:
        raise InputError(f"{where}: the dataset has no 'input_ids' column (columns: {dataset.column_names})")
    return dataset


def load_saved_dataset(path: Path, max_examples: int | None) -> list[TokenizedExample]:
    dataset = open_saved_dataset(path)
    columns = [name for name in ("input_ids", "attention_mask", "labels") if name in dataset.column_names]
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    dataset = dataset.select_columns(columns).with_format("numpy")
    examples = []
    for batch in dataset.iter(batch_size=1024):
        for offset in range(len(batch["input_ids"])):
            row = {name: batch[name][offset] for name in columns}
            examples.append(tokens_of_row(row, len(examples), str(path)))
    if skipped := sum(not len(example) for example in examples):
        logger.warning("%s: skipped %d rows with no attended token (attention_mask all 0 or empty)", path, skipped)
    return examples


def cap_rows(examples: list[TokenizedExample], limit: int | None, source: str) -> list[TokenizedExample]:
    """Rows longer than the model's ``limit`` positions keep their last ``limit`` tokens (one warning)."""
    if limit is None:
        return examples
    cut = [i for i, example in enumerate(examples) if len(example) > limit]
    if cut:
        logger.warning("%s: %d of %d rows are longer than the model's %d positions and keep their last %d tokens "
                       "(first: row %d)", source, len(cut), len(examples), limit, limit, cut[0])
    return [TokenizedExample(e.input_ids[-limit:], e.labels[-limit:]) if len(e) > limit else e for e in examples]


def check_vocabulary(examples: list[TokenizedExample], vocab_size: int, source: str, what: str = "row") -> None:
    """Refuse the first token id (or label) outside the model's vocabulary, ``0 .. vocab_size - 1`` (labels may
    also be -100), naming its row: data tokenized with another tokenizer, found before any fitting."""
    for index, example in enumerate(examples):
        for name, values, allowed in (("token id", example.input_ids, None), ("label", example.labels, IGNORE_INDEX)):
            if not values or (min(values) >= 0 and max(values) < vocab_size):  # the common case, at C speed
                continue
            bad = next((value for value in values if value != allowed and not 0 <= value < vocab_size), None)
            if bad is not None:
                raise InputError(f"{source}: {what} {index}: {name} {bad} is outside the model's vocabulary "
                                 f"(0 to {vocab_size - 1}); was it tokenized with another tokenizer?")


def load_hessian_examples(
    path: str | Path, example_tokenizer: ExampleTokenizer | None, max_examples: int | None = None,
    vocab_size: int | None = None,
) -> list[TokenizedExample]:
    """Load and check the fitting data: at least one example and at least one labelled token, and, given the
    model's ``vocab_size``, every token id in its vocabulary (:func:`check_vocabulary`). Records are tokenized
    by ``example_tokenizer`` (its length limit, capped at the model's positions); saved rows are cut at the
    model's positions only."""
    path = Path(path)
    if path.suffix in (".json", ".jsonl"):
        examples = load_examples(path)[:max_examples]
        tokenized = example_tokenizer.tokenize_all(examples, str(path))
        example_tokenizer.warn_capped()
    elif path.is_dir():
        limit = None if example_tokenizer is None else example_tokenizer.position_limit
        tokenized = cap_rows(load_saved_dataset(path, max_examples), limit, str(path))
    elif not path.exists():
        raise InputError(f"{path}: hessian dataset not found")
    else:
        raise InputError(f"{path}: expected a dataset directory (save_to_disk) or a .json/.jsonl file")
    if vocab_size is not None:  # before empty rows are dropped: the index is the row's
        check_vocabulary(tokenized, vocab_size, str(path), "row" if path.is_dir() else "record")
    tokenized = [example for example in tokenized if len(example)]
    if not tokenized:
        raise InputError(f"{path}: the hessian dataset has no examples")
    if not any(example.num_labelled for example in tokenized):
        raise InputError(f"{path}: the hessian dataset has no labelled token (all labels are -100)")
    return tokenized
