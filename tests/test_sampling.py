"""True-Fisher label sampling: independent per stage, reproducible, resumable, distributed as the model's softmax."""

import json

import pytest
import torch
from helpers import factors

import if_query.model.loss as loss_module
import if_query.model.sampling as sampling
from if_query.data.tokenization import IGNORE_INDEX, collate
from if_query.fit.metadata import METADATA_FILE


def fit_args(model, data, out, *extra):
    return ["fit-hessians", "--model", model, "--hessian-dataset", data, "--output-dir", out, "--fisher", "true",
            "--quiet", *extra]


def assert_same_factors(a, b, exact=True):
    assert set(a) == set(b) and len(a) > 4
    for name in a:
        assert set(a[name]) == set(b[name])
        for key in a[name]:
            if exact:
                torch.testing.assert_close(b[name][key], a[name][key], rtol=0, atol=0)
            else:
                torch.testing.assert_close(b[name][key], a[name][key])


@pytest.fixture
def recorded_labels(monkeypatch):
    """Every label drawn through sample_labels: {(stage, unpadded token ids): labels at labelled positions}."""
    drawn: dict = {}
    original = sampling.sample_labels

    def recording(logits, labels, batch, stage, seed):
        out = original(logits, labels, batch, stage, seed)
        for row in range(out.shape[0]):
            tokens = tuple(batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist())
            key = (stage, tokens)
            value = out[row][labels[row] != IGNORE_INDEX].tolist()
            assert drawn.get(key, value) == value, "one example drew two different label sets in one stage"
            drawn[key] = value
        return out

    monkeypatch.setattr(sampling, "sample_labels", recording)
    return drawn


def test_stages_draw_different_labels_reproducibly(cli, tiny_gpt2, fitted, tmp_path, recorded_labels):
    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "one", "--factor-batch-size", "3", "--lambda-batch-size", "2"))
    first = dict(recorded_labels)
    recorded_labels.clear()
    # Other batch sizes (so other batch compositions and padding): each example must draw the same labels.
    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "two", "--factor-batch-size", "2", "--lambda-batch-size", "5"))
    assert recorded_labels == first
    stages = {stage for stage, _ in first}
    assert stages == {"covariance", "lambda"}
    examples = {tokens for _, tokens in first}
    assert len(examples) == 6 and len(first) == 12  # 7 records, two of them the same text
    covariance = [label for tokens in sorted(examples) for label in first["covariance", tokens]]
    lambdas = [label for tokens in sorted(examples) for label in first["lambda", tokens]]
    assert len(covariance) == len(lambdas) > 20
    # A random tiny model is nearly uniform over ~80 tokens: independent draws agree about 1 time in 80.
    agreeing = sum(a == b for a, b in zip(covariance, lambdas, strict=True))
    assert agreeing < len(covariance) / 4, (agreeing, len(covariance))
    # Another seed draws other labels.
    recorded_labels.clear()
    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "three", "--seed", "1"))
    assert recorded_labels.keys() == first.keys() and recorded_labels != first


def test_interrupted_partitioned_fit_resumes_to_the_same_factors(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    import kronfluence.computer.factor_computer as computer

    args = ("--module-partitions", "2", "--factor-batch-size", "2", "--lambda-batch-size", "3")
    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "whole", *args))
    original = computer.fit_covariance_matrices_with_loader
    calls = []

    def interrupt_second_partition(*positional, **keywords):
        calls.append(keywords["tracked_module_names"])
        if len(calls) == 2:  # Ctrl-C once module partition 0's covariances are saved
            raise KeyboardInterrupt
        return original(*positional, **keywords)

    with monkeypatch.context() as patch:
        patch.setattr(computer, "fit_covariance_matrices_with_loader", interrupt_second_partition)
        result = cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "resumed", *args), expect=None)
    assert result.exit_code == 130
    assert calls[0] != calls[1]
    saved = set(factors(tmp_path / "resumed"))
    assert any("module_partition0" in name for name in saved)
    assert not any("module_partition1" in name for name in saved)
    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "resumed", *args))
    assert_same_factors(factors(tmp_path / "whole"), factors(tmp_path / "resumed"))

    # Labels depend on the example, not on the partition: one partition gives the same factors.
    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "single", "--factor-batch-size", "2",
                  "--lambda-batch-size", "3"))
    whole, single = factors(tmp_path / "whole"), factors(tmp_path / "single")
    assert_same_factors({k: v for k, v in whole.items() if "partition" not in k}, single, exact=False)


def test_factors_of_another_sampling_scheme_are_refused(cli, tiny_gpt2, fitted, tmp_path):
    out = tmp_path / "f"
    cli(*fit_args(tiny_gpt2, fitted["data"], out, "--strategy", "diagonal"))
    metadata = json.loads((out / METADATA_FILE).read_text())
    assert metadata["fit"]["label_sampling"] == sampling.LABEL_SAMPLING
    del metadata["fit"]["label_sampling"]  # as written before the scheme was recorded
    (out / METADATA_FILE).write_text(json.dumps(metadata))
    result = cli(*fit_args(tiny_gpt2, fitted["data"], out, "--strategy", "diagonal"), expect=None)
    assert result.exit_code == 2 and "label_sampling" in result.stderr


