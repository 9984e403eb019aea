"""The Kronfluence task: summed cross-entropy of the labelled (completion) tokens."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from kronfluence.task import Task
from torch import nn

from if_query.tokenization import IGNORE_INDEX


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    model = getattr(model, "module", model)  # DistributedDataParallel
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def shifted_logits_and_labels(batch: dict, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (float32) and the labels they predict, at the positions where some example of
    the batch has a label (the LM head and softmax are skipped elsewhere when the model allows it)."""
    labels = batch["labels"][:, 1:]
    positions = (labels != IGNORE_INDEX).any(dim=0).nonzero().flatten()
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


class CompletionLossTask(Task):
    """Training loss and measurement are both the summed cross-entropy over completion tokens.

    For the true Fisher (``sample=True``) the labels at labelled positions are drawn from the model's
    own predictions with a seeded generator; :meth:`reseed` restarts that stream so that every fitting
    stage samples the same labels whether or not the fit was interrupted.
    """

    def __init__(self, tracked_modules: list[str], seed: int = 0):
        self.tracked_modules = list(tracked_modules)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self) -> None:
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return self._generators[device]

    def compute_train_loss(self, batch: dict, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits, labels = shifted_logits_and_labels(batch, model)
        if sample:
            with torch.no_grad():
                labelled = labels != IGNORE_INDEX
                probabilities = torch.softmax(logits[labelled].detach(), dim=-1)
                drawn = torch.multinomial(probabilities, 1, generator=self._generator(probabilities.device))
                labels = labels.clone()
                labels[labelled] = drawn.squeeze(-1)
        return summed_token_losses(logits, labels).sum()

    def compute_measurement(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.tracked_modules

    def get_attention_mask(self, batch: dict) -> torch.Tensor:
        return batch["attention_mask"]
