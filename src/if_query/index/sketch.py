"""The index's sketch of a whitened gradient, module by module: the maths, no files.

A tracked module's whitened gradient is ``W = S ⊙ R`` with ``R = Ĝᵀ Â = Q_gᵀ Gᵀ [A, 1] Q_a`` (out, in') and the
EK-FAC scaling ``S = (Λ + λ)^-½`` (:mod:`if_query.score.engine`). ``S`` is a general positive matrix, so it is
approximated by its truncated SVD ``S_R = Σ_r u_r v_rᵀ`` (R terms, :func:`low_rank_scaling`), and a window's row is

    Ω_gᵀ (S_R ⊙ R) Ω_a  =  Σ_r (G Q_g diag(u_r) Ω_g)ᵀ ([A, 1] Q_a diag(v_r) Ω_a)        (k_g, k_a)

with Gaussian ``Ω_g`` (out, k) and ``Ω_a`` (in', k), entries N(0, 1/k), fixed by the seed and the module's name
(:func:`gaussian`). The right-hand side is formed from the window's token factors, (k × T)(T × k) per r: the dense
(out, in') gradient never exists (:meth:`ModuleSketch.rows`). ``E <row_x, row_y> = <S_R ⊙ R_x, S_R ⊙ R_y>``.

Queries are formed densely, one module at a time as the engine forms them, and sketched with the same Ω
(:meth:`ModuleSketch.dense_rows`): ``symmetric`` sketches ``S_R ⊙ R_q`` (the train rows' form), ``unbiased``
sketches ``(S² / S_R) ⊙ R_q`` (S_R clamped positive), whose expected product with a train row is the exact score
``<S ⊙ R_q, S ⊙ R_t>``. Without eigenvectors (diagonal) there is no rotation; identity's S is 1 (exact at R = 1).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from if_query.kron.factors import Preconditioner
from if_query.plan.sizes import Shape
from if_query.score.per_example import with_bias_column

QUERY_FORMS = ("unbiased", "symmetric")


def low_rank_scaling(scale: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``S ≈ Σ_r u_r v_rᵀ``: (u (rank, out), v (rank, in')) float32 from the float64 truncated SVD of ``scale`` (the
    singular values folded into u), and the relative Frobenius error ``|S - S_R| / |S|``."""
    s = scale.double()
    left, values, right = torch.linalg.svd(s, full_matrices=False)
    rank = min(rank, len(values))
    u = (left[:, :rank] * values[:rank]).T
    v = right[:rank]
    error = float(torch.linalg.matrix_norm(s - u.T @ v) / torch.linalg.matrix_norm(s).clamp_min(1e-300))
    return u.float(), v.float(), error


def gaussian(rows: int, k: int, seed: int, module: str, side: str) -> torch.Tensor:
    """(rows, k) float32 with entries N(0, 1/k), a function of (seed, module, side) alone (drawn on the CPU: the
    same on every device and rank)."""
    key = int(hashlib.sha256(f"{seed}:{module}:{side}".encode()).hexdigest()[:15], 16)
    generator = torch.Generator().manual_seed(key)
    return torch.randn(rows, k, generator=generator) / k**0.5


