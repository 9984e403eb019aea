"""The quality benchmark's counterfactual half: LDS, its ceiling, BM25 and ASTRA.

Imported by ``bench_quality.py`` (the one entry point: ``--lds M``, ``--self-check``); nothing here runs alone.

LDS (the linear datamodeling score, Park et al. 2023)
    Draw M random halves S_1..S_M of the training records (records that only teach the query format, the
    phrasing-b records of a world that trains some, are in every subset). Train one model per subset: the same
    initialisation, batch order and number of steps as the full model, each batch keeping only its records in
    S_j (``tiny_world.train_tiny_gpt2(keep=...)``: the full run with the other records removed). Measure each
    other-phrasing query's summed completion loss L(q, S_j) under each. A method's scores s(q, t) are of the
    model trained on ALL records and estimate how much training on t lowers q's loss, so they predict
    L(q, S) = const - sum_{t in S} s(q, t). LDS = the mean over queries of the Spearman correlation over the
    M subsets between that prediction and the measured loss (a query whose prediction or loss is constant over
    the subsets counts 0). Raw scores, not cosines: a sum of effects needs their sizes.
The ceiling
    The first C subsets are trained again from another training seed (another initialisation and batch order);
    the mean over queries of the Spearman correlation between the two runs' losses over those C subsets, r, says
    how much of a subset's effect on a loss is reproducible rather than an accident of one training run: a
    rough bound on what scores that know nothing of the seed can reach (under a signal-plus-independent-noise
    model, the best such predictor correlates sqrt(r) with one run). Scores of the seed's own model can exceed r.
BM25
    ``rank_bm25.BM25Okapi`` over the training records' texts (prompt + completion, lower-cased words), each
    query's text as the query: a score that knows words, not the model.
ASTRA (Wang et al. 2025, arXiv 2507.14740), a prototype of ``run-query --refine-steps N``
    :func:`refine_ihvp` (see its docstring); :func:`astra_scores` runs it on a benchmark seed and
    :func:`check_against_dense` (``--self-check``) checks it against dense matrices on a model tracking 2,128
    parameters.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

GN_CHUNK = 16  # examples per graph of the Gauss-Newton product (length-sorted: little padding)
SUBSET_FRACTION = 0.5  # each LDS subset keeps this fraction of the records that are not format records
ASTRA_N0_TOLERANCE = 1e-3  # float32, eager vs sdpa attention, per-example vs batched gradients: 1.3e-4 was
# seen on facts2 (memorized: tiny gradients under a damping of 1e-12); --self-check holds N = 0 to 1e-4 in float64
CEILING_SEED_OFFSET = 1000  # the ceiling's second training seed = the seed + this
WORD = re.compile(r"\w+")

# ---------------------------------------------------------------------------------------------
# LDS: subsets, their models' losses, rank correlations
# ---------------------------------------------------------------------------------------------


def draw_subsets(is_format: Sequence[bool], count: int, seed: int) -> np.ndarray:
    """(count, records) bool: random halves of the non-format records, plus every format record."""
    rng = np.random.default_rng(seed)
    is_format = np.asarray(is_format, dtype=bool)
    free = np.flatnonzero(~is_format)
    subsets = np.repeat(is_format[None, :], count, axis=0)  # (count, records)
    for row in subsets:
        row[rng.choice(free, size=round(SUBSET_FRACTION * len(free)), replace=False)] = True
    return subsets


def summed_losses(model, tokenizer, records: list[dict]) -> np.ndarray:
    """Each record's summed completion loss (+ EOS) under ``model``, as run-query's ``loss_sum``, (records,)."""
    from if_query.data.tokenization import ExampleTokenizer, collate
    from if_query.model import loss

    examples = examples_of(records)
    tokens = ExampleTokenizer(tokenizer, 512).tokenize_all(examples)
    with torch.no_grad():
        logits, labels = loss.shifted_logits_and_labels(collate(tokens, tokenizer.pad_token_id), model.eval())
        return loss.summed_token_losses(logits, labels).double().numpy()


def examples_of(records: list[dict]) -> list:
    """``if_query.data.records.Example``s of in-memory records (through a temporary JSON file, as run-query reads)."""
    import json
    import tempfile

    from if_query.data.records import load_examples

    with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8") as file:
        json.dump(records, file)
        file.flush()
        return load_examples(file.name)


def subset_losses(train: Callable, subsets: np.ndarray, seed: int, tokenizer, queries: list[dict], log) -> tuple:
    """(losses (queries, subsets), seconds per model): one model per subset, trained with ``seed``."""
    losses, started = [], time.perf_counter()
    for j, keep in enumerate(subsets):
        losses.append(summed_losses(train(keep=keep.tolist(), seed=seed), tokenizer, queries))
        if j in (0, len(subsets) - 1):
            log(f"    subset model {j + 1}/{len(subsets)} (training seed {seed}): "
                f"{(time.perf_counter() - started) / (j + 1):.1f}s each")
    return np.stack(losses, axis=1), (time.perf_counter() - started) / len(subsets)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties averaged (Spearman's convention)."""
    order = np.argsort(x, axis=-1, kind="stable")
    ranks = np.empty_like(x, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(x.shape[-1], dtype=np.float64)[None, :].repeat(len(x), 0), axis=-1)
    for row in range(len(x)):  # average the ranks of tied values
        values, inverse = np.unique(x[row], return_inverse=True)
        if len(values) < x.shape[-1]:
            ranks[row] = (np.bincount(inverse, ranks[row]) / np.bincount(inverse))[inverse]
    return ranks


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``x`` with the same row of ``y`` (rows, n); 0 for a constant row."""
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    norms = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    return np.where(norms > 0, (rx * ry).sum(axis=1) / np.where(norms > 0, norms, 1.0), 0.0)


def lds(scores: np.ndarray, subsets: np.ndarray, losses: np.ndarray) -> float:
    """The LDS of a (queries, records) raw score matrix against measured (queries, subsets) losses."""
    predicted = -np.asarray(scores, np.float64) @ subsets.T.astype(np.float64)  # (queries, subsets)
    return float(spearman_rows(predicted, losses).mean())


# ---------------------------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------------------------


def bm25_scores(queries: list[dict], records: list[dict]) -> np.ndarray:
    """(queries, records) BM25 (Okapi) similarity of each query's text to each record's text."""
    from rank_bm25 import BM25Okapi

    def words(record: dict) -> list[str]:
        return WORD.findall((record["prompt"] + record["completion"]).lower())

    index = BM25Okapi([words(r) for r in records])
    return np.stack([index.get_scores(words(q)) for q in queries])


# ---------------------------------------------------------------------------------------------
# ASTRA: EK-FAC-preconditioned Neumann refinement of each inverse-Hessian-vector product
# ---------------------------------------------------------------------------------------------
# Vectors over the tracked modules are dicts {module name: (K, out, in') tensor}: K vectors at once, each
# module's block in Kronfluence's layout (the weight's (out, in) with the bias as a last column, in' = in + 1).

Vectors = dict[str, torch.Tensor]


def _dot(x: Vectors, y: Vectors) -> torch.Tensor:
    """(K,) inner products of the K vectors of ``x`` with those of ``y``, summed over modules."""
    return sum((x[m] * y[m]).flatten(1).sum(dim=1) for m in x)


def _combine(x: Vectors, y: Vectors, a: float | torch.Tensor = 1.0) -> Vectors:
    """x + a * y, ``a`` a number or (K,) per vector."""
    a = a if isinstance(a, float) else a[:, None, None]
    return {m: x[m] + a * y[m] for m in x}


def ekfac_inverse(preconditioners: dict, vectors: Vectors) -> Vectors:
    """P v = Q_g [(Q_g^T V Q_a) / (curvature + damping)] Q_a^T per module: the fitted preconditioner's inverse
    (EK-FAC, or any if_query.kron.factors.Preconditioner: K-FAC, diagonal, identity), ``scale`` =
    (curvature + damping)^-1/2."""
    out = {}
    for name, v in vectors.items():  # v: (K, out, in')
        pre = preconditioners[name]
        if pre.scale is None:
            out[name] = v
            continue
        rotated = v if pre.q_g is None else pre.q_g.T @ v @ pre.q_a  # (K, out, in') in the eigenbasis
        rotated = rotated * pre.scale**2
        out[name] = rotated if pre.q_g is None else pre.q_g @ rotated @ pre.q_a.T
    return out


def _tracked_parameters(linears: dict) -> list[torch.Tensor]:
    return [p for linear in linears.values() for p in (linear.weight, linear.bias) if p is not None]


def _to_vectors(linears: dict, grads: Sequence[torch.Tensor]) -> Vectors:
    """Per-parameter gradients (weight (out, in), bias (out,), module by module) -> one (1, out, in') block each."""
    out, grads = {}, iter(grads)
    for name, linear in linears.items():
        weight = next(grads)
        blocks = [weight, next(grads)[:, None]] if linear.bias is not None else [weight]
        out[name] = torch.cat(blocks, dim=1)[None]  # (1, out, in')
    return out


def _from_vector(linears: dict, v: Vectors, k: int) -> list[torch.Tensor]:
    """Vector k of ``v`` as per-parameter tensors (weight (out, in), bias (out,)), inverse of :func:`_to_vectors`."""
    parts = []
    for name, linear in linears.items():
        parts.append(v[name][k, :, : linear.in_features])
        if linear.bias is not None:
            parts.append(v[name][k, :, linear.in_features])
    return parts


class GaussNewton:
    """v -> H_B v, the Gauss-Newton matrix of all tracked modules jointly on the batch B, normalised as the fitted
    factors are (lambda / n): H_B = (1/|B|) sum_{x in B} J_x^T H_x J_x, with J_x the Jacobian of x's next-token
    logits at its labelled positions w.r.t. the tracked weights and H_x = diag(p) - p p^T per position, the
    cross-entropy's Hessian in the logits (p the model's softmax: no sampled labels).

    One forward pass builds the graph; every product then reuses it: J v by the double-backward trick (u -> J^T u
    is linear, so the VJP of that map with cotangent v is J v), J^T w by a plain VJP. The batch goes through in
    length-sorted chunks of GN_CHUNK examples (little padding; one graph each). Logits are formed at the labelled
    positions only (the output embedding applied to those rows of the base model's last hidden state: models
    whose logits are that linear map, as GPT-2, Llama, OLMo; not logit soft-capping). The model must be twice
    differentiable (GPT-2: eager attention)."""

    def __init__(self, model, linears: dict, examples: Sequence, pad_token_id: int):
        from if_query.data.tokenization import IGNORE_INDEX, collate

        self.linears, self.count = linears, len(examples)
        self.parameters = _tracked_parameters(linears)
        ordered = sorted(examples, key=len)
        self.chunks = []  # per chunk: (logits (labelled, vocab), probs (labelled, vocab), cotangent, J^T cotangent)
        for start in range(0, len(ordered), GN_CHUNK):
            batch = collate(ordered[start : start + GN_CHUNK], pad_token_id)
            labelled = batch["labels"][:, 1:] != IGNORE_INDEX  # (b, T-1): position t predicts label t+1
            with torch.enable_grad():
                hidden = model.base_model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).last_hidden_state  # (b, T, d)
                logits = model.get_output_embeddings()(hidden[:, :-1][labelled])  # (labelled, vocab)
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                cotangent = torch.zeros_like(logits, requires_grad=True)
                transposed = torch.autograd.grad(logits, self.parameters, cotangent, create_graph=True)
            self.chunks.append((logits, torch.softmax(logits.detach(), dim=-1), cotangent, transposed))

    def __call__(self, v: Vectors) -> Vectors:
        out = []
        for k in range(next(iter(v.values())).shape[0]):
            tangent, total = _from_vector(self.linears, v, k), None
            for logits, probs, cotangent, transposed in self.chunks:
                jv = torch.autograd.grad(transposed, cotangent, tangent, retain_graph=True)[0]  # (labelled, vocab)
                hjv = probs * jv - probs * (probs * jv).sum(dim=-1, keepdim=True)  # (diag p - p p^T) J v
                grads = torch.autograd.grad(logits, self.parameters, hjv, retain_graph=True)
                total = grads if total is None else [t + g for t, g in zip(total, grads, strict=True)]
            out.append(_to_vectors(self.linears, [g / self.count for g in total]))
        return {m: torch.cat([o[m] for o in out]) for m in v}


