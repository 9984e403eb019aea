"""Token factors + fitted factors -> exact pairwise scores, self-influences and per-token scores.

In: a :class:`~if_query.capture.TokenFactorStore` (each example's layer inputs A (T, in) and output
gradients G (T, out) per tracked module), a :class:`~if_query.kron.FactorReader`, the store indices
of the queries and of the train examples (an example may be both), the damping (None = auto).
Out: :class:`Scores` (float64 on the host): ``pairwise`` (queries, train), ``query_self``
(queries,), ``train_self`` (train,), and with ``per_token`` the (T_t,) contributions of every
train position to every pair's score.

The maths (conventions in :mod:`if_query.kron`): per module, with ``Â = [A, 1] Q_a`` and
``Ĝ = G Q_g`` (token vectors rotated into the eigenbasis; no rotation without eigenvectors) and
``S = (curvature + damping)^-1/2``, the whitened gradient ``W = S ⊙ (Ĝᵀ Â)`` (out, in') gives

    score(q, t) = sum over modules of <W_q, W_t>,     self-influence(x) = sum of |W_x|²,

because the preconditioner is diagonal in the eigenbasis and the eigenbases are orthogonal. The
contribution of train position s to score(q, t) is ``ĝ_sᵀ (S ⊙ W_q) â_s`` (these sum to the score).

Memory: one module's factors on the device at a time; W of at most ``workspace_bytes`` worth of
examples at a time (all examples at once when they fit, else blocks of queries against streamed
blocks of columns, forming a column block's W again for each query block: exact, but slower).
With per-token scores a quarter of the workspace is set aside for them: the preconditioned W and the
mapped output gradients (T, in') of as many queries as fit there (at least one) at a time.

Cost per example and module: rotations 2 T (in'² + out²) FLOPs, W 2 T out in' FLOPs, products
2 out in' per pair. When T is large enough that rotating the summed gradient
(2 out in' (out + in')) is cheaper than rotating tokens, that order is used instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from if_query.capture import TokenFactorStore
from if_query.kron import FactorReader, Preconditioner
from if_query.sizes import BYTES_PER_FLOAT


@dataclass
class Scores:
    pairwise: torch.Tensor  # (queries, train) float64
    query_self: torch.Tensor  # (queries,) float64
    train_self: torch.Tensor  # (train,) float64
    per_token: list[list[torch.Tensor]] | None  # [query][train] -> (T_train,) float64
    damping: dict[str, float | None]  # resolved damping of each module


def whitened_bytes(store: TokenFactorStore, module: str) -> int:
    """Bytes of one example's W for ``module`` (float32, bias column included)."""
    out, inp = store.shapes[module]
    return out * (inp + 1) * BYTES_PER_FLOAT


class _Module:
    """One module's token factors on the device, rotated and whitened on demand."""

    def __init__(self, store: TokenFactorStore, name: str, bias: bool, preconditioner: Preconditioner,
                 device: torch.device):
        self.store, self.name, self.bias = store, name, bias
        self.pre, self.device = preconditioner, device
        self.out, inp = store.shapes[name]
        self.width = inp + int(bias)

    def rotated(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Â (T, in'), Ĝ (T, out)) in float32 on the device."""
        inputs = self.store.inputs(self.name, example).to(self.device, torch.float32)
        if self.bias:
            inputs = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)  # (T, in')
        output_grads = self.store.output_grads(self.name, example).to(self.device, torch.float32)  # (T, out)
        return self.pre.rotate_inputs(inputs), self.pre.rotate_output_grads(output_grads)

    def _rotated_gradient(self, example: int) -> torch.Tensor:
        """Q_gᵀ (Gᵀ [A, 1]) Q_a (out, in'), in whichever order costs fewer FLOPs."""
        tokens = self.store.lengths[example]
        rotate_tokens = tokens * (self.out**2 + self.width**2)
        rotate_gradient = self.out * self.width * (self.out + self.width)
        if self.pre.q_a is None or rotate_tokens <= rotate_gradient:
            inputs, output_grads = self.rotated(example)
            return output_grads.T @ inputs
        inputs = self.store.inputs(self.name, example).to(self.device, torch.float32)
        if self.bias:
            inputs = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)
        output_grads = self.store.output_grads(self.name, example).to(self.device, torch.float32)
        return self.pre.q_g.T @ (output_grads.T @ inputs) @ self.pre.q_a

    def whitened(self, examples: Sequence[int]) -> torch.Tensor:
        """W of ``examples``, (len(examples), out * in') float32."""
        result = torch.empty(len(examples), self.out, self.width, dtype=torch.float32, device=self.device)
        for row, example in enumerate(examples):
            result[row] = self._rotated_gradient(example)
        if self.pre.scale is not None:
            result.mul_(self.pre.scale)
        return result.view(len(examples), -1)  # (examples, out * in')

    def per_token(self, query_whitened: torch.Tensor, example: int) -> torch.Tensor:
        """Contribution of each position of ``example`` to its score with each query:
        ``ĝ_sᵀ (S ⊙ W_q) â_s``, (queries, T) float32."""
        preconditioned = query_whitened.view(-1, self.out, self.width)  # (queries, out, in')
        if self.pre.scale is not None:
            preconditioned = preconditioned * self.pre.scale
        inputs, output_grads = self.rotated(example)  # (T, in'), (T, out)
        mapped = torch.matmul(output_grads, preconditioned)  # (queries, T, in')
        return (mapped * inputs).sum(dim=-1)


