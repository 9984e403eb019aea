"""report.html: structure checked with the stdlib HTML parser, on real run-query output and on crafted CSVs."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from helpers import QUERIES, TRAIN, assert_close_to_largest, write_json
from transformers import AutoTokenizer

from if_query.demo.run_demo import DEMO_MODEL
from if_query.report.html import MAX_HEATMAP_SIDE, write_report
from if_query.report.results import read_results

TOP_K = 2


class ReportParser(HTMLParser):
    """Collects links, ranked tables (rows and sort keys), token containers (spans) and query sections."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[tuple[str, dict]] = []
        self.sections: list[str] = []
        self.nav_text: list[str] = []
        self.tables: list[dict] = []
        self.tokens: list[dict] = []
        self._in_nav = False
        self._table: dict | None = None
        self._row: dict | None = None
        self._token_box: dict | None = None
        self._span: dict | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        for name, value in attrs:
            if name in ("src", "href", "action", "srcset", "poster", "data"):
                self.urls.append((tag, name, value or ""))
        classes = (attributes.get("class") or "").split()
        if tag == "nav":
            self._in_nav = True
        if tag == "section" and "query" in classes:
            self.sections.append(attributes["data-query-id"])
        if tag == "table" and "ranked" in classes:
            self._table = {"kind": attributes["data-kind"], "query": attributes["data-query-id"], "rows": []}
            self.tables.append(self._table)
        if tag == "tr" and self._table is not None and "data-train-id" in attributes:
            self._row = {"train_id": attributes["data-train-id"], "sort": []}
            self._table["rows"].append(self._row)
        if tag == "td" and self._row is not None:
            self._row["sort"].append(attributes.get("data-sort"))
        if tag == "div" and "tokens" in classes:
            self._token_box = {"query": attributes["data-query-id"], "train": attributes["data-train-id"],
                               "n": int(attributes["data-n-tokens"]), "spans": []}
            self.tokens.append(self._token_box)
        if tag == "span" and self._token_box is not None and "tok" in classes:
            self._span = {"v": float(attributes["data-v"]), "n": int(attributes.get("data-n", 1)),
                          "title": attributes["title"], "text": ""}
            self._token_box["spans"].append(self._span)

    def handle_endtag(self, tag):
        if tag == "nav":
            self._in_nav = False
        if tag == "table":
            self._table = None
        if tag == "tr":
            self._row = None
        if tag == "div":
            self._token_box = None
        if tag == "span":
            self._span = None

    def handle_data(self, data):
        if self._in_nav:
            self.nav_text.append(data)
        if self._span is not None:
            self._span["text"] += data


def parse(path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def assert_offline(parser: ReportParser) -> None:
    """Only in-page anchors: no src/href to any URL, no <link>, no external script."""
    for tag, attribute, value in parser.urls:
        assert value.startswith("#"), f"<{tag} {attribute}={value!r}> is not an in-page anchor"
    assert not [t for t, a in parser.tags if t in ("link", "img", "iframe", "object", "embed")]
    assert not [a for t, a in parser.tags if t == "script" and "src" in a]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, cli, tiny_gpt2, fitted):
    """One run-query --per-token-scores --report on the conftest records, then its CSVs and report."""
    root = tmp_path_factory.mktemp("report")
    files = {"train": write_json(root / "train.json", TRAIN), "query": write_json(root / "query.json", QUERIES)}
    out = root / "results"
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json", files["train"],
        "--query-json", files["query"], "--output-dir", out, "--per-token-scores", "--report", "--top-k", TOP_K,
        "--rank-by", "score", "--quiet")
    read = {"keep_default_na": False, "dtype": {"query_id": str, "train_id": str}}
    return {
        "dir": out,
        "influences": pd.read_csv(out / "influences.csv", **read),
        "train": pd.read_csv(out / "train.csv", **read).set_index("train_id"),
        "report": parse(out / "report.html"),
        "html": (out / "report.html").read_text(encoding="utf-8"),
    }


