"""Which layers are tracked (``--track``): the linear layers of a kind (MLP projections, attention projections, or
every linear layer of the blocks), found by name, their inputs probed; GPT-2's ``Conv1D`` swapped for ``nn.Linear``
(Kronfluence wraps only linear layers); flattened-token modules and mixture-of-experts MLPs refused.

A kind is one :class:`TrackKind` entry of :data:`TRACK_KINDS` (its names are ``config.TRACK_CHOICES``): which
modules of a block it selects, by their path inside the block, and whether it would reach a mixture-of-experts
MLP. Every tracked module is a linear map applied to each token, so everything downstream (token factors, the
engine, the lambda stage, per-token scores, the plan's sizes) is the same for every kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
# Where a forward pass cannot run (a meta-device model for the plan): projections of one module that read the very
# same input, as the probe finds them in every family that has them (tests/test_tracking.py): the MLP's gate_proj and
# up_proj, the attention's q_proj, k_proj and v_proj (the block's hidden states). The first of a group in the model's
# order (OPT declares k_proj first) keeps the input; the others read it.
SHARED_INPUT_GROUPS = (frozenset({"gate_proj", "up_proj"}), frozenset({"q_proj", "k_proj", "v_proj"}))
# Mixture-of-experts models, known from their config: any of these attributes above 1, or one of these model types.
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
MOE_MODEL_TYPES = frozenset(
    {"olmoe", "flex_olmo", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v2", "deepseek_v3", "dbrx",
     "jamba", "granitemoe", "granitemoeshared", "granitemoehybrid", "phimoe", "jetmoe", "gpt_oss", "minimax",
     "llama4", "llama4_text", "glm4_moe", "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "switch_transformers"}
)


def _in_attention(path: tuple[str, ...]) -> bool:
    return any(_ATTENTION.search(part) for part in path)


@dataclass(frozen=True)
class TrackKind:
    """One ``--track`` choice: ``selects`` says, from a linear layer's path inside its block (``("self_attn",
    "q_proj")``), whether it is tracked; ``what`` names the modules in messages; ``reaches_experts``: whether it
    would track a mixture-of-experts MLP (refused: the experts are not linear layers applied to every token)."""

    name: str
    what: str
    selects: Callable[[tuple[str, ...]], bool]
    reaches_experts: bool


TRACK_KINDS = {kind.name: kind for kind in (
    TrackKind("mlp", "MLP projections", lambda path: not _in_attention(path) and path[-1] in MLP_PROJECTION_NAMES,
              reaches_experts=True),
    TrackKind("attention", "attention projections", _in_attention, reaches_experts=False),
    TrackKind("all-linear", "linear layers", lambda path: True, reaches_experts=True),
    TrackKind("lora", "LoRA matrices (lora_A, lora_B)", lambda path: "lora_A" in path or "lora_B" in path,
              reaches_experts=False),
)}
DEFAULT_TRACK = "mlp"


@dataclass(frozen=True)
class TrackedModule:
    """A linear layer whose Hessian is approximated: its name in the model, its block, its weight
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


def _block_path(name: str) -> tuple[int, tuple[str, ...]] | None:
    """(block index, the path inside the block) of a module name: the first integer component is the block."""
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            rest = tuple(parts[position + 1 :])
            return (int(part), rest) if rest else None
    return None


def track_kind(track: str) -> TrackKind:
    try:
        return TRACK_KINDS[track]
    except KeyError:
        raise InputError(f"unknown --track {track!r}; choose one of {', '.join(TRACK_KINDS)}") from None


def find_tracked_modules(model: nn.Module, layer_stride: int = 1, track: str = DEFAULT_TRACK) -> list[TrackedModule]:
    """The linear layers of kind ``track`` in blocks 0, N, 2N, ... (N = ``layer_stride``), in the model's order.

    Never the LM head or the embeddings (they are in no block). A mixture-of-experts model (known from its config)
    is refused for the kinds that would reach its experts (:func:`refuse_experts`).
    """
    kind = track_kind(track)
    refuse_experts(model, kind)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        where = _block_path(name)
        if where is None or where[0] % layer_stride or not kind.selects(where[1]):
            continue
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
        else:
            out_features, in_features = module.weight.shape
        found.append(TrackedModule(name, where[0], out_features, in_features, module.bias is not None))
    if not found:
        known = ("if-query knows the MLP projections of GPT-2, Llama, OLMo, OLMo-2, Qwen2, Mistral, GPT-NeoX/Pythia, "
                 "OPT, GPT-J and Phi" if kind.name == "mlp" else
                 "attention projections are linear layers under a module named *attn* or *attention* in a block"
                 if kind.name == "attention" else "it tracks a LoRA/PEFT adapter's own matrices: give --model an "
                 "adapter folder (adapter_config.json)" if kind.name == "lora"
                 else "linear layers are nn.Linear or GPT-2's Conv1D in a numbered block")
        raise InputError(f"no {kind.what} found in {type(model).__name__} (--track {kind.name}): {known}")
    return found


