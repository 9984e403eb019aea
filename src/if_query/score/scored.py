"""What a scorer returns: the scores of distinct queries against distinct train sequences (:class:`ScoredSet`), with
the self-influences behind the cosine, the queries' losses and per-token scores; the finiteness check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from if_query.errors import RunError


@dataclass
class ScoredSet:
    """Scores of queries against train sequences (float64, on the host); both scorers return one."""

    scores: torch.Tensor  # (queries, train)
    query_self: torch.Tensor | None  # (queries,); None without the cosine
    train_self: torch.Tensor | None  # (train,); None without the cosine
    query_losses: torch.Tensor  # (queries,) summed completion loss
    per_token: dict[tuple[int, int], torch.Tensor] | None  # (query, train) -> (train length,), the pairs computed
    damping: dict[str, float | None] | None  # resolved damping per module (None: not known)

    def select(self, queries: Sequence[int], train: Sequence[int]) -> ScoredSet:
        """The rows ``queries`` and columns ``train`` (indices into this set; repeats allowed)."""
        per_token = None
        if self.per_token is not None:
            per_token = {(row, column): self.per_token[q, t] for row, q in enumerate(queries)
                         for column, t in enumerate(train) if (q, t) in self.per_token}
        rows, columns = torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(train, dtype=torch.long)
        return ScoredSet(self.scores[rows][:, columns].double(),
                         None if self.query_self is None else self.query_self[rows].double(),
                         None if self.train_self is None else self.train_self[columns].double(),
                         self.query_losses[rows], per_token, self.damping)

    def cosine(self) -> torch.Tensor | None:
        """``influence_cosine``: each score over the geometric mean of the two self-influences, in [-1, 1]
        (0 where a self-influence is 0), (queries, train); None without self-influences."""
        if self.query_self is None or self.train_self is None:
            return None
        norms = torch.sqrt(self.query_self.clamp_min(0)[:, None] * self.train_self.clamp_min(0)[None, :])
        return torch.nan_to_num(self.scores / norms, nan=0.0).clamp(-1.0, 1.0)

    def check_finite(self, query_ids: Sequence[str], train_ids: Sequence[str]) -> None:
        """Raise :class:`RunError` naming the first records whose loss or scores are not finite."""
        if bad := [query_ids[i] for i in _non_finite(self.query_losses)]:
            raise _non_finite_error("loss", bad)
        width = self.scores.shape[1] if self.scores.dim() == 2 else 1
        if bad := [f"{query_ids[i // width]}/{train_ids[i % width]}" for i in _non_finite(self.scores.flatten())]:
            raise _non_finite_error("influence score", bad)


def _non_finite(values: torch.Tensor, limit: int = 6) -> list[int]:
    """Indices of the first ``limit`` non-finite values (never a string per value)."""
    return (~torch.isfinite(values)).nonzero().flatten()[:limit].tolist()


def _non_finite_error(what: str, ids: list[str]) -> RunError:
    shown = ", ".join(repr(i) for i in ids[:5]) + (" and more" if len(ids) > 5 else "")
    return RunError(f"non-finite {what} for {shown}; try --dtype float32 (or bfloat16 instead of float16)"
                    + (", or a larger --damping" if what != "loss" else ""))


def per_token_pairs(per_token: list[list[torch.Tensor]] | None, train_rows) -> dict | None:
    """An engine's per-token scores [query][j] as {(query, train row): scores}."""
    if per_token is None:
        return None
    rows = [int(r) for r in train_rows]
    return {(q, rows[j]): values for q, row in enumerate(per_token) for j, values in enumerate(row)}
