"""Loading a HuggingFace causal LM, its tokenizer and config (straight to this rank's device), and the dtype and
matmul-precision policy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub.errors import HFValidationError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

if TYPE_CHECKING:  # transformers' modeling_utils pulls torch._dynamo (fp8/deepgemm): imported when a model loads
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from if_query import distributed
from if_query.config import DTYPE_CHOICES
from if_query.errors import InputError, first_line
from if_query.model.adapter import Adapter, apply_adapter, find_adapter

DTYPES = {name: getattr(torch, name) for name in DTYPE_CHOICES if name != "auto"}  # --dtype

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


def load_tokenizer(model: str, revision: str | None = None, base_model: str | None = None
                   ) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a model folder without one is refused saying what to do (transformers would make
    up an empty tokenizer for some families). An adapter folder (:mod:`if_query.model.adapter`) without one uses
    its base model's."""
    adapter = find_adapter(model, base_model)
    if adapter is not None and any((adapter.path / name).is_file() for name in TOKENIZER_FILES):
        adapter = None  # the adapter folder's own tokenizer
    model = model if adapter is None else adapter.base
    if Path(model).is_dir() and not any((Path(model) / name).is_file() for name in TOKENIZER_FILES):
        whose = "" if adapter is None else adapter.whose  # the base's folder, not --model's value
        raise InputError(f"{model}: the model folder has no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}, "
                         f"...){whose}; save the model's tokenizer into it (tokenizer.save_pretrained)",
                         option="model" if adapter is None else "base_model", flag_first=adapter is None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as exc:
        raise _cannot_load("the tokenizer of", model, exc, adapter) from exc
    # Silence transformers' "Token indices sequence length is longer than the specified maximum": it compares with
    # model_max_length, which need not be the model's limit; if-query cuts examples itself and warns about the
    # position limit (:func:`position_limit`). transformers warns once per tokenizer, after setting this flag.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def load_config(model: str, revision: str | None = None, base_model: str | None = None) -> PretrainedConfig:
    """The model's configuration (config.json alone: no weights are read); an adapter's is its base model's."""
    adapter = find_adapter(model, base_model)
    model = model if adapter is None else adapter.base
    try:
        return AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as exc:
        raise _cannot_load("the configuration of", model, exc, adapter) from exc


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
            raise InputError(f"cannot build a causal LM of model type {config.model_type!r}: {first_line(exc)}") \
                from exc


def load_model(model: str, revision: str | None, dtype: torch.dtype, device: torch.device | None = None,
               base_model: str | None = None, merge_adapter: bool = True) -> PreTrainedModel:
    """The model in ``dtype``, loaded straight onto ``device`` (default: this rank's, see
    :func:`if_query.distributed.device`): under torchrun each rank's weights go to its own GPU, never all of
    them into host RAM at once. An adapter folder is loaded over its base model, merged into it unless
    ``merge_adapter`` is False (``--track lora``)."""
    device = device or distributed.device()
    adapter = find_adapter(model, base_model)
    source = model if adapter is None else adapter.base
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, device_map={"": device})
    except (OSError, ValueError) as exc:
        raise _cannot_load("the model", source, exc, adapter) from exc
    loaded.eval()
    return loaded if adapter is None else apply_adapter(loaded, adapter, merge_adapter)


def _cannot_load(what: str, model: str, exc: Exception, adapter: Adapter | None = None) -> InputError:
    """The one-line error of a failed load of ``what`` of ``model``: a missing local folder is said as such (not
    as the hub's complaint about a repo id), any other failure by the first line of its message; ``model`` an
    adapter's base (``adapter``) is said to be."""
    whose = "" if adapter is None else adapter.whose
    not_a_repo_id = any(isinstance(error, HFValidationError) for error in (exc, exc.__cause__, exc.__context__))
    if not_a_repo_id and not Path(model).exists():
        if adapter is not None:  # the message names the adapter, not --model's value
            return InputError(f"{model}: model folder not found (nor is it a HuggingFace hub name){whose}",
                              option="base_model", flag_first=False)
        return InputError(f"{model}: model folder not found (nor is it a HuggingFace hub name)", option="model")
    return InputError(f"cannot load {what} {model!r}{whose}: {first_line(exc)}")
