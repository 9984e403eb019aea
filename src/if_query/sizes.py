"""Estimates of factor and gradient sizes from the tracked modules' shapes (float32 storage)."""

from __future__ import annotations

from dataclasses import dataclass

from if_query.modeling import MlpProjection

BYTES_PER_FLOAT = 4


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class FactorSizes:
    covariance_bytes: int
    eigen_bytes: int
    lambda_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.covariance_bytes + self.eigen_bytes + self.lambda_bytes

    def human(self) -> str:
        return human_bytes(self.total_bytes)


def estimate_factor_sizes(modules: list[MlpProjection], strategy: str) -> FactorSizes:
    """Bytes of the factors Kronfluence stores for ``strategy`` (the bias adds one input column)."""
    covariance = eigen = lambdas = 0
    for module in modules:
        a = module.in_features + int(module.bias)
        g = module.out_features
        covariance += (a * a + g * g) * BYTES_PER_FLOAT
        eigen += (a * a + g * g + a + g) * BYTES_PER_FLOAT
        lambdas += a * g * BYTES_PER_FLOAT
    if strategy == "ekfac":
        return FactorSizes(covariance, eigen, lambdas)
    if strategy == "kfac":
        return FactorSizes(covariance, eigen, 0)
    if strategy == "diagonal":
        return FactorSizes(0, 0, lambdas)
    return FactorSizes(0, 0, 0)

