"""The engine and the token-factor store on random token factors, against dense per-example gradients."""

import weakref

import pytest
import torch
from helpers import assert_close_to_largest
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from if_query.kron.factors import Preconditioner
from if_query.plan.sizes import Shape
from if_query.score import engine
from if_query.score.store import TokenFactorStore
from if_query.score.transfer import Transfers

SHAPES = {"a": (5, 4), "b": (3, 6)}  # name -> (out, in)
BIAS = {"a": True, "b": False}
LENGTHS = [3, 1, 4, 2, 5]


class RandomFactors:
    """Stands in for HessianFactors: random orthogonal eigenbases and positive curvature per module; the modules
    of ``same_inputs`` ({module: other}) get the other's activation eigenvectors (as gate_proj and up_proj)."""

    def __init__(self, seed: int = 0, shapes=SHAPES, bias=BIAS, same_inputs=None):
        generator = torch.Generator().manual_seed(seed)
        self.modules = {}
        for name, (out, inp) in shapes.items():
            width = inp + int(bias[name])
            q_a, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
            q_g, _ = torch.linalg.qr(torch.randn(out, out, generator=generator, dtype=torch.float64))
            curvature = torch.rand(out, width, generator=generator, dtype=torch.float64) + 0.1
            if same_inputs and name in same_inputs:
                q_a = self.modules[same_inputs[name]][0]
            self.modules[name] = (q_a, q_g, curvature)

    def read(self, name):
        """The module's factors as a file would hold them (what the engine copies to the device)."""
        q_a, q_g, curvature = self.modules[name]
        return {"q_a": q_a.float(), "q_g": q_g.float(), "curvature": curvature}

    ranges = read  # no files: the host tensors stand for their ranges

    def prepare(self, tensors, damping):
        damping = 0.5 if damping is None else damping
        return Preconditioner(tensors["q_a"], tensors["q_g"], (tensors["curvature"] + damping).rsqrt().float(),
                              damping)

    def preconditioner(self, name, damping, device):
        return self.prepare(self.read(name), damping)

    def same_activation_eigenvectors(self, name, other):
        return torch.equal(self.modules[name][0], self.modules[other][0])


def filled_store(host_budget: int, tmp_path, shapes=SHAPES, shared_inputs=None, lengths=LENGTHS) -> TokenFactorStore:
    store = TokenFactorStore(shapes, lengths, torch.float32, host_budget, tmp_path, shared_inputs)
    generator = torch.Generator().manual_seed(1)
    for name, (out, inp) in shapes.items():
        if name in store.input_groups:
            store.module_inputs(name).copy_(torch.randn(store.tokens, inp, generator=generator))
        store.module_output_grads(name).copy_(torch.randn(store.tokens, out, generator=generator))
    return store


def run_engine(store, factors, bias, queries, train, per_token, workspace, shared=(), **options):
    """engine.score with both sides in ``store``; ``shared``: the modules that read an earlier one's input."""
    shapes = [Shape(name, out, inp, bias[name], name in shared) for name, (out, inp) in store.shapes.items()]
    setup = engine.Setup(factors, shapes, None, torch.device("cpu"), **options)
    return engine.score(engine.Side(store, queries), engine.Side(store, train), setup, workspace, per_token)


