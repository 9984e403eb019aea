"""One gradient per distinct example: scores as inner products of whitened gradients.

Every strategy's preconditioner P = (G + damping)^-1 is symmetric positive definite, so
``g_q^T P g_t = <P^1/2 g_q, P^1/2 g_t>``. For K-FAC and EK-FAC, P is diagonal in the Kronecker
eigenbasis (Q_g ⊗ Q_a), so ``W = (Q_g^T grad Q_a) / sqrt(lambda + damping)`` is a valid whitened
gradient (the rotation back to parameter space is unnecessary for inner products). With ``W`` of
every distinct query and train sequence in memory, the pairwise matrix is one matrix product and
self-influences are squared norms: each gradient is computed once, instead of once as a query,
once as a train example and once more for self-influence in Kronfluence's streaming path.

This reuses the factors Kronfluence fitted and follows its conventions (bias as an extra input
column, lambda divided by the number of examples, the same damping heuristic); tests check it
against Kronfluence's own pairwise scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from kronfluence.module import TrackedModule
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    HEURISTIC_DAMPING_SCALE,
    LAMBDA_MATRIX_NAME,
    NUM_LAMBDA_PROCESSED,
)
from torch import nn

from if_query.task import CompletionLossTask, shifted_logits_and_labels, summed_token_losses
from if_query.tokenization import Collator, TokenizedExample


class Whitener:
    """Maps a module's per-example gradients (batch, out, in[+1]) to whitened coordinates."""

    def __init__(self, strategy: str, factors: dict, module: str, damping: float | None, device: torch.device):
        self.strategy = strategy
        self.q_g = self.q_a = None
        if strategy == "identity":
            self.scale = None
            return
        if strategy in ("kfac", "ekfac"):
            self.q_a = factors[ACTIVATION_EIGENVECTORS_NAME][module].to(device, torch.float32)
            self.q_g = factors[GRADIENT_EIGENVECTORS_NAME][module].to(device, torch.float32)
        if strategy == "kfac":
            eigen_a = factors[ACTIVATION_EIGENVALUES_NAME][module].to(device, torch.float64)
            eigen_g = factors[GRADIENT_EIGENVALUES_NAME][module].to(device, torch.float64)
            # Eigenvalues of a PSD covariance can come out slightly negative in floating point.
            curvature = torch.kron(eigen_a.unsqueeze(0), eigen_g.unsqueeze(-1)).clamp_min(0)
        else:  # ekfac, diagonal: mean squared (projected) per-example gradients
            curvature = factors[LAMBDA_MATRIX_NAME][module].to(device, torch.float64)
            curvature = curvature / factors[NUM_LAMBDA_PROCESSED][module].to(device, torch.float64)
        if damping is None:
            damping = HEURISTIC_DAMPING_SCALE * torch.mean(curvature)
        self.scale = (curvature + damping).rsqrt().to(torch.float32)

    def __call__(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        """Whitened per-example gradients (batch, out * in) from a batch's layer inputs (batch, tokens,
        in[+1]) and output gradients (batch, tokens, out).

        The per-example gradient is ``sum_t g_t a_t^T``, so its eigenbasis rotation
        ``Q_g^T (sum_t g_t a_t^T) Q_a`` equals ``sum_t (Q_g^T g_t)(Q_a^T a_t)^T``: rotating the
        token vectors costs 2T(out^2 + in^2) instead of 2 out in (out + in) for rotating the
        gradient, far less for short sequences and wide layers; the cheaper order is used.
        """
        if self.q_g is None:
            gradient = torch.einsum("bto,bti->boi", output_grads, inputs)
        else:
            tokens, out_features, in_features = inputs.shape[1], output_grads.shape[-1], inputs.shape[-1]
            rotate_tokens = tokens * (out_features**2 + in_features**2)
            rotate_gradient = out_features * in_features * (out_features + in_features)
            if rotate_tokens <= rotate_gradient:
                gradient = torch.einsum("bto,bti->boi", output_grads @ self.q_g, inputs @ self.q_a)
            else:
                gradient = self.q_g.t() @ torch.einsum("bto,bti->boi", output_grads, inputs) @ self.q_a
        if self.scale is not None:
            gradient.mul_(self.scale)
        return gradient.flatten(start_dim=1)


class _Capture:
    """Forward/backward hooks on tracked modules: inputs and output gradients of the last batch."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def forward_hook(module, inputs, output):
            self.inputs[name] = inputs[0].detach()

            def backward_hook(gradient):
                self.output_grads[name] = gradient.detach()

            output.register_hook(backward_hook)

        return forward_hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def layer_inputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A Linear layer's inputs in float32, with a column of ones for the bias (Kronfluence's convention)."""
    inputs = inputs.to(torch.float32)
    if module.bias is not None:
        inputs = torch.cat([inputs, inputs.new_ones(*inputs.shape[:-1], 1)], dim=-1)
    return inputs


def whitened_gradients(model: nn.Module, task: CompletionLossTask, examples: Sequence[TokenizedExample],
                       strategy: str, factors: dict, damping: float | None, pad_token_id: int,
                       batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened gradients, a (num_examples, num_coordinates) float32 matrix in the order of ``examples``,
    and each example's summed completion loss (float64), both from the same forward pass."""
    tracked = {m.name: m for m in model.modules() if isinstance(m, TrackedModule) and m.name in task.tracked_modules}
    whiteners = {name: Whitener(strategy, factors, name, damping, device) for name in tracked}
    capture = _Capture(tracked)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    collate = Collator(pad_token_id)
    sizes = {name: module.original_module.weight.numel() + (module.original_module.bias.numel()
                                                         if module.original_module.bias is not None else 0)
             for name, module in tracked.items()}
    # Rows are filled in length order (contiguous writes) and put back in input order at the end.
    whitened = torch.empty(len(examples), sum(sizes.values()), dtype=torch.float32, device=device)
    losses = torch.empty(len(examples), dtype=torch.float64)
    try:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices]).items()}
            model.zero_grad(set_to_none=True)
            logits, labels = shifted_logits_and_labels(batch, model)
            example_losses = summed_token_losses(logits, labels)  # the task's measurement, per example
            example_losses.sum().backward()
            losses[indices] = example_losses.detach().double().cpu()
            rows = slice(start, start + len(indices))
            with torch.no_grad():
                offset = 0
                for name, module in tracked.items():
                    part = whiteners[name](layer_inputs(module.original_module, capture.inputs[name]),
                                           capture.output_grads[name].to(torch.float32))
                    whitened[rows, offset : offset + sizes[name]] = part
                    offset += sizes[name]
            capture.inputs.clear()
            capture.output_grads.clear()
    finally:
        capture.remove()
        model.zero_grad(set_to_none=True)
    if order != sorted(order):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        whitened = whitened[inverse.to(device)]
    return whitened, losses