def example_gradients(model, linears: dict, examples: Sequence, pad_token_id: int) -> Vectors:
    """Each example's gradient of its summed completion loss w.r.t. the tracked modules, (examples, out, in')."""
    from if_query.data.tokenization import collate
    from if_query.model import loss

    parameters, grads = _tracked_parameters(linears), []
    for example in examples:
        with torch.enable_grad():
            logits, labels = loss.shifted_logits_and_labels(collate([example], pad_token_id), model)
            total = loss.summed_token_losses(logits, labels).sum()
            grads.append(_to_vectors(linears, torch.autograd.grad(total, parameters)))
    return {m: torch.cat([g[m] for g in grads]) for m in linears}


@dataclasses.dataclass
class Refinement:
    vectors: dict[int, Vectors]  # N -> the refined v_N, {module: (K, out, in')}
    seconds: dict[int, float]  # N -> seconds from the start (power iterations included) to v_N
    alpha: float
    largest_eigenvalue: float  # of P (H_B + damping), estimated
    residuals: list[list[float]]  # [k]: each vector's ||g - (H_B + damping) v_k||_P / ||g||_P, k = 0..max N
    stopped: dict[int, int]  # vector index -> the step at which its residual grew (kept at the step before)


def refine_ihvp(gradients: Vectors, hessian: Callable[[Vectors], Vectors], preconditioners: dict,
                steps: Sequence[int], power_iterations: int = 20, growth_tolerance: float = 1e-3,
                seed: int = 0, alpha_scale: float = 1.0) -> Refinement:
    """ASTRA's refinement of K inverse-Hessian-vector products (H_B + L)^-1 g, g = ``gradients``.

    v_0 = P g, v_{k+1} = v_k + alpha P (g - (H_B + L) v_k): P = :func:`ekfac_inverse` (the fitted EK-FAC inverse
    under the per-module damping L = ``preconditioners[m].damping``), H_B = ``hessian`` (e.g. :class:`GaussNewton`;
    any symmetric positive semi-definite map, batches may change between calls), alpha = 1 / the largest
    eigenvalue of P (H_B + L), estimated by ``power_iterations`` power iterations from a random start (safe
    untuned: the iteration contracts for any alpha < 2 / that eigenvalue). Its fixed point is (H_B + L)^-1 g,
    and N = 0 is the EK-FAC product itself. The residual r_k = g - (H_B + L) v_k costs nothing extra (it is the
    update's); its P-norm shrinks every step in exact arithmetic, so a vector whose residual grows by more than
    ``growth_tolerance`` (and is above rounding, sqrt(eps) of ||g||_P) is stopped, kept at its previous iterate and
    reported in ``stopped`` (``alpha_scale`` > 2, a step too large, makes every vector stop: the self-check's test).

    Returns v_N for every N in ``steps`` (a scored query's refined score against a train gradient g_t is
    v_N . g_t). Memory: g, v, the previous v and the products, for K vectors."""
    started = time.perf_counter()

    def damped(v):  # (H_B + L) v
        return _combine(hessian(v), {m: preconditioners[m].damping * v[m] for m in v})

    v = ekfac_inverse(preconditioners, gradients)  # v_0 = P g, (K, out, in') per module
    result = Refinement({0: v}, {0: time.perf_counter() - started}, 0.0, 0.0, [], {})
    result.largest_eigenvalue = largest_eigenvalue(lambda x: ekfac_inverse(preconditioners, damped(x)), gradients,
                                                   power_iterations, seed)
    result.alpha = alpha_scale / result.largest_eigenvalue
    norm = _dot(gradients, v).sqrt()  # (K,) ||g||_P
    floor = torch.finfo(norm.dtype).eps ** 0.5  # a relative residual below this is rounding: never "growth"
    active = torch.ones(len(norm), dtype=torch.bool)
    previous, previous_size = v, None
    for step in range(max(steps) + 1):
        residual = _combine(gradients, damped(v), -1.0)  # g - (H_B + L) v_step
        update = ekfac_inverse(preconditioners, residual)  # P r
        size = _dot(residual, update).clamp_min(0).sqrt() / norm  # (K,) ||r||_P / ||g||_P
        if previous_size is not None:
            grew = active & (size > (1 + growth_tolerance) * previous_size) & (size > floor)
            for k in grew.nonzero().flatten().tolist():
                result.stopped[k] = step - 1  # v_{step-1}, the iterate before the residual grew, is kept
            v = {m: torch.where(grew[:, None, None], previous[m], v[m]) for m in v}
            size = torch.where(grew, previous_size, size)
            active &= ~grew
        result.residuals.append(size.tolist())
        if step and step in steps:
            result.vectors[step], result.seconds[step] = v, time.perf_counter() - started
        if step == max(steps):
            return result
        previous, previous_size = v, size
        v = _combine(v, update, active.to(size.dtype) * result.alpha)  # v_{step+1} (stopped vectors unchanged)
    return result


