"""``report.html``: one self-contained page for reading a results directory.

The page has a header (model, revision, strategy, factors dir, damping, date: from the results'
run.json, else from the factors' metadata.json), a query x train heatmap of
influence cosines, and per query its most helpful and most harmful training examples in sortable
tables; with per-token scores, each shown training example's tokens are coloured by their
contribution to the pair's score (the tokens of one character drawn together, their contributions summed:
:func:`if_query.data.token_text.piece_groups`). Everything is inline (the style and sorting script of
``report/assets/``), so the file opens offline and can be mailed around. All text from the CSVs is escaped. The
results are read by :func:`if_query.report.results.read_results` and ranked by :mod:`if_query.report.ranking`, as
the terminal summary's are.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from if_query.atomic import check_writable_dir, write_text_atomic
from if_query.data.token_text import piece_groups
from if_query.errors import InputError, about
from if_query.fit.metadata import read_metadata
from if_query.report.provenance import describe_damping, read_run
from if_query.report.ranking import rank_by_of, ranked_rows
from if_query.report.results import INFLUENCES_FILE, REPORT_FILE, REPORT_TITLE, QueryResults, read_results
from if_query.report.summary import score_text

MAX_HEATMAP_SIDE = 200  # heatmap drawn only when both queries and train examples are at most this many
HEATMAP_VALUES_UP_TO = 16  # train examples up to which heatmap cells show their value as text
MAX_QUERY_SECTIONS = 300  # queries drawn with their own section
MAX_TOKENS_DRAWN = 2048  # tokens drawn per training example
MAX_TOKENS_PAGE = 150_000  # tokens drawn in the whole page (about 80 bytes each); later examples get plain text
MAX_TEXT_CHARS = 600  # characters of a prompt/completion shown in a table cell (the tooltip holds more)
MAX_TITLE_CHARS = 4000

HEADER_FIELDS = (("model", "model"), ("revision", "revision"), ("strategy", "strategy"),
                 ("factors_dir", "factors dir"), ("date", "date"))  # always shown; others (damping...) when known
PER_TOKEN_MEANING = (
    "the value at a token is the contribution of the tracked layers' computation at that position (its input "
    "times its output gradient) to the pair's score; the values sum to the score. At a completion token (and "
    "at the token just before the completion) that computation feeds the prediction of the next token "
    "directly; at the other prompt tokens it reaches the loss only through attention; the final EOS token "
    "predicts nothing and is 0."
)
# Diverging scale: positive (helpful) blue, negative (harmful) red, zero white.
POSITIVE_RGB = (44, 123, 182)
NEGATIVE_RGB = (215, 48, 39)
LEVELS = 10  # colour steps per sign (classes p1..p10 and n1..n10 keep the page small)


def header_from_metadata(metadata: dict | None, factors_dir: str | Path | None = None,
                         date: str | None = None) -> dict[str, Any]:
    """Header fields from a factors directory's metadata.json (missing ones are left out)."""
    header: dict[str, Any] = {}
    if metadata:
        fit = metadata.get("fit") or {}
        header["model"] = metadata.get("model") or fit.get("model")
        header["revision"] = fit.get("revision") or ("default (none given)" if "revision" in fit else None)
        header["strategy"] = fit.get("strategy")
    if factors_dir is not None:
        header["factors_dir"] = str(factors_dir)
    if date is not None:
        header["date"] = date
    return {key: value for key, value in header.items() if value not in (None, "")}


def header_from_run(run: dict | None) -> dict[str, Any]:
    """Header fields from a results directory's run.json (see :mod:`if_query.report.provenance`)."""
    if not run:
        return {}
    header: dict[str, Any] = {
        "model": run.get("model"),
        "revision": run.get("revision") or ("default (none given)" if "revision" in run else None),
        "strategy": run.get("strategy"),
        "factors_dir": run.get("factors_dir"),
        "damping": describe_damping(run),
        "date": run.get("date"),
        "dtype": run.get("dtype"),
        "weights_fingerprint": run.get("weights_fingerprint"),
    }
    return {key: str(value) for key, value in header.items() if value not in (None, "")}


