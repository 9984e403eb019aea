"""if-query's eigenvalue-correction (lambda) stage, written into Kronfluence's own factor files.

Kronfluence's lambda for EK-FAC is ``sum over examples of (Q_gᵀ ∇W Q_a)²`` (out, in'), for the
diagonal strategy ``sum of ∇W²``, with ``∇W = Gᵀ [A, 1]`` the per-example gradient (conventions in
:mod:`if_query.kron`). Kronfluence forms every ``∇W`` and rotates it: 2·out·in'·(out + in') FLOPs per
example and module. Rotating the T token vectors first, ``Ĝᵀ Â`` with ``Â = [A, 1] Q_a`` and
``Ĝ = G Q_g``, gives the same rotated gradient for 2·T·(out² + in'²) + 2·T·out·in' FLOPs (about 9x
less for a 13B MLP at T = 512); each batch and module takes whichever order is cheaper.

What stays as Kronfluence's stage did it:

- one forward and backward pass per batch (weights frozen: activation gradients only) over the
  fitting examples in the same order and batches; the true Fisher's labels are drawn by
  :func:`if_query.model.sampling.sample_labels` under stage ``"lambda"`` and the fit's seed, exactly what
  ``CompletionLossTask.compute_train_loss(..., sample=True)`` draws there; ``--fisher empirical``
  uses the data's labels;
- float32 accumulation on the device (token vectors cast from the model's dtype, as Kronfluence's
  ``per_sample_gradient_dtype``), ``num_lambda_processed`` = the number of examples;
- module partitions: one data pass per group of modules (Kronfluence's groups), only that group's
  eigenvectors and lambdas on the device, each group's files written when it is done;
- torchrun: rank r takes examples r, r + N, ... (Kronfluence's ``DistributedEvalSampler``), lambdas
  are summed onto rank 0 (``torch.distributed.reduce``: NCCL under fit-hessians), rank 0 writes;
- the files, their metadata and resuming (:mod:`if_query.kron`): an interrupted stage keeps the
  groups it finished and reruns the rest, ending with the same factors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from if_query.data.tokenization import TokenizedExample
from if_query.errors import RunError
from if_query.kron import lambda_files
from if_query.kron.factors import read_eigenvectors
from if_query.model import loss as loss_module
from if_query.model import sampling
from if_query.score.capture import LayerRecorder, forward_backward, frozen_weights
from if_query.score.per_example import rotate_tokens, with_bias_column

logger = logging.getLogger(__name__)
STAGE = "lambda"  # the label-sampling stage name (as Kronfluence's lambda stage samples under it)
CHUNK_BYTES = 1 << 30  # per-example gradients formed at once, at most (Kronfluence forms a whole batch's)


def shard(examples: Sequence, rank: int, world: int) -> list:
    """This rank's examples: ``rank``, ``rank + world``, ... (Kronfluence's DistributedEvalSampler)."""
    return list(examples[rank::world])


def sampled_loss(seed: int) -> Callable:
    """Per-example summed cross-entropy against labels drawn from the model (true Fisher, stage "lambda")."""

    def loss(logits: torch.Tensor, labels: torch.Tensor, batch: dict) -> torch.Tensor:
        drawn = sampling.sample_labels(logits, labels, batch, STAGE, seed)
        return loss_module.summed_token_losses(logits, drawn)

    return loss


class _Accumulator:
    """One module's lambda (float32, on the device) and, for EK-FAC, its eigenvectors."""

    def __init__(self, linear: nn.Linear, eigenvectors: tuple[torch.Tensor, torch.Tensor] | None,
                 device: torch.device):
        self.bias = linear.bias is not None
        self.out = linear.out_features
        self.width = linear.in_features + int(self.bias)
        self.q_a, self.q_g = eigenvectors if eigenvectors is not None else (None, None)
        self.value = torch.zeros(self.out, self.width, dtype=torch.float32, device=device)

    def add(self, inputs: torch.Tensor, output_grads: torch.Tensor, lengths: list[int]) -> None:
        """Add the batch's examples: ``inputs`` (B, T, in), ``output_grads`` (B, T, out), example i's
        first ``lengths[i]`` positions (the rest is right padding, whose output gradients are exactly 0,
        so padding adds exactly 0)."""
        tokens = max(lengths)
        inputs = with_bias_column(inputs[:, :tokens].float(), self.bias)  # (B, T, in')
        output_grads = output_grads[:, :tokens].float()
        tokens_rotated = self.q_a is not None and rotate_tokens(tokens, self.out, self.width)
        if tokens_rotated:  # the whole batch's token vectors in two matmuls
            inputs = inputs @ self.q_a
            output_grads = output_grads @ self.q_g
        rows = max(1, CHUNK_BYTES // (self.out * self.width * 4))  # examples whose gradients are formed at once
        for start in range(0, len(lengths), rows):
            gradients = torch.bmm(output_grads[start : start + rows].transpose(1, 2),
                                  inputs[start : start + rows])  # (rows, out, in')
            if self.q_a is not None and not tokens_rotated:
                gradients = self.q_g.T @ gradients @ self.q_a
            self.value.add_(gradients.square_().sum(dim=0))


def accumulate_lambda(model: nn.Module, modules: dict[str, nn.Linear],
                      eigenvectors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                      examples: Sequence[TokenizedExample], batch_size: int, collate: Callable,
                      device: torch.device, loss: Callable | None = None,
                      progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Sum over ``examples`` (in batches of ``batch_size``, in order) of each module's squared rotated
    (``eigenvectors`` given) or plain per-example gradient: {name: (out, in') float32 on ``device``}."""
    accumulators = {name: _Accumulator(linear, None if eigenvectors is None else eigenvectors[name], device)
                    for name, linear in modules.items()}
    with frozen_weights(model), LayerRecorder(modules) as recorder:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = {key: value.to(device) for key, value in collate(chunk).items()}
            forward_backward(model, batch, loss)
            lengths = [len(example) for example in chunk]
            for name, accumulator in accumulators.items():
                accumulator.add(recorder.inputs[name], recorder.output_grads[name], lengths)
            recorder.clear()
            if progress is not None:
                progress(1)
    return {name: accumulator.value for name, accumulator in accumulators.items()}


def reduce_to_main(lambdas: dict[str, torch.Tensor], state) -> dict[str, torch.Tensor] | None:
    """Every rank's lambdas summed onto rank 0 (in place), which gets them back; other ranks get None."""
    if state.use_distributed:
        for value in lambdas.values():
            dist.reduce(value, dst=0, op=dist.ReduceOp.SUM)
    return lambdas if state.process_index == 0 else None


def _check_finite(lambdas: dict[str, torch.Tensor] | None, state) -> None:
    """Every rank raises if rank 0's summed lambdas are not all finite (no rank is left waiting)."""
    bad = [name for name, value in (lambdas or {}).items() if not bool(torch.isfinite(value).all())]
    flag = torch.tensor([len(bad)], device=state.device)
    if state.use_distributed:
        dist.broadcast(flag, src=0)
    if int(flag.item()):
        where = f" for module {bad[0]}" if bad else ""
        raise RunError(f"non-finite lambda{where} (overflow in the model's dtype? try --dtype float32)")


def lambda_group(model: nn.Module, modules: dict[str, nn.Linear], directory: Path | None, rotated: bool,
                 examples: Sequence[TokenizedExample], batch_size: int, collate: Callable, state,
                 loss: Callable | None = None, progress: Callable[[int], None] | None = None,
                 ) -> dict[str, torch.Tensor] | None:
    """One group of modules: this rank's share of ``examples``, summed over ranks onto rank 0, which
    gets {name: (out, in') float32}; other ranks get None (``state``:
    Kronfluence's State, or anything with its ``process_index``, ``num_processes``, ``use_distributed``
    and ``device``). Eigenvectors are read from ``directory`` when ``rotated``."""
    eigenvectors = ({name: read_eigenvectors(directory, name, state.device) for name in modules}
                    if rotated else None)
    mine = shard(examples, state.process_index, state.num_processes)
    lambdas = accumulate_lambda(model, modules, eigenvectors, mine, batch_size, collate, state.device, loss, progress)
    del eigenvectors
    return reduce_to_main(lambdas, state)


def fit_lambda_matrices(analyzer, model: nn.Module, factors_name: str, examples: Sequence[TokenizedExample],
                        batch_size: int, collate: Callable, factor_args, seed: int, quiet: bool = False) -> None:
    """The lambda stage of a fit: Kronfluence's files for ``factor_args`` (strategy, Fisher, module
    partitions), computed as the module docstring says; skipped when they exist (as Kronfluence skips).

    ``model`` is the prepared model (not a DDP wrapper), already on ``analyzer.state.device``;
    ``examples`` are in the fit's order (all ranks the same)."""
    directory = lambda_files.prepare_lambda_stage(analyzer, factors_name, factor_args, examples)
    if directory is None:
        return
    state = analyzer.state
    strategy = lambda_files.lambda_strategy(factor_args.strategy)
    modules = lambda_files.tracked_linears(model)
    groups = lambda_files.module_groups(list(modules), factor_args.lambda_module_partitions)
    partitioned = len(groups) > 1
    loss = None if factor_args.use_empirical_fisher else sampled_loss(seed)
    counts = {name: torch.tensor([len(examples)], dtype=torch.int64) for name in modules}
    batches = -(-len(shard(examples, state.process_index, state.num_processes)) // batch_size)
    todo = [g for g in range(len(groups)) if not (partitioned and lambda_files.lambda_files_exist(directory, g))]
    with tqdm(total=batches * len(todo), desc="Fitting Lambda matrices", disable=quiet or not state.is_main_process,
              ) as bar:
        for number in todo:
            group = {name: modules[name] for name in groups[number]}
            lambdas = lambda_group(model, group, directory, strategy.rotated, examples, batch_size, collate, state,
                                   loss, bar.update)
            _check_finite(lambdas, state)
            if lambdas is not None:  # rank 0
                lambda_files.write_lambda_matrices(directory, {name: value.cpu() for name, value in lambdas.items()},
                                           {name: counts[name] for name in group}, factor_args,
                                           number if partitioned else None)
            del lambdas
            state.wait_for_everyone()
    if partitioned:
        if state.is_main_process:
            lambda_files.aggregate_lambda_matrices(directory, len(groups))
        state.wait_for_everyone()
    logger.debug("Lambda matrices of %d modules written to %s", len(modules), directory)
