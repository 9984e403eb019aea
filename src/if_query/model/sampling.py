"""The true Fisher's sampled labels (the loss they enter: :mod:`if_query.model.loss`).

True-Fisher label sampling (``LABEL_SAMPLING``): when a fitting stage asks for sampled labels, the
label at each labelled position is drawn from the model's softmax there, by inverse-CDF sampling
with one uniform number per position. That number is a hash (a counter-based generator, computed
with tensor operations on the batch's device) of

- the sampling seed (``--seed``) and the stage's name (``"covariance"``, ``"lambda"``, ...),
- the example: its unpadded token ids and which of them are labelled,
- the position within the example, and the example's Fisher-sample index (0 unless a batch carries
  ``fisher_sample``, see :func:`sample_labels`).

So an example's labels depend on nothing else: not on the batch it lands in, the batch order, the
module partition, the process rank, or whether the stage was interrupted and resumed. Stages draw
independent labels (covariance and lambda differ); a partitioned fit samples exactly the labels of
an unpartitioned one; a resumed stage samples what it would have sampled uninterrupted. Two
identical examples (same tokens and labelled positions) get the same labels. Changing any of this
changes the fitted factors, so ``LABEL_SAMPLING`` is part of the fit's identity.
"""

from __future__ import annotations

import hashlib
import math

import torch

from if_query.data.tokenization import IGNORE_INDEX
from if_query.model.loss import labelled_columns

LABEL_SAMPLING = "example-hash-v1"  # bump whenever sampled labels would change
_MASK32 = 0xFFFFFFFF


# --- counter-based hashing on int64 tensors holding 32-bit values (no overflow: every product < 2^49) ---


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2^32`` for ``x`` in [0, 2^32)."""
    return (((x & 0xFFFF) * constant) + ((((x >> 16) * constant) & 0xFFFF) << 16)) & _MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (Wellons' lowbias32): every input bit affects every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(h: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    return _mix(h ^ _mix((value + 0x9E3779B9) & _MASK32))


def _stage_key(seed: int, stage: str) -> int:
    digest = hashlib.sha256(f"{LABEL_SAMPLING}|{seed}|{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _example_hashes(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hash of each example's unpadded tokens and labelled positions (batch,), index of each example's first
    token (batch,)); independent of padding on either side."""
    mask = batch["attention_mask"].long()
    first = (mask.cumsum(dim=1) == 0).sum(dim=1)  # (batch,) number of left-padding columns
    positions = torch.arange(mask.shape[1], device=mask.device) - first[:, None]  # (batch, tokens)
    labelled = (batch["labels"] != IGNORE_INDEX).long()
    values = _mix(batch["input_ids"].long() * 2 + labelled)  # (batch, tokens)
    terms = _combine(values, positions.clamp(min=0)) * mask
    return _mix(terms.sum(dim=1) & _MASK32), first


def _inverse_cdf(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``softmax(logits)`` (n, vocab) at the quantiles ``uniform`` (n,) in [0, 1).

    Two-level search (blocks of about sqrt(vocab) tokens, then tokens within the chosen block), in float64,
    so memory stays near one copy of the logits and a token of probability zero is never drawn.
    """
    n, vocab = logits.shape
    block = max(1, math.isqrt(vocab))
    blocks = -(-vocab // block)
    padded = logits.new_full((n, blocks * block), float("-inf"))
    padded[:, :vocab] = logits
    probabilities = torch.softmax(padded, dim=-1).view(n, blocks, block)  # (n, blocks, block)
    del padded
    cdf = probabilities.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)  # (n, blocks)
    target = uniform * cdf[:, -1]
    chosen = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=blocks - 1)
    before = torch.where(chosen > 0, cdf.gather(1, (chosen - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    rows = torch.arange(n, device=logits.device)
    within = probabilities[rows, chosen].double().cumsum(dim=-1)  # (n, block)
    # Keep the remainder inside the chosen block's mass, so rounding never lands on a zero-probability token.
    rest = torch.minimum((target - before).clamp(min=0.0), torch.nextafter(within[:, -1], within.new_zeros(())))
    offset = torch.searchsorted(within, rest[:, None], right=True).squeeze(1).clamp_(max=block - 1)
    return chosen * block + offset


@torch.no_grad()
def sample_labels(logits: torch.Tensor, labels: torch.Tensor, batch: dict, stage: str, seed: int) -> torch.Tensor:
    """Labels drawn from ``softmax(logits)`` at the labelled positions of ``labels`` (as returned by
    :func:`if_query.model.loss.shifted_logits_and_labels` for ``batch``); -100 elsewhere. Deterministic in (``seed``,
    ``stage``, each example's tokens, position, ``batch.get("fisher_sample", 0)``): see the module docstring."""
    full_width = batch["labels"].shape[1] - 1
    device = labels.device
    if labels.shape[1] == full_width:
        columns = torch.arange(full_width, device=device)
    else:  # logits were computed at the labelled columns only
        columns = labelled_columns(batch).to(device)
    example, first = _example_hashes({k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")})
    sample = batch.get("fisher_sample")
    sample = torch.zeros_like(example) if sample is None else sample.to(device).long()
    labelled = labels != IGNORE_INDEX  # (batch, columns)
    row, column = labelled.nonzero(as_tuple=True)
    position = columns[column] - first[row]  # position of the predicting token within its example
    key = _combine(_combine(example[row] ^ _stage_key(seed, stage), position), sample[row])
    uniform = (key.double() + 0.5) / 2.0**32  # (labelled,) in (0, 1)
    drawn = labels.clone()
    drawn[row, column] = _inverse_cdf(logits[row, column].detach().float(), uniform)
    return drawn
