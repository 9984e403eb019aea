import logging

import torch
from models import make_tokenizer

from if_query.records import Example
from if_query.tokenization import IGNORE_INDEX, ExampleTokenizer, collate


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_unlabelled_completion_and_eos_labelled():
    tokenizer = make_tokenizer()
    tokenized = ExampleTokenizer(tokenizer, 64)(Example("a", "Alice lives in", " Paris."))
    prompt, completion = ids(tokenizer, "Alice lives in"), ids(tokenizer, " Paris.")
    assert list(tokenized.input_ids) == prompt + completion + [tokenizer.eos_token_id]
    assert list(tokenized.labels) == [IGNORE_INDEX] * len(prompt) + completion + [tokenizer.eos_token_id]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # pad = EOS when the tokenizer has none


def test_bos_added_when_the_tokenizer_adds_one():
    tokenizer = make_tokenizer(bos=True)
    tokenized = ExampleTokenizer(tokenizer, 64)(Example("a", "Alice", " Paris."))
    assert tokenized.input_ids[0] == tokenizer.bos_token_id
    assert tokenized.labels[0] == IGNORE_INDEX
    assert tokenized.input_ids.count(tokenizer.bos_token_id) == 1


def test_long_record_loses_prompt_tokens_from_the_left(caplog):
    tokenizer = make_tokenizer()
    example = Example("long-one", "the a of in is lives works", " Paris.")
    completion = ids(tokenizer, " Paris.") + [tokenizer.eos_token_id]
    with caplog.at_level(logging.WARNING, logger="if_query"):
        tokenized = ExampleTokenizer(tokenizer, len(completion) + 2)(example)
    assert len(tokenized) == len(completion) + 2
    assert list(tokenized.input_ids[:2]) == ids(tokenizer, "the a of in is lives works")[-2:]
    assert list(tokenized.labels[2:]) == completion
    assert "long-one" in caplog.text


def test_batches_padded_right_to_longest_with_masked_labels():
    tokenizer = make_tokenizer()
    make = ExampleTokenizer(tokenizer, 64)
    short, long = make(Example("s", "Bob", " doctor.")), make(Example("l", "Alice lives in the", " red city."))
    batch = collate([short, long], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(long))
    n = len(short)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long) - n)
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, :n].tolist() == list(short.input_ids)
    assert torch.equal(batch["labels"][1], torch.tensor(long.labels))
