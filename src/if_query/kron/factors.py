"""Kronfluence's factor files, read one module at a time for if-query's engine (conventions: :mod:`if_query.kron`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from if_query.errors import InputError, first_line
from if_query.kron.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    FACTOR_ARGUMENTS_NAME,
    FACTOR_SAVE_PREFIX,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    HEURISTIC_DAMPING_SCALE,
    LAMBDA_MATRIX_NAME,
    NUM_LAMBDA_PROCESSED,
)

FACTORS_NAME = "hessian"  # Kronfluence's factors name: the factors live in <factors-dir>/factors_hessian/
_FILES = {  # the factor files each strategy needs (Kronfluence's strategy names)
    "ekfac": (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME, LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED),
    "kfac": (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME, ACTIVATION_EIGENVALUES_NAME,
             GRADIENT_EIGENVALUES_NAME),
    "diagonal": (LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED),
    "identity": (),
}


def factors_path(factors_dir: str | Path) -> Path:
    """Where Kronfluence keeps the factors of a fit-hessians output directory."""
    return Path(factors_dir) / f"{FACTOR_SAVE_PREFIX}{FACTORS_NAME}"


def clamp_kfac_eigenvalues(loaded_factors: dict) -> None:
    """Clamp K-FAC eigenvalues at 0 in factors loaded by Kronfluence (see the module docstring)."""
    for name in (ACTIVATION_EIGENVALUES_NAME, GRADIENT_EIGENVALUES_NAME):
        for tensor in loaded_factors.get(name, {}).values():
            tensor.clamp_min_(0)


@dataclass
class Preconditioner:
    """One module's factors on the scoring device, ready to map per-token vectors and gradients.

    ``rotate_inputs``/``rotate_output_grads`` map token vectors into the eigenbasis (no-ops without
    eigenvectors); ``scale`` is ``C^-1/2`` (out, in') in float32, None for identity.
    """

    q_a: torch.Tensor | None  # (in', in') float32
    q_g: torch.Tensor | None  # (out, out) float32
    scale: torch.Tensor | None  # (out, in') float32
    damping: float | None  # resolved damping (None for identity)

    def rotate_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs if self.q_a is None else inputs @ self.q_a

    def rotate_output_grads(self, output_grads: torch.Tensor) -> torch.Tensor:
        return output_grads if self.q_g is None else output_grads @ self.q_g

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q_a, self.q_g, self.scale) if t is not None)


class HessianFactors:
    """Reads a fit's factors one module at a time (memory-mapped safetensors: processes on one host
    share the pages; only the module being scored is copied)."""

    def __init__(self, factors_dir: str | Path):
        self.directory = factors_path(factors_dir)
        arguments = self.directory / f"{FACTOR_ARGUMENTS_NAME}_arguments.json"
        try:
            self.strategy = json.loads(arguments.read_text(encoding="utf-8"))["strategy"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{factors_dir}: no readable Kronfluence factor arguments ({exc})") from exc
        if self.strategy not in _FILES:
            raise InputError(f"{factors_dir}: unknown strategy {self.strategy!r}")
        self._same: dict[tuple[str, str], bool] = {}
        self._files = {}
        for name in _FILES[self.strategy]:
            path = self.directory / f"{name}.safetensors"
            if not path.is_file():
                raise InputError(f"{factors_dir}: {path.name} is missing (incomplete fit?)")
            try:
                self._files[name] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise InputError(f"{path}: cannot read this factor file ({first_line(exc)}): truncated or damaged; "
                                 "refit with fit-hessians --overwrite", option="factors_dir") from exc

    def _tensor(self, factor: str, module: str) -> torch.Tensor:
        try:
            return self._files[factor].get_tensor(module)
        except Exception as exc:  # safetensors raises its own error type for a missing key
            raise InputError(f"factors have no {factor} for module {module!r} (fitted for other modules?)") from exc

    def curvature(self, module: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The module's curvature in its eigenbasis, (out, in') float64 on ``device``; None for identity."""
        if self.strategy == "identity":
            return None
        if self.strategy == "kfac":
            eigen_a = self._tensor(ACTIVATION_EIGENVALUES_NAME, module).to(device).double().clamp_min(0)
            eigen_g = self._tensor(GRADIENT_EIGENVALUES_NAME, module).to(device).double().clamp_min(0)
            return torch.outer(eigen_g, eigen_a)
        count = self._tensor(NUM_LAMBDA_PROCESSED, module).to(device).double()
        return self._tensor(LAMBDA_MATRIX_NAME, module).to(device).double().div_(count)

    def preconditioner(self, module: str, damping: float | None, device: torch.device) -> Preconditioner:
        """Factors of ``module`` on ``device``, prepared there (the float64 curvature, its mean, the damping and
        the rsqrt: no host work per module); ``damping`` None means the heuristic (0.1 x mean curvature)."""
        curvature = self.curvature(module, device)
        if curvature is None:
            return Preconditioner(None, None, None, None)
        if damping is None:
            damping = HEURISTIC_DAMPING_SCALE * float(curvature.mean())
        scale = curvature.add_(damping).rsqrt_().float()  # (out, in')
        del curvature
        q_a = q_g = None
        if self.strategy in ("kfac", "ekfac"):
            q_a = self._tensor(ACTIVATION_EIGENVECTORS_NAME, module).to(device, torch.float32)
            q_g = self._tensor(GRADIENT_EIGENVECTORS_NAME, module).to(device, torch.float32)
        return Preconditioner(q_a, q_g, scale, float(damping))

    def same_activation_eigenvectors(self, module: str, other: str) -> bool:
        """Whether two modules' activation eigenvectors are identical (read on the host, from the mapped file;
        False for strategies without eigenvectors)."""
        if self.strategy not in ("kfac", "ekfac"):
            return False
        key = (module, other)
        if key not in self._same:
            self._same[key] = torch.equal(self._tensor(ACTIVATION_EIGENVECTORS_NAME, module),
                                          self._tensor(ACTIVATION_EIGENVECTORS_NAME, other))
        return self._same[key]


def read_eigenvectors(directory: Path, module: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_a (in', in'), Q_g (out, out)) of ``module``, float32 on ``device`` (one module read from disk)."""
    loaded = []
    for factor in (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME):
        with safe_open(str(directory / f"{factor}.safetensors"), framework="pt", device="cpu") as file:
            loaded.append(file.get_tensor(module).to(device, torch.float32))
    return loaded[0], loaded[1]