def largest_eigenvalue(operator: Callable[[Vectors], Vectors], like: Vectors, iterations: int, seed: int) -> float:
    """The largest eigenvalue of ``operator`` (P (H_B + L): similar to a symmetric positive definite matrix, so
    its eigenvalues are real and positive) by power iteration from a random vector shaped like one of ``like``."""
    generator = torch.Generator().manual_seed(seed)
    x = {m: torch.randn(g[:1].shape, generator=generator, dtype=g.dtype) for m, g in like.items()}  # (1, out, in')
    estimate = 0.0
    for _ in range(iterations):
        y = operator(x)
        length = float(_dot(y, y).sqrt())
        estimate = length / float(_dot(x, x).sqrt())
        x = {m: t / length for m, t in y.items()}
    return estimate


def gauss_newton_batches(model, linears: dict, examples: Sequence, batch_size: int | None, pad_token_id: int,
                         seed: int = 0) -> Callable[[Vectors], Vectors]:
    """H_B for the refinement: the whole fitting set as one batch (``batch_size`` None or >= its size: one graph,
    the same exact H every step), else a new random batch of ``batch_size`` examples at every call (stochastic
    Neumann: each step, and each power iteration, draws its own; batches cycle through shuffled epochs)."""
    if batch_size is None or batch_size >= len(examples):
        return GaussNewton(model, linears, examples, pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def next_batch(v: Vectors) -> Vectors:
        if len(order) < batch_size:
            order.extend(torch.randperm(len(examples), generator=generator).tolist())
        chosen = [examples[order.pop()] for _ in range(batch_size)]
        return GaussNewton(model, linears, chosen, pad_token_id)(v)

    return next_batch


def refinement_model(model_dir, layer_stride: int = 1) -> tuple:
    """(model, {name: nn.Linear}): the model as run-query loads it (float32, MLP projections tracked, Conv1D
    swapped), with eager attention (twice differentiable) and gradients on the tracked weights only."""
    from if_query.model.loading import load_model
    from if_query.model.tracking import track_modules

    model = load_model(str(model_dir), None, torch.float32)
    model.set_attn_implementation("eager")
    model, modules = track_modules(model, layer_stride)
    model.requires_grad_(False)
    linears = {m.name: model.get_submodule(m.name) for m in modules}
    for parameter in _tracked_parameters(linears):
        parameter.requires_grad_(True)
    return model, linears


def pairwise(x: Vectors, y: Vectors) -> torch.Tensor:
    """(len x, len y) inner products of every vector of ``x`` with every vector of ``y``."""
    return sum(x[m].flatten(1) @ y[m].flatten(1).T for m in x)


@dataclasses.dataclass
class AstraRun:
    scores: dict[int, tuple[np.ndarray, np.ndarray]]  # N -> (raw, cosine), each (queries, train)
    seconds: dict[int, float]  # N -> gradients + refinement to N (the EK-FAC fit and scoring not included)
    refinement: Refinement
    refined_side: str  # "query" or "train"
    n0_error: float  # max |N=0 - if-query's EK-FAC score| / max |score|


def astra_scores(built: dict, factors_dir, steps: Sequence[int], reference: np.ndarray,
                 batch_size: int | None = None, seed: int = 0) -> AstraRun:
    """ASTRA-refined scores of a benchmark seed (``built``: model_dir, query_json, train_json; the fitting data
    is the train records, as for the benchmark's factors) for every N in ``steps`` (0 included).

    Which side is refined: the queries (as run-query would), except with the whole fitting set as one batch,
    where the refined operator M_N = alpha sum_k (I - alpha P A)^k P is symmetric, so refining the train side
    gives the same scores (``--self-check`` checks it) and is cheaper when there are fewer train records.
    ``influence_cosine`` under refinement: the refined score over the EK-FAC self-influences of both sides (a
    query's own normaliser does not change its ranking). Raises when N = 0 differs from ``reference`` (if-query's
    EK-FAC raw scores of the same factors) by more than ASTRA_N0_TOLERANCE of the largest score."""
    from if_query.data.records import load_examples
    from if_query.data.tokenization import ExampleTokenizer
    from if_query.fit.metadata import load_complete_metadata
    from if_query.kron.factors import HessianFactors
    from if_query.model.loading import load_tokenizer

    started = time.perf_counter()
    tokenizer = load_tokenizer(str(built["model_dir"]))
    tokenize = ExampleTokenizer(tokenizer, 512)
    queries = tokenize.tokenize_all(load_examples(built["query_json"]))
    train = tokenize.tokenize_all(load_examples(built["train_json"]))
    model, linears = refinement_model(built["model_dir"], load_complete_metadata(factors_dir)["fit"]["layer_stride"])
    reader = HessianFactors(factors_dir)
    preconditioners = {name: reader.preconditioner(name, None, torch.device("cpu")) for name in linears}
    query_grads = example_gradients(model, linears, queries, tokenizer.pad_token_id)  # (queries, out, in') each
    train_grads = example_gradients(model, linears, train, tokenizer.pad_token_id)  # (train, out, in') each
    hessian = gauss_newton_batches(model, linears, train, batch_size, tokenizer.pad_token_id, seed)
    refine_train = isinstance(hessian, GaussNewton) and len(train) < len(queries)
    refined = refine_ihvp(train_grads if refine_train else query_grads, hessian, preconditioners, steps, seed=seed)
    gradient_s = time.perf_counter() - started - refined.seconds[max(steps)]
    norms = [_dot(g, ekfac_inverse(preconditioners, g)).clamp_min(0).sqrt() for g in (query_grads, train_grads)]
    scores = {}
    for n, v in refined.vectors.items():
        raw = pairwise(query_grads, v) if refine_train else pairwise(v, train_grads)  # (queries, train)
        cosine = (raw / (norms[0][:, None] * norms[1][None, :])).nan_to_num(0.0).clamp(-1, 1)
        scores[n] = (raw.double().numpy(), cosine.double().numpy())
    error = float(np.abs(scores[0][0] - reference).max() / np.abs(reference).max())
    if error > ASTRA_N0_TOLERANCE:
        raise RuntimeError(f"ASTRA N=0 differs from if-query's EK-FAC scores by {error:.1e} of the largest score")
    return AstraRun(scores, {n: gradient_s + s for n, s in refined.seconds.items()}, refined,
                    "train" if refine_train else "query", error)


# ---------------------------------------------------------------------------------------------
# --self-check: ASTRA against dense matrices on a model tracking about 2,000 parameters
# ---------------------------------------------------------------------------------------------

SELF_CHECK_TOLERANCE = 1e-10  # relative, float64: the Gauss-Newton product, the recurrence, the symmetry
SELF_CHECK_N0_TOLERANCE = 1e-4  # relative: N = 0 (float64) against if-query's EK-FAC scores (float32)
SELF_CHECK_CONVERGED = 1e-4  # relative: many steps against the exact (H + L)^-1 scores
SELF_CHECK_STEPS = 5  # the step compared with the dense recurrence
SELF_CHECK_MAX_STEPS = 4000
DIVERGING_ALPHA_SCALE = 3.0  # alpha = this / the largest eigenvalue: the iteration diverges (> 2)
SELF_CHECK_DAMPINGS = (0.1, 1.0, 10.0, 100.0)  # x each module's mean eigenvalue: the convergence check's choices


def _flat(v: Vectors) -> torch.Tensor:
    """(K, P): the K vectors with their module blocks flattened (row-major) and concatenated."""
    return torch.cat([t.flatten(1) for t in v.values()], dim=1)


def _unflat(flat: torch.Tensor, like: Vectors) -> Vectors:
    """Inverse of :func:`_flat` for (K, P) ``flat``, blocks shaped like ``like``'s (K, out, in')."""
    sizes = [t[0].numel() for t in like.values()]
    return {m: part.reshape(len(flat), *like[m].shape[1:]) for m, part in zip(like, flat.split(sizes, dim=1),
                                                                               strict=True)}


def dense_gauss_newton(model, linears: dict, examples: Sequence, pad_token_id: int, like: Vectors) -> torch.Tensor:
    """(P, P) Gauss-Newton matrix (1/n) sum_x J_x^T (diag p - p p^T) J_x from full Jacobians (torch.func.jacrev over
    the flattened tracked weights): an independent route to what :class:`GaussNewton` applies."""
    from torch.func import functional_call, jacrev

    from if_query.data.tokenization import IGNORE_INDEX, collate

    names = [f"{m}.{kind}" for m, linear in linears.items() for kind in ("weight", "bias")
             if getattr(linear, kind) is not None]
    theta = _flat(_to_vectors(linears, [p.detach() for p in _tracked_parameters(linears)]))[0]  # (P,) the weights
    total = torch.zeros(len(theta), len(theta), dtype=theta.dtype)
    for example in examples:
        batch = collate([example], pad_token_id)
        labelled = batch["labels"][0, 1:] != IGNORE_INDEX  # (T-1,)

        def logits(flat, batch=batch, labelled=labelled):
            params = _from_vector(linears, _unflat(flat[None], like), 0)
            out = functional_call(model, dict(zip(names, params, strict=True)),
                                  args=(), kwargs={"input_ids": batch["input_ids"]}).logits
            return out[0, :-1][labelled]  # (C, vocab) at the labelled positions

        jacobian = jacrev(logits)(theta)  # (C, vocab, P)
        p = torch.softmax(logits(theta).detach(), dim=-1)  # (C, vocab)
        hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (C, vocab, vocab)
        total += torch.einsum("cvp,cvw,cwq->pq", jacobian, hessian, jacobian)
    return total / len(examples)


def dense_preconditioner(preconditioners: dict) -> torch.Tensor:
    """(P, P) block-diagonal P: per module R^T diag(scale^2) R with R = (Q_g kron Q_a)^T (row-major
    vec(Q_g^T V Q_a) = R vec(V))."""
    blocks = []
    for pre in preconditioners.values():
        rotation = torch.kron(pre.q_g, pre.q_a).T  # (out in', out in')
        blocks.append(rotation.T @ torch.diag(pre.scale.flatten() ** 2) @ rotation)
    return torch.block_diag(*blocks)


def _relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / y.abs().max())


