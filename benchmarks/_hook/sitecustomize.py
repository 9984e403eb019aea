"""Timing hook for benchmarks/bench_query.py: inert unless IFQ_BENCH_TIMINGS is set.

bench_query.py puts this directory on PYTHONPATH of the ``run-query`` / ``fit-hessians`` processes it
starts, so the real console scripts run unchanged while this module (imported by ``site`` at start-up)
wraps a few functions of if-query and Kronfluence with wall-clock timers as their modules are imported,
and writes the timings as JSON to $IFQ_BENCH_TIMINGS when the process exits.

IFQ_BENCH_TIMINGS=path     coarse steps: imports, tokenizer/metadata, tokenization, model and factor
                           loading, scoring per folder, CSV writing; fitting stages for fit-hessians
IFQ_BENCH_PROFILE=1        also fine-grained, nested timers (forward, backward, per-sample gradient,
                           whitening / preconditioning, dot products, loss pass, ...), exclusive seconds
IFQ_BENCH_TORCH_PROFILE=p  also a torch.profiler op table of the scoring (from the first folder's
                           scoring to the end of QueryRunner.run), written to p
"""

from __future__ import annotations

import atexit
import importlib.abc
import json
import os
import sys
import time

_PATH = os.environ.get("IFQ_BENCH_TIMINGS")

