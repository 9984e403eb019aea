"""Whether fitted factors serve a run-query run: every check of a fit against the model it is given, in one place.

:func:`load_model_for_factors` is the entry point; its docstring lists the checks in the order they run. What it
compares comes from ``metadata.json`` as :func:`if_query.fit.metadata.load_complete_metadata` read it (that the
directory holds a finished fit is a property of the directory alone, checked there when the run starts); the
factor files themselves are opened, and refused when incomplete, by :mod:`if_query.kron`. fit-hessians asks
another question of an existing output directory (may it resume there, or must it replace or refuse it?):
:func:`if_query.fit.fit_hessians._check_previous_fit`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from if_query.config import QueryConfig
from if_query.errors import InputError
from if_query.fit.metadata import canonical_model
from if_query.kron.factors import HessianFactors
from if_query.model.fingerprint import weights_fingerprint
from if_query.model.loading import load_model
from if_query.model.tracking import DEFAULT_TRACK, TrackedModule, track_modules

logger = logging.getLogger(__name__)

_warned: set[str] = set()


def load_model_for_factors(config: QueryConfig, metadata: dict, dtype: torch.dtype
                           ) -> tuple[nn.Module, list[TrackedModule], HessianFactors | None]:
    """Load run-query's model (``config.model`` at ``config.revision``, in ``dtype``) with the modules the
    factors in ``config.factors_dir`` track (the fit's ``--track``: MLP projections for fits that record none),
    refusing factors that do not fit it.

    ``metadata`` is the fit's ``metadata.json``. The checks, in order, each an InputError about ``factors_dir``
    (its ``option``) saying what to do:

    1. the factors were fitted with this revision (before the model loads);
    2. and for these weights: their fingerprint (:func:`check_fingerprint`; before the model loads where the
       weights can be read then, a local folder or a cached hub model, else once loading downloaded them).
       Factors belong to weights, not to a path: the same weights under another path or name are fine; the
       model's name decides only where the fit recorded no fingerprint, or where the weights cannot be read
       before loading;
    3. the factor files the fit's strategy needs are there and readable (before the model loads): opened here
       (:class:`~if_query.kron.factors.HessianFactors`) whichever engine scores; with --engine kronfluence,
       Kronfluence's loader reads them again when its scorer is built
       (:class:`~if_query.kron.streaming.StreamingScorer`);
    4. the model, tracked with the fit's layer stride and kind (``--track``), has the modules the factors cover
       (names and shapes).

    Returns the model, its tracked modules and the default engine's factor reader (None with --engine
    kronfluence).
    """
    factors_dir = config.factors_dir
    _refuse_other_model(metadata, factors_dir, {"revision": config.revision})
    fingerprint_args = (metadata, config.model, config.revision, factors_dir)
    checked = check_fingerprint(*fingerprint_args, base_model=config.base_model)
    factors = HessianFactors(factors_dir)  # every file the strategy needs, readable, whichever engine scores
    track = metadata["fit"].get("track", DEFAULT_TRACK)
    model = load_model(config.model, config.revision, dtype, base_model=config.base_model,
                       merge_adapter=track != "lora")
    if not checked:  # a hub model not cached before load_model downloaded it
        check_fingerprint(*fingerprint_args, loaded=True, base_model=config.base_model)
    model, modules = track_modules(model, metadata["fit"]["layer_stride"], track)
    _refuse_other_model(metadata, factors_dir, {"tracked_modules": [[m.name, m.shape] for m in modules]})
    return model, modules, None if config.engine == "kronfluence" else factors


def _refuse_other_model(metadata: dict, factors_dir: str | Path, given: dict, found: str = "") -> None:
    """Raise an InputError when the factors of ``metadata`` were fitted for another model, revision or set of
    tracked modules than ``given`` names (those of the keys ``model``, ``revision``, ``tracked_modules`` it has);
    ``found``: what else the message says (the fingerprints compared)."""
    fit = metadata["fit"]
    fitted = {"model": fit["model"], "revision": fit["revision"],
              "tracked_modules": [[m["name"], m["shape"]] for m in metadata.get("tracked_modules", [])]}
    if reasons := describe_model_mismatch(fitted, given):
        raise InputError(f"{factors_dir} does not fit this model{found}: {reasons}", option="factors_dir")


def _revision(value: str | None) -> str:
    return "no revision" if value is None else f"revision {value!r}"


def describe_model_mismatch(fitted: dict, given: dict) -> str:
    """Why factors fitted for ``fitted`` (``model``, ``revision``, ``tracked_modules`` from metadata.json) do
    not serve the model a run was ``given`` (the same keys, those it has), in words that say what to do."""
    reasons = []
    if "model" in given and given["model"] != fitted["model"]:
        reasons.append(f"the factors were fitted for the model {fitted['model']!r}, this run passes "
                       f"{given['model']!r}; fit factors for this model, or pass the model they were fitted for")
    if "revision" in given and given["revision"] != fitted["revision"]:
        before, now = fitted["revision"], given["revision"]
        fix = (f"drop --revision from this run, or refit with --revision {now}" if before is None
               else f"add --revision {before} to this run" if now is None
               else f"pass --revision {before}, or refit with --revision {now}")
        reasons.append(f"the factors were fitted with {_revision(before)}, this run passes {_revision(now)}; {fix}")
    if "tracked_modules" in given and given["tracked_modules"] != fitted["tracked_modules"]:
        ours, theirs = given["tracked_modules"], fitted["tracked_modules"]
        differ = next((f"{a} vs {b}" for a, b in zip(theirs, ours, strict=False) if a != b),
                      f"{len(theirs)} modules vs {len(ours)}")
        reasons.append(f"the factors track other modules than this model has (fitted vs now: {differ}); "
                       "the weights' architecture changed: refit")
    return "; ".join(reasons)


def check_fingerprint(metadata: dict, model: str, revision: str | None = None, factors_dir: str | Path = "",
                      loaded: bool = False, cache_dir: str | Path | None = None, base_model: str | None = None) -> bool:
    """Refuse factors fitted for other weights (InputError naming both digests).

    ``metadata`` is the fit's ``metadata.json``; the weights are those ``model`` at ``revision`` loads
    (:func:`~if_query.model.fingerprint.weights_fingerprint`, a hub model read from ``cache_dir``). Factors belong to
    weights: when the fingerprints match, a ``model`` other than the fit's (a copy of its folder elsewhere) is
    fine, and the log says so. The model's name decides where the fit recorded no fingerprint (factors fitted by
    an older if-query: a warning, once per directory and model, when the names match) and where the weights
    cannot be read yet under another name (not downloaded only to compare). Returns False when it cannot decide
    yet (a hub model of the fit's name not in the local cache: call again with ``loaded=True`` after loading the
    model, which warns if it still cannot), True otherwise. Factors of another revision are left to the
    identity check (:func:`describe_model_mismatch`).
    """
    fit = metadata.get("fit", {})
    if fit.get("revision") != revision:
        return True
    recorded = fit.get("weights_fingerprint")
    other = fit.get("model") != canonical_model(model)
    current = None if recorded is None else weights_fingerprint(model, revision, cache_dir, base_model)
    if other and (current is None or current["digest"] != recorded):
        found = "" if current is None else f" (weights fingerprint {recorded} in the factors, {current['digest']} now)"
        _refuse_other_model(metadata, factors_dir, {"model": canonical_model(model)}, found)
    if recorded is None:
        key = f"{factors_dir}|{model}@{revision}"
        if key not in _warned:
            _warned.add(key)
            logger.warning("%s records no weights fingerprint (fitted by an older if-query): cannot check "
                           "that its factors were fitted for the weights of %s now", factors_dir, model)
        return True
    if current is None:
        if loaded:
            logger.warning("Cannot find the weight files of %s in the HuggingFace cache: not checking that the "
                           "factors in %s were fitted for them", model, factors_dir)
        return loaded
    if current["digest"] != recorded:
        fitted = metadata.get("weights") or {}
        if current.get("source") == "adapter" and fitted.get("adapter") == current["adapter"]:  # the base differs
            was, now = fitted.get("base", {}), current["base"]
            how = ("" if was.get("source") == now["source"] else f" (a {was.get('source')} copy then, a {now['source']}"
                   " copy now: the two fingerprint differently, so give the base as the fit was given it)")
            raise InputError(
                f"{factors_dir} was fitted for the adapter {model} over other base weights (base fingerprint "
                f"{was.get('digest')} in the factors, {now['digest']} now): give --base-model the base it was "
                f"fitted on{how}", option="base_model", flag_first=False)
        raise InputError(
            f"{factors_dir} was fitted for other weights of {model} (weights fingerprint "
            f"{recorded} in the factors, {current['digest']} now); refit with fit-hessians --overwrite",
            option="factors_dir",
        )
    if other:
        logger.info("%s was fitted for %s; %s has the same weights (fingerprint %s): using its factors",
                    factors_dir, fit.get("model"), model, recorded)
    return True