def _float64(pre):
    return dataclasses.replace(pre, q_a=pre.q_a.double(), q_g=pre.q_g.double(), scale=pre.scale.double())


@dataclasses.dataclass
class DenseCase:
    """The self-check's model (float64), gradients and dense Gauss-Newton matrix."""

    model: object
    linears: dict
    reader: object  # if_query.kron.factors.HessianFactors of the fit
    query_grads: Vectors  # (queries, out, in') per module
    train_grads: Vectors  # (train, out, in') per module
    hessian: GaussNewton  # the refinement's operator on the fitting data (the train records)
    gauss_newton: torch.Tensor  # (P, P) the same matrix formed densely

    def preconditioners(self, ratio: float | None = None) -> dict:
        """Each module's EK-FAC in float64 with damping "auto" (None) or ``ratio`` x its mean eigenvalue."""
        cpu = torch.device("cpu")
        return {name: _float64(self.reader.preconditioner(
            name, None if ratio is None else ratio * float(self.reader.curvature(name).mean()), cpu))
            for name in self.linears}

    def damped(self, pre: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """((P, P) H + L, (P,) the diagonal L) under ``pre``'s dampings."""
        damping = torch.cat([torch.full((t[0].numel(),), pre[m].damping, dtype=torch.float64)
                             for m, t in self.train_grads.items()])
        return self.gauss_newton + torch.diag(damping), damping

    def spectrum(self, pre: dict) -> torch.Tensor:
        """The eigenvalues of P (H + L) (those of the symmetric P^1/2 (H + L) P^1/2)."""
        eigen_p, basis = torch.linalg.eigh(dense_preconditioner(pre))
        root = basis @ torch.diag(eigen_p.clamp_min(0).sqrt()) @ basis.T  # (P, P) P^1/2
        return torch.linalg.eigvalsh(root @ self.damped(pre)[0] @ root)


def dense_case(built: dict, factors_dir) -> DenseCase:
    from if_query.data.records import load_examples
    from if_query.data.tokenization import ExampleTokenizer
    from if_query.kron.factors import HessianFactors
    from if_query.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(built["model_dir"]))
    tokenize, pad = ExampleTokenizer(tokenizer, 512), tokenizer.pad_token_id
    queries = tokenize.tokenize_all(load_examples(built["query_json"]))
    train = tokenize.tokenize_all(load_examples(built["train_json"]))
    model, linears = refinement_model(built["model_dir"])
    model.double()
    query_grads, train_grads = (example_gradients(model, linears, t, pad) for t in (queries, train))
    return DenseCase(model, linears, HessianFactors(factors_dir), query_grads, train_grads,
                     GaussNewton(model, linears, train, pad),
                     dense_gauss_newton(model, linears, train, pad, train_grads))


