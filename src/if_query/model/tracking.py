"""Which layers are tracked: the MLP projections of a model (found by name, their inputs probed), GPT-2's
``Conv1D`` swapped for ``nn.Linear`` (Kronfluence wraps only linear layers); flattened-token MLPs refused."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from if_query.errors import InputError

# Names of MLP projections in the common families: GPT-2 (c_fc, c_proj), Llama / OLMo / OLMo-2 /
# Qwen2 / Mistral (gate_proj, up_proj, down_proj), GPT-NeoX / Pythia (dense_h_to_4h, dense_4h_to_h),
# OPT and Phi (fc1, fc2), GPT-J (fc_in, fc_out).
MLP_PROJECTION_NAMES = frozenset(
    {"c_fc", "c_proj", "gate_proj", "up_proj", "down_proj", "dense_h_to_4h", "dense_4h_to_h",
     "fc1", "fc2", "fc_in", "fc_out"}
)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
# Where a forward pass cannot run (a meta-device model for the plan): the projection that reads the very input
# of another in the same MLP, as the probe finds it in every family that has both (tests/test_modeling.py).
SHARED_INPUT_BY_NAME = {"up_proj": "gate_proj"}


@dataclass(frozen=True)
class MlpProjection:
    """An MLP projection whose Hessian is approximated: its name in the model, its block, its weight
    shape (out, in) and whether it has a bias (the bias column of :mod:`if_query.score.per_example`)."""

    name: str
    layer: int
    out_features: int
    in_features: int
    bias: bool
    input_from: str | None = None  # the earlier tracked module whose very input tensor this one sees, if any

    @property
    def shape(self) -> list[int]:
        return [self.out_features, self.in_features]


def _layer_index(name: str) -> int | None:
    """The transformer block index of a module name (first integer component), if the module is in
    a block's MLP (no attention component after the index)."""
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            if any(_ATTENTION.search(rest) for rest in parts[position + 1 :]):
                return None
            return int(part)
    return None


def find_mlp_modules(model: nn.Module, layer_stride: int = 1) -> list[MlpProjection]:
    """The MLP projection modules of blocks 0, N, 2N, ... (N = ``layer_stride``).

    Never the LM head, the embeddings or attention projections.
    """
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in MLP_PROJECTION_NAMES:
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        layer = _layer_index(name)
        if layer is None or layer % layer_stride:
            continue
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
        else:
            out_features, in_features = module.weight.shape
        found.append(MlpProjection(name, layer, out_features, in_features, module.bias is not None))
    if not found:
        raise InputError(
            f"no MLP modules found in {type(model).__name__}: if-query knows the MLP projections of GPT-2, "
            "Llama, OLMo, OLMo-2, Qwen2, Mistral, GPT-NeoX/Pythia, OPT, GPT-J and Phi"
        )
    return found


def conv1d_to_linear(module: Conv1D) -> nn.Linear:
    """A numerically identical ``nn.Linear`` for GPT-2's ``Conv1D`` (y = x W + b, W of shape in x out)."""
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=True, device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        linear.bias.copy_(module.bias)
    return linear


def make_trackable(model: nn.Module, modules: list[MlpProjection]) -> nn.Module:
    """Replace tracked ``Conv1D`` modules by ``nn.Linear`` so Kronfluence can wrap them."""
    for tracked in modules:
        module = model.get_submodule(tracked.name)
        if isinstance(module, Conv1D):
            parent_name, _, child = tracked.name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, conv1d_to_linear(module))
    return model


class _ProbeDone(Exception):
    """Raised by the probe's hooks once every tracked module has been seen (skips the rest)."""


def probe_inputs(model: nn.Module, modules: list[MlpProjection]) -> list[MlpProjection]:
    """Refuse a model whose tracked modules do not see (batch, tokens, features) inputs, and note which
    modules see the very input tensor of an earlier one (``input_from``: Llama's up_proj that of gate_proj).

    Some families (OPT: its decoder layer reshapes hidden states to (batch * tokens, hidden) before
    fc1/fc2) feed the MLP flattened tokens; Kronfluence would then treat every token as an example
    (per-token, not per-example, gradients) and scoring fails. A forward pass on 2 sequences of 2
    tokens, with hooks on the tracked modules, shows the shape each one really sees, and where it lives
    (the same storage, offset, shape and strides are the same tensor: its token factors are kept once).
    """
    batch, tokens = 2, 2
    seen: dict[str, tuple[int, ...] | None] = {}
    where: dict[str, tuple] = {}
    kept: dict[str, torch.Tensor] = {}
    names = [m.name for m in modules]

    def hook(name):
        def record(_module, args, kwargs):
            tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
            seen[name] = tuple(tensors[0].shape) if tensors else None
            if tensors:  # the tensor is kept alive until the probe ends, so no other can reuse its memory
                kept[name] = tensors[0]
                where[name] = (tensors[0].data_ptr(), tensors[0].shape, tensors[0].stride(), tensors[0].dtype)
            if len(seen) == len(names):
                raise _ProbeDone

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True) for name in names]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((batch, tokens), dtype=torch.long, device=device), use_cache=False)
    except _ProbeDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    flat = [name for name, shape in seen.items() if shape is not None and shape[:2] != (batch, tokens)]
    if flat:
        family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise InputError(
            f"{type(model).__name__} (model type {family!r}) is not supported: its MLP modules see tokens "
            f"flattened to (batch * tokens, features) (e.g. {flat[0]}: {list(seen[flat[0]])} for {batch} "
            f"sequences of {tokens} tokens), so Kronfluence would take every token for an example"
        )
    first_seen: dict[tuple, str] = {}
    probed = []
    for module in modules:
        key = where.get(module.name)
        source = first_seen.setdefault(key, module.name) if key is not None else module.name
        probed.append(replace(module, input_from=source if source != module.name else None))
    return probed


def shared_inputs_by_name(modules: list[MlpProjection]) -> list[MlpProjection]:
    """``input_from`` from the names alone (SHARED_INPUT_BY_NAME), for a model that cannot run a probe."""
    names = {m.name for m in modules}
    result = []
    for module in modules:
        parent, _, leaf = module.name.rpartition(".")
        source = f"{parent}.{SHARED_INPUT_BY_NAME[leaf]}" if leaf in SHARED_INPUT_BY_NAME else None
        result.append(replace(module, input_from=source if source in names else None))
    return result


def track_mlp_modules(model: nn.Module, layer_stride: int) -> tuple[nn.Module, list[MlpProjection]]:
    """The model ready for tracking (Conv1D swapped) and its MLP projections of every ``layer_stride``-th
    block, after checking that they see (batch, tokens, features) inputs (and which share one)."""
    modules = probe_inputs(model, find_mlp_modules(model, layer_stride))
    return make_trackable(model, modules), modules
