"""The train side a scorer reads: the distinct train sequences' lengths, a reader of chosen rows (records in memory,
or a corpus's windows read by range), and which rows are also queries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from if_query.data.tokenization import TokenizedExample


@dataclass
class TrainSequences:
    """The distinct train sequences to score: their lengths, a reader of chosen rows (records in memory, or a
    corpus's windows read by range), and which of them are also queries (train row -> query index: scored from the
    queries' own token factors)."""

    lengths: np.ndarray  # (train,) int64
    take: Callable[[Sequence[int]], list[TokenizedExample]]  # the sequences of rows, in the order asked
    queries: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, sequences: Sequence[TokenizedExample], queries: dict[int, int] | None = None) -> TrainSequences:
        return cls(np.array([len(x) for x in sequences], dtype=np.int64),
                   lambda rows: [sequences[int(r)] for r in rows], queries or {})

    def train_only(self) -> np.ndarray:
        """The rows that are not queries, in order."""
        return np.array([i for i in range(len(self.lengths)) if i not in self.queries], dtype=np.int64)