def results_date(results_dir: str | Path) -> str | None:
    """When the results were written (modification time of influences.csv), in local time."""
    try:
        mtime = (Path(results_dir) / INFLUENCES_FILE).stat().st_mtime
    except OSError:
        return None
    return datetime.fromtimestamp(mtime).astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- helpers


def esc(value: Any) -> str:
    """A value as HTML-escaped text (None: empty)."""
    return escape("" if value is None else str(value), quote=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _score(value: Any) -> str:
    return score_text(value) if _finite(value) else "n/a"


def _cosine(value: Any) -> str:
    return f"{value:+.3f}" if _finite(value) else "n/a"


def _sort_key(value: Any) -> str:
    return repr(float(value)) if _finite(value) else ""


def _level(value: float, scale: float) -> str:
    """Colour class of ``value`` on a diverging scale symmetric around 0 (``scale`` = full colour):
    ``p1``..``p10`` for positive values, ``n1``..``n10`` for negative ones, ``""`` for 0."""
    if not _finite(value) or scale <= 0 or value == 0:
        return ""
    step = max(1, min(LEVELS, math.ceil(abs(value) / scale * LEVELS)))
    return f"{'p' if value > 0 else 'n'}{step}"


def _level_css(selector: str, max_alpha: float, white_text_from: int | None = None) -> str:
    """``selector.p3{background:...}`` rules for every colour class."""
    rules = []
    for sign, (red, green, blue) in (("p", POSITIVE_RGB), ("n", NEGATIVE_RGB)):
        for step in range(1, LEVELS + 1):
            white = ";color:#fff" if white_text_from is not None and step >= white_text_from else ""
            rules.append(f"{selector}.{sign}{step}{{background:rgba({red},{green},{blue},"
                         f"{step / LEVELS * max_alpha:.3f}){white}}}")
    return "\n".join(rules)


def _token_text(token: str) -> str:
    """How a token is drawn: newlines and tabs made visible, empty tokens as ∅."""
    if token == "":
        return "∅"
    return token.replace("\r", "␍").replace("\n", "↵\n").replace("\t", "→\t")


def _token_classes(token: str, value: float, scale: float) -> str:
    return " ".join(c for c in ("tok", _level(value, scale), "special" if token == "" else "") if c)


def _token_tip(group: range, token: str, values: list[float]) -> str:
    """A drawn token's tooltip: its position and text and value; a group's positions, text, summed value and
    each token's own value."""
    text = json.dumps(token, ensure_ascii=False)
    if len(group) == 1:
        return f"#{group.start} {text}: {values[group.start]:+.4g}"
    own = ", ".join(f"{values[i]:+.4g}" for i in group)
    return (f"#{group.start}-#{group.stop - 1} {text}: {sum(values[group.start : group.stop]):+.4g}, "
            f"the sum of its {len(group)} tokens ({own})")


def _extras(row: pd.Series, skip: set[str]) -> str:
    items = [f"<span class=\"kv\"><b>{esc(k)}</b> {esc(_clip(str(v), 200))}</span>"
             for k, v in row.items() if k not in skip and str(v) != ""]
    return f"<div class=\"extras\">{''.join(items)}</div>" if items else ""


def _example_text(prompt: str, completion: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Prompt (muted) then completion (bold), each clipped, full text in the tooltip."""
    full = _clip(prompt + completion, MAX_TITLE_CHARS)
    return (f"<span class=\"text\" title=\"{esc(full)}\"><span class=\"prompt\">{esc(_clip(prompt, limit))}</span>"
            f"<span class=\"completion\">{esc(_clip(completion, limit))}</span></span>")


# ---------------------------------------------------------------------------------------------- page


ASSETS = resources.files("if_query.report") / "assets"  # the page's static style and sorting script


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


class _Page:
    """The page of ``results`` (read from ``results_dir``): each ``*_html`` method returns one piece of it."""

    def __init__(self, results: QueryResults, results_dir: Path, header: dict, top_k: int):
        self.results = results
        self.has_per_token = results.has_per_token and "tokens" in results.train.columns  # scores and their tokens
        self.results_dir = results_dir
        self.header = header
        self.top_k = top_k
        self.query_ids = results.queries["query_id"].tolist()
        self.train_ids = results.train["train_id"].tolist()
        self.anchor = {query_id: f"q-{i}" for i, query_id in enumerate(self.query_ids[:MAX_QUERY_SECTIONS])}
        self.train = results.train.drop_duplicates("train_id").set_index("train_id", drop=False)
        self.tokens: dict[str, list[str] | None] = {}
        self.tokens_drawn = 0
        self.tokens_left_out = 0
        self.rank_by = rank_by_of(results.provenance) if results.has_cosine else "score"
        self.helpful, self.harmful = ranked_rows(results.influences, top_k, self.rank_by)
        drawn = set(self.anchor)
        pairs = {(q, t) for table in (self.helpful, self.harmful) for q, g in table.items() if q in drawn
                 for t in g["train_id"]}
        self.per_token = results.per_token_scores(pairs)

    # ---- pieces

    def header_html(self) -> str:
        rows = []
        known = {key for key, _ in HEADER_FIELDS}
        fields = list(HEADER_FIELDS) + [(k, k.replace("_", " ")) for k in self.header if k not in known]
        for key, label in fields:
            value = self.header.get(key)
            value = "unknown" if value is None or str(value) == "" else str(value)
            rows.append(f"<dt>{esc(label)}</dt><dd class=\"mono\">{esc(value)}</dd>")
        rows.append(f"<dt>results</dt><dd class=\"mono\">{esc(self.results_dir)}</dd>")
        cosine = ("<b>cosine</b> = score / √(self-influence of the query × self-influence of the training example), "
                  "in [−1, 1]: comparable across training examples of different lengths and gradient norms."
                  if self.results.has_cosine else "This results directory has no influence_cosine column.")
        per_token = ("Per-token scores are present: each shown training example's tokens are coloured by their "
                     "contribution to the score (see the legend below)." if self.has_per_token else
                     "No per-token scores (run run-query with --per-token-scores to colour tokens).")
        return (
            f"<h1>Influence report</h1><dl class=\"header\">{''.join(rows)}</dl>"
            f"<p class=\"note\"><b>{len(self.query_ids)}</b> queries × <b>{len(self.train_ids)}</b> training "
            f"examples; top {self.top_k} helpful and harmful shown per query.</p>"
            "<p class=\"note\"><b>score</b> &gt; 0: training on the example lowers the query's loss "
            "(<span style=\"color:#1b5e93\">helpful</span>); &lt; 0: it raises the loss "
            f"(<span style=\"color:#b02418\">harmful</span>). {cosine}</p><p class=\"note\">{per_token}</p>"
        )

    def nav_html(self) -> str:
        queries = self.results.queries
        loss = queries["loss"].tolist() if "loss" in queries.columns else [None] * len(self.query_ids)
        items = []
        for query_id, value in zip(self.query_ids, loss, strict=True):
            if query_id not in self.anchor:
                break
            shown = f"{value:.3f}" if _finite(value) else ""
            items.append(f"<li><a href=\"#{self.anchor[query_id]}\" title=\"{esc(query_id)}\">"
                         f"<span class=\"id mono\">{esc(query_id)}</span>"
                         f"<span class=\"loss\">{esc(shown)}</span></a></li>")
        left_out = len(self.query_ids) - len(self.anchor)
        more = f"<p class=\"note\">{left_out} more queries not drawn</p>" if left_out else ""
        heat = "<li><a href=\"#heatmap\">Heatmap</a></li>"
        return (f"<nav><ol><li><a href=\"#top\">Header</a></li>{heat}</ol>"
                f"<h2>Queries (loss)</h2><ol>{''.join(items)}</ol>{more}</nav>")

    def heatmap_html(self) -> str:
        n_queries, n_train = len(self.query_ids), len(self.train_ids)
        title = "<h2>Query × training example</h2>"
        if n_queries == 0 or n_train == 0:
            return f"<section class=\"block\" id=\"heatmap\">{title}<p class=\"note\">No pairs to draw.</p></section>"
        if n_queries > MAX_HEATMAP_SIDE or n_train > MAX_HEATMAP_SIDE:
            return (f"<section class=\"block\" id=\"heatmap\">{title}<p class=\"warn\">Heatmap left out: "
                    f"{n_queries} queries × {n_train} training examples; it is drawn only when both are at most "
                    f"{MAX_HEATMAP_SIDE}. The per-query sections below list the top influences.</p></section>")
        column = "influence_cosine" if self.results.has_cosine else "influence_score"
        frame = self.results.influences.drop_duplicates(["query_id", "train_id"])
        values = frame.pivot(index="query_id", columns="train_id", values=column).reindex(
            index=self.query_ids, columns=self.train_ids)
        scores = frame.pivot(index="query_id", columns="train_id", values="influence_score").reindex(
            index=self.query_ids, columns=self.train_ids)
        finite = values.to_numpy(dtype=float)
        finite = finite[pd.notna(finite)]
        scale = float(abs(finite).max()) if finite.size else 0.0
        show_values = n_train <= HEATMAP_VALUES_UP_TO
        fmt = _cosine if column == "influence_cosine" else _score
        vertical = " vert" if not show_values else ""
        head = "".join(f"<th title=\"{esc(t)}\"><span class=\"mono{vertical}\">{esc(_clip(t, 24))}</span></th>"
                       for t in self.train_ids)
        body = []
        for query_id, row, score_row in zip(self.query_ids, values.to_numpy(dtype=float),
                                            scores.to_numpy(dtype=float), strict=True):
            label = esc(_clip(query_id, 28))
            if query_id in self.anchor:
                label = f"<a href=\"#{self.anchor[query_id]}\">{label}</a>"
            cells = []
            for train_id, value, score in zip(self.train_ids, row, score_row, strict=True):
                tip = f"query {query_id} × train {train_id}\nscore {_score(score)}"
                if column == "influence_cosine":
                    tip += f"\ncosine {_cosine(value)}"
                level = _level(value, scale)
                level = f" class=\"{level}\"" if level else ""
                text = esc(fmt(value)) if show_values else ""
                cells.append(f"<td{level} title=\"{esc(tip)}\">{text}</td>")
            body.append(f"<tr><th class=\"mono\" title=\"{esc(query_id)}\">{label}</th>{''.join(cells)}</tr>")
        what = "influence cosine" if column == "influence_cosine" else "raw influence score (no cosine column)"
        legend = (f"<div class=\"legend\"><span>{esc(fmt(-scale))}</span><span class=\"bar\"></span>"
                  f"<span>{esc(fmt(scale))}</span><span>— colour: {what}, scaled to the largest |value| "
                  f"({esc(fmt(scale))}); rows are queries, columns training examples; hover a cell for its values."
                  "</span></div>")
        values_class = " values" if show_values else ""
        return (f"<section class=\"block\" id=\"heatmap\">{title}{legend}<div class=\"heatwrap\">"
                f"<table class=\"heat{values_class}\"><thead><tr><th class=\"corner\"></th>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table></div></section>")

    def _train_tokens(self, train_id: str) -> list[str] | None:
        if train_id not in self.tokens:
            tokens = None
            if self.has_per_token and train_id in self.train.index:
                try:
                    parsed = json.loads(self.train.at[train_id, "tokens"])
                    tokens = [str(t) for t in parsed] if isinstance(parsed, list) else None
                except (json.JSONDecodeError, TypeError):
                    tokens = None
            self.tokens[train_id] = tokens
        return self.tokens[train_id]

    def tokens_html(self, query_id: str, train_id: str) -> str | None:
        """The training example's tokens coloured by contribution; None when there is nothing to draw."""
        tokens = self._train_tokens(train_id)
        cell = self.per_token.get((query_id, train_id))
        if tokens is None or cell is None:
            return None
        try:
            values = [float(v) for v in json.loads(cell)]
        except (json.JSONDecodeError, TypeError, ValueError):
            return "<div class=\"warn\">per-token scores unreadable for this pair</div>"
        if len(values) != len(tokens):
            return (f"<div class=\"warn\">{len(values)} per-token scores for {len(tokens)} tokens: "
                    "not drawn</div>")
        groups = [g for g in piece_groups(tokens) if g.start < MAX_TOKENS_DRAWN]  # a character's tokens together
        drawn = groups[-1].stop if groups else 0
        if self.tokens_drawn + drawn > MAX_TOKENS_PAGE:
            self.tokens_left_out += 1
            example = self.train.loc[train_id]
            return (_example_text(example["prompt"], example["completion"]) +
                    f"<div class=\"scale\">token colours left out: the page already draws {self.tokens_drawn} "
                    "tokens</div>")
        self.tokens_drawn += drawn
        sums = [sum(values[g.start : g.stop]) for g in groups]
        scale = max((abs(v) for v in sums if math.isfinite(v)), default=0.0)
        spans = []
        for group, value in zip(groups, sums, strict=True):
            token = tokens[group.stop - 1]
            spans.append(f"<span class=\"{_token_classes(token, value, scale)}\" data-v=\"{value:.7g}\"" +
                         (f" data-n=\"{len(group)}\"" if len(group) > 1 else "") +
                         f" title=\"{esc(_token_tip(group, token, values))}\">{esc(_token_text(token))}</span>")
        cut = (f" Only the first {drawn} of {len(tokens)} tokens are drawn." if drawn < len(tokens) else "")
        return (f"<div class=\"tokens\" data-query-id=\"{esc(query_id)}\" data-train-id=\"{esc(train_id)}\" "
                f"data-n-tokens=\"{len(tokens)}\">{''.join(spans)}</div>"
                f"<div class=\"scale\">colour scale ±{scale:.3g} (this example's largest |contribution|)."
                f"{cut}</div>")

    def ranked_html(self, query_id: str, kind: str, rows: pd.DataFrame | None) -> str:
        noun = "cosines" if self.rank_by == "cosine" else "scores"
        label = {"helpful": f"Most helpful (highest positive {noun})",
                 "harmful": f"Most harmful (lowest negative {noun})"}[kind]
        if rows is None or rows.empty:
            none = (f"no training example has a negative {noun[:-1]}" if kind == "harmful"
                    else f"no positive {noun[:-1]}")
            return f"<h3>{label}</h3><p class=\"note\">None: {none}.</p>"
        skip = {"train_id", "prompt", "completion", "tokens"}
        body = []
        for rank, row in enumerate(rows.itertuples(index=False), start=1):
            train_id = row.train_id
            cosine = getattr(row, "influence_cosine", None)
            score = row.influence_score
            if train_id in self.train.index:
                example = self.train.loc[train_id]
                text = self.tokens_html(query_id, train_id) or _example_text(example["prompt"], example["completion"])
                text += _extras(example, skip)
            else:
                text = "<span class=\"note\">(not in train.csv)</span>"
            sign = "pos" if _finite(score) and score > 0 else "neg" if _finite(score) and score < 0 else ""
            cosine_cell = (f"<td class=\"num {sign}\" data-sort=\"{_sort_key(cosine)}\">{_cosine(cosine)}</td>"
                           if self.results.has_cosine else "")
            body.append(
                f"<tr data-train-id=\"{esc(train_id)}\"><td class=\"num\" data-sort=\"{rank}\">{rank}</td>"
                f"<td class=\"mono id\" title=\"{esc(train_id)}\">{esc(train_id)}</td>"
                f"<td class=\"num {sign}\" data-sort=\"{_sort_key(score)}\">{_score(score)}</td>{cosine_cell}"
                f"<td class=\"ex\">{text}</td></tr>"
            )
        cosine_head = "<th>cosine</th>" if self.results.has_cosine else ""
        return (f"<h3>{label}</h3><table class=\"ranked sortable\" data-kind=\"{kind}\" "
                f"data-query-id=\"{esc(query_id)}\"><thead><tr><th>#</th><th>train_id</th><th>score</th>"
                f"{cosine_head}<th>training example</th></tr></thead><tbody>{''.join(body)}</tbody></table>")

    def query_html(self, row: pd.Series) -> str:
        query_id = row["query_id"]
        stats = []
        if _finite(row.get("loss")):
            stats.append(f"loss <b>{row['loss']:.4f}</b> (mean per completion token)")
        if _finite(row.get("loss_sum")):
            stats.append(f"summed loss <b>{row['loss_sum']:.4f}</b>")
        extras = _extras(row, {"query_id", "prompt", "completion", "loss", "loss_sum"})
        text = (f"<div class=\"qtext\"><span class=\"prompt\">{esc(row['prompt'])}</span>"
                f"<span class=\"completion\">{esc(row['completion'])}</span></div>")
        return (
            f"<section class=\"block query\" id=\"{self.anchor[query_id]}\" data-query-id=\"{esc(query_id)}\">"
            f"<h2>Query <code>{esc(query_id)}</code></h2><div class=\"stats\">{' · '.join(stats)}</div>{extras}{text}"
            f"{self.ranked_html(query_id, 'helpful', self.helpful.get(query_id))}"
            f"{self.ranked_html(query_id, 'harmful', self.harmful.get(query_id))}</section>"
        )

    def html(self) -> str:
        sections = [self.query_html(row) for _, row in self.results.queries.iterrows()
                    if row["query_id"] in self.anchor]
        left_out = len(self.query_ids) - len(self.anchor)
        if left_out:
            sections.append(f"<p class=\"warn\">{left_out} of {len(self.query_ids)} queries are not drawn (the first "
                            f"{MAX_QUERY_SECTIONS} are); their scores are in {INFLUENCES_FILE}.</p>")
        token_note = ""
        if self.has_per_token:
            token_note = (
                "<div class=\"legend\"><span>harmful</span><span class=\"bar\"></span><span>helpful</span>"
                f"<span>— token colours: {esc(PER_TOKEN_MEANING)} Colours are normalised <b>per training "
                "example</b> (full colour = that example's largest |contribution|). Hover a token for its value. "
                "A character whose bytes span several tokens is drawn once, on the tokens that complete it, with "
                "their summed contribution (the hover lists each token's own). "
                f"At most {MAX_TOKENS_DRAWN} tokens are drawn per example.</span></div>")
            if self.tokens_left_out:
                token_note += (f"<p class=\"warn\">Token colours left out for {self.tokens_left_out} shown "
                               f"training examples: the page draws at most {MAX_TOKENS_PAGE} tokens.</p>")
        title = f"{REPORT_TITLE}: {self.results_dir.name}"
        css = "\n".join((_asset("report.css"), _level_css("table.heat td", 1.0, white_text_from=7),
                         _level_css(".tokens .tok", 0.75)))
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{css}</style></head><body>{self.nav_html()}"
            f"<main><section id=\"top\">{self.header_html()}{token_note}</section>{self.heatmap_html()}"
            f"{''.join(sections)}</main><script>{_asset('report.js')}</script></body></html>\n"
        )


def write_report(results_dir: str | Path, header: dict | None, top_k: int, results: QueryResults | None = None
                 ) -> Path:
    """Write ``report.html`` into a results directory (atomically) and return its path: the page of ``results``
    (run-query's, in memory) or, when None, of the CSVs the directory holds. ``top_k`` (>= 1, checked by the
    command's config): helpful and harmful examples listed per query."""
    results_dir = Path(results_dir)
    results = read_results(results_dir) if results is None else results
    page = _Page(results, results_dir, dict(header or {}), top_k).html()
    path = write_text_atomic(results_dir / REPORT_FILE, lambda file: file.write(page))
    return path


def report_results_dir(results_dir: Path, factors_dir: Path | None, top_k: int) -> Path:
    """``if-query report``: the page of an existing results directory, its header from the results' run.json
    and, when ``factors_dir`` is given, that fit's model, revision and strategy (which win)."""
    with about("results_dir"):
        if not results_dir.is_dir():
            raise InputError(f"{results_dir}: results directory not found (run run-query first)")
        check_writable_dir(results_dir)  # report.html goes there
        header = {"date": results_date(results_dir), **header_from_run(read_run(results_dir))}
        results = read_results(results_dir)
    if factors_dir is not None:
        with about("factors_dir"):
            header.update(header_from_metadata(read_metadata(factors_dir), factors_dir))
    return write_report(results_dir, {k: v for k, v in header.items() if v is not None}, top_k, results)
