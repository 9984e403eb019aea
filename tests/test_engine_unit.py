"""The engine and the token-factor store on random token factors, against dense per-example gradients."""

import pytest
import torch
from helpers import assert_close_to_largest

from if_query import engine
from if_query.capture import TokenFactorStore
from if_query.kron import Preconditioner

SHAPES = {"a": (5, 4), "b": (3, 6)}  # name -> (out, in)
BIAS = {"a": True, "b": False}
LENGTHS = [3, 1, 4, 2, 5]


class RandomFactors:
    """Stands in for FactorReader: random orthogonal eigenbases and positive curvature per module."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.modules = {}
        for name, (out, inp) in SHAPES.items():
            width = inp + int(BIAS[name])
            q_a, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
            q_g, _ = torch.linalg.qr(torch.randn(out, out, generator=generator, dtype=torch.float64))
            curvature = torch.rand(out, width, generator=generator, dtype=torch.float64) + 0.1
            self.modules[name] = (q_a, q_g, curvature)

    def preconditioner(self, name, damping, device):
        q_a, q_g, curvature = self.modules[name]
        damping = 0.5 if damping is None else damping
        return Preconditioner(q_a.float(), q_g.float(), (curvature + damping).rsqrt().float(), damping)


def filled_store(host_budget: int, tmp_path) -> TokenFactorStore:
    store = TokenFactorStore(SHAPES, LENGTHS, torch.float32, host_budget, tmp_path)
    generator = torch.Generator().manual_seed(1)
    for name, (out, inp) in SHAPES.items():
        store._inputs[name].copy_(torch.randn(store.tokens, inp, generator=generator))
        store._output_grads[name].copy_(torch.randn(store.tokens, out, generator=generator))
    return store


def dense_scores(store: TokenFactorStore, factors: RandomFactors, queries, train):
    """score(q, t) = sum_modules sum_ij R_q R_t / C with R = Q_g^T (sum_t g_t a_t^T) Q_a, in float64."""
    total = torch.zeros(len(queries), len(train), dtype=torch.float64)
    self_scores = torch.zeros(len(LENGTHS), dtype=torch.float64)
    per_token = [[torch.zeros(LENGTHS[t], dtype=torch.float64) for t in train] for _ in queries]
    for name in SHAPES:
        q_a, q_g, curvature = factors.modules[name]
        inverse = 1 / (curvature + 0.5)

        def tokens(i, name=name):
            a = store.inputs(name, i).double()
            if BIAS[name]:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=torch.float64)], dim=1)
            return a, store.output_grads(name, i).double()

        rotated = {}
        for i in range(len(LENGTHS)):
            a, g = tokens(i)
            rotated[i] = q_g.T @ (g.T @ a) @ q_a
            self_scores[i] += (rotated[i] ** 2 * inverse).sum()
        for row, q in enumerate(queries):
            preconditioned = q_g @ (rotated[q] * inverse) @ q_a.T  # P g_q in parameter space
            for column, t in enumerate(train):
                total[row, column] += (rotated[q] * rotated[t] * inverse).sum()
                a, g = tokens(t)
                per_token[row][column] += torch.einsum("so,oi,si->s", g, preconditioned, a)
    return total, self_scores, per_token


# 1600 bytes: every W at once, per-token scores 2 queries at a time for module a (1 for b).
@pytest.mark.parametrize("workspace", [10**9, 1, 1600], ids=["all-at-once", "blocks-of-one", "per-token-chunks"])
@pytest.mark.parametrize("spill", [False, True], ids=["ram", "spill-file"])
def test_engine_equals_dense_gradients(tmp_path, workspace, spill):
    store = filled_store(0 if spill else 10**9, tmp_path)
    assert store.spilled == spill
    factors = RandomFactors()
    queries, train = [3, 0, 4], [1, 3, 2, 0]  # two examples are both query and train
    result = engine.score(store, factors, BIAS, queries, train, None, True, workspace, torch.device("cpu"))
    expected, self_scores, per_token = dense_scores(store, factors, queries, train)
    assert_close_to_largest(result.pairwise, expected, 1e-5)
    assert_close_to_largest(result.query_self, self_scores[queries], 1e-5)
    assert_close_to_largest(result.train_self, self_scores[train], 1e-5)
    got_tokens = torch.cat([t for row in result.per_token for t in row])
    assert_close_to_largest(got_tokens, torch.cat([t for row in per_token for t in row]), 1e-5)
    sums = torch.tensor([[float(t.sum()) for t in row] for row in result.per_token])
    assert_close_to_largest(sums, expected, 1e-5)
    assert result.damping == {"a": 0.5, "b": 0.5}


def test_engine_without_queries_gives_train_self_influences(tmp_path):
    store = filled_store(10**9, tmp_path)
    factors = RandomFactors()
    result = engine.score(store, factors, BIAS, [], [2, 4], None, False, 1, torch.device("cpu"))
    _, self_scores, _ = dense_scores(store, factors, [], [2, 4])
    assert result.pairwise.shape == (0, 2)
    assert_close_to_largest(result.train_self, self_scores[[2, 4]], 1e-5)


def test_store_rows_and_spill_file_leave_nothing_behind(tmp_path):
    store = TokenFactorStore(SHAPES, LENGTHS, torch.bfloat16, 0, tmp_path)
    assert store.spilled and not list(tmp_path.iterdir())  # the file is unlinked at once, the mapping lives on
    store._inputs["a"][store.rows(2)] = 1.5
    assert store.inputs("a", 2).shape == (4, 4) and bool((store.inputs("a", 2) == 1.5).all())
    assert not bool((store.inputs("a", 1) == 1.5).any())
    bytes_per_row = sum(out + inp for out, inp in SHAPES.values()) * 2
    assert store.nbytes == sum(LENGTHS) * bytes_per_row
