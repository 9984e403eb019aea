"""Token factors + fitted factors -> exact pairwise scores, self-influences and per-token scores.

In: a :class:`~if_query.score.capture.TokenFactorStore` (each example's layer inputs A (T, in) and output
gradients G (T, out) per tracked module), a :class:`~if_query.kron.factors.HessianFactors`, the store indices
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
through :mod:`if_query.score.transfer`); W of at most ``workspace_bytes`` worth of examples at a time (all
examples at once when they fit, else blocks of queries against streamed blocks of columns, forming a
column block's W again for each query block: exact, but slower). No other temporary is the size of W:
self-influences are row-wise dot products, per-token products are taken in place. With per-token
scores a quarter of the workspace is set aside for them: the preconditioned W and the mapped output
gradients (T, in') of as many queries as fit there (at least one) at a time.

Modules that see the same input (Llama/OLMo's gate_proj and up_proj; q_proj, k_proj and v_proj) share one
slab of inputs; when consecutive ones' activation eigenvectors are also identical (they are fitted on the same
inputs, so they are unless the factors say otherwise: checked), the rotated inputs ``Â`` of the first are kept
for the next if they fit in an eighth of the workspace.

Cost per example and module: rotations 2 T (in'² + out²) FLOPs, W 2 T out in' FLOPs, products
2 out in' per pair. When T is large enough that rotating the summed gradient
(2 out in' (out + in')) is cheaper than rotating tokens, that order is used instead. The products are
float32; on CUDA, ``--matmul-precision`` says whether they may use TF32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from if_query.kron.factors import HessianFactors, Preconditioner
from if_query.plan import sizes
from if_query.plan.sizes import BYTES_PER_FLOAT, Shape, rotation_flops
from if_query.score.per_example import rotate_tokens, with_bias_column
from if_query.score.store import TokenFactorStore
from if_query.score.transfer import Transfers

ROTATION_CACHE_SHARE = 8  # kept rotated inputs may take up to 1/8 of the workspace


@dataclass(frozen=True)
class Side:
    """One side of the scores: examples ``indices`` of ``store``. The query and train sides may share a store
    (a folder that fits at once: an example that is both is formed once) or not (a chunk of a corpus)."""

    store: TokenFactorStore
    indices: Sequence[int]


@dataclass
class Scores:
    pairwise: torch.Tensor  # (queries, train) float64
    query_self: torch.Tensor | None  # (queries,) float64; None without the cosine
    train_self: torch.Tensor | None  # (train,) float64; None without the cosine
    per_token: list[list[torch.Tensor]] | None  # [query][train] -> (T_train,) float64
    damping: dict[str, float | None]  # resolved damping of each module
    bytes_to_device: int = 0  # token factors copied to the device (0 on the CPU: read in place)
    unrotated_modules: int = 0  # modules scored as <P_q, G_tᵀ A_t> (no train rotation)


def whitened_bytes(shape: Shape) -> int:
    return sizes.whitened_bytes(shape)


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """|row|² of each row of ``rows`` (n, d) as n dot products: no (n, d) temporary."""
    return torch.bmm(rows.unsqueeze(1), rows.unsqueeze(2)).view(-1)  # (n, 1, d) @ (n, d, 1) -> (n,)


class _Module:
    """One module's token factors of one store on the device (its slabs), rotated and whitened on demand."""

    def __init__(self, store: TokenFactorStore, shape: Shape, preconditioner: Preconditioner,
                 inputs: torch.Tensor, output_grads: torch.Tensor, rotations: dict[int, torch.Tensor] | None):
        self.store, self.shape, self.pre = store, shape, preconditioner
        self.inputs, self.output_grads = inputs, output_grads  # (tokens, in), (tokens, out), model dtype
        self.rotations = rotations  # example -> Â, shared with the next module of the same inputs; None: off
        self.out, self.width = shape.out, shape.width

    def _tokens(self, example: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([A, 1] (T, in'), G (T, out)) in float32 on the device (upcast there, not on the host)."""
        rows = self.store.rows(example)
        inputs = with_bias_column(self.inputs[rows].float(), self.shape.bias)  # (T, in')
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

    def gradient(self, example: int) -> torch.Tensor:
        """The plain per-example gradient Gᵀ [A, 1] (out, in')."""
        inputs, output_grads = self._tokens(example)
        return output_grads.T @ inputs

    def _rotated_gradient(self, example: int) -> torch.Tensor:
        """Q_gᵀ (Gᵀ [A, 1]) Q_a (out, in'), in whichever order costs fewer FLOPs."""
        if self.pre.q_a is None or rotate_tokens(self.store.lengths[example], self.out, self.width):
            inputs, output_grads = self.rotated(example)
            return output_grads.T @ inputs
        return self.pre.q_g.T @ self.gradient(example) @ self.pre.q_a


def _form(columns: Sequence[tuple[_Module, int]], kind: str) -> torch.Tensor:
    """(len(columns), out * in') float32 on the device, for (module view, example) pairs: ``whitened`` W =
    S ⊙ R, ``gradient`` D = Gᵀ [A, 1] (unrotated), or ``preconditioned`` P = Q_g (S ⊙ W) Q_aᵀ (the dense query
    form: score = <P_q, D_t>)."""
    first = columns[0][0] if columns else None
    if first is None:
        return torch.empty(0, 0)
    result = torch.empty(len(columns), first.out, first.width, dtype=torch.float32, device=first.inputs.device)
    pre = first.pre
    for row, (view, example) in enumerate(columns):
        result[row] = view.gradient(example) if kind == "gradient" else view._rotated_gradient(example)
    if kind != "gradient" and pre.scale is not None:
        result.mul_(pre.scale)
        if kind == "preconditioned":
            result.mul_(pre.scale)  # S² ⊙ R
    if kind == "preconditioned" and pre.q_a is not None:
        for row in range(len(columns)):
            result[row] = pre.q_g @ result[row] @ pre.q_a.T  # back to the weights' basis
    return result.view(len(columns), -1)  # (columns, out * in')


def _query_rows(columns: list[tuple[_Module, int]], rows: range, kind: str, refined: list | None,
                shape: Shape) -> torch.Tensor:
    """The query side of ``rows``: as :func:`_form` forms it, or from refined queries' dense v (their
    ``refine.py`` blocks): v itself for ``preconditioned``, else ``(Q_gᵀ v Q_a) / S``, the form whose dot with a
    train example's W is <v, D_t> (and whose per-token scores are g_sᵀ v a_s)."""
    if refined is None:
        return _form([columns[i] for i in rows], kind)
    view = columns[0][0]
    pre = view.pre
    v = torch.stack([refined[i][shape.name] for i in rows]).to(view.inputs.device)  # (rows, out, in')
    if kind != "preconditioned":
        if pre.q_a is not None:
            v = pre.q_g.T @ v @ pre.q_a
        if pre.scale is not None:
            v = v / pre.scale
    return v.reshape(len(rows), -1)


def _per_token(view: _Module, query_whitened: torch.Tensor, example: int) -> torch.Tensor:
    """Contribution of each position of ``example`` to its score with each query:
    ``ĝ_sᵀ (S ⊙ W_q) â_s``, (queries, T) float32."""
    preconditioned = query_whitened.view(-1, view.out, view.width)  # (queries, out, in')
    if view.pre.scale is not None:
        preconditioned = preconditioned * view.pre.scale
    inputs, output_grads = view.rotated(example)  # (T, in'), (T, out)
    mapped = torch.matmul(output_grads, preconditioned)  # (queries, T, in')
    return mapped.mul_(inputs).sum(dim=-1)


def _chunks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _add_per_token(token_scores: list[list[torch.Tensor]], rows: range, query_w: torch.Tensor,
                   train: Sequence[tuple[_Module, int]], queries_at_once: int) -> None:
    for j, (view, example) in enumerate(train):
        for chunk in _chunks(len(rows), queries_at_once):
            contributions = _per_token(view, query_w[chunk.start : chunk.stop], example).double().cpu()  # (c, T)
            for k in chunk:
                token_scores[rows[k]][j] += contributions[k - chunk.start]


class _Slabs:
    """The device copies of a store's slabs for the module being scored: its output gradients, and the
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


def _shares_rotations(store: TokenFactorStore, factors: HessianFactors, names: list[str], index: int) -> bool:
    """Whether module ``names[index + 1]`` reads the same inputs as ``names[index]`` with the same activation
    eigenvectors, so the rotated inputs of the one serve the other."""
    if index + 1 >= len(names):
        return False
    this, following = names[index], names[index + 1]
    return (store.input_of[this] == store.input_of[following]
            and factors.same_activation_eigenvectors(this, following))


def _unrotated_is_cheaper(shape: Shape, train_lengths: Sequence[int], queries: int) -> bool:
    """Without self-influences: whether <P_q, D_t> (each query's W rotated back once, no train rotation) costs
    fewer FLOPs than W_q . W_t (every train example's tokens or gradient rotated)."""
    out, width = shape.out, shape.width
    rotated = sum(rotation_flops(t, out, width) for t in train_lengths)
    unrotated = sum(2 * t * out * width for t in train_lengths) + queries * 2 * out * width * (out + width)
    return unrotated < rotated


@dataclass(frozen=True)
class Setup:
    """What every engine call of a run shares: the factors' reader, the tracked modules' shapes, the damping (None:
    auto, per module), the device, whether self-influences (the cosine) are computed, and the transfers that move
    (and count) token factors."""

    factors: HessianFactors
    shapes: Sequence[Shape]
    damping: float | None
    device: torch.device
    cosine: bool = True
    transfers: Transfers | None = None


@torch.no_grad()
def score(queries: Side, train: Side, setup: Setup, workspace_bytes: int, per_token: bool,
          refined: tuple[list, torch.Tensor] | None = None, progress: Callable[[str], None] | None = None) -> Scores:
    """Exact scores of every (query, train) pair, summed over the modules of ``setup.shapes``, with whitened
    gradients in at most ``workspace_bytes``.

    Queries must be distinct, and so must train examples. Without ``setup.cosine`` no self-influence is computed,
    and a module whose queries are cheaper to rotate back than its train examples are to rotate is scored as
    <P_q, D_t> (never with per-token scores). ``refined`` (one dense v per query, :mod:`if_query.score.refine`, and
    their self-influences) replaces the queries' EK-FAC forms: scores <v_q, D_t>.
    """
    factors, shapes, damping, device, cosine = setup.factors, setup.shapes, setup.damping, setup.device, setup.cosine
    refined, refined_self = refined or (None, None)
    transfers = setup.transfers or Transfers(device)
    moved_before = transfers.to_device_bytes
    same = train.store is queries.store
    n_queries = len(queries.indices)
    keys, train_columns = _column_keys(queries, train, same)
    totals = _Totals(
        products=torch.zeros(n_queries, len(keys), dtype=torch.float64),
        self_scores=torch.zeros(len(keys), dtype=torch.float64) if cosine else None,
        token_scores=([[torch.zeros(train.store.lengths[t], dtype=torch.float64) for t in train.indices]
                       for _ in queries.indices] if per_token else None))
    longest = max((train.store.lengths[x] for x in train.indices), default=1)
    resolved: dict[str, float | None] = {}
    stores = {"q": queries.store, "t": train.store}
    slabs = {key: _Slabs(store, transfers) for key, store in stores.items() if key == "q" or not same}
    rotations: dict[str, dict | None] = {key: None for key in slabs}
    names = [s.name for s in shapes]
    unrotated_modules = 0
    for index, shape in enumerate(shapes):
        if progress is not None:
            progress(shape.name)
        pre = factors.preconditioner(shape.name, damping, device)
        resolved[shape.name] = pre.damping
        shares = {key: _shares_rotations(stores[key], factors, names, index) for key in slabs}
        kept = _keep_rotations(rotations, shares, stores, keys, shape, workspace_bytes)
        views = {key: _Module(stores[key], shape, pre, *slabs[key].load(shape.name), rotations[key]) for key in slabs}
        columns = [(views[k], x) for k, x in keys]
        train_pairs = [(views["q" if same else "t"], x) for x in train.indices]
        unrotated = (not cosine and not per_token and pre.q_a is not None and _unrotated_is_cheaper(
            shape, [stores[k].lengths[x] for k, x in keys[n_queries:]], n_queries))
        _score_module(columns, train_pairs, n_queries, shape, workspace_bytes, kept, longest, totals, refined,
                      unrotated)
        unrotated_modules += unrotated
        for key in slabs:
            if not shares[key]:
                rotations[key] = None  # the next module reads other inputs or eigenvectors
        del pre, views, columns, train_pairs
    self_scores = totals.self_scores
    return Scores(
        pairwise=totals.products[:, train_columns],
        query_self=None if self_scores is None else self_scores[:n_queries] if refined is None else refined_self,
        train_self=None if self_scores is None else self_scores[train_columns],
        per_token=totals.token_scores,
        damping=resolved,
        bytes_to_device=transfers.to_device_bytes - moved_before,
        unrotated_modules=unrotated_modules,
    )


@dataclass
class _Totals:
    """What :func:`score` sums over modules, by column (every query, then the train examples that are not)."""

    products: torch.Tensor  # (queries, columns) float64: <W_q, W_x>
    self_scores: torch.Tensor | None  # (columns,) float64: |W_x|²; None without the cosine
    token_scores: list[list[torch.Tensor]] | None  # [query][train] -> (T_train,) float64; None without


def _column_keys(queries: Side, train: Side, same: bool) -> tuple[list[tuple[str, int]], torch.Tensor]:
    """The columns: every query, then the train examples that are not queries (a shared store forms those once),
    as (``"q"`` or ``"t"``, store index) keys; and each train example's column (train,)."""
    column_of = {("q", x): i for i, x in enumerate(queries.indices)}
    for x in train.indices:
        column_of.setdefault(("q" if same else "t", x), len(column_of))
    train_columns = torch.tensor([column_of["q" if same else "t", x] for x in train.indices], dtype=torch.long)
    return list(column_of), train_columns


def _keep_rotations(rotations: dict[str, dict | None], shares: dict[str, bool], stores: dict[str, TokenFactorStore],
                    keys: list[tuple[str, int]], shape: Shape, workspace_bytes: int) -> int:
    """Start keeping this module's rotated inputs for the next (gate_proj's for up_proj), each store its own,
    where the next shares them and they fit in an eighth of the workspace; the bytes the kept rotations take."""
    cache = {key: sum(stores[key].lengths[x] for (k, x) in keys if k == key) * shape.width * BYTES_PER_FLOAT
             for key in rotations}
    for key in rotations:
        if rotations[key] is None and shares[key] and cache[key] <= workspace_bytes // ROTATION_CACHE_SHARE:
            rotations[key] = {}  # filled by this module, read by the next
    return sum(cache[key] for key in rotations if rotations[key] is not None)


def _score_module(columns: list[tuple[_Module, int]], train: list[tuple[_Module, int]], n_queries: int,
                  shape: Shape, workspace_bytes: int, kept: int, longest: int, totals: _Totals,
                  refined: list | None, unrotated: bool) -> None:
    """One module's scores added to ``totals``: as <P_q, D_t> (``unrotated``), every W at once when the
    workspace (less the ``kept`` rotations) holds them, else blocks of queries against streamed blocks."""
    scratch, capacity = sizes.workspace_split(workspace_bytes, shape, totals.token_scores is not None, kept)
    queries_at_once = max(1, scratch // sizes.per_token_scratch_bytes(shape, longest))
    if unrotated:
        _score_unrotated(columns, n_queries, capacity, totals.products, refined, shape)
    elif capacity >= len(columns) + (n_queries if refined is not None else 0):  # every W at once: each formed once
        every_w = _form(columns, "whitened")
        query_w = every_w[:n_queries] if refined is None else _query_rows(columns, range(n_queries), "whitened",
                                                                         refined, shape)
        totals.products += (query_w @ every_w.T).double().cpu()
        if totals.self_scores is not None:
            totals.self_scores += _squared_norms(every_w).double().cpu()
        if totals.token_scores is not None:
            _add_per_token(totals.token_scores, range(n_queries), query_w, train, queries_at_once)
        del every_w, query_w
    else:  # blocks of queries against streamed blocks of columns
        _score_in_blocks(columns, n_queries, capacity // 2, totals.products, totals.self_scores, totals.token_scores,
                         train, queries_at_once, refined, shape)


def _score_in_blocks(columns: list[tuple[_Module, int]], n_queries: int, block: int, products: torch.Tensor,
                     self_scores: torch.Tensor | None, token_scores: list | None, train: list[tuple[_Module, int]],
                     queries_at_once: int, refined: list | None = None, shape: Shape | None = None) -> None:
    """Blocks of ``block`` queries against streamed blocks of ``block`` columns (each column block's W formed
    again for every query block)."""
    for number, rows in enumerate(_chunks(n_queries, block) or [range(0)]):
        query_w = _query_rows(columns, rows, "whitened", refined, shape)
        for part in _chunks(len(columns), block):
            same = part == rows and refined is None
            column_w = query_w if same else _form([columns[i] for i in part], "whitened")
            if len(rows):
                products[rows.start : rows.stop, part.start : part.stop] += (query_w @ column_w.T).double().cpu()
            if number == 0 and self_scores is not None:  # the first pass over the columns gives self-influences
                self_scores[part.start : part.stop] += _squared_norms(column_w).double().cpu()
            del column_w
        if token_scores is not None:
            _add_per_token(token_scores, rows, query_w, train, queries_at_once)
        del query_w


def _score_unrotated(columns: list[tuple[_Module, int]], n_queries: int, capacity: int, products: torch.Tensor,
                     refined: list | None = None, shape: Shape | None = None) -> None:
    """Scores as <P_q, D_t>: the queries' preconditioned gradients P_q (blocks of them; refined: v_q) against the
    train examples' plain gradients D_t (streamed blocks); a train column that is a query is its own D."""
    block = max(1, capacity // 2)
    for rows in _chunks(n_queries, block):
        query_p = _query_rows(columns, rows, "preconditioned", refined, shape)
        for part in _chunks(len(columns), block):
            column_d = _form([columns[i] for i in part], "gradient")
            products[rows.start : rows.stop, part.start : part.stop] += (query_p @ column_d.T).double().cpu()
            del column_d
        del query_p


@torch.no_grad()
def gradients(side: Side, shapes: Sequence[Shape], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Each example's plain per-module gradient Gᵀ [A, 1] (out, in') float32 on ``device`` (for refinement)."""
    result = [{} for _ in side.indices]
    slabs = _Slabs(side.store, Transfers(device))
    for shape in shapes:
        view = _Module(side.store, shape, Preconditioner(None, None, None, None), *slabs.load(shape.name), None)
        for row, example in enumerate(side.indices):
            result[row][shape.name] = view.gradient(example)
    return result
