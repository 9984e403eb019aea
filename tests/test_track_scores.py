"""--track attention and all-linear, through the real CLI, against brute-force autograd and Kronfluence's own scores.

Tiny random Llama with grouped-query attention (k_proj and v_proj smaller than q_proj, and reading q_proj's input),
OLMo-2, GPT-2 (its fused c_attn swapped for nn.Linear) and two mixture-of-experts models (OLMoE, Mixtral: attention
only). With ``--strategy identity`` a score is the plain dot product of the two examples' gradients over exactly the
tracked parameters; with EK-FAC the default engine equals Kronfluence's own scores on the same modules; per-token
scores sum to the pair score for every kind.
"""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import (
    QUERIES,
    TRAIN,
    Reference,
    assert_close_to_largest,
    assert_one_line_error,
    run_query,
    save_tiny_model,
    score_matrix,
    write_json,
)

ATTENTION = {
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    **{family: tuple(f"self_attn.{p}_proj" for p in "qkvo") for family in ("llama_gqa", "olmo2", "olmoe", "mixtral")},
}
MLP = {"gpt2": ("mlp.c_fc", "mlp.c_proj"), **{f: ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
                                               for f in ("llama_gqa", "olmo2")}}
# What each kind tracks in every block, written out here (not asked of if-query): the parameters a score sums over.
TRACKED = {(family, "attention"): ATTENTION[family] for family in ATTENTION}
TRACKED |= {(family, "all-linear"): ATTENTION[family] + MLP[family] for family in MLP}
TRACKED[("llama_gqa", "mlp")] = MLP["llama_gqa"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("track-models")
    return {family: save_tiny_model(root / family, family) for family in ATTENTION}


@pytest.fixture(scope="module")
def hessian_data(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("track-data") / "fit.json", TRAIN + QUERIES)


def _fit(cli, model, data, out, track, strategy):
    cli("fit-hessians", "--model", model, "--hessian-dataset", data, "--output-dir", out, "--track", track,
        "--strategy", strategy, "--factor-batch-size", 3, "--lambda-batch-size", 2, "--quiet")
    return out


def _per_token_sums(frame: pd.DataFrame) -> list[float]:
    return [sum(json.loads(cell)) for cell in frame["per_token_scores"]]


@pytest.mark.parametrize(("family", "track"), sorted(TRACKED))
def test_identity_scores_are_gradient_dot_products_over_the_tracked_parameters(cli, models, hessian_data, query_files,
                                                                               tmp_path, family, track):
    factors = _fit(cli, models[family], hessian_data, tmp_path / "factors", track, "identity")
    metadata = json.loads((factors / "metadata.json").read_text())
    assert metadata["fit"]["track"] == track
    suffixes = TRACKED[family, track]
    tracked = [m["name"] for m in metadata["tracked_modules"]]
    assert sorted(tracked) == sorted(name for name, _ in Reference(models[family], suffixes=suffixes).modules)
    assert {name.split(".", 3)[3] for name in tracked} == set(suffixes)

    frame = run_query(cli, models[family], factors, query_files, tmp_path / "out", "--per-token-scores")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["track"] == track
    reference = Reference(models[family], suffixes=suffixes)
    expected = (reference.gradients(QUERIES) @ reference.gradients(TRAIN).T).numpy()
    got = score_matrix(frame, [q["pair_id"] for q in QUERIES], [t["pair_id"] for t in TRAIN])
    assert_close_to_largest(got, expected, 1e-4)
    assert_close_to_largest(_per_token_sums(frame), frame["influence_score"], 1e-4)


# all-linear on Llama-GQA holds attention (q/k/v sharing one input and rotation) and the MLP; OLMo-2's attention
# (q and k normed after their projections); GPT-2's fused c_attn (biased), alone and with the MLP; a
# mixture-of-experts model's attention (Mixtral's is the same code: checked above against autograd).
EKFAC_CASES = [("llama_gqa", "all-linear"), ("olmo2", "attention"), ("gpt2", "attention"), ("gpt2", "all-linear"),
               ("olmoe", "attention")]


@pytest.mark.parametrize(("family", "track"), EKFAC_CASES)
def test_ekfac_scores_equal_kronfluence_on_the_same_modules(cli, models, hessian_data, tmp_path, family, track):
    factors = _fit(cli, models[family], hessian_data, tmp_path / "factors", track, "ekfac")
    if family == "llama_gqa":  # the premise: k_proj and v_proj are scored with q_proj's kept input and rotation
        from if_query.kron.factors import HessianFactors

        reader, block = HessianFactors(factors), "model.layers.0.self_attn."
        assert all(reader.same_activation_eigenvectors(block + a, block + b) for a, b in (("q_proj", "k_proj"),
                                                                                          ("k_proj", "v_proj")))
    files = {"train": write_json(tmp_path / "t.json", TRAIN), "query": write_json(tmp_path / "q.json", QUERIES[:2])}
    ours = run_query(cli, models[family], factors, files, tmp_path / "ours", "--per-token-scores")
    theirs = run_query(cli, models[family], factors, files, tmp_path / "theirs", "--per-token-scores",
                       "--engine", "kronfluence")
    assert_close_to_largest(ours["influence_score"], theirs["influence_score"], 1e-4)
    np.testing.assert_allclose(ours["influence_cosine"], theirs["influence_cosine"], atol=1e-4)
    mine = [json.loads(cell) for cell in ours["per_token_scores"]]
    kron = [json.loads(cell) for cell in theirs["per_token_scores"]]
    assert [len(x) for x in mine] == [len(x) for x in kron]
    assert_close_to_largest(np.concatenate(mine), np.concatenate(kron), 1e-4)
    assert_close_to_largest(_per_token_sums(ours), ours["influence_score"], 1e-4)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
@pytest.mark.parametrize("track", ["mlp", "all-linear"])
def test_mixture_of_experts_mlps_are_refused_in_one_line(cli, models, hessian_data, tmp_path, family, track):
    result = cli("fit-hessians", "--model", models[family], "--hessian-dataset", hessian_data, "--output-dir",
                 tmp_path / "f", "--track", track, expect=None)
    assert_one_line_error(result, 2, f"--track {track}:", "mixture-of-experts", "model.layers.0.mlp.experts",
                          "--track attention works")
    assert not (tmp_path / "f").exists()


def test_run_query_follows_the_factors_and_refuses_a_track_of_its_own(cli, models, hessian_data, query_files,
                                                                      tmp_path):
    model = models["llama_gqa"]
    factors = _fit(cli, model, hessian_data, tmp_path / "factors", "attention", "identity")
    result = cli("run-query", "--model", model, "--factors-dir", factors, "--train-json", query_files["train"],
                 "--query-json", query_files["query"], "--output-dir", tmp_path / "out", "--track", "mlp",
                 expect=None)
    assert_one_line_error(result, 2, "--track is a fit-hessians option", "comes from the factors")
    # Another --track into the same directory is another fit: refused unless --overwrite.
    result = cli("fit-hessians", "--model", model, "--hessian-dataset", hessian_data, "--output-dir", factors,
                 "--track", "mlp", "--strategy", "identity", "--quiet", expect=None)
    assert_one_line_error(result, 2, "track was 'attention', now 'mlp'")


def test_factors_that_record_no_track_are_mlp_factors(cli, tiny_gpt2, fitted, query_files, tmp_path):
    """Fits made before --track existed tracked the MLP: run-query tracks it for them, and fit-hessians with the
    same arguments (--track mlp by default) resumes them instead of refusing them as another fit."""
    import shutil

    old = shutil.copytree(fitted["identity"], tmp_path / "old")
    metadata = json.loads((old / "metadata.json").read_text())
    del metadata["fit"]["track"]
    (old / "metadata.json").write_text(json.dumps(metadata))
    run_query(cli, tiny_gpt2, old, query_files, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["track"] == "mlp"
    cli("fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", fitted["data"], "--output-dir", old,
        "--strategy", "identity", "--factor-batch-size", 3, "--lambda-batch-size", 2, "--fisher", "empirical",
        "--quiet")
