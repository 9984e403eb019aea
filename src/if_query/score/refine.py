"""``--refine-steps N``: each query's inverse-Hessian-vector product refined by EK-FAC-preconditioned stochastic
Neumann iterations (ASTRA, Wang et al. 2025), then scored against the train side's plain gradients.

For a query gradient g (every tracked module's (out, in') block, bias column included), with P the EK-FAC
inverse under each module's damping (``P g`` is the query's preconditioned gradient of :mod:`if_query.score.engine`)
and Λ those dampings:

    v₀ = P g,        v_{k+1} = v_k + α P (g − (H_B + Λ) v_k),

where ``H_B`` is the Gauss-Newton matrix of all tracked modules *jointly* (not block-diagonal, not Kronecker-
factored) on a batch B of the fitting data, normalised as the fitted factors are: the mean over B's examples
of the Gauss-Newton matrix of each example's summed-token loss (lambda / n). ``H_B v`` is a JVP through the
network, the cross-entropy's Hessian at the model's own softmax (``diag(p) − p pᵀ`` at each labelled
position: no sampled labels), and a VJP back. Each step draws the next batch of the fitting data (cycling).
The step ``α = 1 / λ_max`` with λ_max the largest eigenvalue of ``P (H_B + Λ)``, estimated by a few power
iterations on the first batch (P(H + Λ) is similar to a symmetric positive definite matrix, so it converges
for any α below 2 / λ_max). If the residual ``|P (g − (H + Λ) v)|`` grows, refinement stops at the last iterate
that reduced it and says so (measured in P's norm, ``sqrt(rᵀ P r)``, in which each step with one batch provably
shrinks it). N = 0 is the EK-FAC score exactly.

Scores are ``<v_q, G_tᵀ [A_t, 1]>`` against each train example's plain gradient; ``influence_cosine`` divides by
``sqrt(<v_q, g_q> · t_self)``, where the train side's self-influence stays EK-FAC's (refining every train
example too would cost N refinements).

Memory, on the device: the model; every module's prepared EK-FAC factors (``Inverse``: Q_a, Q_g and S, as the
engine holds one module's); one fitting batch's JVP/VJP activations; and of one query at a time (the others' g and
every refined v wait on the host) ``REFINE_COPIES`` (:mod:`if_query.plan.sizes`) copies of the tracked weights in
float32: g, v, the residual
(made in place from H v) and the update, or during ``H v`` the pullback's weight-sized result and its blocks. The
JVP's primals are the model's own weights (no float32 copy of them) and its tangents v cast to the model's dtype
inside the forward as before (the same numbers). :func:`refine_bytes` counts these for the check before the model
loads and for ``if-query plan --refine-steps``; ``tests/test_refine.py`` measures the peak on the CPU.

Bytes moved, all counted by the run's :class:`~if_query.score.transfer.Transfers` as the ``refine`` kind (planned by
:func:`if_query.plan.sizes.refine_moved`): the factors (``Inverse``; unless the plan keeps them on the device: then
put there once for the engine too, as ``factors``), the power iterations' random start, each query's g onto the
device and its v off it; the queries' slabs and gradients by :func:`if_query.score.engine.gradients`, the refined v's
by every engine call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from if_query.kron.factors import HessianFactors
from if_query.model import loss as loss_module
from if_query.plan.sizes import BYTES_PER_FLOAT, Shape, refine_vector_bytes
from if_query.score.transfer import FACTORS, REFINE, Transfers

logger = logging.getLogger(__name__)
POWER_ITERATIONS = 10


def refine_bytes(shapes: Sequence[Shape], queries: int) -> tuple[int, int]:
    """(device bytes of one query's vectors and P's temporaries, host bytes of every query's g and refined v)."""
    return refine_vector_bytes(shapes), 2 * queries * sum(s.out * s.width for s in shapes) * BYTES_PER_FLOAT


Blocks = dict[str, torch.Tensor]  # module name -> (out, in') float32


DOT_CHUNK = 1 << 20  # elements upcast at a time by _dot


def _dot(a: Blocks, b: Blocks) -> float:
    """<a, b> accumulated in float64, a million elements at a time (no float64 copy of a block)."""
    total = None
    for k in a:
        for x, y in zip(a[k].reshape(-1).split(DOT_CHUNK), b[k].reshape(-1).split(DOT_CHUNK), strict=True):
            part = (x.double() * y.double()).sum()
            total = part if total is None else total.add_(part)
    return 0.0 if total is None else float(total)  # one synchronisation


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """The model's attention as plain matrix products (HuggingFace's "eager") for the duration."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before is None or before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


class GaussNewton:
    """``H_B v`` for the tracked modules of ``model`` (weights as (out, in') blocks with the bias column)."""

    def __init__(self, model: nn.Module, shapes: Sequence[Shape]):
        self.model, self.shapes = model, list(shapes)
        self.linears = {s.name: model.get_submodule(s.name) for s in self.shapes}

    def _weights(self, blocks: Blocks) -> dict[str, torch.Tensor]:
        """{parameter name: tensor} of the tracked modules from (out, in') blocks."""
        weights = {}
        for s in self.shapes:
            block = blocks[s.name]
            weights[f"{s.name}.weight"] = block[:, : s.inp]
            if s.bias:
                weights[f"{s.name}.bias"] = block[:, s.inp]
        return weights

    def _blocks(self, weights: Sequence[torch.Tensor]) -> Blocks:
        blocks, position = {}, 0
        for s in self.shapes:
            parts = [weights[position]]
            position += 1
            if s.bias:
                parts.append(weights[position][:, None])
                position += 1
            blocks[s.name] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return blocks

    def current(self) -> Blocks:
        return {s.name: torch.cat([self.linears[s.name].weight.detach().float()]
                                  + ([self.linears[s.name].bias.detach().float()[:, None]] if s.bias else []), dim=1)
                for s in self.shapes}

    def _primals(self) -> dict[str, torch.Tensor]:
        """The tracked parameters themselves, in the model's dtype (no copy)."""
        primals = {}
        for s in self.shapes:
            primals[f"{s.name}.weight"] = self.linears[s.name].weight.detach()
            if s.bias:
                primals[f"{s.name}.bias"] = self.linears[s.name].bias.detach()
        return primals

    def product(self, batch: dict, v: Blocks) -> Blocks:
        """The mean over the batch's examples of each example's summed-token-loss Gauss-Newton matrix, times v."""
        primals = self._primals()
        names = list(primals)
        positions = loss_module.labelled_columns(batch)
        labels = batch["labels"][:, 1:][:, positions]  # (batch, columns)
        mask = (labels != -100).unsqueeze(-1)  # (batch, columns, 1)
        dtype = next(self.model.parameters()).dtype

        def logits(*tensors):
            params = {n: t.to(dtype) for n, t in zip(names, tensors, strict=True)}
            out = functional_call(self.model, params, args=(), kwargs={
                "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).logits
            return out[:, :-1][:, positions].float()  # (batch, columns, vocab)

        tangents = tuple(t.to(primals[n].dtype) for n, t in self._weights(v).items())  # cast as inside: same numbers
        with eager_attention(self.model):  # forward-mode AD has no fused attention kernels
            value, jv = jvp(logits, tuple(primals[n] for n in names), tangents)
        p = torch.softmax(value, dim=-1)
        hjv = (p * jv - p * (p * jv).sum(dim=-1, keepdim=True)) * mask  # the cross-entropy's Hessian
        _, pullback = vjp(logits, *(primals[n] for n in names))
        product = self._blocks([t.float() for t in pullback(hjv)])
        count = batch["input_ids"].shape[0]
        return {k: t.detach().div_(count) for k, t in product.items()}


class Inverse:
    """P: each module's EK-FAC inverse under its resolved damping (the factors of every module kept on the device:
    refinement serves models whose tracked weights fit there three times over).

    The factors go onto the device through ``transfers`` (counted as ``refine``'s bytes), or, where the plan keeps
    every module's prepared factors on the device (``resident``: the engine's dict), are taken from there, and those
    not there yet are copied once into it (counted as ``factors``, which the engine's calls then need not copy)."""

    def __init__(self, factors: HessianFactors, shapes: Sequence[Shape], damping: float | None, device,
                 transfers: Transfers | None = None, resident: dict | None = None):
        transfers = transfers or Transfers(torch.device(device))
        self.pre = {}
        for s in shapes:
            pre = None if resident is None else resident.get(s.name)
            if pre is None:
                with transfers.streams.copying(s.name):
                    sources = factors.ranges(s.name) if transfers.copies else factors.read(s.name)
                    tensors = {factor: transfers.to_device(source, REFINE if resident is None else FACTORS)
                               for factor, source in sources.items()}
                transfers.streams.wait(transfers.streams.copied(s.name), s.name)
                pre = factors.prepare(tensors, damping)
                if resident is not None:
                    resident[s.name] = pre
            self.pre[s.name] = pre
        self.damping = {name: float(pre.damping or 0.0) for name, pre in self.pre.items()}

    def __call__(self, v: Blocks) -> Blocks:
        return _precondition(self.pre, v)


def _precondition(preconditioners: dict, v: Blocks) -> Blocks:
    """P v: each block through its module's EK-FAC inverse (eigenbasis, 1 / (curvature + damping), back)."""
    result = {}
    for name, block in v.items():
        pre = preconditioners[name]
        if pre.scale is None:
            result[name] = block.clone()  # a new vector, as for the others (refine updates v in place)
            continue
        rotated = block.clone() if pre.q_a is None else pre.q_g.T @ block @ pre.q_a
        rotated.mul_(pre.scale).mul_(pre.scale)  # S² ⊙, in place
        result[name] = rotated if pre.q_a is None else pre.q_g @ rotated @ pre.q_a.T
    return result


def refine(gauss_newton: GaussNewton, inverse: Inverse, gradient: Blocks, batches: Iterator[dict], steps: int,
           alpha: float) -> tuple[Blocks, int]:
    """(v after at most ``steps`` iterations, the steps taken) for one query's ``gradient``."""
    damping = inverse.damping
    v = inverse(gradient)
    best = None
    for step in range(steps):
        residual = gauss_newton.product(next(batches), v)  # H v, made g - (H + Λ) v in place
        for k in residual:
            residual[k].neg_().add_(gradient[k]).sub_(v[k], alpha=damping[k])
        update = inverse(residual)  # P (g - (H + Λ) v)
        size = max(_dot(residual, update), 0.0) ** 0.5  # the residual in P's norm: it shrinks every step
        del residual
        if best is not None and size > best:
            logger.warning("Refinement stopped after %d of %d steps: the residual grew (%.3g > %.3g)", step, steps,
                           size, best)
            return v, step
        best = size
        for k in v:
            v[k].add_(update[k], alpha=alpha)
        del update
    return v, steps


def step_size(gauss_newton: GaussNewton, inverse: Inverse, batch: dict, like: Blocks,
              iterations: int = POWER_ITERATIONS, transfers: Transfers | None = None) -> float:
    """1 / the largest eigenvalue of P (H_B + Λ), by power iterations from a random start (seed 0, drawn on the
    host: the same numbers on every device)."""
    generator = torch.Generator().manual_seed(0)
    transfers = transfers or Transfers(next(gauss_newton.model.parameters()).device)
    x = {k: transfers.put(torch.randn(t.shape, generator=generator)) for k, t in like.items()}
    eigenvalue = 1.0
    for _ in range(iterations):
        norm = _dot(x, x) ** 0.5
        x = {k: t / norm for k, t in x.items()}
        hx = gauss_newton.product(batch, x)
        for k in hx:
            hx[k].add_(x[k], alpha=inverse.damping[k])  # (H + Λ) x, in place
        x = inverse(hx)
        del hx
        eigenvalue = _dot(x, x) ** 0.5  # |P (H + Λ) x| for a unit x: the largest eigenvalue, in the limit
    return 1.0 / max(eigenvalue, 1e-30)


def refine_queries(gauss_newton: GaussNewton, inverse: Inverse, gradients: list[Blocks], batches: Sequence[dict],
                   steps: int, transfers: Transfers | None = None) -> tuple[list[Blocks], torch.Tensor]:
    """Every query's refined v (on the host) and its refined self-influence <v, g>, (queries,) float64. What crosses
    the bus (the power iterations' start, each g onto the device, each v off it) is counted by ``transfers``."""
    if not gradients:
        return [], torch.zeros(0, dtype=torch.float64)
    transfers = transfers or Transfers(next(gauss_newton.model.parameters()).device)
    alpha = step_size(gauss_newton, inverse, batches[0], gradients[0], transfers=transfers)
    logger.info("Refining %d queries: %d Neumann steps of size %.3g (1 / the largest eigenvalue of P (H + damping)), "
                "on %d fitting batches", len(gradients), steps, alpha, len(batches))
    refined, own = [], []
    for host_gradient in gradients:  # one query's g on the device at a time
        gradient = {k: transfers.put(t) for k, t in host_gradient.items()}
        cycle = (batches[k % len(batches)] for k in range(steps))
        v, _ = refine(gauss_newton, inverse, gradient, cycle, steps, alpha)
        own.append(_dot(v, gradient))
        refined.append({k: transfers.take(t) for k, t in v.items()})
        del gradient, v
    return refined, torch.tensor(own, dtype=torch.float64)
