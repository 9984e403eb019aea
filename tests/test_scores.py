"""Influence scores against independent autograd computations."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    QUERIES,
    TRAIN,
    Reference,
    assert_close_to_largest,
    reference_tokens,
    run_query,
    score_matrix,
    write_json,
)


@pytest.fixture(scope="module")
def reference(tiny_gpt2):
    return Reference(tiny_gpt2)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_scores_equal_gradient_dot_products(cli, tiny_gpt2, fitted, query_files, tmp_path, reference,
                                                      batch_size):
    frame = run_query(cli, tiny_gpt2, fitted["identity"], query_files, tmp_path / "out",
                      "--score-batch-size", batch_size)
    expected = (reference.gradients(QUERIES) @ reference.gradients(TRAIN).T).numpy()
    got = score_matrix(frame, [q["pair_id"] for q in QUERIES], [t["pair_id"] for t in TRAIN])
    assert_close_to_largest(got, expected, 1e-4)


def test_diagonal_scores_equal_independent_computation(cli, tiny_gpt2, fitted, query_files, tmp_path, reference):
    damping = 1e-3
    frame = run_query(cli, tiny_gpt2, fitted["diagonal"], query_files, tmp_path / "out", "--damping", damping)
    fit_records = json.loads(fitted["data"].read_text())
    fisher = (reference.gradients(fit_records) ** 2).mean(dim=0)
    expected = ((reference.gradients(QUERIES) / (fisher + damping)) @ reference.gradients(TRAIN).T).numpy()
    got = score_matrix(frame, [q["pair_id"] for q in QUERIES], [t["pair_id"] for t in TRAIN])
    assert_close_to_largest(got, expected, 2e-4)


@pytest.mark.parametrize("engine", ["if-query", "kronfluence"])
def test_losses_equal_independent_computation(cli, tiny_gpt2, fitted, query_files, tmp_path, reference, engine):
    run_query(cli, tiny_gpt2, fitted["identity"], query_files, tmp_path / "out", "--engine", engine)
    queries = pd.read_csv(tmp_path / "out" / "query.csv")
    expected = [reference.mean_loss(q) for q in QUERIES]
    np.testing.assert_allclose(queries["loss"], expected, rtol=1e-5)
    counts = queries["loss_sum"] / queries["loss"]
    assert np.allclose(counts, np.round(counts))  # loss = loss_sum / number of completion tokens (with EOS)


@pytest.mark.parametrize("engine", ["if-query", "kronfluence"])
def test_without_eos_in_loss_scores_and_losses_leave_the_eos_token_out(cli, tiny_gpt2, fitted, query_files, tmp_path,
                                                                       reference, engine):
    def without_eos(record) -> tuple[torch.Tensor, float, int]:
        """(gradient, summed loss, predicted tokens) with the EOS token unlabelled."""
        _, labels = reference_tokens(reference.tokenizer, record["prompt"], record["completion"])
        labels = labels[:-1] + [-100]
        loss = reference.loss(record, labels_override=labels)
        gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss, reference.params)])
        return gradient, float(loss.detach()), sum(label != -100 for label in labels[1:])

    frame = run_query(cli, tiny_gpt2, fitted["identity"], query_files, tmp_path / "out", "--no-eos-in-loss",
                      "--engine", engine)
    queries, train = [without_eos(q) for q in QUERIES], [without_eos(t) for t in TRAIN]
    expected = (torch.stack([q[0] for q in queries]) @ torch.stack([t[0] for t in train]).T).numpy()
    got = score_matrix(frame, [q["pair_id"] for q in QUERIES], [t["pair_id"] for t in TRAIN])
    assert_close_to_largest(got, expected, 1e-4)
    with_eos = (reference.gradients(QUERIES) @ reference.gradients(TRAIN).T).numpy()
    assert np.abs(got - with_eos).max() > 1e-2 * np.abs(with_eos).max()  # EOS does contribute by default
    written = pd.read_csv(tmp_path / "out" / "query.csv")
    np.testing.assert_allclose(written["loss_sum"], [q[1] for q in queries], rtol=1e-5)
    np.testing.assert_allclose(written["loss"], [q[1] / q[2] for q in queries], rtol=1e-5)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "identity"])
def test_per_token_scores_sum_to_pair_score(cli, tiny_gpt2, fitted, query_files, tmp_path, strategy):
    frame = run_query(cli, tiny_gpt2, fitted[strategy], query_files, tmp_path / "out", "--per-token-scores")
    train = pd.read_csv(tmp_path / "out" / "train.csv").set_index("train_id")
    sums = []
    for row in frame.itertuples():
        per_token = json.loads(row.per_token_scores)
        assert len(per_token) == len(json.loads(train.loc[row.train_id, "tokens"]))
        sums.append(sum(per_token))
    assert_close_to_largest(sums, frame["influence_score"], 1e-4)


@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_cosine_uses_self_influence_from_a_pairwise_run(cli, tiny_gpt2, fitted, tmp_path, strategy):
    """With query = train, diag(S) is each example's self-influence, so cosine = S / sqrt(d d^T)."""
    files = {"train": write_json(tmp_path / "t.json", TRAIN), "query": write_json(tmp_path / "q.json", TRAIN)}
    frame = run_query(cli, tiny_gpt2, fitted[strategy], files, tmp_path / "same")
    ids = [t["pair_id"] for t in TRAIN]
    scores = score_matrix(frame, ids, ids)
    diagonal = np.diag(scores)
    np.testing.assert_allclose(score_matrix(frame, ids, ids, "influence_cosine"),
                               scores / np.sqrt(np.outer(diagonal, diagonal)), rtol=1e-5, atol=1e-6)
    # Cosines computed with separately computed self-influences agree with the pairwise diagonal.
    mixed = {"train": files["train"], "query": write_json(tmp_path / "q2.json", TRAIN[:2] + QUERIES[:1])}
    other = run_query(cli, tiny_gpt2, fitted[strategy], mixed, tmp_path / "mixed")
    np.testing.assert_allclose(score_matrix(other, ids[:2], ids, "influence_cosine"),
                               score_matrix(frame, ids[:2], ids, "influence_cosine"), rtol=0, atol=1e-5)


def test_scores_invariant_to_batch_size_and_order(cli, tiny_gpt2, fitted, tmp_path):
    forward = {"train": write_json(tmp_path / "t.json", TRAIN), "query": write_json(tmp_path / "q.json", QUERIES)}
    backward = {"train": write_json(tmp_path / "t2.json", TRAIN[::-1]),
                "query": write_json(tmp_path / "q2.json", QUERIES[::-1])}
    a = run_query(cli, tiny_gpt2, fitted["ekfac"], forward, tmp_path / "a", "--score-batch-size", 1)
    b = run_query(cli, tiny_gpt2, fitted["ekfac"], backward, tmp_path / "b", "--score-batch-size", 4)
    q, t = [x["pair_id"] for x in QUERIES], [x["pair_id"] for x in TRAIN]
    assert_close_to_largest(score_matrix(a, q, t), score_matrix(b, q, t), 1e-4)
    assert list(b["query_id"].unique()) == q[::-1]  # outputs keep the JSON order