def test_sampled_labels_follow_the_model_softmax(tiny_gpt2):
    """Many examples share the prompt before the first labelled position (so the model's distribution there)
    and differ after it; the labels drawn there must be distributed as that softmax (chi-square test)."""
    from transformers import AutoModelForCausalLM

    from if_query.data.tokenization import TokenizedExample

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    prompt = [11, 13, 7]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    logits = (logits - logits.mean()) / logits.std() * 2  # the random model is near uniform: sharpen it
    logits[::4] = float("-inf")  # tokens of probability zero
    expected = torch.softmax(logits.double(), dim=-1)
    generator = torch.Generator().manual_seed(0)
    n = 6000
    examples = [TokenizedExample(tuple(prompt + suffix), (IGNORE_INDEX,) * len(prompt) + tuple(suffix))
                for suffix in torch.randint(3, 80, (n, 3), generator=generator).tolist()]
    counts = torch.zeros_like(expected)
    for start in range(0, n, 500):
        batch = collate(examples[start:start + 500], pad_token_id=0)
        labels = batch["labels"][:, 1:]
        batch_logits = torch.zeros(labels.shape + logits.shape)
        batch_logits[:, len(prompt) - 1] = logits
        drawn = sampling.sample_labels(batch_logits, labels, batch, "covariance", seed=0)
        assert (drawn == IGNORE_INDEX).equal(labels == IGNORE_INDEX)
        counts += torch.bincount(drawn[:, len(prompt) - 1], minlength=len(expected)).double()
    likely = expected * n >= 5
    pooled = ~likely & (expected > 0)  # rare tokens pooled into one bin
    assert likely.sum() >= 10 and expected[pooled].sum() * n >= 5
    observed = torch.cat([counts[likely], counts[pooled].sum()[None]])
    wanted = torch.cat([expected[likely], expected[pooled].sum()[None]]) * n
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    degrees = len(observed) - 1
    # chi-square with k degrees of freedom: mean k, sd sqrt(2k); 6 sd is far beyond chance (p < 1e-5)
    assert chi2 < degrees + 6 * (2 * degrees) ** 0.5, (chi2, degrees)
    # Zero-probability tokens are never drawn.
    assert counts[expected == 0].sum() == 0


def test_labels_do_not_depend_on_the_batch_or_padding():
    """One example alone, right-padded in a batch, or left-padded: the same labels (sampling is per example)."""
    torch.manual_seed(0)
    vocab = 50
    example = [5, 6, 7, 8, 9, 10]
    labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10]
    logits_row = torch.randn(len(example) - 1, vocab)

    def draw(batch, rows_logits):
        return sampling.sample_labels(rows_logits, batch["labels"][:, 1:], batch, "lambda", seed=3)

    alone = {"input_ids": torch.tensor([example]), "attention_mask": torch.ones(1, 6, dtype=torch.long),
             "labels": torch.tensor([labels])}
    reference = draw(alone, logits_row[None])[0]
    other = [1, 2, 3, 4, 4, 4, 4, 4]
    right = {"input_ids": torch.tensor([example + [0, 0], other]),
             "attention_mask": torch.tensor([[1] * 6 + [0, 0], [1] * 8]),
             "labels": torch.tensor([labels + [IGNORE_INDEX] * 2, [IGNORE_INDEX] * 4 + other[4:]])}
    right_logits = torch.randn(2, 7, vocab)
    right_logits[0, :5] = logits_row
    assert draw(right, right_logits)[0, :5].equal(reference)
    left = {"input_ids": torch.tensor([[0, 0] + example]), "attention_mask": torch.tensor([[0, 0] + [1] * 6]),
            "labels": torch.tensor([[IGNORE_INDEX] * 2 + labels])}
    left_logits = torch.randn(1, 7, vocab)
    left_logits[0, 2:] = logits_row
    assert draw(left, left_logits)[0, 2:].equal(reference)
    # A batch's Fisher-sample index (several draws of one example) gives other labels.
    again = draw(dict(alone, fisher_sample=torch.tensor([1])), logits_row[None])[0]
    assert not again.equal(reference) and (again == IGNORE_INDEX).equal(reference == IGNORE_INDEX)
    # Logits kept only at the batch's labelled columns (the logits_to_keep path): the same labels.
    columns = loss_module.labelled_columns(right)
    assert columns.numel() < 7
    kept = sampling.sample_labels(right_logits[:, columns], right["labels"][:, 1:][:, columns], right, "lambda",
                                     seed=3)
    assert kept[0][columns < 5].equal(reference[columns[columns < 5]])
