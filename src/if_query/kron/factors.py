"""Kronfluence's factor files, read one module at a time for if-query's engine (conventions: :mod:`if_query.kron`)."""

from __future__ import annotations

import json
import struct
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


_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "F16": torch.float16,
           "BF16": torch.bfloat16, "I32": torch.int32}


@dataclass(frozen=True)
class FileRange:
    """Where one tensor's bytes lie in a file (a safetensors factor file, a spill file): read with ``os.pread``
    straight into a pinned buffer, a copy the kernel makes (no host tensor copy, whatever OpenMP's threads)."""

    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    fd: int = -1  # an open descriptor to read instead of ``path`` (a spill file, unlinked at once)


def safetensors_ranges(path: Path) -> dict[str, FileRange]:
    """Every tensor's :class:`FileRange` in a safetensors file, from its header (8 bytes of length, then JSON)."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    ranges = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] not in _DTYPES:
            continue
        begin, end = entry["data_offsets"]
        ranges[name] = FileRange(str(path), 8 + length + begin, end - begin, _DTYPES[entry["dtype"]],
                                 tuple(entry["shape"]))
    return ranges


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
    damping: float | torch.Tensor | None  # resolved damping (None for identity; the engine's: a 0-d device tensor)

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
        self._ranges: dict[str, dict[str, FileRange]] | None = None
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

    def files(self) -> tuple[str, ...]:
        """The factor files a module's preconditioner is made from (the bytes the engine moves per module)."""
        return _FILES[self.strategy]

    def read(self, module: str) -> dict[str, torch.Tensor]:
        """The module's factor tensors as stored, on the host (memory-mapped pages: read in place)."""
        return {factor: self._tensor(factor, module) for factor in self.files()}

    def ranges(self, module: str) -> dict[str, FileRange]:
        """Where the module's factor tensors lie in their files (for reads straight into pinned memory)."""
        if self._ranges is None:
            self._ranges = {f: safetensors_ranges(self.directory / f"{f}.safetensors") for f in self.files()}
        missing = [factor for factor in self.files() if module not in self._ranges[factor]]
        if missing:
            raise InputError(f"factors have no {missing[0]} for module {module!r} (fitted for other modules?)")
        return {factor: self._ranges[factor][module] for factor in self.files()}

    def curvature(self, module: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The module's curvature in its eigenbasis, (out, in') float64 on ``device``; None for identity."""
        return _curvature(self.strategy, {f: t.to(device) for f, t in self.read(module).items()})

    def prepare(self, tensors: dict[str, torch.Tensor], damping: float | None) -> Preconditioner:
        """A preconditioner from the module's factor tensors (:meth:`read`'s, on the scoring device), prepared there
        (the float64 curvature, its mean, the damping and the rsqrt) with no synchronisation: an automatic damping
        (None: 0.1 x mean curvature) stays a 0-d device tensor until the engine lands it."""
        curvature = _curvature(self.strategy, tensors)
        if curvature is None:
            return Preconditioner(None, None, None, None)
        if damping is None:
            damping = curvature.mean().mul_(HEURISTIC_DAMPING_SCALE)  # (), on the device
        scale = curvature.add_(damping).rsqrt_().float()  # (out, in')
        del curvature
        q_a = q_g = None
        if self.strategy in ("kfac", "ekfac"):
            q_a = tensors[ACTIVATION_EIGENVECTORS_NAME].to(torch.float32)
            q_g = tensors[GRADIENT_EIGENVECTORS_NAME].to(torch.float32)
        return Preconditioner(q_a, q_g, scale, damping)

    def preconditioner(self, module: str, damping: float | None, device: torch.device) -> Preconditioner:
        """Factors of ``module`` on ``device``, prepared there (:meth:`prepare`), the damping as a float."""
        pre = self.prepare({f: t.to(device) for f, t in self.read(module).items()}, damping)
        if pre.damping is not None:
            pre.damping = float(pre.damping)
        return pre

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


def _curvature(strategy: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The curvature in the eigenbasis, (out, in') float64 where ``tensors`` are (None for identity)."""
    if strategy == "identity":
        return None
    if strategy == "kfac":
        eigen_a = tensors[ACTIVATION_EIGENVALUES_NAME].double().clamp_min(0)
        eigen_g = tensors[GRADIENT_EIGENVALUES_NAME].double().clamp_min(0)
        return torch.outer(eigen_g, eigen_a)
    return tensors[LAMBDA_MATRIX_NAME].to(torch.float64, copy=True).div_(tensors[NUM_LAMBDA_PROCESSED].double())


def read_eigenvectors(directory: Path, module: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q_a (in', in'), Q_g (out, out)) of ``module``, float32 on ``device`` (one module read from disk)."""
    loaded = []
    for factor in (ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME):
        with safe_open(str(directory / f"{factor}.safetensors"), framework="pt", device="cpu") as file:
            loaded.append(file.get_tensor(module).to(device, torch.float32))
    return loaded[0], loaded[1]
