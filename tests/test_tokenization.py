import logging

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    Reference,
    assert_close_to_largest,
    make_tokenizer,
    reference_tokens,
    save_tiny_model,
    write_json,
)

from if_query.data.records import Example
from if_query.data.tokenization import IGNORE_INDEX, ExampleTokenizer, TokenizedExample, collate
from if_query.errors import InputError


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


# ---- every labelled token is predicted (GPT-2-style tokenizers add no BOS)


def test_empty_prompt_without_bos_starts_with_eos():
    tokenizer = make_tokenizer()
    tokenized = ExampleTokenizer(tokenizer, 64)(Example("e", "", " Paris."))
    completion = ids(tokenizer, " Paris.") + [tokenizer.eos_token_id]
    assert list(tokenized.input_ids) == [tokenizer.eos_token_id] + completion
    assert list(tokenized.labels) == [IGNORE_INDEX] + completion
    assert tokenized.num_labelled == len(completion)  # every completion token and EOS is predicted


def test_empty_prompt_with_bos_gets_no_extra_start_token():
    tokenizer = make_tokenizer(bos=True)
    tokenized = ExampleTokenizer(tokenizer, 64)(Example("e", "", " Paris."))
    completion = ids(tokenizer, " Paris.") + [tokenizer.eos_token_id]
    assert list(tokenized.input_ids) == [tokenizer.bos_token_id] + completion
    assert tokenized.num_labelled == len(completion)


def test_truncation_keeps_one_token_before_the_completion():
    tokenizer = make_tokenizer()
    completion = ids(tokenizer, " Paris.") + [tokenizer.eos_token_id]
    prompt = ids(tokenizer, "the a of in is lives works")
    tokenized = ExampleTokenizer(tokenizer, len(completion) + 1)(Example("t", "the a of in is lives works", " Paris."))
    assert list(tokenized.input_ids) == prompt[-1:] + completion
    assert tokenized.labels[0] == IGNORE_INDEX and tokenized.num_labelled == len(completion)
    for bos in (False, True):  # the completion alone fills --max-length: nothing left to predict its first token
        make = ExampleTokenizer(make_tokenizer(bos=bos), len(completion))
        for prompt in ("the a", ""):
            with pytest.raises(InputError, match="longer than --max-length"):
                make(Example("t", prompt, " Paris."))


def test_num_labelled_counts_predicted_labels_only():
    # A label on the first token (e.g. a saved dataset labelling every token) is predicted by nothing.
    assert TokenizedExample((5, 6, 7), (5, 6, 7)).num_labelled == 2
    assert TokenizedExample((5, 6, 7), (IGNORE_INDEX, 6, IGNORE_INDEX)).num_labelled == 1


EDGE_TRAIN = [
    {"pair_id": "empty-prompt", "prompt": "", "completion": " Alice lives in Paris."},
    {"pair_id": "cut-prompt", "prompt": "the colour of Carol is blue and Bob works as a", "completion": " doctor."},
    {"pair_id": "plain", "prompt": "Dave plays the", "completion": " drum."},
]
EDGE_QUERIES = [
    {"pair_id": "q-empty", "prompt": "", "completion": " Bob works as a doctor."},
    {"pair_id": "q-cut", "prompt": "where Alice lives is the city of", "completion": " Paris!"},
]
MAX_LENGTH = 8  # the longest empty-prompt record fits exactly with its start token; cut prompts keep 5 tokens


@pytest.mark.parametrize("engine", ["if-query", "kronfluence"])
def test_empty_and_truncated_prompts_against_brute_force(cli, tiny_gpt2, fitted, tmp_path, engine):
    """Loss is averaged over the predicted tokens (all completion tokens and EOS) and every one of them
    is in the score: identity scores equal gradient dot products of the brute-force sequences."""
    files = {"train": write_json(tmp_path / "t.json", EDGE_TRAIN),
             "query": write_json(tmp_path / "q.json", EDGE_QUERIES)}
    out = tmp_path / "out"
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], "--train-json", files["train"],
        "--query-json", files["query"], "--output-dir", out, "--max-length", MAX_LENGTH, "--engine", engine,
        "--quiet")
    reference = Reference(tiny_gpt2)
    tokenizer = reference.tokenizer
    for record in EDGE_TRAIN + EDGE_QUERIES:
        sequence, labels = reference_tokens(tokenizer, record["prompt"], record["completion"], MAX_LENGTH)
        assert len(sequence) <= MAX_LENGTH and labels[0] == -100
    assert len(reference_tokens(tokenizer, "", EDGE_QUERIES[0]["completion"])[0]) == MAX_LENGTH
    assert len(ids(tokenizer, EDGE_TRAIN[1]["prompt"])) > MAX_LENGTH
    queries = pd.read_csv(out / "query.csv")
    expected_loss = [reference.mean_loss(q, MAX_LENGTH) for q in EDGE_QUERIES]
    np.testing.assert_allclose(queries["loss"], expected_loss, rtol=1e-5)
    completion_tokens = [len(ids(tokenizer, q["completion"])) + 1 for q in EDGE_QUERIES]
    np.testing.assert_allclose(queries["loss_sum"] / queries["loss"], completion_tokens, rtol=1e-6)
    frame = pd.read_csv(out / "influences.csv")
    got = frame.pivot(index="query_id", columns="train_id", values="influence_score")
    got = got.loc[[q["pair_id"] for q in EDGE_QUERIES], [t["pair_id"] for t in EDGE_TRAIN]].to_numpy()
    expected = (reference.gradients(EDGE_QUERIES, MAX_LENGTH) @ reference.gradients(EDGE_TRAIN, MAX_LENGTH).T).numpy()
    assert_close_to_largest(got, expected, 1e-4)


