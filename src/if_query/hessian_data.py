"""The data the Hessian factors are fitted on.

Either a dataset saved with ``datasets.Dataset.save_to_disk`` (``input_ids`` and optionally
``attention_mask`` and ``labels``; padded or ragged), or a ``.json`` / ``.jsonl`` file of
prompt/completion records tokenized exactly as ``run-query`` tokenizes them.
"""

from __future__ import annotations

from pathlib import Path

from if_query.errors import InputError
from if_query.records import load_examples
from if_query.tokenization import IGNORE_INDEX, ExampleTokenizer, TokenizedExample


def _from_row(row: dict, index: int, source: str) -> TokenizedExample:
    input_ids = list(row["input_ids"])
    mask = row.get("attention_mask")
    mask = [1] * len(input_ids) if mask is None else list(mask)
    if len(mask) != len(input_ids):
        raise InputError(f"{source}: row {index}: attention_mask and input_ids differ in length")
    labels = row.get("labels")
    if labels is None:
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)]
    else:
        labels = [label if keep else IGNORE_INDEX for label, keep in zip(labels, mask, strict=True)]
    # Drop padding so batches are padded dynamically; mask zeros inside a sequence keep label -100.
    length = max((i + 1 for i, keep in enumerate(mask) if keep), default=0)
    return TokenizedExample(tuple(int(t) for t in input_ids[:length]), tuple(int(t) for t in labels[:length]))


def load_saved_dataset(path: Path, max_examples: int | None) -> list[TokenizedExample]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{path}: not a dataset saved with save_to_disk ({exc})") from exc
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise InputError(f"{path}: a DatasetDict with splits {list(dataset)}; save a single split")
        dataset = next(iter(dataset.values()))
    if "input_ids" not in dataset.column_names:
        raise InputError(f"{path}: the dataset has no 'input_ids' column (columns: {dataset.column_names})")
    columns = [name for name in ("input_ids", "attention_mask", "labels") if name in dataset.column_names]
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    dataset = dataset.select_columns(columns)
    return [_from_row(row, index, str(path)) for index, row in enumerate(dataset)]


def load_hessian_examples(
    path: str | Path, example_tokenizer: ExampleTokenizer, max_examples: int | None = None
) -> list[TokenizedExample]:
    """Load and check the fitting data: at least one example and at least one labelled token."""
    path = Path(path)
    if max_examples is not None and max_examples < 1:
        raise InputError(f"--max-examples must be at least 1, got {max_examples}")
    if path.suffix in (".json", ".jsonl"):
        examples = load_examples(path)[:max_examples]
        tokenized = example_tokenizer.tokenize_all(examples, str(path))
    elif path.is_dir():
        tokenized = load_saved_dataset(path, max_examples)
    elif not path.exists():
        raise InputError(f"{path}: hessian dataset not found")
    else:
        raise InputError(f"{path}: expected a dataset directory (save_to_disk) or a .json/.jsonl file")
    tokenized = [example for example in tokenized if len(example)]
    if not tokenized:
        raise InputError(f"{path}: the hessian dataset has no examples")
    if not any(example.num_labelled for example in tokenized):
        raise InputError(f"{path}: the hessian dataset has no labelled token (all labels are -100)")
    return tokenized