def test_every_query_has_a_section_and_a_link(scored):
    report = scored["report"]
    ids = [q["pair_id"] for q in QUERIES]
    assert report.sections == ids
    nav = "".join(report.nav_text)
    assert all(query_id in nav for query_id in ids)
    anchors = {value for _, attribute, value in report.urls if attribute == "href"}
    assert {f"#q-{i}" for i in range(len(ids))} <= anchors
    for query_id in ids:
        assert f'data-query-id="{query_id}"' in scored["html"]


def test_top_lists_match_the_csv_and_are_ordered(scored):
    influences = scored["influences"]
    tables = {(t["query"], t["kind"]): t for t in scored["report"].tables}
    assert len(tables) == 2 * len(QUERIES)
    for query in QUERIES:
        rows = influences[influences["query_id"] == query["pair_id"]]
        expected = {
            "helpful": rows[rows["influence_score"] > 0].sort_values("influence_score", ascending=False),
            "harmful": rows[rows["influence_score"] < 0].sort_values("influence_score"),
        }
        for kind, frame in expected.items():
            shown = tables[(query["pair_id"], kind)]["rows"]
            assert [r["train_id"] for r in shown] == frame["train_id"].head(TOP_K).tolist()
            scores = [float(r["sort"][2]) for r in shown]  # columns: rank, train_id, score, cosine, example
            cosines = [float(r["sort"][3]) for r in shown]
            assert scores == sorted(scores, reverse=(kind == "helpful"))
            assert all(s > 0 for s in scores) if kind == "helpful" else all(s < 0 for s in scores)
            assert scores == pytest.approx(frame["influence_score"].head(TOP_K).tolist())
            assert cosines == pytest.approx(frame["influence_cosine"].head(TOP_K).tolist())
            assert [int(r["sort"][0]) for r in shown] == list(range(1, len(shown) + 1))


def test_token_spans_map_one_to_one_to_tokens(scored):
    report, influences, train = scored["report"], scored["influences"], scored["train"]
    per_token = {(r.query_id, r.train_id): json.loads(r.per_token_scores) for r in influences.itertuples()}
    shown = [(t["query"], row["train_id"]) for t in report.tables for row in t["rows"]]
    assert shown and sorted(shown) == sorted((box["query"], box["train"]) for box in report.tokens)
    for box in report.tokens:
        tokens = json.loads(train.loc[box["train"], "tokens"])
        values = per_token[(box["query"], box["train"])]
        assert len(box["spans"]) == len(tokens) == box["n"] == len(values)
        assert [s["v"] for s in box["spans"]] == pytest.approx(values, rel=1e-6, abs=1e-30)
        for span, token, value in zip(box["spans"], tokens, values, strict=True):
            assert f"{value:+.4g}" in span["title"]
            assert json.dumps(token, ensure_ascii=False) in span["title"]
            assert span["text"] == (token.replace("\n", "↵\n") if token else "∅")