def dense_scores(store: TokenFactorStore, factors: RandomFactors, queries, train, bias=BIAS):
    """score(q, t) = sum_modules sum_ij R_q R_t / C with R = Q_g^T (sum_t g_t a_t^T) Q_a, in float64."""
    total = torch.zeros(len(queries), len(train), dtype=torch.float64)
    self_scores = torch.zeros(len(store.lengths), dtype=torch.float64)
    per_token = [[torch.zeros(store.lengths[t], dtype=torch.float64) for t in train] for _ in queries]
    for name in store.shapes:
        q_a, q_g, curvature = factors.modules[name]
        inverse = 1 / (curvature + 0.5)

        def tokens(i, name=name):
            a = store.inputs(name, i).double()
            if bias[name]:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=torch.float64)], dim=1)
            return a, store.output_grads(name, i).double()

        rotated = {}
        for i in range(len(store.lengths)):
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
    result = run_engine(store, factors, BIAS, queries, train, True, workspace)
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
    result = run_engine(store, factors, BIAS, [], [2, 4], False, 1)
    _, self_scores, _ = dense_scores(store, factors, [], [2, 4])
    assert result.pairwise.shape == (0, 2)
    assert_close_to_largest(result.train_self, self_scores[[2, 4]], 1e-5)


def test_store_rows_and_spill_file_leave_nothing_behind(tmp_path):
    store = TokenFactorStore(SHAPES, LENGTHS, torch.bfloat16, 0, tmp_path)
    assert store.spilled and not list(tmp_path.iterdir())  # the file is unlinked at once, the mapping lives on
    store.module_inputs("a")[store.rows(2)] = 1.5
    assert store.inputs("a", 2).shape == (4, 4) and bool((store.inputs("a", 2) == 1.5).all())
    assert not bool((store.inputs("a", 1) == 1.5).any())
    bytes_per_row = sum(out + inp for out, inp in SHAPES.values()) * 2
    assert store.nbytes == sum(LENGTHS) * bytes_per_row


# ---- modules that share an input (gate_proj and up_proj): one slab, one rotation

GATED = {"gate": (5, 4), "up": (6, 4), "down": (4, 6)}  # name -> (out, in); up sees gate's input
GATED_BIAS = {"gate": False, "up": False, "down": False}


@pytest.mark.parametrize("same_eigenvectors", [True, False])
def test_a_shared_input_is_kept_once_and_rotated_once(tmp_path, monkeypatch, same_eigenvectors):
    # at most 4 tokens each: every module rotates token vectors (not the summed gradient) for every example
    store = filled_store(10**9, tmp_path, GATED, {"up": "gate"}, lengths=[3, 1, 4, 2, 3])
    assert store.input_groups == ["gate", "down"]
    assert store.inputs("up", 2).data_ptr() == store.inputs("gate", 2).data_ptr()
    assert store.nbytes == 13 * (5 + 4 + 6 + 4 + 6) * 4  # the shared input counted once
    factors = RandomFactors(shapes=GATED, bias=GATED_BIAS, same_inputs={"up": "gate"} if same_eigenvectors else None)
    queries, train = [3, 0], [1, 3, 2, 0, 4]
    staged = Transfers(torch.device("cpu"), bounce_bytes=64, staged=True)  # the device path, on the CPU
    result = run_engine(store, factors, GATED_BIAS, queries, train, True, 10**9, {"up"}, transfers=staged)
    factor_bytes = sum(t.numel() * t.element_size() for name in GATED for t in factors.read(name).values())
    assert result.factor_bytes_to_device == factor_bytes  # every module's factors moved once
    assert result.bytes_to_device == store.nbytes + factor_bytes  # every slab moved once, the shared input once
    expected, self_scores, per_token = dense_scores(store, factors, queries, train, GATED_BIAS)
    assert_close_to_largest(result.pairwise, expected, 1e-5)
    assert_close_to_largest(result.train_self, self_scores[train], 1e-5)
    assert_close_to_largest(torch.cat([t for row in result.per_token for t in row]),
                            torch.cat([t for row in per_token for t in row]), 1e-5)
    rotations = []
    rotate = Preconditioner.rotate_inputs
    monkeypatch.setattr(Preconditioner, "rotate_inputs", lambda self, x: rotations.append(x.shape) or rotate(self, x))
    run_engine(store, factors, GATED_BIAS, queries, train, False, 10**9, {"up"})
    # gate and down rotate each example's inputs once; up reuses gate's rotations when the eigenvectors match
    assert len(rotations) == len(set(queries + train)) * (2 if same_eigenvectors else 3)


