"""LoRA / PEFT adapters: a ``--model`` folder holding ``adapter_config.json`` is an adapter over a base model.

The base model is the adapter's ``base_model_name_or_path``, or ``--base-model``. It is loaded first, then the
adapter with ``peft``: merged into the weights (``--track mlp``, ``attention`` or ``all-linear`` attribute through
the fine-tuned model's own layers), or kept apart (``--track lora``: the adapter's ``lora_A`` and ``lora_B``
matrices are what is tracked, what fine-tuning changed). The tokenizer is the adapter folder's when it saved one,
else the base model's; the configuration (positions, vocabulary) is the base model's.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from if_query.errors import InputError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Adapter:
    """An adapter folder and the base model it applies to (a hub name or a folder)."""

    path: Path
    base: str

    @property
    def files(self) -> list[Path]:
        """What the adapter's fingerprint covers: its configuration and its weights."""
        return [self.path / name for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS) if (self.path / name).is_file()]

    @property
    def whose(self) -> str:
        """What a failed load of the base says it was: the base recorded as a relative path or a hub name the
        user may not recognise as the adapter's."""
        return f" (the base model of the adapter {self.path}, from its {ADAPTER_CONFIG} or --base-model)"


def find_adapter(model: str, base_model: str | None = None) -> Adapter | None:
    """The adapter ``model`` names (None: ``model`` is a model, not an adapter folder); ``base_model``
    (``--base-model``) overrides the base the adapter records."""
    config = Path(model) / ADAPTER_CONFIG
    if not config.is_file():
        if base_model is not None:
            raise InputError(f"--base-model is for a LoRA/PEFT adapter folder (with {ADAPTER_CONFIG}); {model} is not "
                             "one", option="base_model", flag_first=False)
        return None
    try:
        recorded = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise InputError(f"{config}: cannot read the adapter's configuration ({first_line(exc)})",
                         option="model") from exc
    base = base_model or recorded
    if not base:
        raise InputError(f"{config} names no base model (base_model_name_or_path); give --base-model",
                         option="base_model", flag_first=False)
    return Adapter(Path(model), base)


@contextmanager
def _quietly() -> Iterator[None]:
    """peft asks the model ``is_gradient_checkpointing``, which transformers 5 answers with a FutureWarning about its
    own rename: not the user's concern, and not printed to them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing", category=FutureWarning)
        yield


def meta_adapter(model: PreTrainedModel, adapter: Adapter) -> PreTrainedModel:
    """``model``, built on the meta device, with the adapter's layers added (no weights read): the modules and
    shapes ``--track lora`` tracks, for if-query plan."""
    import torch
    from peft import PeftConfig, get_peft_model

    try:
        config = PeftConfig.from_pretrained(str(adapter.path))
        with torch.device("meta"), _quietly():
            return get_peft_model(model, config)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot add the adapter {adapter.path} to {adapter.base!r}: {first_line(exc)}",
                         option="model", flag_first=False) from exc


def apply_adapter(model: PreTrainedModel, adapter: Adapter, merge: bool) -> PreTrainedModel:
    """``model`` (the base, loaded) with the adapter: merged into its weights, or kept as a ``peft`` model whose
    ``lora_A``/``lora_B`` layers can be tracked (in eval mode, so LoRA's dropout is off)."""
    from peft import PeftModel

    try:
        with _quietly():
            wrapped = PeftModel.from_pretrained(model, str(adapter.path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot load the adapter {adapter.path} over {adapter.base!r}: {first_line(exc)}",
                         option="model", flag_first=False) from exc
    loaded = wrapped.merge_and_unload() if merge else wrapped
    loaded.eval()
    return loaded
