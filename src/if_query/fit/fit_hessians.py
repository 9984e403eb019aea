"""fit-hessians: fit Kronfluence's Hessian factors on the tracked modules (``--track``) and record metadata."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import torch

from if_query import distributed
from if_query.atomic import check_writable_dir, shareable_tree
from if_query.config import FitConfig
from if_query.data.hessian_data import load_hessian_examples
from if_query.data.tokenization import Collator, ExampleTokenizer, TokenizedExample
from if_query.errors import InputError, RunError, about
from if_query.fit.lambda_stage import fit_lambda_matrices
from if_query.fit.metadata import (
    METADATA_FILE,
    STATUS_COMPLETE,
    STATUS_FITTING,
    canonical_model,
    describe_mismatch,
    package_versions,
    read_metadata,
    write_json_atomic,
)
from if_query.kron import fit as kron
from if_query.kron.factors import FACTORS_NAME, factors_path
from if_query.model import loading, tracking
from if_query.model.fingerprint import dataset_fingerprint, weights_fingerprint
from if_query.model.sampling import LABEL_SAMPLING
from if_query.plan.estimates import DEFAULT_PEAKS, plan_fit
from if_query.plan.sizes import ModelShape, Shape, estimate_factor_sizes

logger = logging.getLogger(__name__)


# Entries of a fit's identity that fits recorded before they existed, with the value those fits used.
IDENTITY_BEFORE = {"matmul_precision": "ieee", "chat_template": False, "track": "mlp"}


def fit_arguments(config: FitConfig, dtype: torch.dtype, examples: list[TokenizedExample],
                 fingerprint: dict, matmul_precision: str = "ieee") -> dict:
    """The arguments (and weights) that decide the factors; compared on rerun."""
    return {
        "model": canonical_model(config.model),
        "revision": config.revision,
        "weights_fingerprint": fingerprint["digest"],
        "strategy": config.strategy,
        "dtype": str(dtype).removeprefix("torch."),
        "layer_stride": config.layer_stride,
        "track": config.track,
        "hessian_dataset": str(Path(config.hessian_dataset).resolve()),
        "hessian_dataset_fingerprint": dataset_fingerprint(examples),
        "chat_template": config.chat_template,
        "num_examples": len(examples),
        "factor_batch_size": config.factor_batch_size,
        "lambda_batch_size": config.lambda_batch_size,
        "fisher": config.fisher,
        "seed": config.seed,
        "label_sampling": LABEL_SAMPLING if config.fisher == "true" else None,  # sampled labels' scheme
        "module_partitions": config.module_partitions,
        "eigendecomposition_dtype": config.eigendecomposition_dtype,
        "matmul_precision": matmul_precision,
    }


def _check_previous_fit(output_dir: Path, identity: dict, overwrite: bool, refit_if_changed: bool = False) -> bool:
    """Whether earlier factors in ``output_dir`` must be cleared before fitting (reads only).

    With ``overwrite`` anything there is replaced. Otherwise a fit with identical arguments and
    weights is resumed (kept), and one with others is refused, or replaced with ``refit_if_changed``, unless
    it stopped before any stage finished (:func:`nothing_fitted`): then it is replaced.
    (Whether finished factors fit the model a run-query run is given is :mod:`if_query.run.compatibility`'s question.)
    """
    factors = factors_path(output_dir)
    if not (output_dir / METADATA_FILE).exists():
        if factors.exists() and not overwrite and not refit_if_changed and not nothing_fitted(output_dir):
            raise InputError(f"{output_dir}: holds factors without {METADATA_FILE}; use --overwrite to replace",
                             "output_dir", flag_first=False)
        return factors.exists()
    if overwrite:
        logger.info("Replacing the factors in %s (--overwrite)", output_dir)
        return True
    previous = read_metadata(output_dir)
    before = {**IDENTITY_BEFORE, **previous.get("fit", {})}
    if before.get("weights_fingerprint") == identity["weights_fingerprint"]:
        before["model"] = identity["model"]  # factors belong to weights: the same weights under another path resume
    differences = describe_mismatch(identity, before)
    if not differences:
        return False
    if previous.get("status") != STATUS_COMPLETE and nothing_fitted(output_dir):
        logger.info("Replacing the fit in %s, which stopped before any stage finished (%s)", output_dir, differences)
        return True
    if not refit_if_changed:
        raise InputError(
            f"{output_dir} holds factors fitted with other arguments ({differences}); "
            "use --overwrite to replace them or choose another --output-dir", "output_dir", flag_first=False
        )
    logger.info("Refitting the factors in %s, fitted with other arguments (%s)", output_dir, differences)
    return True


def nothing_fitted(output_dir: Path) -> bool:
    """Whether no stage of the fit in ``output_dir`` wrote a factor file: one that stopped before any stage
    finished has nothing to resume, and never blocks a rerun."""
    return not any(factors_path(output_dir).glob("*.safetensors"))


def _clear_previous_fit(output_dir: Path, remove_empty: bool = False) -> None:
    """Remove the factors and metadata.json from ``output_dir`` (and the directory itself when ``remove_empty``
    and nothing else is left in it)."""
    shutil.rmtree(factors_path(output_dir), ignore_errors=True)
    (output_dir / METADATA_FILE).unlink(missing_ok=True)
    if remove_empty and output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()


def _fit_metadata(config: FitConfig, identity: dict, fingerprint: dict, modules: list, factor_bytes: int) -> dict:
    """A fit's metadata.json as it starts (status "fitting")."""
    return {
        "status": STATUS_FITTING,
        "fit": identity,
        "model": config.model,
        "weights": fingerprint,
        "tracked_modules": [{"name": m.name, "layer": m.layer, "shape": m.shape, "bias": m.bias} for m in modules],
        "estimated_factor_bytes": factor_bytes,
        "hessian_data": {"max_length": config.max_length, "max_examples": config.max_examples,  # to read it again
                         "chat_template": config.chat_template},
        "versions": package_versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def fit_warnings(model, modules, config: FitConfig, dtype: torch.dtype, lengths: list[int],
                 device_memory: int) -> list[str]:
    """Each stage whose planned device memory (:func:`if_query.plan.estimates.plan_fit`, as ``if-query plan``
    computes it) exceeds ``device_memory``, described as the plan describes it, with its advice: for a data pass,
    the fewest --module-partitions that fit (or what no count can fit)."""
    fit = plan_fit([Shape.of(m) for m in modules], ModelShape.of(model, model.config), config.strategy,
                   dtype.itemsize, config.factor_batch_size, config.lambda_batch_size, config.module_partitions,
                   lengths, DEFAULT_PEAKS, "ieee", device_memory)
    return [peak.describe() for peak in fit.peaks() if not peak.fits]


def warn_if_fit_does_not_fit(model, modules, config: FitConfig, dtype: torch.dtype, lengths: list[int]) -> None:
    """Warn, before fitting on CUDA, about each stage planned over the GPU's memory (:func:`fit_warnings`)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return
    memory = torch.cuda.get_device_properties(device).total_memory
    for warning in fit_warnings(model, modules, config, dtype, lengths, memory):
        logger.warning("The plan does not fit: %s", warning)


def fit_hessians(config: FitConfig, quiet: bool = False) -> dict:
    """Fit the factors (resuming completed stages) and return the written metadata."""
    output_dir = Path(config.output_dir)
    check_writable_dir(output_dir, "output_dir")  # before anything is loaded: not found out after the work
    created = not output_dir.exists()
    tokenizer = loading.load_tokenizer(config.model, config.revision, config.base_model)
    hf_config = loading.load_config(config.model, config.revision, config.base_model)
    limit = loading.position_limit(hf_config)
    if config.track != "lora":  # an adapter's matrices are known once it is loaded: checked after tracking below
        tracked = tracking.find_tracked_modules(loading.meta_model(hf_config), config.layer_stride, config.track)
        tracking.check_partitions(config.module_partitions, len(tracked))
    example_tokenizer = ExampleTokenizer(tokenizer, config.max_length, position_limit=limit,
                                         chat_template=config.chat_template)
    with about("hessian_dataset"):
        examples = load_hessian_examples(config.hessian_dataset, example_tokenizer, config.max_examples,
                                         loading.vocabulary_size(hf_config))
    dtype = loading.resolve_dtype(config.dtype)
    precision = loading.resolve_matmul_precision(config.matmul_precision)
    loading.set_matmul_precision(precision)
    # the rank's GPU chosen (and the NCCL group started on it) before anything loads: a model loaded first would make
    # a CUDA context on GPU 0 in every rank, and Kronfluence's State would be set up after the weights are placed
    distributed.check_launch()
    distributed.start_data_parallel()
    fingerprint = weights_fingerprint(config.model, config.revision, base_model=config.base_model)
    model = None
    if fingerprint is None:  # a hub model whose weights are not in the local cache yet: load (download) first
        model = loading.load_model(config.model, config.revision, dtype, base_model=config.base_model,
                                   merge_adapter=config.track != "lora")
        fingerprint = weights_fingerprint(config.model, config.revision, base_model=config.base_model)
        if fingerprint is None:
            raise RunError(f"cannot find the weight files of {config.model!r} in the HuggingFace cache")
    identity = fit_arguments(config, dtype, examples, fingerprint, precision)
    clear = _check_previous_fit(output_dir, identity, config.overwrite, config.refit_if_changed)

    if model is None:
        model = loading.load_model(config.model, config.revision, dtype, base_model=config.base_model,
                                   merge_adapter=config.track != "lora")
    model, modules = tracking.track_modules(model, config.layer_stride, config.track)
    if config.track == "lora":
        tracking.check_partitions(config.module_partitions, len(modules))
    sizes = estimate_factor_sizes(modules, config.strategy)
    logger.info(
        "Tracking %d %s of %d blocks (--track %s); factors need about %s in memory and on disk",
        len(modules), tracking.track_kind(config.track).what, len({m.layer for m in modules}), config.track,
        sizes.human(),
    )
    warn_if_fit_does_not_fit(model, modules, config, dtype, [len(e) for e in examples])
    task = kron.CompletionLossTask([m.name for m in modules], seed=config.seed)
    model = kron.wrap_tracked_modules(model, task)
    analyzer = kron.make_analyzer(output_dir, model, task, quiet)

    metadata = _fit_metadata(config, identity, fingerprint, modules, sizes.total_bytes)
    is_main = analyzer.state.is_main_process
    if clear:
        if is_main:
            _clear_previous_fit(output_dir)
        analyzer.state.wait_for_everyone()  # no rank may see the old factors once fitting starts
    if is_main:
        write_json_atomic(output_dir / METADATA_FILE, metadata)
    try:
        _run_stages(analyzer, model, task, examples, tokenizer.pad_token_id, config, quiet)
    except BaseException:
        if is_main and nothing_fitted(output_dir):  # nothing to resume: leave nothing, not a half-written fit
            _clear_previous_fit(output_dir, remove_empty=created)
        raise

    metadata["status"] = STATUS_COMPLETE
    metadata["completed_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    if is_main:
        write_json_atomic(output_dir / METADATA_FILE, metadata)
    analyzer.state.wait_for_everyone()
    return metadata


def _run_stages(analyzer, model: torch.nn.Module, task, examples: list[TokenizedExample], pad_token_id: int,
                config: FitConfig, quiet: bool) -> None:
    """Kronfluence's covariance and eigendecomposition stages, then if-query's lambda stage (written in
    Kronfluence's files, :mod:`if_query.fit.lambda_stage`), in that order, each drawing its own true-Fisher labels."""
    # Sorting by length keeps padding low; covariances and lambdas are sums, so order is irrelevant.
    ordered = sorted(examples, key=len)
    collate = Collator(pad_token_id)
    arguments = kron.factor_arguments(config.strategy, config.fisher == "empirical", config.module_partitions,
                                      getattr(torch, config.eigendecomposition_dtype))
    stages = (
        ("covariance", lambda: kron.fit_covariances(analyzer, ordered, config.factor_batch_size, collate, arguments)),
        ("eigendecomposition", lambda: kron.fit_eigendecomposition(analyzer, arguments)),
        ("lambda", lambda: fit_lambda_matrices(
            analyzer, model, FACTORS_NAME, ordered, config.lambda_batch_size, collate,
            arguments, seed=config.seed, quiet=quiet)),
    )
    directory = analyzer.factors_output_dir(factors_name=FACTORS_NAME)
    done = [name for name, _ in stages if kron.stage_done(directory, name, config.strategy)]
    if len(done) == len(stages):
        logger.info("Using cached factors in %s (every stage done)", config.output_dir)
    with FiniteLogits(model) as logits:
        for name, run_stage in stages:
            if len(done) < len(stages):
                logger.info("Stage %s done, skipped" if name in done else "Fitting stage: %s", name)
            task.set_stage(name)  # each stage draws its own labels, the same whether or not it was resumed
            logits.stage, logits.batch = name, 0
            run_stage()
            if analyzer.state.is_main_process:
                shareable_tree(directory)  # Kronfluence's files (safetensors') are written private (0600)


class FiniteLogits:
    """Every fitting batch's logits checked for inf and NaN (one reduction: their minimum and maximum), by a
    forward hook on the model while the stages run: a model that overflows in its dtype stops the fit at the
    first such batch, in one line, instead of drawing true-Fisher labels from NaN or fitting non-finite
    covariances that only the eigendecomposition or the lambda stage would trip over."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.stage, self.batch = "", 0

    def __enter__(self) -> FiniteLogits:
        self._handle = self.model.register_forward_hook(self._check)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _check(self, module, inputs, output) -> None:
        self.batch += 1
        logits = getattr(output, "logits", None)
        if logits is None or not logits.numel() or bool(torch.stack(torch.aminmax(logits)).isfinite().all()):
            return
        dtype = str(self.dtype).removeprefix("torch.")
        hint = ("try --dtype float32 (or bfloat16 instead of float16)" if self.dtype.itemsize < 4
                else "the model gives them even in float32: are its weights finite?")
        raise RunError(f"non-finite logits (inf or NaN) in batch {self.batch} of the {self.stage} stage, with the "
                       f"model in {dtype}; {hint}")


