"""``--refine-steps``' fitting examples: refused before the model loads where refinement will not fit the device (the
model, every module's factors, a fitting batch's passes and one query's vectors: :func:`~if_query.plan.estimates.
plan_refine`, what ``if-query plan --refine-steps`` prints); the factors' own fitting data by default, checked
unchanged since the fit."""

from __future__ import annotations

import torch

from if_query.data.hessian_data import load_hessian_examples
from if_query.data.tokenization import ExampleTokenizer, TokenizedExample
from if_query.errors import InputError
from if_query.model.fingerprint import dataset_fingerprint
from if_query.model.loading import meta_model
from if_query.plan.estimates import plan_refine
from if_query.plan.memory import host_memory_total
from if_query.plan.sizes import ModelShape, Shape


def refine_examples(config, metadata: dict, hf_config, dtype: torch.dtype, device: torch.device,
                    example_tokenizer: ExampleTokenizer) -> list[TokenizedExample]:
    """--refine-steps: refuse (before the model loads) where refinement will not fit the device (or the RAM); the
    fitting examples of the Gauss-Newton batches (the factors' own by default, checked unchanged)."""
    shapes = [Shape(m["name"], m["shape"][0], m["shape"][1], m["bias"]) for m in metadata["tracked_modules"]]
    model = ModelShape.of(meta_model(hf_config), hf_config)
    if device.type == "cuda":
        limit, where = torch.cuda.get_device_properties(device).total_memory, "device"
    else:  # the physical RAM: every rank must come to the same verdict
        limit, where = host_memory_total(), "RAM"
    fitted = metadata.get("hessian_data") or {}
    max_length = config.max_length if config.refine_data is not None else fitted.get("max_length", config.max_length)
    peak = plan_refine(shapes, model, metadata["fit"].get("strategy", "ekfac"), dtype.itemsize,
                       config.refine_batch_size * max_length, limit, where)
    if not peak.fits:
        raise InputError(f"needs {peak.describe()}", option="refine_steps")
    fit, data = metadata["fit"], metadata.get("hessian_data")
    if config.refine_data is not None:
        return load_hessian_examples(config.refine_data, example_tokenizer)
    if data is None:
        raise InputError("needs the factors' fitting data, and their metadata.json does not say how it was "
                         "tokenized (fitted by an older if-query); give --refine-data", option="refine_steps")
    tokenizer = ExampleTokenizer(example_tokenizer.tokenizer, data["max_length"],
                                 position_limit=example_tokenizer.position_limit,
                                 chat_template=data.get("chat_template", False))
    examples = load_hessian_examples(fit["hessian_dataset"], tokenizer, data["max_examples"])
    if dataset_fingerprint(examples) != fit["hessian_dataset_fingerprint"]:
        raise InputError(f"needs the factors' fitting data, and {fit['hessian_dataset']} changed since the fit "
                         "(its fingerprint differs); give --refine-data", option="refine_steps")
    return examples
