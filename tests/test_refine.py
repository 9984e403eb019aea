"""--refine-steps against a dense computation: on a tiny GPT-2 tracking 2,128 weights (block 0's MLP), the damped
Gauss-Newton matrix of the fitting data is formed densely and inverted; refinement converges to its scores, and
with no step it gives the EK-FAC scores."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import QUERIES, TRAIN, Reference, assert_close_to_largest, reference_tokens, score_matrix, write_json

from if_query.score import refine

STEPS = 40
DAMPING = 0.01  # a well-conditioned case: 40 Neumann steps bring the scores within 1% of the exact inverse's


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_gpt2, cli):
    root = tmp_path_factory.mktemp("refine")
    data = write_json(root / "fit.json", TRAIN + QUERIES)
    cli("fit-hessians", "--model", tiny_gpt2, "--hessian-dataset", data, "--output-dir", root / "f",
        "--layer-stride", 2, "--quiet")  # block 0 only; the true Fisher, whose expectation is the Gauss-Newton
    return root, data


def scores(cli, model, root, name, *options):
    out = root / name
    cli("run-query", "--model", model, "--factors-dir", root / "f", "--train-json", write_json(root / "t.json", TRAIN),
        "--query-json", write_json(root / "q.json", QUERIES), "--output-dir", out, "--quiet", *options)
    frame = pd.read_csv(out / "influences.csv")
    damping = json.loads((out / "run.json").read_text())["damping_per_module"]
    return score_matrix(frame, [q["pair_id"] for q in QUERIES], [t["pair_id"] for t in TRAIN]), damping


def dense_scores(model_dir, records, damping) -> torch.Tensor:
    """g_qᵀ (H + Λ)⁻¹ g_t with H the mean over the fitting records of Jᵀ (diag p - p pᵀ) J (float64)."""
    from torch.func import functional_call, jacrev

    reference = Reference(model_dir, layers=(0,))
    reference.model.set_attn_implementation("eager")  # jacrev batches the attention's backward
    names = [n for n, p in reference.model.named_parameters() if any(p is q for q in reference.params)]
    params = {n: p.detach() for n, p in reference.model.named_parameters() if n in names}
    total = sum(p.numel() for p in params.values())
    hessian = torch.zeros(total, total, dtype=torch.float64)
    for record in records:
        ids, labels = reference_tokens(reference.tokenizer, record["prompt"], record["completion"])
        positions = [t for t in range(len(ids) - 1) if labels[t + 1] != -100]

        def logits(weights, ids=ids, positions=positions):
            return functional_call(reference.model, weights, (torch.tensor([ids]),)).logits[0][positions]

        jacobian = torch.cat([j.flatten(2) for j in jacrev(logits)(params).values()], dim=2)  # (pos, vocab, w)
        p = F.softmax(logits(params), dim=-1)
        curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (positions, vocab, vocab)
        hessian += torch.einsum("tvw,tvu,tux->wx", jacobian, curvature, jacobian)
    hessian /= len(records)
    lam = torch.cat([torch.full((p.numel(),), damping[n.rsplit(".", 1)[0]], dtype=torch.float64)
                     for n, p in params.items()])
    inverse = torch.linalg.inv(hessian + torch.diag(lam))
    weights = [reference.model.get_parameter(n) for n in params]

    def gradients(records):  # in the order of ``params`` (the Hessian's)
        return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(reference.loss(r), weights)])
                            for r in records])

    return (gradients(QUERIES) @ inverse @ gradients(TRAIN).T).detach()


def test_refinement_converges_to_the_damped_gauss_newton_inverse(cli, tiny_gpt2, setup):
    root, data = setup
    ekfac, damping = scores(cli, tiny_gpt2, root, "ekfac", "--damping", DAMPING)
    refined, refined_damping = scores(cli, tiny_gpt2, root, "refined", "--damping", DAMPING, "--refine-steps", STEPS,
                                      "--refine-batch-size", 100)  # one batch: all fitting records, H_B = H
    assert refined_damping == damping
    exact = dense_scores(tiny_gpt2, json.loads(data.read_text()), damping).numpy()
    far = abs(ekfac - exact).max() / abs(exact).max()
    assert far > 1e-2  # the premise: EK-FAC is not already the exact inverse here
    assert_close_to_largest(refined, exact, far / 50)


def test_no_refinement_step_is_the_ekfac_score(cli, tiny_gpt2, setup, monkeypatch):
    """v₀ = P g through the refined queries' path of the engine gives the EK-FAC scores."""
    root, _ = setup
    ekfac, _ = scores(cli, tiny_gpt2, root, "ekfac0")
    monkeypatch.setattr(refine, "refine", lambda gn, inverse, gradient, batches, steps, alpha: (inverse(gradient), 0))
    unrefined, _ = scores(cli, tiny_gpt2, root, "zero", "--refine-steps", 1)
    assert_close_to_largest(unrefined, ekfac, 1e-5)


def test_the_refine_check_counts_the_peak_a_cpu_run_measures():
    """--refine-steps' peak on the CPU (tests/refine_peak_probe.py: a random OLMo-2 whose MLPs dominate, one query,
    2 steps; the resident high-water mark reset just before refining) is what the check and ``if-query plan
    --refine-steps`` count for one query's vectors: REFINE_COPIES x the tracked weights in float32 and P's
    temporaries of the largest block (4.33 x here; 3.6-4.77 measured; the previous code measured 5.9 against the 3
    it counted)."""
    import subprocess
    import sys
    from pathlib import Path

    from if_query.plan.sizes import Shape, refine_vector_bytes

    probe = Path(__file__).with_name("refine_peak_probe.py")
    run = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    shapes = [Shape(f"{k}.{name}", *((6144, 384) if name != "down_proj" else (384, 6144)), False)
              for k in range(2) for name in ("gate_proj", "up_proj", "down_proj")]
    assert measured["tracked_bytes"] == sum(s.out * s.width for s in shapes) * 4
    planned = refine_vector_bytes(shapes) / measured["tracked_bytes"]
    # The resident high-water mark is the tensors plus the pages the allocator keeps or returns, which move with the
    # threads' interleaving: 3.6 to 4.77 x over runs here (4.77 once, in CI's run beside other load). So the bounds
    # are wide, and still fail a count off by the factor of two the previous code was.
    assert 0.7 * planned <= measured["multiple"] <= 1.25 * planned, (measured, planned)