def test_without_eos_the_sequence_ends_with_the_completion():
    tokenizer = make_tokenizer()
    example = Example("p1", "Alice lives in", " Paris.", {})
    with_eos = ExampleTokenizer(tokenizer, 512)(example)
    without = ExampleTokenizer(tokenizer, 512, eos_in_loss=False)(example)
    assert with_eos.input_ids[-1] == tokenizer.eos_token_id
    assert without.input_ids == with_eos.input_ids[:-1] and without.labels == with_eos.labels[:-1]
    assert without.num_labelled == with_eos.num_labelled - 1
    with pytest.raises(InputError, match="completion has no tokens"):
        ExampleTokenizer(tokenizer, 512, eos_in_loss=False)(Example("p2", "Alice", "", {}))


# ---- --max-length beyond the model's positions (the earlier tool's clients always pass 512)

POSITIONS = 12
LONG = [  # two records longer than POSITIONS tokens, two shorter
    {"pair_id": "long-1", "prompt": "the colour of Carol is blue and Bob works as a doctor and Alice lives in",
     "completion": " Paris."},
    {"pair_id": "short-1", "prompt": "Bob works as a", "completion": " doctor."},
    {"pair_id": "long-2", "prompt": "who plays the piano and the violin and the drum in Rome and in Oslo is",
     "completion": " Dave."},
    {"pair_id": "short-2", "prompt": "Alice lives in", "completion": " Lima."},
]


def test_max_length_is_capped_at_the_models_positions(cli, tmp_path):
    """--max-length 512 (the default) on a model of 12 positions: records are cut to 12 tokens (prompt from the
    left) with one warning per run naming both numbers and the count, in fit-hessians (records and saved rows)
    and run-query (every folder), instead of an IndexError in the position embeddings."""
    import datasets

    model = save_tiny_model(tmp_path / "model", "gpt2", positions=POSITIONS)
    records = write_json(tmp_path / "long.json", LONG)
    fit = cli("fit-hessians", "--model", model, "--hessian-dataset", records, "--output-dir", tmp_path / "f",
              "--strategy", "identity")
    warning = f"--max-length 512 is more than the model's {POSITIONS} positions"
    assert fit.stderr.count(warning) == 1 and "2 of 4 records were cut" in fit.stderr
    rows = [{"input_ids": list(range(3, 3 + length))} for length in (5, 20, 30)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "rows"))
    fit_rows = cli("fit-hessians", "--model", model, "--hessian-dataset", tmp_path / "rows", "--output-dir",
                   tmp_path / "f-rows", "--strategy", "diagonal", "--fisher", "empirical")
    assert f"2 of 3 rows are longer than the model's {POSITIONS} positions" in fit_rows.stderr

    folders = []
    for name in ("a", "b"):
        write_json(tmp_path / name / "train.json", LONG)
        write_json(tmp_path / name / "query.json", LONG[:2])
        folders.append(tmp_path / name)
    result = cli("run-query", "--model", model, "--factors-dir", tmp_path / "f", *folders)
    assert result.stderr.count(warning) == 1 and "6 of 12 records were cut" in result.stderr
    frame = pd.read_csv(tmp_path / "a" / "results" / "influences.csv")
    reference = Reference(model)
    expected = (reference.gradients(LONG[:2], POSITIONS) @ reference.gradients(LONG, POSITIONS).T).numpy()
    got = frame.pivot(index="query_id", columns="train_id", values="influence_score")
    assert_close_to_largest(got.loc[["long-1", "short-1"], [r["pair_id"] for r in LONG]].to_numpy(), expected, 1e-4)