def test_characters_split_over_tokens_are_shown_whole_in_train_csv_and_the_report(cli, tmp_path):
    """The demo's byte-level BPE writes é as two tokens and 🙂 as four: train.csv's tokens give "" to a token ending
    inside a character and the whole character to the token completing it (joining to the record's text, one per
    per-token score), and the report draws the character once with its tokens' summed score, never U+FFFD."""
    model = Path(str(DEMO_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(model)
    for text in ("Le café", " 🙂."):  # the premise: a character's bytes span several tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)
    train = [{"pair_id": "cafe", "prompt": "Le café", "completion": " 🙂."},
             {"pair_id": "plain", "prompt": "Thotro Hand lives in", "completion": " Drellport."}]
    files = {"train": write_json(tmp_path / "train.json", train),
             "query": write_json(tmp_path / "query.json", [{**train[0], "pair_id": "q"}])}
    cli("fit-hessians", "--model", model, "--hessian-dataset", files["train"], "--output-dir", tmp_path / "factors",
        "--strategy", "identity", "--fisher", "empirical", "--dtype", "float32", "--quiet")
    out = tmp_path / "results"
    cli("run-query", "--model", model, "--factors-dir", tmp_path / "factors", "--train-json", files["train"],
        "--query-json", files["query"], "--output-dir", out, "--per-token-scores", "--report", "--dtype", "float32",
        "--quiet")
    assert "\ufffd" not in (out / "train.csv").read_text(encoding="utf-8")
    assert "\ufffd" not in (out / "report.html").read_text(encoding="utf-8")
    read = {"keep_default_na": False, "dtype": {"query_id": str, "train_id": str}}
    tokens = {r.train_id: json.loads(r.tokens) for r in pd.read_csv(out / "train.csv", **read).itertuples()}
    for record in train:
        assert "".join(tokens[record["pair_id"]]) == record["prompt"] + record["completion"] + tokenizer.eos_token
    values = {r.train_id: json.loads(r.per_token_scores) for r in pd.read_csv(out / "influences.csv", **read)
              .itertuples()}
    assert all(len(values[t]) == len(tokens[t]) for t in tokens)

    [box] = [box for box in parse(out / "report.html").tokens if box["train"] == "cafe"]
    pieces, scores = tokens["cafe"], values["cafe"]
    assert box["n"] == len(pieces) and [s["text"] for s in box["spans"]] == [p for p in pieces if p]
    sums, total = [], 0.0  # each drawn piece: its token's score plus those of the "" tokens just before it
    for piece, score in zip(pieces, scores, strict=True):
        total += score
        if piece:
            sums.append(total)
            total = 0.0
    assert_close_to_largest([s["v"] for s in box["spans"]], sums, 1e-6)
    drawn = {s["text"]: s for s in box["spans"]}
    assert drawn["é"]["n"] == 2 and drawn["🙂"]["n"] == 4 and "the sum of its 4 tokens" in drawn["🙂"]["title"]
    assert drawn["🙂"]["v"] != pytest.approx(scores[pieces.index("🙂")], rel=1e-3)  # summed, not its last token's


def test_report_is_self_contained(scored):
    assert_offline(scored["report"])
    html = scored["html"]
    assert "url(" not in html and "@import" not in html and "://" not in html  # nor in the CSS
    assert "<style>" in scored["html"] and "<script>" in scored["html"]


def test_report_command_rewrites_with_factors_header(cli, scored, fitted, tiny_gpt2):
    result = cli("report", scored["dir"], "--factors-dir", fitted["kfac"], "--top-k", 1)
    assert str(scored["dir"] / "report.html") in result.stdout
    report = parse(scored["dir"] / "report.html")
    html = (scored["dir"] / "report.html").read_text(encoding="utf-8")
    assert all(len(t["rows"]) <= 1 for t in report.tables)
    assert str(tiny_gpt2) in html and ">kfac<" in html and str(fitted["kfac"]) in html
    assert not list(scored["dir"].glob(".*.tmp"))
    assert_offline(report)


@pytest.mark.parametrize("layout", ["no-dir", "no-influences", "bad-columns"])
def test_report_on_missing_results_exits_2_with_one_line(cli, tmp_path, layout):
    target = tmp_path / "results"
    if layout != "no-dir":
        target.mkdir()
        (target / "query.csv").write_text("query_id,prompt,completion\nq,a,b\n")
        (target / "train.csv").write_text("train_id,prompt,completion\nt,a,b\n")
        if layout == "bad-columns":
            (target / "influences.csv").write_text("a,b\n1,2\n")
    result = cli("report", target, expect=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (target / "report.html").exists()


def test_run_query_report_and_terminal_summary(cli, tiny_gpt2, fitted, query_files, tmp_path):
    out = tmp_path / "results"
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], "--train-json",
                 query_files["train"], "--query-json", query_files["query"], "--output-dir", out, "--report",
                 "--top-k", 3)
    assert (out / "report.html").is_file()
    assert str(out / "report.html") in result.stdout
    for query in QUERIES:
        assert f"query {query['pair_id']} (loss" in result.stdout
    assert "most helpful" in result.stdout
    report = parse(out / "report.html")
    assert report.sections == [q["pair_id"] for q in QUERIES]
    assert not report.tokens  # no per-token scores, so plain text
    html = (out / "report.html").read_text(encoding="utf-8")
    assert ">identity<" in html and str(fitted["identity"]) in html

    quiet = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], "--train-json",
                query_files["train"], "--query-json", query_files["query"], "--output-dir", tmp_path / "q", "--quiet")
    assert quiet.stdout == "" and not (tmp_path / "q" / "report.html").exists()


