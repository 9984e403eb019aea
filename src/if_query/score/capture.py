"""One forward and backward pass per batch -> each example's token factors.

A linear layer's per-example gradient over T tokens is ``sum_t g_t a_t^T`` (rank <= T), so keeping
the layer inputs ``A`` (T, in) and output gradients ``G`` (T, out) of every tracked module costs
T (in + out) numbers per example and module instead of in x out, and is all the scores need.

- :class:`LayerRecorder` hooks the tracked ``nn.Linear`` modules and hands back, after each
  backward pass, their inputs (batch, tokens, in) and output gradients (batch, tokens, out) in the
  model's dtype (exactly what autograd computed: a bfloat16 model's are exactly bfloat16).
- :func:`forward_backward` runs one batch with the model's weights frozen: the backward pass
  computes activation gradients only, no weight gradients.
- :func:`capture_token_factors` fills a :class:`~if_query.score.store.TokenFactorStore` with every example's
  ``A`` and ``G`` per module.

Padding positions are dropped (their output gradients are exactly 0 with right padding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from if_query.data.tokenization import Collator, TokenizedExample
from if_query.errors import RunError
from if_query.model.loss import shifted_logits_and_labels, summed_token_losses
from if_query.score.store import TokenFactorStore
from if_query.score.transfer import Transfers

logger = logging.getLogger(__name__)


class LayerRecorder:
    """Forward/backward hooks on ``modules``: ``inputs[name]`` and ``output_grads[name]`` of the last batch."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> LayerRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.output_grads.clear()

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            layer_input = inputs[0].detach()
            if layer_input.dim() != 3:
                raise RunError(
                    f"module {name} sees its input as {tuple(layer_input.shape)}, not (batch, tokens, features): "
                    "per-example gradients cannot be formed for this model family"
                )
            self.inputs[name] = layer_input

            def backward_hook(gradient):
                self.output_grads[name] = gradient.detach()

            output.register_hook(backward_hook)

        return hook


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """No parameter requires a gradient, but the input embeddings' output does, so a backward pass
    computes activation gradients (what the hooks need) and no weight gradients."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    try:
        yield
    finally:
        handle.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def forward_backward(model: nn.Module, batch: dict, loss: Callable | None = None) -> torch.Tensor:
    """Forward and backward pass of the summed completion loss; returns each example's summed loss
    (batch,) float32. Call inside :func:`frozen_weights` and a :class:`LayerRecorder`.

    ``loss(logits, labels, batch)`` may replace the labels' cross-entropy (the lambda stage samples
    labels from the model)."""
    logits, labels = shifted_logits_and_labels(batch, model)
    losses = summed_token_losses(logits, labels) if loss is None else loss(logits, labels, batch)
    losses.sum().backward()
    return losses.detach()


def capture_token_factors(model: nn.Module, modules: dict[str, nn.Linear], examples: Sequence[TokenizedExample],
                          store: TokenFactorStore, batches: Sequence[Sequence[int]], pad_token_id: int,
                          device: torch.device, progress: Callable[[int], None] | None = None,
                          transfers: Transfers | None = None) -> torch.Tensor:
    """Fill ``store`` with the token factors of ``examples`` (store example i = ``examples[i]``), one
    forward/backward pass per batch of indices in ``batches`` (each index once), and return each
    example's summed completion loss, (num_examples,) float64. A batch's factors leave the device in one
    go (:class:`~if_query.score.transfer.Transfers`: non-blocking copies into pinned memory, one synchronisation),
    in the model's dtype, each example's positions alone (no padding)."""
    collate = Collator(pad_token_id)
    transfers = transfers or Transfers(device)
    losses = torch.empty(len(examples), dtype=torch.float64)
    with frozen_weights(model), LayerRecorder(modules) as recorder:
        for indices in batches:
            indices = list(indices)
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices]).items()}
            losses[indices] = forward_backward(model, batch).double().cpu()
            captured = {  # each example's own positions: padding never leaves the device
                (key, row): tensor[row, : store.lengths[example]]
                for key, tensor in [*((f"inputs:{name}", recorder.inputs[name]) for name in store.input_groups),
                                    *((f"output_grads:{name}", recorder.output_grads[name]) for name in modules)]
                for row, example in enumerate(indices)}
            if transfers.copies and transfers.page_locked(store.flat):  # straight into the store's locked pages
                places = {row: store.places(example) for row, example in enumerate(indices)}
                transfers.to_host_into([(places[row][key], tensor) for (key, row), tensor in captured.items()])
            else:
                landed = transfers.to_host(captured)
                for row, example in enumerate(indices):
                    store.put(example, {key: value for (key, at), value in landed.items() if at == row})
            recorder.clear()
            if progress is not None:
                progress(len(indices))
    return losses
