"""Loading a HuggingFace causal LM and choosing the MLP modules whose Hessian is approximated."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from if_query import distributed
from if_query.config import DTYPE_CHOICES
from if_query.errors import InputError

DTYPES = {name: getattr(torch, name) for name in DTYPE_CHOICES if name != "auto"}  # --dtype

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


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if name == "auto":
        device = device or distributed.device()
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# --matmul-precision auto on CUDA: TF32 moved scores 1/750 (rounded to nearest) to 1/44 (truncated) of the fit's
# seed-to-seed distance, under the tenth bench_fit.py calls safe (emulated on CPU: README, "Matrix-product precision")
CUDA_MATMUL_PRECISION = "tf32"


def resolve_matmul_precision(name: str, device: torch.device | None = None) -> str:
    """``auto`` is ``CUDA_MATMUL_PRECISION`` on CUDA and ``ieee`` on CPU (which has no TF32)."""
    if name != "auto":
        return name
    return CUDA_MATMUL_PRECISION if (device or distributed.device()).type == "cuda" else "ieee"


def set_matmul_precision(precision: str) -> None:
    """Whether CUDA's float32 matrix products (cuBLAS, cuDNN) may use TF32: set explicitly, so that a caller
    (or a library) that enabled TF32 cannot silently change the "exact" scores."""
    tf32 = precision == "tf32"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the per-backend API (never mixed with the legacy one)
        matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


# The files a model folder's tokenizer is loaded from (transformers reads one of them at least).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(model: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a model folder without one is refused saying what to do (transformers would make
    up an empty tokenizer for some families)."""
    if Path(model).is_dir() and not any((Path(model) / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{model}: the model folder has no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, "
                         "...); save the model's tokenizer into it (tokenizer.save_pretrained)", option="model")
    try:
        return AutoTokenizer.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as exc:
        raise _cannot_load("the tokenizer of", model, exc) from exc


def load_config(model: str, revision: str | None = None) -> PretrainedConfig:
    """The model's configuration (config.json alone: no weights are read)."""
    try:
        return AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as exc:
        raise _cannot_load("the configuration of", model, exc) from exc


def position_limit(config: PretrainedConfig) -> int | None:
    """How many positions the model embeds (``max_position_embeddings``, GPT-2's ``n_positions``), None if
    it does not say. Not the tokenizer's ``model_max_length``, which need not match the model."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocabulary_size(config: PretrainedConfig) -> int | None:
    """How many token ids the model embeds (``vocab_size``), None if its config does not say."""
    value = getattr(config, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model of ``config`` on the meta device: its modules and shapes, no memory, no weights read."""
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as exc:
            raise InputError(f"cannot build a causal LM of model type {config.model_type!r}: {_first_line(exc)}") \
                from exc


def load_model(model: str, revision: str | None, dtype: torch.dtype, device: torch.device | None = None
               ) -> PreTrainedModel:
    """The model in ``dtype``, loaded straight onto ``device`` (default: this rank's, see
    :func:`if_query.distributed.device`): under torchrun each rank's weights go to its own GPU, never all of
    them into host RAM at once."""
    device = device or distributed.device()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype, device_map={"": device})
    except (OSError, ValueError) as exc:
        raise _cannot_load("the model", model, exc) from exc
    loaded.eval()
    return loaded


def _cannot_load(what: str, model: str, exc: Exception) -> InputError:
    """The one-line error of a failed load of ``what`` of ``model``: a missing local folder is said as such (not
    as the hub's complaint about a repo id), any other failure by the first line of its message."""
    not_a_repo_id = any(isinstance(error, HFValidationError) for error in (exc, exc.__cause__, exc.__context__))
    if not_a_repo_id and not Path(model).exists():
        return InputError(f"{model}: model folder not found (nor is it a HuggingFace hub name)", option="model")
    return InputError(f"cannot load {what} {model!r}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    """The first line of an error's message, or all of it in one line when that first line ends in a colon."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return " ".join(lines) if lines[0].endswith(":") else lines[0]


@dataclass(frozen=True)
class MlpProjection:
    """An MLP projection whose Hessian is approximated: its name in the model, its block, its weight
    shape (out, in) and whether it has a bias (the bias column of :mod:`if_query.per_example`)."""

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