def _chunks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def per_token_bytes(store: TokenFactorStore, module: str) -> int:
    """Scratch for one query's per-token scores against one train example of ``module``: its preconditioned
    W (out, in') and the mapped output gradients (T, in') of the longest example, float32."""
    out, inp = store.shapes[module]
    return whitened_bytes(store, module) + max(store.lengths) * (inp + 1) * BYTES_PER_FLOAT


def _add_per_token(token_scores: list[list[torch.Tensor]], module: _Module, rows: range, query_w: torch.Tensor,
                   train: Sequence[int], queries_at_once: int) -> None:
    for j, example in enumerate(train):
        for chunk in _chunks(len(rows), queries_at_once):
            contributions = module.per_token(query_w[chunk.start : chunk.stop], example).double().cpu()  # (c, T)
            for k in chunk:
                token_scores[rows[k]][j] += contributions[k - chunk.start]


@torch.no_grad()
def score(store: TokenFactorStore, factors: FactorReader, modules: dict[str, bool], queries: Sequence[int],
          train: Sequence[int], damping: float | None, per_token: bool, workspace_bytes: int,
          device: torch.device, progress: Callable[[str], None] | None = None) -> Scores:
    """Exact scores of every (query, train) pair, summed over ``modules`` ({name: has bias}).

    ``queries`` and ``train`` are store indices; queries must be distinct, and so must train examples.
    """
    distinct = list(dict.fromkeys([*queries, *train]))  # queries first, then train-only examples
    column = {example: i for i, example in enumerate(distinct)}
    train_columns = torch.tensor([column[t] for t in train], dtype=torch.long)
    n_queries = len(queries)
    products = torch.zeros(n_queries, len(distinct), dtype=torch.float64)  # <W_q, W_x> summed over modules
    self_scores = torch.zeros(len(distinct), dtype=torch.float64)
    token_scores = ([[torch.zeros(store.lengths[t], dtype=torch.float64) for t in train] for _ in queries]
                    if per_token else None)
    resolved: dict[str, float | None] = {}
    for name, bias in modules.items():
        if progress is not None:
            progress(name)
        pre = factors.preconditioner(name, damping, device)
        resolved[name] = pre.damping
        module = _Module(store, name, bias, pre, device)
        # With per-token scores a quarter of the workspace is their scratch (queries taken in chunks).
        scratch = workspace_bytes // 4 if token_scores is not None else 0
        queries_at_once = max(1, scratch // per_token_bytes(store, name))
        capacity = max(2, (workspace_bytes - scratch) // whitened_bytes(store, name))
        if capacity >= len(distinct):  # every W of this module at once: each formed once
            every_w = module.whitened(distinct)
            products += (every_w[:n_queries] @ every_w.T).double().cpu()
            self_scores += every_w.square().sum(dim=1).double().cpu()
            if token_scores is not None:
                _add_per_token(token_scores, module, range(n_queries), every_w[:n_queries], train, queries_at_once)
            del every_w
        else:  # blocks of queries against streamed blocks of columns
            block = capacity // 2
            for number, rows in enumerate(_chunks(n_queries, block) or [range(0)]):
                query_w = module.whitened([distinct[i] for i in rows])
                for columns in _chunks(len(distinct), block):
                    column_w = query_w if columns == rows else module.whitened([distinct[i] for i in columns])
                    products[rows.start : rows.stop, columns.start : columns.stop] += (
                        query_w @ column_w.T).double().cpu()
                    if number == 0:  # the first pass over the columns also gives every self-influence
                        self_scores[columns.start : columns.stop] += column_w.square().sum(dim=1).double().cpu()
                    del column_w
                if token_scores is not None:
                    _add_per_token(token_scores, module, rows, query_w, train, queries_at_once)
                del query_w
        del pre, module
    return Scores(
        pairwise=products[:, train_columns],
        query_self=self_scores[:n_queries],
        train_self=self_scores[train_columns],
        per_token=token_scores,
        damping=resolved,
    )
