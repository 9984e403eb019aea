"""A compact terminal summary: per query, its loss and its most helpful and harmful training examples."""

from __future__ import annotations

import shutil

from if_query.report.ranking import rank_by_of, ranked_rows
from if_query.report.results import QueryResults


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def score_text(value: float) -> str:
    """A score to 4 significant digits, its sign always shown: trailing zeros kept (+0.1000, columns line up) but
    not a bare trailing point (+3498, not +3498.)."""
    return f"{value:+#.4g}".removesuffix(".")


def format_summary(results: QueryResults, top_k: int, width: int | None = None, rank_by: str | None = None) -> str:
    """Top-k helpful (highest positive values) and harmful (lowest negative values) training examples per query,
    ranked by :mod:`if_query.report.ranking` by ``rank_by`` (default: the results' run.json's, as the report and
    --top-train rank)."""
    width = width or shutil.get_terminal_size((100, 20)).columns
    train = results.train.set_index("train_id")
    lines: list[str] = []
    rank_by = rank_by or rank_by_of(results.provenance)
    helpful_rows, harmful_rows = ranked_rows(results.influences, top_k, rank_by)
    for query in results.queries.itertuples(index=False):
        lines.append(_clip(f"query {query.query_id} (loss {query.loss:.3g}): {query.prompt}{query.completion}", width))
        for title, chosen in (("helpful", helpful_rows.get(query.query_id, [])),
                              ("harmful", harmful_rows.get(query.query_id, []))):
            if not len(chosen):
                # (a cosine has its score's sign: "no negative score" whatever the ranking; clients parse these lines)
                lines.append(f"  most {title}: none (no {'positive' if title == 'helpful' else 'negative'} score)")
                continue
            lines.append(f"  most {title}:")
            for row in chosen.itertuples(index=False):
                text = train.loc[row.train_id, "prompt"] + train.loc[row.train_id, "completion"]
                cosine = getattr(row, "influence_cosine", None)
                head = (f"    {score_text(row.influence_score):>11}  "
                        + (f"cos {cosine:+.2f}  " if cosine is not None else "") + f"{row.train_id}: ")
                lines.append(head + _clip(text, width - len(head)))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