if _PATH:
    _T_SITE = time.perf_counter()
    _STEPS: dict[str, float] = {}  # coarse, inclusive
    _EVENTS: list[tuple[str, float, float]] = []  # (label, start, end) relative to _T_SITE
    _FINE_INCL: dict[str, float] = {}
    _FINE_EXCL: dict[str, float] = {}
    _FINE_CALLS: dict[str, int] = {}
    _STACK: list[list] = []
    _STATE = {"phase": "other", "profiler": None, "first_runner": None}
    _FINE = os.environ.get("IFQ_BENCH_PROFILE") == "1"
    _TORCH_PROFILE = os.environ.get("IFQ_BENCH_TORCH_PROFILE")

    def _coarse(label: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                end = time.perf_counter()
                _STEPS[label] = _STEPS.get(label, 0.0) + end - start
                _EVENTS.append((label, start - _T_SITE, end - _T_SITE))

        wrapper.__wrapped__ = function
        return wrapper

    def _fine(label, function, phase: str | None = None):
        """Nested timer; ``label`` may be a function of the current phase."""

        def wrapper(*args, **kwargs):
            name = label if isinstance(label, str) else label(_STATE["phase"])
            previous = _STATE["phase"]
            if phase is not None:
                _STATE["phase"] = phase
            frame = [name, time.perf_counter(), 0.0]
            _STACK.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                _STACK.pop()
                elapsed = time.perf_counter() - frame[1]
                _FINE_INCL[name] = _FINE_INCL.get(name, 0.0) + elapsed
                _FINE_EXCL[name] = _FINE_EXCL.get(name, 0.0) + elapsed - frame[2]
                _FINE_CALLS[name] = _FINE_CALLS.get(name, 0) + 1
                if _STACK:
                    _STACK[-1][2] += elapsed
                _STATE["phase"] = previous

        wrapper.__wrapped__ = function
        return wrapper

    def _wrap(owner, attribute: str, make) -> None:
        function = getattr(owner, attribute, None)
        if function is not None:
            setattr(owner, attribute, make(function))

    # ---------------------------------------------------------------- patches, applied on import

    def _patch_query(module) -> None:
        runner = module.QueryRunner
        original_init = runner.__init__

        def init(self, *args, **kwargs):
            if _STATE["first_runner"] is None:
                _STATE["first_runner"] = time.perf_counter() - _T_SITE
            return original_init(self, *args, **kwargs)

        runner.__init__ = _coarse("metadata + tokenizer load", init)
        _wrap(runner, "prepare", lambda f: _coarse("read + tokenize records", f))
        _wrap(module, "load_model", lambda f: _coarse("model weights (from_pretrained)", f))
        _wrap(module, "InfluenceScorer", lambda cls: _patch_scorer_init(cls))
        _wrap(module, "prepare_model", lambda f: _coarse("Kronfluence prepare_model (wrap modules)", f))
        _wrap(module, "write_results", lambda f: _coarse("write CSVs", f))
        original_score = runner.score

        def score(self, *args, **kwargs):
            if _TORCH_PROFILE and _STATE["profiler"] is None:
                from torch.profiler import ProfilerActivity, profile

                _STATE["profiler"] = profile(activities=[ProfilerActivity.CPU])
                _STATE["profiler"].__enter__()
            return original_score(self, *args, **kwargs)

        runner.score = _coarse("scoring", score)
        original_run = runner.run

        def run(self, *args, **kwargs):
            try:
                return original_run(self, *args, **kwargs)
            finally:
                _stop_torch_profiler()

        runner.run = run
        if _FINE:
            _wrap(runner, "_self_influence", lambda f: _fine("Kronfluence path: self-influence", f))

    def _patch_scorer_init(cls):
        original = cls.__init__
        cls.__init__ = _coarse("factors (Analyzer + load_all_factors)", original)
        return cls

    def _stop_torch_profiler() -> None:
        profiler = _STATE["profiler"]
        if profiler is None:
            return
        _STATE["profiler"] = None
        profiler.__exit__(None, None, None)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        with open(_TORCH_PROFILE, "w", encoding="utf-8") as out:
            out.write(table + "\n")

    def _patch_fitting(module) -> None:
        original = module.fit_hessians

        def fit(*args, **kwargs):
            if _STATE["first_runner"] is None:
                _STATE["first_runner"] = time.perf_counter() - _T_SITE
            return original(*args, **kwargs)

        module.fit_hessians = _coarse("fit_hessians (total)", fit)
        _wrap(module, "load_model", lambda f: _coarse("model weights (from_pretrained)", f))
        _wrap(module, "load_hessian_examples", lambda f: _coarse("read + tokenize records", f))

    def _patch_factor_computer(module) -> None:
        computer = module.FactorComputer
        _wrap(computer, "fit_covariance_matrices", lambda f: _coarse("stage: covariance", f))
        _wrap(computer, "perform_eigendecomposition", lambda f: _coarse("stage: eigendecomposition", f))
        _wrap(computer, "fit_lambda_matrices", lambda f: _coarse("stage: lambda", f))

    def _patch_scoring(module) -> None:
        if not _FINE:
            return
        _wrap(module, "compute_pairwise_scores_with_loaders",
              lambda f: _fine("Kronfluence path: query pass, other", f, phase="query pass"))
        _wrap(module, "compute_self_scores_with_loaders",
              lambda f: _fine("Kronfluence path: self-score pass, other", f, phase="self-score pass"))
        _wrap(module, "shifted_logits_and_labels", lambda f: _fine(lambda p: f"forward ({p})", f))
        scorer = module.InfluenceScorer
        _wrap(scorer, "completion_losses", lambda f: _fine("loss pass: other (collate, python)", f,
                                                            phase="loss pass"))
        _wrap(scorer, "whitened", lambda f: _fine("gradient pass: other (collate, hooks, python)", f,
                                                  phase="gradient pass"))

    def _patch_gradients(module) -> None:
        if not _FINE:
            return
        _wrap(module, "per_example_gradient", lambda f: _fine(lambda p: f"per-example gradient ({p})", f))
        _wrap(module, "layer_inputs", lambda f: _fine(lambda p: f"layer inputs + bias column ({p})", f))
        _wrap(module, "shifted_logits_and_labels", lambda f: _fine(lambda p: f"forward ({p})", f))
        _wrap(module, "summed_token_losses", lambda f: _fine(lambda p: f"cross-entropy ({p})", f))
        whitener = getattr(module, "Whitener", None)
        if whitener is not None:
            _wrap(whitener, "__call__",
                  lambda f: _fine(lambda p: f"Whitener.__call__: rotate (+ outer products) ({p})", f))
            _wrap(whitener, "__init__", lambda f: _fine("whitener setup (eigenvectors, lambda, damping)", f))

    def _patch_task(module) -> None:
        if not _FINE:
            return
        import torch

        _wrap(module.CompletionLossTask, "compute_train_loss", lambda f: _fine(lambda p: f"forward ({p})", f))
        _wrap(torch.Tensor, "backward", lambda f: _fine(lambda p: f"backward ({p})", f))

    def _patch_kron_pairwise(module) -> None:
        if not _FINE:
            return
        _wrap(module, "compute_dot_products_with_loader",
              lambda f: _fine("Kronfluence path: train pass, other", f, phase="train pass"))
        for name in ("set_factors", "prepare_modules", "set_mode", "finalize_all_iterations"):
            _wrap(module, name, lambda f: _fine("Kronfluence path: factor/mode setup", f))

    def _patch_kron_linear(module) -> None:
        if not _FINE:
            return
        linear = module.TrackedLinear
        _wrap(linear, "compute_per_sample_gradient", lambda f: _fine(lambda p: f"per-example gradient ({p})", f))
        _wrap(linear, "compute_pairwise_score",
              lambda f: _fine(lambda p: f"per-example gradient + dot products ({p})", f))

    def _patch_kron_config(module) -> None:
        if not _FINE:
            return
        _wrap(module.Ekfac, "precondition_gradient", lambda f: _fine(lambda p: f"EK-FAC preconditioning ({p})", f))

    _PATCHES = {
        "if_query.query": _patch_query,
        "if_query.fitting": _patch_fitting,
        "if_query.scoring": _patch_scoring,
        "if_query.gradients": _patch_gradients,
        "if_query.task": _patch_task,
        "kronfluence.computer.factor_computer": _patch_factor_computer,
        "kronfluence.score.pairwise": _patch_kron_pairwise,
        "kronfluence.module.linear": _patch_kron_linear,
        "kronfluence.factor.config": _patch_kron_config,
    }

    class _Finder(importlib.abc.MetaPathFinder):
        """Runs the patch of a listed module right after the module's own code."""

        def find_spec(self, name, path, target=None):
            if name not in _PATCHES:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            loader = spec.loader
            original_exec = loader.exec_module

            def exec_module(module):
                original_exec(module)
                try:
                    _PATCHES[name](module)
                except Exception as exc:  # noqa: BLE001 - a changed API must not break the measured run
                    print(f"[bench hook] could not patch {name}: {exc!r}", file=sys.stderr)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())

    @atexit.register
    def _dump() -> None:
        _stop_torch_profiler()
        end = time.perf_counter() - _T_SITE
        result = {
            "site_to_exit_s": end,
            "site_to_first_call_s": _STATE["first_runner"],
            "steps": _STEPS,
            "events": _EVENTS,
            "fine_exclusive": _FINE_EXCL,
            "fine_inclusive": _FINE_INCL,
            "fine_calls": _FINE_CALLS,
            "threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
        }
        with open(_PATH, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=1)
