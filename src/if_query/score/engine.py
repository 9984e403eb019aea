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

A pipeline (:mod:`if_query.score.streams`): module m+1's factors (as stored, prepared on the device when they
arrive) and token factors (its slabs of each store, in the model's dtype, :mod:`if_query.score.transfer`) are
copied on a copy stream while module m is computed; the compute stream waits for their event, not the host. The
scores are summed on the device and land on the host once, at the end. The one synchronisation per module: before
module m+1's copies are issued, the host waits for module m-1's compute (module m is queued by then), so that at most
two modules' factors and slabs are on the device. Where every module's prepared factors fit beside the model
(``Setup.resident``, the plan's decision), they stay on the device across calls: copied once per run.

Memory (``sizes.py`` counts every part; the plan line prints them): two modules' factors and token factors on the
device (the one being scored and the next, arriving); W of at most ``workspace_bytes`` worth of examples at a time (all
examples at once when they fit, else blocks of queries against streamed blocks of columns, forming a
column block's W again for each query block: exact, but slower). No other temporary is the size of W:
self-influences are row-wise dot products, each example's W is written into its row, per-token products are taken
in place. With per-token scores a quarter of the workspace is set aside for them: the mapped output gradients
(T, in') of as many queries as fit there (at least one) at a time; the queries' W become S ⊙ W in place, once,
and each train example's tokens are rotated once per block of queries.

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
from if_query.score.transfer import FACTORS, REFINE, Transfers

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
    bytes_to_device: int = 0  # token factors and factors copied to the device (0 on the CPU: read in place)
    factor_bytes_to_device: int = 0  # of which factors (0 where they stayed on the device from an earlier call)
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

    def gradient(self, example: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The plain per-example gradient Gᵀ [A, 1] (out, in'), written into ``out`` when given."""
        inputs, output_grads = self._tokens(example)
        return torch.matmul(output_grads.T, inputs, out=out)

    def rotated_gradient(self, example: int, out: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
        """Q_gᵀ (Gᵀ [A, 1]) Q_a (out, in') written into ``out``, in whichever order costs fewer FLOPs (the summed
        gradient's through ``scratch``: one (out, in') buffer shared by every example of a call)."""
        if self.pre.q_a is None or rotate_tokens(self.store.lengths[example], self.out, self.width):
            inputs, output_grads = self.rotated(example)
            return torch.matmul(output_grads.T, inputs, out=out)
        self.gradient(example, out=out)
        torch.matmul(self.pre.q_g.T, out, out=scratch)
        return torch.matmul(scratch, self.pre.q_a, out=out)


ALIGNMENT = 64  # bytes: BLAS rounds by where its output starts (MKL does), so rows are written in place only so


def _aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % ALIGNMENT == 0


def _form(columns: Sequence[tuple[_Module, int]], kind: str) -> torch.Tensor:
    """(len(columns), out * in') float32 on the device, for (module view, example) pairs: ``whitened`` W =
    S ⊙ R, ``gradient`` D = Gᵀ [A, 1] (unrotated), or ``preconditioned`` P = Q_g (S ⊙ W) Q_aᵀ (the dense query
    form: score = <P_q, D_t>). Each example is written into its row of the result (a row that does not start
    64-byte aligned, as in small test shapes, through an aligned buffer: the same bits as a fresh tensor); two
    (out, in') buffers per call, none per example."""
    first = columns[0][0] if columns else None
    if first is None:
        return torch.empty(0, 0)
    result = torch.empty(len(columns), first.out, first.width, dtype=torch.float32, device=first.inputs.device)
    pre = first.pre
    buffers = [torch.empty(first.out, first.width, dtype=torch.float32, device=result.device) for _ in range(2)]
    scratch, staging = buffers
    for row, (view, example) in enumerate(columns):
        target = result[row] if _aligned(result[row]) else staging
        if kind == "gradient":
            view.gradient(example, out=target)
        else:
            view.rotated_gradient(example, target, scratch)
        if target is staging:
            result[row].copy_(staging)
    if kind != "gradient" and pre.scale is not None:
        result.mul_(pre.scale)
        if kind == "preconditioned":
            result.mul_(pre.scale)  # S² ⊙ R
    if kind == "preconditioned" and pre.q_a is not None:
        for row in range(len(columns)):  # back to the weights' basis: Q_g (S² ⊙ R) Q_aᵀ
            torch.matmul(pre.q_g, result[row], out=scratch)
            target = result[row] if _aligned(result[row]) else staging
            torch.matmul(scratch, pre.q_a.T, out=target)
            if target is staging:
                result[row].copy_(staging)
    return result.view(len(columns), -1)  # (columns, out * in')


@dataclass(frozen=True)
class _Refined:
    """The refined queries' dense v (on the host, one dict of (out, in') blocks per query) and the transfers that
    count their copies onto the device: each query's block once per module and engine call."""

    vectors: list[dict[str, torch.Tensor]]
    transfers: Transfers

    def into(self, row: torch.Tensor, query: int, name: str) -> None:
        block = self.vectors[query][name]
        row.copy_(block)
        self.transfers.count(block.numel() * block.element_size(), REFINE)


def _query_rows(columns: list[tuple[_Module, int]], rows: range, kind: str, refined: _Refined | None,
                shape: Shape) -> torch.Tensor:
    """The query side of ``rows``: as :func:`_form` forms it, or from refined queries' dense v (their
    ``refine.py`` blocks): v itself for ``preconditioned``, else ``(Q_gᵀ v Q_a) / S``, the form whose dot with a
    train example's W is <v, D_t> (and whose per-token scores are g_sᵀ v a_s). Each v is copied into its row of
    the result and mapped there (one (out, in') scratch: no temporary the size of the block)."""
    if refined is None:
        return _form([columns[i] for i in rows], kind)
    view = columns[0][0]
    pre = view.pre
    v = torch.empty(len(rows), shape.out, shape.width, dtype=torch.float32, device=view.inputs.device)
    for k, i in enumerate(rows):
        refined.into(v[k], i, shape.name)
    if kind != "preconditioned":
        if pre.q_a is not None:
            scratch, staging = (torch.empty(shape.out, shape.width, dtype=torch.float32, device=v.device)
                                for _ in range(2))
            for k in range(len(rows)):
                torch.matmul(pre.q_g.T, v[k], out=scratch)
                target = v[k] if _aligned(v[k]) else staging
                torch.matmul(scratch, pre.q_a, out=target)
                if target is staging:
                    v[k].copy_(staging)
        if pre.scale is not None:
            v.div_(pre.scale)
    return v.view(len(rows), -1)  # (rows, out * in')


def _chunks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _add_per_token(totals: _Totals, rows: range, query_w: torch.Tensor, train: Sequence[tuple[_Module, int]],
                   queries_at_once: int) -> None:
    """Each train position's contribution ``ĝ_sᵀ (S ⊙ W_q) â_s`` to its score with each query of ``rows``, added to
    ``totals.token_scores``. ``query_w`` (rows, out * in') becomes S ⊙ W_q in place (its last use), once; each train
    example's tokens are rotated once, then mapped against ``queries_at_once`` queries at a time (the mapped output
    gradients (queries, T, in') are the per-token scratch)."""
    if not train or not len(rows):
        return
    first = train[0][0]
    preconditioned = query_w.view(-1, first.out, first.width)  # (rows, out, in')
    if first.pre.scale is not None:
        preconditioned.mul_(first.pre.scale)
    for j, (view, example) in enumerate(train):
        inputs, output_grads = view.rotated(example)  # (T, in'), (T, out)
        positions = slice(totals.token_offsets[j], totals.token_offsets[j] + inputs.shape[0])
        for chunk in _chunks(len(rows), queries_at_once):
            mapped = torch.matmul(output_grads, preconditioned[chunk.start : chunk.stop])  # (c, T, in')
            contributions = mapped.mul_(inputs).sum(dim=-1)  # (c, T)
            totals.token_scores[rows.start + chunk.start : rows.start + chunk.stop, positions] += contributions


@dataclass
class _Arrived:
    """One module's copies, issued on the copy stream: its factors as stored (None: resident, ``pre`` set), each
    store's slabs (inputs, output gradients) and the event that marks their end."""

    pre: Preconditioner | None
    factors: dict[str, torch.Tensor] | None
    slabs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    event: object


class _Loader:
    """Issues a module's copies on the copy stream: its factors (unless resident) and each store's slabs, an
    inputs slab only when the input group changes (gate_proj's serves up_proj)."""

    def __init__(self, setup: Setup, stores: dict[str, TokenFactorStore], transfers: Transfers):
        self.setup, self.stores, self.transfers = setup, stores, transfers
        self.inputs: dict[str, tuple[str | None, torch.Tensor | None]] = {key: (None, None) for key in stores}

    def issue(self, name: str) -> _Arrived:
        transfers, factors = self.transfers, self.setup.factors
        resident = self.setup.resident
        with transfers.streams.copying(name):
            pre = None if resident is None else resident.get(name)
            tensors = None
            if pre is None:
                sources = factors.ranges(name) if transfers.copies else factors.read(name)
                tensors = {factor: transfers.to_device(source, FACTORS) for factor, source in sources.items()}
            slabs = {}
            for key, store in self.stores.items():
                group = store.input_of[name]
                if self.inputs[key][0] != group:
                    self.inputs[key] = (group, None)  # the previous group's slab goes with the module that reads it
                    self.inputs[key] = (group, transfers.to_device(store.slab_source("inputs", name)))
                slabs[key] = (self.inputs[key][1], transfers.to_device(store.slab_source("output_grads", name)))
        return _Arrived(pre, tensors, slabs, transfers.streams.copied(name))


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
    auto, per module), the device, whether self-influences (the cosine) are computed, the transfers that move
    (and count) token factors and factors, and ``resident``: a dict that keeps every module's prepared factors on
    the device across calls (the plan's decision, where they fit beside the model; None: copied per call)."""

    factors: HessianFactors
    shapes: Sequence[Shape]
    damping: float | None
    device: torch.device
    cosine: bool = True
    transfers: Transfers | None = None
    resident: dict[str, Preconditioner] | None = None


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
    refined = None if refined is None else _Refined(refined, transfers)
    streams = transfers.streams
    moved_before, factors_before = transfers.to_device_bytes, transfers.moved[FACTORS]
    same = train.store is queries.store
    n_queries = len(queries.indices)
    keys, train_columns = _column_keys(queries, train, same)
    totals = _Totals.zeros(n_queries, len(keys), cosine, [train.store.lengths[t] for t in train.indices] if per_token
                           else None, device)
    longest = max((train.store.lengths[x] for x in train.indices), default=1)
    dampings: dict[str, float | torch.Tensor | None] = {}
    stores = {"q": queries.store, "t": train.store}
    stores = {key: store for key, store in stores.items() if key == "q" or not same}
    loader = _Loader(setup, stores, transfers)
    rotations: dict[str, dict | None] = {key: None for key in stores}
    names = [s.name for s in shapes]
    unrotated_modules = 0
    arriving = loader.issue(names[0]) if names else None
    previous = None  # the event of the last module's compute
    for index, shape in enumerate(shapes):
        if progress is not None:
            progress(shape.name)
        arrived, arriving = arriving, None
        streams.wait(arrived.event, shape.name)  # the compute stream waits for the copies; the host does not
        pre = arrived.pre or factors.prepare(arrived.factors, damping)
        arrived.factors = None  # the stored lambda goes once S is made
        if setup.resident is not None:
            setup.resident[shape.name] = pre
        dampings[shape.name] = pre.damping
        shares = {key: _shares_rotations(stores[key], factors, names, index) for key in stores}
        kept = _keep_rotations(rotations, shares, stores, keys, shape, workspace_bytes)
        views = {key: _Module(stores[key], shape, pre, *arrived.slabs[key], rotations[key]) for key in stores}
        columns = [(views[k], x) for k, x in keys]
        train_pairs = [(views["q" if same else "t"], x) for x in train.indices]
        unrotated = (not cosine and not per_token and pre.q_a is not None and _unrotated_is_cheaper(
            shape, [stores[k].lengths[x] for k, x in keys[n_queries:]], n_queries))
        _score_module(columns, train_pairs, n_queries, shape, workspace_bytes, kept, longest, totals, refined,
                      unrotated)
        unrotated_modules += unrotated
        done = streams.computed(shape.name)
        if previous is not None:
            streams.retire(previous, names[index - 1])  # module index - 1 is done; this one is queued
        previous = done
        if index + 1 < len(names):
            arriving = loader.issue(names[index + 1])  # its copies run while this module is computed
        for key in stores:
            if not shares[key]:
                rotations[key] = None  # the next module reads other inputs or eigenvectors
        del pre, views, columns, train_pairs, arrived
    streams.land("scores")
    landed = totals.to_host()
    resolved = _land_dampings(dampings)
    self_scores = landed.self_scores
    return Scores(
        pairwise=landed.products[:, train_columns],
        query_self=None if self_scores is None else self_scores[:n_queries] if refined is None else refined_self,
        train_self=None if self_scores is None else self_scores[train_columns],
        per_token=landed.per_token_lists(n_queries),
        damping=resolved,
        bytes_to_device=transfers.to_device_bytes - moved_before,
        factor_bytes_to_device=transfers.moved[FACTORS] - factors_before,
        unrotated_modules=unrotated_modules,
    )


def _land_dampings(dampings: dict[str, float | torch.Tensor | None]) -> dict[str, float | None]:
    """The resolved dampings as floats (automatic ones were 0-d device tensors: landed together, once)."""
    on_device = [name for name, value in dampings.items() if isinstance(value, torch.Tensor)]
    values = torch.stack([dampings[name].double() for name in on_device]).tolist() if on_device else []
    landed = dict(zip(on_device, values, strict=True))
    return {name: landed[name] if name in landed else None if value is None else float(value)
            for name, value in dampings.items()}


@dataclass
class _Totals:
    """What :func:`score` sums over modules, by column (every query, then the train examples that are not), on the
    scoring device until they land."""

    products: torch.Tensor  # (queries, columns) float64: <W_q, W_x>
    self_scores: torch.Tensor | None  # (columns,) float64: |W_x|²; None without the cosine
    token_scores: torch.Tensor | None  # (queries, train tokens) float64, train examples one after the other
    token_offsets: list[int]  # where each train example's positions start in token_scores
    token_lengths: list[int]

    @classmethod
    def zeros(cls, queries: int, columns: int, cosine: bool, train_lengths: list[int] | None,
              device: torch.device) -> _Totals:
        offsets = [0]
        for length in (train_lengths or [])[:-1]:
            offsets.append(offsets[-1] + length)
        return cls(torch.zeros(queries, columns, dtype=torch.float64, device=device),
                   torch.zeros(columns, dtype=torch.float64, device=device) if cosine else None,
                   None if train_lengths is None else torch.zeros(queries, sum(train_lengths), dtype=torch.float64,
                                                                  device=device),
                   offsets, list(train_lengths or []))

    def to_host(self) -> _Totals:
        """These totals on the host (one copy of each)."""
        return _Totals(self.products.cpu(), None if self.self_scores is None else self.self_scores.cpu(),
                       None if self.token_scores is None else self.token_scores.cpu(), self.token_offsets,
                       self.token_lengths)

    def per_token_lists(self, queries: int) -> list[list[torch.Tensor]] | None:
        """[query][train] -> (T_train,) float64 (views of the landed totals)."""
        if self.token_scores is None:
            return None
        return [[self.token_scores[q, start : start + length]
                 for start, length in zip(self.token_offsets, self.token_lengths, strict=True)]
                for q in range(queries)]


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
                  refined: _Refined | None, unrotated: bool) -> None:
    """One module's scores added to ``totals`` (on the device: nothing waits here): as <P_q, D_t> (``unrotated``),
    every W at once when the workspace (less the ``kept`` rotations) holds them, else blocks of queries against
    streamed blocks."""
    scratch, capacity = sizes.workspace_split(workspace_bytes, shape, totals.token_scores is not None, kept)
    queries_at_once = max(1, scratch // sizes.per_token_scratch_bytes(shape, longest))
    if unrotated:
        _score_unrotated(columns, n_queries, capacity, totals.products, refined, shape)
    elif capacity >= len(columns) + (n_queries if refined is not None else 0):  # every W at once: each formed once
        every_w = _form(columns, "whitened")
        query_w = every_w[:n_queries] if refined is None else _query_rows(columns, range(n_queries), "whitened",
                                                                         refined, shape)
        totals.products += (query_w @ every_w.T).double()
        if totals.self_scores is not None:
            totals.self_scores += _squared_norms(every_w).double()
        if totals.token_scores is not None:
            _add_per_token(totals, range(n_queries), query_w, train, queries_at_once)  # query_w's last use
        del every_w, query_w
    else:  # blocks of queries against streamed blocks of columns
        _score_in_blocks(columns, n_queries, capacity // 2, totals, train, queries_at_once, refined, shape)


def _score_in_blocks(columns: list[tuple[_Module, int]], n_queries: int, block: int, totals: _Totals,
                     train: list[tuple[_Module, int]], queries_at_once: int, refined: _Refined | None = None,
                     shape: Shape | None = None) -> None:
    """Blocks of ``block`` queries against streamed blocks of ``block`` columns (each column block's W formed
    again for every query block)."""
    products, self_scores = totals.products, totals.self_scores
    for number, rows in enumerate(_chunks(n_queries, block) or [range(0)]):
        query_w = _query_rows(columns, rows, "whitened", refined, shape)
        for part in _chunks(len(columns), block):
            same = part == rows and refined is None
            column_w = query_w if same else _form([columns[i] for i in part], "whitened")
            if len(rows):
                products[rows.start : rows.stop, part.start : part.stop] += (query_w @ column_w.T).double()
            if number == 0 and self_scores is not None:  # the first pass over the columns gives self-influences
                self_scores[part.start : part.stop] += _squared_norms(column_w).double()
            del column_w
        if totals.token_scores is not None:
            _add_per_token(totals, rows, query_w, train, queries_at_once)  # query_w's last use
        del query_w


def _score_unrotated(columns: list[tuple[_Module, int]], n_queries: int, capacity: int, products: torch.Tensor,
                     refined: _Refined | None = None, shape: Shape | None = None) -> None:
    """Scores as <P_q, D_t>: the queries' preconditioned gradients P_q (blocks of them; refined: v_q) against the
    train examples' plain gradients D_t (streamed blocks); a train column that is a query is its own D."""
    block = max(1, capacity // 2)
    for rows in _chunks(n_queries, block):
        query_p = _query_rows(columns, rows, "preconditioned", refined, shape)
        for part in _chunks(len(columns), block):
            column_d = _form([columns[i] for i in part], "gradient")
            products[rows.start : rows.stop, part.start : part.stop] += (query_p @ column_d.T).double()
            del column_d
        del query_p


@torch.no_grad()
def gradients(side: Side, shapes: Sequence[Shape], device: torch.device,
              transfers: Transfers | None = None) -> list[dict[str, torch.Tensor]]:
    """Each example's plain per-module gradient Gᵀ [A, 1] (out, in') float32 on the host (for refinement, which
    takes them one query at a time to the device). The store's slabs go onto the device once each (a shared input
    once for its group) and the gradients come off it, all counted as ``refine``'s bytes."""
    transfers = transfers or Transfers(device)
    result = [{} for _ in side.indices]
    group, inputs = None, None
    for shape in shapes:
        with transfers.streams.copying(shape.name):
            if side.store.input_of[shape.name] != group:
                group, inputs = side.store.input_of[shape.name], None
                inputs = transfers.to_device(side.store.slab_source("inputs", shape.name), REFINE)
            output_grads = transfers.to_device(side.store.slab_source("output_grads", shape.name), REFINE)
        transfers.streams.wait(transfers.streams.copied(shape.name), shape.name)
        view = _Module(side.store, shape, Preconditioner(None, None, None, None), inputs, output_grads, None)
        for row, example in enumerate(side.indices):
            result[row][shape.name] = transfers.take(view.gradient(example))
    return result