def test_token_factors_reach_the_device_through_staging_buffers_unchanged():
    """The staging path (run here on the CPU with unpinned buffers): chunks of 100 bytes, two buffers."""
    transfers = Transfers(torch.device("cpu"), bounce_bytes=100, staged=True)
    host = torch.randn(37, 11).to(torch.bfloat16)  # 814 bytes: 9 chunks
    moved = transfers.to_device(host)
    assert moved.dtype == torch.bfloat16 and torch.equal(moved, host) and moved.data_ptr() != host.data_ptr()
    assert transfers.to_device_bytes == 814
    back = transfers.to_host({"a": moved[:, :5], "b": torch.arange(7.0)})  # a strided view, then float32
    assert torch.equal(back["a"], host[:, :5]) and torch.equal(back["b"], torch.arange(7.0))
    assert transfers.to_host_bytes == 37 * 5 * 2 + 7 * 4
    assert Transfers(torch.device("cpu")).to_device(host) is host  # CPU: read in place, nothing moved


class Allocations(TorchDispatchMode):
    """Peak bytes of the tensor storages created while it is active (each alive while a tensor views it)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.holders, self.total, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.holders[key] -= 1
        if not self.holders[key]:
            self.total -= self.bytes.pop(key)
            del self.holders[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage().data_ptr()
            if key not in self.bytes:
                if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == key
                       for a in tree_leaves((args, kwargs))):
                    continue  # a view or in-place result of a tensor from before: not an allocation
                self.bytes[key], self.holders[key] = tensor.untyped_storage().nbytes(), 0
                self.total += self.bytes[key]
                self.peak = max(self.peak, self.total)
            self.holders[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def test_a_page_locked_store_goes_to_the_device_with_no_host_copy_and_a_spilled_one_through_the_bounce_slots(
        tmp_path, monkeypatch):
    """The plan's page-locked store (recorded on the CPU's staged path; ``cudaHostRegister`` on CUDA): its slabs are
    copied straight from its pages (counted ``direct``, no bounce slot filled, no host copy), a spilled store's
    through the bounce slots; both arrive unchanged, and the store is unregistered once it is collected."""
    import gc

    from if_query.score import transfer

    copies = []
    real = transfer.host_copy
    monkeypatch.setattr(transfer, "host_copy", lambda target, source: (copies.append(target.numel()),
                                                                        real(target, source)))
    in_ram, spilled = filled_store(10**9, tmp_path), filled_store(0, tmp_path)
    transfers = Transfers(torch.device("cpu"), bounce_bytes=256, staged=True)
    transfers.register_store(in_ram.flat, in_ram)
    slab = in_ram.slab_source("inputs", "a")
    moved = transfers.to_device(slab)
    assert torch.equal(moved, slab) and moved.data_ptr() != slab.data_ptr()
    assert transfers.direct["to device"] == slab.numel() * 4 and copies == [] and not transfers._slots
    from_file = transfers.to_device(spilled.slab_source("inputs", "a"))
    assert torch.equal(from_file, spilled.module_inputs("a")) and len(transfers._slots) == 2
    assert transfers.direct["to device"] == slab.numel() * 4  # the spilled slab was not direct
    assert transfers.page_locked_peak == in_ram.nbytes
    del in_ram, slab, moved
    gc.collect()
    assert not transfers._stores  # unregistered with the store



def test_stores_and_buffers_own_their_pages_and_a_refused_page_lock_stops_in_one_line(tmp_path, monkeypatch):
    """cudaHostRegister refuses a range that shares a page with one already registered (CUDA error 712), so stores
    in RAM and the pinned buffers are each in pages of their own; a refusal (faked: the CPU has no CUDA) stops the
    run with a RunError rather than leaving CUDA's last error for the next kernel launch to raise."""
    import mmap

    from if_query.errors import RunError

    stores = [filled_store(10**9, tmp_path) for _ in range(2)]
    transfers = Transfers(torch.device("cpu"), bounce_bytes=256, staged=True)
    slab = stores[0].slab_source("inputs", "a")
    transfers.to_device(slab)  # allocates the bounce slots
    regions = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
               for t in [s.flat for s in stores] + transfers._slots]
    assert all(low % mmap.PAGESIZE == 0 for low, _ in regions)
    pages = [set(range(low // mmap.PAGESIZE, -(-high // mmap.PAGESIZE))) for low, high in regions]
    assert all(not (a & b) for i, a in enumerate(pages) for b in pages[i + 1:])

    class Cudart:
        def cudaHostRegister(self, pointer, size, flags):  # noqa: N802 (CUDA's name)
            return 712

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    transfers.pinned = True  # as on CUDA: registration is asked for
    with pytest.raises(RunError, match="could not page-lock .* of token factors in RAM"):
        transfers.register_store(stores[1].flat, stores[1])
    assert not transfers._stores


@pytest.mark.parametrize("at_once", [24, 16], ids=["every-W-at-once", "blocks-of-8"])
def test_the_engine_allocates_no_hidden_copy_of_the_whitened_gradients(tmp_path, at_once):
    """With a workspace of exactly ``at_once`` W's, the engine's allocations peak at that workspace plus one
    module's factors and per-example temporaries: no second tensor the size of W (a .square() of it, say)."""
    shapes, bias, lengths = {"big": (64, 48)}, {"big": True}, [5] * 24
    store = filled_store(10**9, tmp_path, shapes, lengths=lengths)
    factors = RandomFactors(shapes=shapes, bias=bias)
    workspace = at_once * 64 * 49 * 4  # W of `at_once` examples (out 64, in' 49, float32)
    width = 48 + 1
    factor_bytes = 4 * (width**2 + 64**2 + 64 * width)  # Q_a, Q_g, S (float32)
    per_example = 4 * (5 * width * 2 + 5 * 64 * 2 + 2 * 64 * width)  # [A, 1], Â, G, Ĝ, Ĝᵀ Â and its copy in W
    small = 8 * 24 * 24 * 4  # products and self-influences, float32 and float64
    with Allocations() as allocations:
        run_engine(store, factors, bias, list(range(8)), list(range(24)), False, workspace)
    assert allocations.peak <= workspace + factor_bytes + per_example + small, allocations.peak
    assert allocations.peak >= workspace  # the premise: the W's were formed in the workspace


def substore(store: TokenFactorStore, examples, tmp_path) -> TokenFactorStore:
    """A store holding ``examples`` of ``store`` (in that order): a query store, or one chunk of train examples."""
    part = TokenFactorStore(store.shapes, [store.lengths[x] for x in examples], store.dtype, 10**9, tmp_path)
    for name in store.shapes:
        for row, x in enumerate(examples):
            part.module_inputs(name)[part.rows(row)] = store.inputs(name, x)
            part.module_output_grads(name)[part.rows(row)] = store.output_grads(name, x)
    return part


@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "no-cosine"])
@pytest.mark.parametrize("workspace", [10**9, 1], ids=["all-at-once", "blocks-of-one"])
def test_queries_and_a_train_chunk_in_two_stores(tmp_path, cosine, workspace):
    """A corpus chunk: the queries' token factors in one store, the chunk's in another. Without the cosine no
    self-influence is computed, and a module whose queries are cheaper to rotate back than its train examples
    are to rotate is scored as <P_q, G_tᵀ A_t> (module b here: 6 train tokens of 5 x 7 against 2 queries)."""
    store = filled_store(10**9, tmp_path)
    factors = RandomFactors()
    queries, train = [3, 0], [1, 2, 4, 0]
    shapes = [Shape(name, out, inp, BIAS[name]) for name, (out, inp) in SHAPES.items()]
    result = engine.score(engine.Side(substore(store, queries, tmp_path), [0, 1]),
                          engine.Side(substore(store, train, tmp_path), [0, 1, 2, 3]),
                          engine.Setup(factors, shapes, None, torch.device("cpu"), cosine=cosine), workspace, False)
    expected, self_scores, _ = dense_scores(store, factors, queries, train)
    assert_close_to_largest(result.pairwise, expected, 1e-5)
    if cosine:
        assert_close_to_largest(result.query_self, self_scores[queries], 1e-5)
        assert_close_to_largest(result.train_self, self_scores[train], 1e-5)
        assert result.unrotated_modules == 0
    else:
        assert result.query_self is None and result.train_self is None
        assert result.unrotated_modules >= 1  # the premise: the unrotated form ran


# ---- the pipeline: module m+1's copies on their way while module m is scored


def test_the_next_modules_copies_are_issued_before_this_modules_results_land(tmp_path):
    """A recording stream (the CPU's :class:`Streams` with its log): every module's copies (factors and slabs)
    are issued before the previous module is retired (its compute waited for, the one synchronisation per module)
    and the compute stream waits for a module's copies before computing it; the scores land once, at the end."""
    from if_query.score.streams import Streams

    store = filled_store(10**9, tmp_path, GATED, {"up": "gate"})
    factors = RandomFactors(shapes=GATED, bias=GATED_BIAS, same_inputs={"up": "gate"})
    streams = Streams(record=True)
    transfers = Transfers(torch.device("cpu"), bounce_bytes=64, staged=True, streams=streams)
    result = run_engine(store, factors, GATED_BIAS, [3, 0], [1, 3, 2, 0, 4], True, 10**9, {"up"},
                        transfers=transfers)
    log = streams.log
    names = list(GATED)

    def at(what, name):
        return log.index((what, name))

    for m, name in enumerate(names):
        assert at("copy", name) < at("copied", name) < at("wait", name) < at("computed", name)
        if m + 1 < len(names):
            assert at("copy", names[m + 1]) < at("retire", name)  # m+1 on its way before m is waited for
            assert at("computed", name) < at("copy", names[m + 1])  # ... once m is queued
        if 1 <= m < len(names) - 1:  # at most two modules' copies on the device: m-1 done before m+1 comes
            assert at("retire", names[m - 1]) < at("copy", names[m + 1])
    assert [entry for entry in log if entry[0] == "land"] == [("land", "scores")] and log[-1] == ("land", "scores")
    expected, _, _ = dense_scores(store, factors, [3, 0], [1, 3, 2, 0, 4], GATED_BIAS)
    assert_close_to_largest(result.pairwise, expected, 1e-5)


def test_resident_factors_are_copied_once_across_calls(tmp_path):
    """``Setup.resident``: the prepared factors stay on the device, so a second call (the next folder or chunk)
    moves token factors alone."""
    store = filled_store(10**9, tmp_path)
    factors = RandomFactors()
    transfers = Transfers(torch.device("cpu"), staged=True)
    shapes = [Shape(name, out, inp, BIAS[name]) for name, (out, inp) in SHAPES.items()]
    setup = engine.Setup(factors, shapes, None, torch.device("cpu"), transfers=transfers, resident={})
    first = engine.score(engine.Side(store, [3, 0]), engine.Side(store, [1, 2]), setup, 10**9, False)
    second = engine.score(engine.Side(store, [3, 0]), engine.Side(store, [1, 2]), setup, 10**9, False)
    factor_bytes = sum(t.numel() * t.element_size() for name in SHAPES for t in factors.read(name).values())
    assert first.factor_bytes_to_device == factor_bytes and second.factor_bytes_to_device == 0
    assert first.bytes_to_device == second.bytes_to_device + factor_bytes == store.nbytes + factor_bytes
    assert torch.equal(first.pairwise, second.pairwise)
