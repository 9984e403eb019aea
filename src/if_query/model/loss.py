"""The loss being attributed: the summed cross-entropy of an example's labelled (completion) tokens.

The same function is the training loss, the measurement and the score's gradient: Kronfluence's task
(:class:`if_query.kron.fit.CompletionLossTask`), :mod:`if_query.score.capture`, :mod:`if_query.fit.lambda_stage` and
:mod:`if_query.score.refine` call these functions. The true Fisher's sampled labels: :mod:`if_query.model.sampling`.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from if_query.data.tokenization import IGNORE_INDEX


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    model = getattr(model, "module", model)  # DistributedDataParallel
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def labelled_columns(batch: dict) -> torch.Tensor:
    """Columns of the shifted labels (``labels[:, 1:]``) where some example of the batch has a label."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()


def shifted_logits_and_labels(batch: dict, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (float32) and the labels they predict, at the positions where some example of
    the batch has a label (the LM head and softmax are skipped elsewhere when the model allows it)."""
    labels = batch["labels"][:, 1:]
    positions = labelled_columns(batch)
    if positions.numel() and _accepts_logits_to_keep(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=positions).logits
        return logits.float(), labels[:, positions]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, :-1].float(), labels


def summed_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example summed cross-entropy over labelled positions, shape (batch,)."""
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(dim=1)