def write_csvs(directory, queries, train, influences):
    directory.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(queries).to_csv(directory / "query.csv", index=False)
    pd.DataFrame(train).to_csv(directory / "train.csv", index=False)
    pd.DataFrame(influences).to_csv(directory / "influences.csv", index=False)


def test_text_is_escaped_and_ids_stay_strings(tmp_path):
    evil = '<script>alert("x")</script><img src="https://example.com/a.png">'
    queries = [{"query_id": "007", "prompt": evil, "completion": " & more", "loss": 1.5, "loss_sum": 3.0}]
    train = [{"train_id": "NA", "prompt": evil, "completion": "</td></table>"},
             {"train_id": "0.10", "prompt": "", "completion": "plain"}]
    influences = [{"query_id": "007", "train_id": "NA", "influence_score": -2.0, "influence_cosine": -0.5},
                  {"query_id": "007", "train_id": "0.10", "influence_score": 3.0, "influence_cosine": 0.25}]
    write_csvs(tmp_path, queries, train, influences)
    path = write_report(tmp_path, {"model": "<b>m</b>"}, top_k=5)
    html = path.read_text(encoding="utf-8")
    report = parse(path)
    assert "<script>alert" not in html and "<img" not in html and "<b>m</b>" not in html
    assert "&lt;b&gt;m&lt;/b&gt;" in html
    assert report.sections == ["007"]
    tables = {t["kind"]: [r["train_id"] for r in t["rows"]] for t in report.tables}
    assert tables == {"helpful": ["0.10"], "harmful": ["NA"]}
    assert html.count(">unknown<") == 4  # revision, strategy, factors dir and date were not given
    assert_offline(report)


def test_large_runs_leave_the_heatmap_out_and_say_so(tmp_path):
    n_train = MAX_HEATMAP_SIDE + 1
    queries = [{"query_id": "q", "prompt": "p", "completion": "c", "loss": 1.0, "loss_sum": 1.0}]
    train = [{"train_id": f"t{i}", "prompt": "p", "completion": "c"} for i in range(n_train)]
    influences = [{"query_id": "q", "train_id": f"t{i}", "influence_score": i - 100.5, "influence_cosine": 0.0}
                  for i in range(n_train)]
    write_csvs(tmp_path, queries, train, influences)
    html = write_report(tmp_path, None, top_k=3).read_text(encoding="utf-8")
    assert "Heatmap left out" in html and f"{n_train} training examples" in html
    assert 'class="heat' not in html
    report = parse(tmp_path / "report.html")
    tables = {t["kind"]: [r["train_id"] for r in t["rows"]] for t in report.tables}
    assert tables == {"helpful": ["t200", "t199", "t198"], "harmful": ["t0", "t1", "t2"]}


def test_read_results_keeps_cells_as_written_and_per_token_scores_on_disk(tmp_path):
    """The one reader (report and summary): extras as text, losses and scores as floats, per-token cells on demand."""
    queries = [{"query_id": "007", "prompt": "p", "completion": "c", "loss": "1.50", "loss_sum": "x", "n": "0010"}]
    train = [{"train_id": "NA", "prompt": "p", "completion": "c", "tokens": '["p", "c"]', "v": "3.0"}]
    influences = [{"query_id": "007", "train_id": "NA", "influence_score": "-2.50", "per_token_scores": "[-1, -1.5]"}]
    write_csvs(tmp_path, queries, train, influences)
    results = read_results(tmp_path)
    assert results.queries.loc[0, "n"] == "0010" and results.train.loc[0, "v"] == "3.0"
    assert results.queries.loc[0, "loss"] == 1.5 and pd.isna(results.queries.loc[0, "loss_sum"])
    assert results.influences["influence_score"].tolist() == [-2.5] and results.provenance is None
    assert "per_token_scores" not in results.influences.columns and results.has_per_token and not results.has_cosine
    assert results.per_token_scores({("007", "NA"), ("007", "other")}) == {("007", "NA"): "[-1, -1.5]"}