def exactness_checks(case: DenseCase, reference: np.ndarray, log) -> list[tuple[str, float, float]]:
    """(name, relative error, tolerance) of the checks under damping "auto": the Gauss-Newton product, N = 0,
    SELF_CHECK_STEPS steps against the dense recurrence, and the train side refined against the query side."""
    pre, steps = case.preconditioners(), SELF_CHECK_STEPS
    damped, damping = case.damped(pre)
    g = _flat(case.query_grads)  # (queries, P)
    probe = _unflat(torch.randn(3, g.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                    case.train_grads)  # 3 random vectors
    query_side = refine_ihvp(case.query_grads, case.hessian, pre, [steps])
    train_side = refine_ihvp(case.train_grads, case.hessian, pre, [steps])
    recurrence = g @ dense_preconditioner(pre)  # (queries, P) v_0
    for _ in range(steps):
        recurrence = recurrence + query_side.alpha * (g - recurrence @ damped) @ dense_preconditioner(pre)
    exact = g @ torch.linalg.solve(damped, _flat(case.train_grads).T)  # (queries, train)
    spectrum = case.spectrum(pre)
    log(f"self-check: {g.shape[1]} tracked parameters, {len(g)} queries, {len(case.train_grads[next(iter(pre))])} "
        f"train records; damping auto: eigenvalues of P(H+L) {float(spectrum.min()):.3g}..{float(spectrum.max()):.3g}"
        f" (power iterations: {query_side.largest_eigenvalue:.3g}); EK-FAC's scores differ from the exact "
        f"(H+L)^-1 scores by {_relative(pairwise(query_side.vectors[0], case.train_grads), exact):.3g} of the largest")
    too_large = refine_ihvp(case.query_grads, case.hessian, pre, [steps], alpha_scale=DIVERGING_ALPHA_SCALE)
    return [
        (f"alpha = {DIVERGING_ALPHA_SCALE:g} / largest eigenvalue: every residual grows, every vector is stopped "
         "(fraction not stopped)", 1 - len(too_large.stopped) / len(g), 0.0),
        ("Gauss-Newton product = dense J^T H J", _relative(_flat(case.hessian(probe)),
                                                           _flat(probe) @ damped - _flat(probe) * damping),
         SELF_CHECK_TOLERANCE),
        ("N = 0 = if-query's EK-FAC scores", _relative(pairwise(query_side.vectors[0], case.train_grads),
                                                       torch.from_numpy(reference)), SELF_CHECK_N0_TOLERANCE),
        (f"N = {steps} = the dense recurrence", _relative(_flat(query_side.vectors[steps]), recurrence),
         SELF_CHECK_TOLERANCE),
        (f"N = {steps}: train side refined = query side refined",
         _relative(pairwise(case.query_grads, train_side.vectors[steps]),
                   pairwise(query_side.vectors[steps], case.train_grads)), SELF_CHECK_TOLERANCE),
    ]


def convergence_check(case: DenseCase, log) -> tuple[str, float, float]:
    """Many steps reach the exact (H + L)^-1 scores, under the smallest damping of SELF_CHECK_DAMPINGS (x each
    module's mean eigenvalue) whose spectrum lets them within SELF_CHECK_MAX_STEPS (auto's may not: a slow
    contraction 1 - alpha x the smallest eigenvalue of P(H+L) is the price of a safe alpha)."""
    for ratio in SELF_CHECK_DAMPINGS:
        pre = case.preconditioners(ratio)
        spectrum = case.spectrum(pre)
        rate = 1 - float(spectrum.min() / spectrum.max())  # per step, with alpha = 1 / the largest eigenvalue
        steps = math.ceil(math.log(SELF_CHECK_CONVERGED / 10) / math.log(rate))
        if steps <= SELF_CHECK_MAX_STEPS:
            break
    steps = min(steps, SELF_CHECK_MAX_STEPS)
    refined = refine_ihvp(case.train_grads, case.hessian, pre, [steps])
    exact = _flat(case.query_grads) @ torch.linalg.solve(case.damped(pre)[0], _flat(case.train_grads).T)
    log(f"  damping {ratio:g} x the mean eigenvalue: eigenvalues of P(H+L) {float(spectrum.min()):.3g}.."
        f"{float(spectrum.max()):.3g} (power iterations: {refined.largest_eigenvalue:.3g}), {steps} steps (stopped "
        f"vectors: {refined.stopped or 'none'})")
    return (f"N = {steps} = the exact (H + L)^-1 scores (damping {ratio:g} x mean eigenvalue)",
            _relative(pairwise(case.query_grads, refined.vectors[steps]), exact), SELF_CHECK_CONVERGED)


def check_against_dense(built: dict, factors_dir, reference: np.ndarray, log) -> bool:
    """``--self-check``: on ``built``'s model (small enough to form every matrix densely; float64), the
    Gauss-Newton product equals the dense J^T H J, N = 0 equals if-query's EK-FAC scores (``reference``), the
    first steps equal the dense recurrence, refining the train side gives the query side's scores, and enough
    steps reach the exact (H + L)^-1 scores. Logs each check; True when all pass."""
    case = dense_case(built, factors_dir)
    checks = [*exactness_checks(case, reference, log), convergence_check(case, log)]
    for name, error, tolerance in checks:
        log(f"  {'ok  ' if error <= tolerance else 'FAIL'} {name}: {error:.2e} (tolerance {tolerance:g})")
    return all(error <= tolerance for _, error, tolerance in checks)