def mixture_of_experts(config) -> str | None:
    """Why ``config`` (a HuggingFace config) is a mixture-of-experts model (``"num_experts = 4"``), or None."""
    for candidate in (config, getattr(config, "text_config", None)):
        if candidate is None:
            continue
        for key in MOE_CONFIG_KEYS:
            value = getattr(candidate, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return f"{key} = {value}"
        if getattr(candidate, "model_type", None) in MOE_MODEL_TYPES:
            return f"model type {candidate.model_type!r}"
    return None


def expert_modules(model: nn.Module) -> list[str]:
    """The modules that hold a mixture-of-experts MLP's experts, named ``experts`` in every family (one module of
    fused 3-D parameters under transformers 5, a list of linear layers under older versions), for messages."""
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == "experts"]


def refuse_experts(model: nn.Module, kind: TrackKind) -> None:
    """Refuse (one line) tracking ``kind`` in a mixture-of-experts model where it would reach the experts: their
    experts are not linear layers that see every token (fused (experts, out, in) parameters; or, under older
    transformers, linear layers fed only the tokens routed to them, flattened), and tracking the other linear layers
    around them (Qwen2-MoE's shared expert, JetMoE's kv_proj beside its attention experts) would silently leave them
    out. Detected from the config, not from module names; ``--track attention`` is offered where the attention has
    no experts of its own."""
    why = mixture_of_experts(getattr(model, "config", None))
    if why is None:
        return
    experts = expert_modules(model)
    in_attention = [name for name in experts if (where := _block_path(name)) is not None and _in_attention(where[1])]
    if kind.reaches_experts:  # the MLP's experts (JetMoE's are not named so: then "its experts" alone)
        reached = [name for name in experts if name not in in_attention]
    else:
        reached = [name for name in experts if (where := _block_path(name)) is not None and kind.selects(where[1])]
        if not reached:
            return
    whose = "its attention's experts" if reached and reached[0] in in_attention else "its experts"
    named = whose + (f" ({reached[0]}" + (f" and {len(reached) - 1} more" if len(reached) > 1 else "") + ")"
                     if reached else "")
    then = ("no --track kind works for it, its attention having experts of its own" if in_attention
            else "--track attention works")
    raise InputError(f"{kind.name}: {type(model).__name__} is a mixture-of-experts model ({why}) and {named} are not "
                     f"linear layers that see every token, so if-query cannot attribute through them; {then}",
                     option="track")


def conv1d_to_linear(module: Conv1D) -> nn.Linear:
    """A numerically identical ``nn.Linear`` for GPT-2's ``Conv1D`` (y = x W + b, W of shape in x out)."""
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=True, device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        linear.bias.copy_(module.bias)
    return linear


def make_trackable(model: nn.Module, modules: list[TrackedModule]) -> nn.Module:
    """Replace tracked ``Conv1D`` modules by ``nn.Linear`` so Kronfluence can wrap them."""
    for tracked in modules:
        module = model.get_submodule(tracked.name)
        if isinstance(module, Conv1D):
            parent_name, _, child = tracked.name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, conv1d_to_linear(module))
    return model


class _ProbeDone(Exception):
    """Raised by the probe's hooks once every tracked module has been seen (skips the rest)."""


def probe_inputs(model: nn.Module, modules: list[TrackedModule]) -> list[TrackedModule]:
    """Refuse a model whose tracked modules do not see (batch, tokens, features) inputs, and note which
    modules see the very input tensor of an earlier one (``input_from``: Llama's up_proj that of gate_proj,
    k_proj and v_proj that of q_proj).

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
            f"{type(model).__name__} (model type {family!r}) is not supported: its tracked modules see tokens "
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


def shared_inputs_by_name(modules: list[TrackedModule]) -> list[TrackedModule]:
    """``input_from`` from the names alone (SHARED_INPUT_GROUPS), for a model that cannot run a probe."""
    first: dict[tuple[str, frozenset], str] = {}
    result = []
    for module in modules:
        parent, _, leaf = module.name.rpartition(".")
        group = next((g for g in SHARED_INPUT_GROUPS if leaf in g), None)
        source = None if group is None else first.setdefault((parent, group), module.name)
        result.append(replace(module, input_from=source if source != module.name else None))
    return result


def describe_shared_inputs(modules: list[TrackedModule]) -> str:
    """Which tracked modules read another's input, by their names in a block: ``"up_proj reads gate_proj's input;
    k_proj, v_proj read q_proj's"`` ("" when none do)."""
    readers: dict[str, list[str]] = {}
    for module in modules:
        if module.input_from is not None:
            leaf = module.name.rsplit(".", 1)[-1]
            group = readers.setdefault(module.input_from.rsplit(".", 1)[-1], [])
            if leaf not in group:
                group.append(leaf)
    return "; ".join(f"{', '.join(leaves)} read{'s' if len(leaves) == 1 else ''} {source}'s input"
                     for source, leaves in readers.items())


def track_modules(model: nn.Module, layer_stride: int, track: str = DEFAULT_TRACK
                  ) -> tuple[nn.Module, list[TrackedModule]]:
    """The model ready for tracking (Conv1D swapped) and its modules of kind ``track`` in every ``layer_stride``-th
    block, after checking that they see (batch, tokens, features) inputs (and which share one)."""
    modules = probe_inputs(model, find_tracked_modules(model, layer_stride, track))
    return make_trackable(model, modules), modules


def check_partitions(partitions: int, modules: int) -> None:
    """Refuse ``--module-partitions`` above the number of tracked modules (Kronfluence would stop at its first
    stage, after the model has loaded)."""
    if partitions > modules:
        raise InputError(f"--module-partitions {partitions} is more than the {modules} tracked modules: give at most "
                         f"{modules}", option="module_partitions")
