"""The one ranking of train examples for a query, used by the terminal summary, report.html and --top-train.

The key is ``--rank-by`` (recorded in run.json as ``rank_by``): ``cosine`` ranks by ``influence_cosine`` (the
default when the cosine is computed: which training examples point the same way as the query, whatever the size
of their gradients), ``score`` by ``influence_score`` (the raw score: the estimated effect on the query's loss,
which favours examples with large gradients). Ties are broken by ``train_id``: the most helpful are the highest
values, the most harmful the lowest. The summary and the report show as helpful only positive values and as
harmful only negative ones; --top-train keeps the K highest and the K lowest whatever their sign (all of them when
there are fewer than 2K).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from if_query.config import RANK_BY

RANK_COLUMNS = {"cosine": "influence_cosine", "score": "influence_score"}


def rank_by_of(provenance: dict | None) -> str:
    """The ranking recorded in a run.json (``score`` for results written before --rank-by, ranked so)."""
    value = (provenance or {}).get("rank_by")
    return value if value in RANK_BY else "score"


def _ordered(scores: np.ndarray, ids: Sequence[str], candidates: np.ndarray, descending: bool) -> np.ndarray:
    """``candidates`` sorted by score (descending or ascending), ties by train_id."""
    values = scores[candidates]
    keys = sorted(range(len(candidates)), key=lambda i: ((-values[i] if descending else values[i]),
                                                         ids[candidates[i]]))
    return candidates[np.array(keys, dtype=np.int64)] if keys else candidates


def top(scores: np.ndarray, ids: Sequence[str], k: int, descending: bool = True) -> np.ndarray:
    """Indices of the ``k`` highest (or lowest) ``scores``, in rank order, ties by ``ids``; linear in N (a
    partition, then a sort of the candidates and of the ties at the cut)."""
    scores = np.asarray(scores, dtype=np.float64)
    count = len(scores)
    k = min(k, count)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    signed = -scores if descending else scores
    cut = np.partition(signed, k - 1)[k - 1]
    candidates = np.flatnonzero(signed <= cut)  # the k best, and every tie at the cut
    return _ordered(scores, ids, candidates, descending)[:k]


def helpful_and_harmful(scores: np.ndarray, ids: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the ``k`` most helpful among the positive values, the ``k`` most harmful among the negative ones)."""
    scores = np.asarray(scores, dtype=np.float64)
    helpful = [i for i in top(scores, ids, k) if scores[i] > 0]
    harmful = [i for i in top(scores, ids, k, descending=False) if scores[i] < 0]
    return np.array(helpful, dtype=np.int64), np.array(harmful, dtype=np.int64)


def kept(scores: np.ndarray, ids: Sequence[str], k: int) -> np.ndarray:
    """--top-train: the ``k`` highest and the ``k`` lowest (every index when there are fewer than 2k), in train
    order."""
    count = len(scores)
    if count <= 2 * k:
        return np.arange(count, dtype=np.int64)
    return np.union1d(top(scores, ids, k), top(scores, ids, k, descending=False))


def ranked_rows(influences, top_k: int, rank_by: str = "score") -> tuple[dict, dict]:
    """({query_id: its most helpful rows}, {query_id: its most harmful rows}) of an influences frame, each
    in rank order by ``rank_by`` (the summary's and the report's lists; by score when the frame has no cosine)."""
    column = RANK_COLUMNS[rank_by]
    column = column if column in influences.columns else "influence_score"
    helpful, harmful = {}, {}
    for query_id, rows in influences.groupby("query_id", sort=False):
        good, bad = helpful_and_harmful(rows[column].to_numpy(), rows["train_id"].tolist(), top_k)
        if len(good):
            helpful[query_id] = rows.iloc[good]
        if len(bad):
            harmful[query_id] = rows.iloc[bad]
    return helpful, harmful
