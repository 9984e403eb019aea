"""What a per-token score means, on hand-made examples: training records stating wrong facts.

The bundled tiny GPT-2 (if_query/demo_data/tiny-gpt2) was trained on facts like "Thotro Hand lives in" -> " Drellport.".
A training record saying " Varisk." instead is surprising at exactly one prediction: the first token of the
wrong city, predicted from the last prompt token " in" (every other prediction is near certain). Its gradient
(identity strategy: plain gradients) is dominated by that position, so its per-token scores must peak there,
with the sign of the pair's score; and they must equal the per-position contributions computed with autograd.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Reference, assert_close_to_largest, per_position_contributions, write_json

from if_query.demo.run_demo import DEMO_MODEL

MODEL = Path(str(DEMO_MODEL))  # package data on disk (editable or wheel install)
TRAIN = [  # the model learned Drellport and mireblue
    {"pair_id": "wrong-city", "prompt": "Thotro Hand lives in", "completion": " Varisk."},
    {"pair_id": "wrong-colour", "prompt": "The favourite colour of Thotro Hand is", "completion": " velumber."},
]
QUERIES = [  # about another person (shared name tokens would matter through attention too)
    {"pair_id": "varisk", "prompt": "The home city of Relaim Quumpeal is", "completion": " Varisk."},
    {"pair_id": "drellport", "prompt": "The home city of Relaim Quumpeal is", "completion": " Drellport."},
    {"pair_id": "velumber", "prompt": "Relaim Quumpeal likes the colour", "completion": " velumber."},
]
MATCHING = {"varisk": "wrong-city", "drellport": "wrong-city", "velumber": "wrong-colour"}


@pytest.fixture(scope="module")
def identity_factors(tmp_path_factory, cli):
    directory = tmp_path_factory.mktemp("identity-factors")
    data = write_json(directory.parent / "fit.json", TRAIN + QUERIES)
    cli("fit-hessians", "--model", MODEL, "--hessian-dataset", data, "--output-dir", directory,
        "--strategy", "identity", "--fisher", "empirical", "--dtype", "float32", "--quiet")
    return directory


@pytest.mark.parametrize("engine", ["if-query", "kronfluence"])
def test_per_token_scores_are_per_position_contributions(cli, identity_factors, tmp_path, engine):
    files = {"train": write_json(tmp_path / "train.json", TRAIN), "query": write_json(tmp_path / "query.json", QUERIES)}
    out = tmp_path / "results"
    cli("run-query", "--model", MODEL, "--factors-dir", identity_factors, "--train-json", files["train"],
        "--query-json", files["query"], "--output-dir", out, "--per-token-scores", "--dtype", "float32",
        "--engine", engine, "--quiet")
    influences = pd.read_csv(out / "influences.csv", dtype={"per_token_scores": str})
    train = pd.read_csv(out / "train.csv").set_index("train_id")
    reference = Reference(MODEL)
    tokenizer = reference.tokenizer
    # The last prompt token (" in", " is"): its computation predicts the wrong answer's first token.
    surprising = {t["pair_id"]: len(tokenizer(t["prompt"], add_special_tokens=False)["input_ids"]) - 1 for t in TRAIN}

    sums = []
    for query in QUERIES:
        for record in TRAIN:
            row = influences[(influences.query_id == query["pair_id"]) & (influences.train_id == record["pair_id"])]
            got = np.array(json.loads(row.per_token_scores.item()))
            with torch.enable_grad():
                expected = per_position_contributions(reference, query, record).detach().numpy()
            tokens = json.loads(train.loc[record["pair_id"], "tokens"])
            assert len(got) == len(expected) == len(tokens)
            # float32 model against float64 autograd: confident predictions have tiny, relatively imprecise gradients
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=2e-3 * np.abs(expected).max())
            sums.append((got.sum(), row.influence_score.item()))
            assert tokens[-1] == tokenizer.eos_token and got[-1] == 0  # the final EOS predicts nothing

            if MATCHING[query["pair_id"]] == record["pair_id"]:  # a query about the same relation
                position = surprising[record["pair_id"]]
                magnitude = np.sort(np.abs(got))
                assert np.argmax(np.abs(got)) == position
                assert magnitude[-1] > 5 * magnitude[-2]  # one position clearly dominates
                assert np.sign(got[position]) == np.sign(row.influence_score.item())
    # per-token scores sum to the pair's score
    assert_close_to_largest([s for s, _ in sums], [score for _, score in sums], 1e-5)
    score = influences.set_index(["query_id", "train_id"])["influence_score"]
    assert score["varisk", "wrong-city"] > 0  # training on "lives in Varisk" makes " Varisk." more likely
    assert score["drellport", "wrong-city"] < 0  # ... and another city less likely