@dataclass
class ModuleSketch:
    """One module's sketch operators on the device: ``left`` = [Q_g diag(u_r) Ω_g]_r (out, R k) and ``right`` =
    [Q_a diag(v_r) Ω_a]_r (in', R k); the dense query side's ``omega_g``/``omega_a``, the rotations, ``scale`` S and
    its approximation ``approx`` S_R; ``error`` the relative error of S_R."""

    shape: Shape
    k: int
    rank: int
    left: torch.Tensor
    right: torch.Tensor
    omega_g: torch.Tensor
    omega_a: torch.Tensor
    pre: Preconditioner
    scale: torch.Tensor
    approx: torch.Tensor
    error: float
    block: torch.Tensor | None = None  # eigen: S on the kept block (k_g, k_a)
    kept: tuple[torch.Tensor, torch.Tensor] | None = None  # eigen: the kept rows and columns of the eigenbasis

    @classmethod
    def make(cls, shape: Shape, pre: Preconditioner, k: int, rank: int, seed: int, device: torch.device,
             kind: str = "gaussian") -> ModuleSketch:
        scale = (pre.scale if pre.scale is not None
                 else torch.ones(shape.out, shape.width, device=device))  # identity: S = 1
        if kind == "eigen":
            return cls._eigen(shape, pre, k, scale, device)
        u, v, error = low_rank_scaling(scale, rank)
        omega_g = gaussian(shape.out, k, seed, shape.name, "g").to(device)
        omega_a = gaussian(shape.width, k, seed, shape.name, "a").to(device)
        left = torch.cat([u_r[:, None] * omega_g for u_r in u], dim=1)  # (out, R k)
        right = torch.cat([v_r[:, None] * omega_a for v_r in v], dim=1)  # (in', R k)
        if pre.q_g is not None:
            left = pre.q_g @ left
        if pre.q_a is not None:
            right = pre.q_a @ right
        return cls(shape, k, len(u), left, right, omega_g, omega_a, pre, scale, u.T @ v, error)

    @classmethod
    def _eigen(cls, shape: Shape, pre: Preconditioner, k: int, scale: torch.Tensor,
               device: torch.device) -> ModuleSketch:
        """The block of W in the eigenbasis whose rows and columns carry the most whitened energy: entry (i, j) of a
        training gradient's W has expected square ``Λ_ij / (Λ_ij + λ) = 1 - λ S_ij²`` (EK-FAC's Λ is the gradients'
        second moment there), so the kept rows are the k of largest summed energy, the columns likewise, and S is
        applied exactly on the block (no approximation of S, no randomness). ``error``: the energy left out."""
        damping = pre.damping or 0.0
        energy = (1 - damping * scale.double() ** 2).clamp_min(0) if pre.scale is not None else scale.double()
        rows = torch.topk(energy.sum(1), min(k, shape.out)).indices.sort().values
        columns = torch.topk(energy.sum(0), min(k, shape.width)).indices.sort().values
        left = (pre.q_g[:, rows] if pre.q_g is not None
                else torch.eye(shape.out, device=device)[:, rows])  # (out, k_g)
        right = (pre.q_a[:, columns] if pre.q_a is not None
                 else torch.eye(shape.width, device=device)[:, columns])  # (in', k_a)
        block = scale[rows][:, columns]
        error = 1 - float(energy[rows][:, columns].sum() / energy.sum().clamp_min(1e-300))
        return cls(shape, k, 1, left, right, left, right, pre, scale, scale, error, block, (rows, columns))

    @property
    def dim(self) -> int:
        return self.left.shape[1] * self.right.shape[1] // (self.rank * self.rank)

    def rows(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        """Rows (batch, k * k) float32 of a batch's token factors: ``inputs`` (batch, T, in) and ``output_grads``
        (batch, T, out) in any dtype (upcast here; padding positions, whose output gradients are 0, add nothing)."""
        a = with_bias_column(inputs.float(), self.shape.bias) @ self.right  # (batch, T, R k)
        g = output_grads.float() @ self.left  # (batch, T, R k)
        batch, tokens = a.shape[:2]
        a = a.reshape(batch, tokens * self.rank, -1)  # the T and r sums taken in one product
        g = g.reshape(batch, tokens * self.rank, -1)
        product = g.transpose(1, 2) @ a
        return (product if self.block is None else product * self.block).reshape(batch, -1)

    def rotated(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        """R = Q_gᵀ Gᵀ [A, 1] Q_a (batch, out, in') float32: the dense rotated gradients (the query side)."""
        a = self.pre.rotate_inputs(with_bias_column(inputs.float(), self.shape.bias))
        g = self.pre.rotate_output_grads(output_grads.float())
        return g.transpose(1, 2) @ a

    def dense_rows(self, rotated: torch.Tensor, form: str) -> torch.Tensor:
        """Rows (batch, k * k) of dense rotated gradients (batch, out, in'): ``symmetric`` sketches S_R ⊙ R,
        ``unbiased`` (S² / S_R) ⊙ R (see the module docstring)."""
        if self.kept is not None:  # eigen: the block itself, exact
            rows, columns = self.kept
            return (rotated[:, rows][:, :, columns] * self.block).reshape(len(rotated), -1)
        if form == "symmetric":
            weighted = rotated * self.approx
        else:
            floor = self.scale.min() * 1e-3  # S_R kept positive: S² / S_R bounded where the SVD dips to 0 or below
            weighted = rotated * (self.scale * self.scale / self.approx.clamp_min(floor))
        return (self.omega_g.T @ weighted @ self.omega_a).reshape(len(rotated), -1)
