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

Memory (``sizes.py`` counts every part; the plan line prints them): one module's factors on the device
at a time, and that module's token factors (its slab of the store, in the model's dtype, copied once
through :mod:`if_query.transfer`); W of at most ``workspace_bytes`` worth of examples at a time (all
examples at once when they fit, else blocks of queries against streamed blocks of columns, forming a
column block's W again for each query block: exact, but slower). No other temporary is the size of W:
self-influences are row-wise dot products, per-token products are taken in place. With per-token
scores a quarter of the workspace is set aside for them: the preconditioned W and the mapped output
gradients (T, in') of as many queries as fit there (at least one) at a time.

Modules that see the same input (Llama/OLMo's gate_proj and up_proj) share one slab of inputs; when
their activation eigenvectors are also identical (they are fitted on the same inputs, so they are unless
the factors say otherwise: checked), the rotated inputs ``Â`` of the first are kept for the second if
they fit in an eighth of the workspace.

Cost per example and module: rotations 2 T (in'² + out²) FLOPs, W 2 T out in' FLOPs, products
2 out in' per pair. When T is large enough that rotating the summed gradient
(2 out in' (out + in')) is cheaper than rotating tokens, that order is used instead. The products are
float32; on CUDA, ``--matmul-precision`` says whether they may use TF32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from if_query.capture import TokenFactorStore
from if_query.kron import FactorReader, Preconditioner
from if_query.sizes import BYTES_PER_FLOAT, rotate_tokens
from if_query.transfer import Transfers

ROTATION_CACHE_SHARE = 8  # kept rotated inputs may take up to 1/8 of the workspace


@dataclass
class Scores:
    pairwise: torch.Tensor  # (queries, train) float64
    query_self: torch.Tensor  # (queries,) float64
    train_self: torch.Tensor  # (train,) float64
    per_token: list[list[torch.Tensor]] | None  # [query][train] -> (T_train,) float64
    damping: dict[str, float | None]  # resolved damping of each module
    bytes_to_device: int = 0  # token factors copied to the device (0 on the CPU: read in place)


def whitened_bytes(store: TokenFactorStore, module: str) -> int:
    """Bytes of one example's W for ``module`` (float32, bias column included)."""
    out, inp = store.shapes[module]
    return out * (inp + 1) * BYTES_PER_FLOAT


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """|row|² of each row of ``rows`` (n, d) as n dot products: no (n, d) temporary."""
    return torch.bmm(rows.unsqueeze(1), rows.unsqueeze(2)).view(-1)  # (n, 1, d) @ (n, d, 1) -> (n,)


class _Module:
    """One module's token factors on the device (its slabs of the store), rotated and whitened on demand."""

    def __init__(self, store: TokenFactorStore, name: str, bias: bool, preconditioner: Preconditioner,
                 inputs: torch.Tensor, output_grads: torch.Tensor, rotations: dict[int, torch.Tensor] | None):
        self.store, self.name, self.bias, self.pre = store, name, bias, preconditioner
        self.inputs, self.output_grads = inputs, output_grads  # (tokens, in), (tokens, out), model dtype
        self.rotations = rotations  # example -> Â, shared with the next module of the same inputs; None: off
        self.out, inp = store.shapes[name]
        self.width = inp + int(bias)

    def _tokens(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([A, 1] (T, in'), G (T, out)) in float32 on the device (upcast there, not on the host)."""
        rows = self.store.rows(example)
        inputs = self.inputs[rows].float()
        if self.bias:
            inputs = torch.cat([inputs, inputs.new_ones(inputs.shape[0], 1)], dim=1)  # (T, in')
        return inputs, self.output_grads[rows].float()

    def rotated(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Â (T, in'), Ĝ (T, out)) in float32 on the device."""
        if self.rotations is not None and example in self.rotations:
            return self.rotations[example], self.pre.rotate_output_grads(self._tokens(example)[1])
        inputs, output_grads = self._tokens(example)
        rotated_inputs = self.pre.rotate_inputs(inputs)
        if self.rotations is not None:
            self.rotations[example] = rotated_inputs
        return rotated_inputs, self.pre.rotate_output_grads(output_grads)

    def _rotated_gradient(self, example: int) -> torch.Tensor:
        """Q_gᵀ (Gᵀ [A, 1]) Q_a (out, in'), in whichever order costs fewer FLOPs."""
        if self.pre.q_a is None or rotate_tokens(self.store.lengths[example], self.out, self.width):
            inputs, output_grads = self.rotated(example)
            return output_grads.T @ inputs
        inputs, output_grads = self._tokens(example)
        return self.pre.q_g.T @ (output_grads.T @ inputs) @ self.pre.q_a

    def whitened(self, examples: Sequence[int]) -> torch.Tensor:
        """W of ``examples``, (len(examples), out * in') float32."""
        result = torch.empty(len(examples), self.out, self.width, dtype=torch.float32, device=self.inputs.device)
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
        return mapped.mul_(inputs).sum(dim=-1)


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


class _Slabs:
    """The device copies of the store's slabs for the module being scored: its output gradients, and the
    inputs of its input group, kept while consecutive modules read them (gate_proj then up_proj)."""

    def __init__(self, store: TokenFactorStore, transfers: Transfers):
        self.store, self.transfers = store, transfers
        self.group: str | None = None
        self.inputs: torch.Tensor | None = None

    def load(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.store.input_of[module]
        if group != self.group:
            self.inputs = None  # the previous group's slab goes before the next one comes
            self.inputs, self.group = self.transfers.to_device(self.store.module_inputs(module)), group
        return self.inputs, self.transfers.to_device(self.store.module_output_grads(module))


def _shares_rotations(store: TokenFactorStore, factors: FactorReader, names: list[str], index: int) -> bool:
    """Whether module ``names[index + 1]`` reads the same inputs as ``names[index]`` with the same activation
    eigenvectors, so the rotated inputs of the one serve the other."""
    if index + 1 >= len(names):
        return False
    this, following = names[index], names[index + 1]
    return (store.input_of[this] == store.input_of[following]
            and factors.same_activation_eigenvectors(this, following))


@torch.no_grad()
def score(store: TokenFactorStore, factors: FactorReader, modules: dict[str, bool], queries: Sequence[int],
          train: Sequence[int], damping: float | None, per_token: bool, workspace_bytes: int,
          device: torch.device, progress: Callable[[str], None] | None = None,
          transfers: Transfers | None = None) -> Scores:
    """Exact scores of every (query, train) pair, summed over ``modules`` ({name: has bias}).

    ``queries`` and ``train`` are store indices; queries must be distinct, and so must train examples.
    """
    transfers = transfers or Transfers(device)
    moved_before = transfers.to_device_bytes
    distinct = list(dict.fromkeys([*queries, *train]))  # queries first, then train-only examples
    column = {example: i for i, example in enumerate(distinct)}
    train_columns = torch.tensor([column[t] for t in train], dtype=torch.long)
    n_queries = len(queries)
    products = torch.zeros(n_queries, len(distinct), dtype=torch.float64)  # <W_q, W_x> summed over modules
    self_scores = torch.zeros(len(distinct), dtype=torch.float64)
    token_scores = ([[torch.zeros(store.lengths[t], dtype=torch.float64) for t in train] for _ in queries]
                    if per_token else None)
    resolved: dict[str, float | None] = {}
    slabs, rotations = _Slabs(store, transfers), None
    names = list(modules)
    for index, (name, bias) in enumerate(modules.items()):
        if progress is not None:
            progress(name)
        pre = factors.preconditioner(name, damping, device)
        resolved[name] = pre.damping
        out, inp = store.shapes[name]
        cache_bytes = sum(store.lengths[x] for x in distinct) * (inp + int(bias)) * BYTES_PER_FLOAT
        shares = _shares_rotations(store, factors, names, index)
        if rotations is None and shares and cache_bytes <= workspace_bytes // ROTATION_CACHE_SHARE:
            rotations = {}  # filled by this module, read by the next
        module = _Module(store, name, bias, pre, *slabs.load(name), rotations)
        # With per-token scores a quarter of the workspace is their scratch (queries taken in chunks).
        scratch = workspace_bytes // 4 if token_scores is not None else 0
        queries_at_once = max(1, scratch // per_token_bytes(store, name))
        reserved = scratch + (cache_bytes if rotations is not None else 0)
        capacity = max(2, (workspace_bytes - reserved) // whitened_bytes(store, name))
        if capacity >= len(distinct):  # every W of this module at once: each formed once
            every_w = module.whitened(distinct)
            products += (every_w[:n_queries] @ every_w.T).double().cpu()
            self_scores += _squared_norms(every_w).double().cpu()
            if token_scores is not None:
                _add_per_token(token_scores, module, range(n_queries), every_w[:n_queries], train, queries_at_once)
            del every_w
        else:  # blocks of queries against streamed blocks of columns
            _score_in_blocks(module, distinct, n_queries, capacity // 2, products, self_scores, token_scores, train,
                             queries_at_once)
        if not shares:
            rotations = None  # the next module reads other inputs or eigenvectors
        del pre, module
    return Scores(
        pairwise=products[:, train_columns],
        query_self=self_scores[:n_queries],
        train_self=self_scores[train_columns],
        per_token=token_scores,
        damping=resolved,
        bytes_to_device=transfers.to_device_bytes - moved_before,
    )


def _score_in_blocks(module: _Module, distinct: list[int], n_queries: int, block: int, products: torch.Tensor,
                     self_scores: torch.Tensor, token_scores: list | None, train: Sequence[int],
                     queries_at_once: int) -> None:
    """Blocks of ``block`` queries against streamed blocks of ``block`` columns (each column block's W formed
    again for every query block)."""
    for number, rows in enumerate(_chunks(n_queries, block) or [range(0)]):
        query_w = module.whitened([distinct[i] for i in rows])
        for columns in _chunks(len(distinct), block):
            column_w = query_w if columns == rows else module.whitened([distinct[i] for i in columns])
            products[rows.start : rows.stop, columns.start : columns.stop] += (query_w @ column_w.T).double().cpu()
            if number == 0:  # the first pass over the columns also gives every self-influence
                self_scores[columns.start : columns.stop] += _squared_norms(column_w).double().cpu()
            del column_w
        if token_scores is not None:
            _add_per_token(token_scores, module, rows, query_w, train, queries_at_once)
        del query_w
