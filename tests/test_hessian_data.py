"""Pre-tokenized fitting data is read as written: padding on either side (or none) gives the same
examples and the same factors; a mask that is not one block of ones is refused."""

import random

import pytest
import torch
from helpers import assert_one_line_error, factors, make_tokenizer

from if_query.data.hessian_data import load_hessian_examples
from if_query.data.tokenization import IGNORE_INDEX, TokenizedExample

PAD = 0
WIDTH = 12  # the earlier tool padded to 512; the layout is what matters


def make_sequences(count=7, seed=0):
    """Token ids and labels (prompt tokens -100) of sequences of different lengths."""
    rng = random.Random(seed)
    vocab = len(make_tokenizer())
    sequences = []
    for i in range(count):
        length = 2 + (i * 5) % (WIDTH - 1)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = rng.randrange(0, length - 1)
        sequences.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return sequences


def rows(sequences, layout, with_labels=True):
    """Rows as the earlier tool (left) or others (right, ragged) would save them. Padding gets
    label PAD (not -100) so that a loader keeping padding labels would be caught."""
    out = []
    for ids, labels in sequences:
        pad = WIDTH - len(ids) if layout != "ragged" else 0
        if layout == "left":
            row = {"input_ids": [PAD] * pad + ids, "attention_mask": [0] * pad + [1] * len(ids),
                   "labels": [PAD] * pad + labels}
        else:
            row = {"input_ids": ids + [PAD] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
                   "labels": labels + [PAD] * pad}
        if layout == "ragged":
            del row["attention_mask"]
        if not with_labels:
            del row["labels"]
        out.append(row)
    return out


def save(rows_, path):
    import datasets

    datasets.Dataset.from_list(rows_).save_to_disk(str(path))
    return path


def load(path):
    return load_hessian_examples(path, example_tokenizer=None)


@pytest.mark.parametrize("with_labels", [True, False])
def test_left_right_and_ragged_rows_give_the_real_tokens(tmp_path, with_labels):
    sequences = make_sequences()
    expected = [TokenizedExample(tuple(ids), tuple(labels if with_labels else ids)) for ids, labels in sequences]
    for layout in ("left", "right", "ragged"):
        loaded = load(save(rows(sequences, layout, with_labels), tmp_path / f"{layout}-{with_labels}"))
        assert loaded == expected, layout


def test_rows_without_attended_tokens_are_dropped(tmp_path):
    sequences = make_sequences(3)
    data = rows(sequences, "left")
    data.insert(1, {"input_ids": [PAD] * WIDTH, "attention_mask": [0] * WIDTH, "labels": [PAD] * WIDTH})
    loaded = load(save(data, tmp_path / "d"))
    assert loaded == [TokenizedExample(tuple(ids), tuple(labels)) for ids, labels in sequences]


def fit(cli, model, data, out):
    cli("fit-hessians", "--model", model, "--hessian-dataset", data, "--output-dir", out, "--strategy", "ekfac",
        "--fisher", "empirical", "--factor-batch-size", 3, "--lambda-batch-size", 2, "--quiet")
    return factors(out)


def test_padding_side_does_not_change_the_factors(cli, tiny_gpt2, tmp_path):
    sequences = make_sequences()
    fitted = {layout: fit(cli, tiny_gpt2, save(rows(sequences, layout), tmp_path / layout), tmp_path / f"f-{layout}")
              for layout in ("left", "right", "ragged")}
    reference = fitted["ragged"]
    assert {"activation_covariance.safetensors", "lambda_matrix.safetensors"} <= set(reference)
    for layout in ("left", "right"):
        assert set(fitted[layout]) == set(reference)
        for name, tensors in reference.items():
            assert set(fitted[layout][name]) == set(tensors)
            for key, tensor in tensors.items():
                assert torch.allclose(fitted[layout][name][key], tensor, rtol=1e-6, atol=0), (layout, name, key)
    # The comparison can fail: the left padding read as real tokens gives other factors.
    padded = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in rows(sequences, "left")]
    kept = fit(cli, tiny_gpt2, save(padded, tmp_path / "padding-kept"), tmp_path / "f-padding-kept")
    covariance = "activation_covariance.safetensors"
    assert any(not torch.allclose(kept[covariance][key], reference[covariance][key], rtol=1e-3)
               for key in reference[covariance])


@pytest.mark.parametrize(
    ("row", "message"),
    [({"input_ids": [5, 6, 7, 8], "attention_mask": [1, 0, 1, 1]}, "row 1: attention_mask is not one contiguous"),
     ({"input_ids": [5, 6, 7, 8], "attention_mask": [0, 1, 2, 0]}, "row 1: attention_mask values must be 0 or 1"),
     ({"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1]}, "row 1: attention_mask and input_ids differ"),
     ({"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7]}, "row 1: labels and input_ids differ"),
     ({"input_ids": [5, 6, 9999, 8]}, "row 1: token id 9999 is outside the model's vocabulary (0 to"),
     ({"labels": [-100, 6, 700, 8]}, "row 1: label 700 is outside the model's vocabulary"),
     ({"input_ids": [-1, 6, 7, 8]}, "row 1: token id -1 is outside")],
)
def test_bad_rows_are_refused_naming_file_and_row(cli, tiny_gpt2, tmp_path, row, message):
    good = {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": [5, 6, 7, 8]}
    data = save([good, {**good, **row}], tmp_path / "bad")
    result = cli("fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", data, "--output-dir", tmp_path / "f",
                 expect=None)
    assert_one_line_error(result, 2, str(data), message)
    assert not (tmp_path / "f").exists()


def test_ids_of_another_tokenizer_are_refused_before_fitting_and_the_fixed_data_fits(cli, tiny_gpt2, tmp_path):
    """A dataset made with another tokenizer is refused naming the row and the id, before anything is written;
    fixed in place, it fits into the same --output-dir (no --overwrite). Masked-out padding may hold any id."""
    good = {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1]}
    padded = {"input_ids": [5, 6, 7, 50257], "attention_mask": [1, 1, 1, 0]}
    data = save([good, padded, {"input_ids": [5, 50256, 7, 8], "attention_mask": [1, 1, 1, 1]}], tmp_path / "d")
    args = ["fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", data, "--output-dir", tmp_path / "f",
            "--strategy", "diagonal", "--quiet"]
    assert_one_line_error(cli(*args, expect=None), 2, f"{data}: row 2: token id 50256 is outside the model's "
                                                        "vocabulary", "another tokenizer")
    assert not (tmp_path / "f").exists()
    save([good, padded, good], data)  # fixed in place
    cli(*args)
