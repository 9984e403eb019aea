"""--rank-by: one ranking (cosine by default, score under --no-cosine) for the terminal summary, report.html and
--top-train, recorded in run.json and reused by `if-query report`."""

import json

import pandas as pd
from helpers import QUERIES, TRAIN, assert_one_line_error, write_json

# q2 is t2 word for word (cosine +1); the long examples have large gradients, so their raw scores can lead.
LONG = [{"pair_id": f"long{k}", "prompt": "Bob works as a",
         "completion": " doctor and a pilot in Rome, Paris and Berlin," * (6 + k)} for k in range(3)]


def scored(cli, model, factors, tmp_path, name, *options, expect=0):
    out = tmp_path / name
    result = cli("run-query", "--model", model, "--factors-dir", factors, "--query-json",
                 write_json(tmp_path / "q.json", [QUERIES[1]]), "--train-json",
                 write_json(tmp_path / "t.json", TRAIN + LONG), "--output-dir", out, "--report", "--top-k", 2,
                 *options, expect=expect)
    return out, result


def summary_helpful(stdout: str) -> list[str]:
    """The train ids of the summary's "most helpful" list."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("most helpful"))
    ids = []
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        ids.append(line.split(": ")[0].split()[-1])
    return ids


def report_helpful(out) -> list[str]:
    html = (out / "report.html").read_text(encoding="utf-8")
    table = html.split('data-kind="helpful"', 1)[1].split("</table>", 1)[0]
    return [part.split('"', 1)[0] for part in table.split('<tr data-train-id="')[1:]]


def test_the_summary_the_report_and_top_train_rank_by_cosine_by_default(cli, tiny_gpt2, fitted, tmp_path):
    out, result = scored(cli, tiny_gpt2, fitted["ekfac"], tmp_path, "cosine")
    influences = pd.read_csv(out / "influences.csv", dtype={"train_id": str})
    by_score = influences.sort_values(["influence_score", "train_id"], ascending=[False, True])["train_id"].tolist()
    by_cosine = influences.sort_values(["influence_cosine", "train_id"], ascending=[False, True])["train_id"].tolist()
    assert by_cosine[0] == "t2" and by_score[0] != "t2"  # the premise: the two rankings disagree at the top
    assert json.loads((out / "run.json").read_text())["rank_by"] == "cosine"
    assert summary_helpful(result.stdout) == by_cosine[:2]
    assert report_helpful(out) == by_cosine[:2]
    cli("report", out, "--top-k", 2)  # regenerated: ranked as run.json says
    assert report_helpful(out) == by_cosine[:2]

    kept, _ = scored(cli, tiny_gpt2, fitted["ekfac"], tmp_path, "kept", "--top-train", 1)
    lowest = influences.sort_values(["influence_cosine", "train_id"])["train_id"].iloc[0]
    assert set(pd.read_csv(kept / "influences.csv", dtype={"train_id": str})["train_id"]) == {"t2", lowest}

    score, result = scored(cli, tiny_gpt2, fitted["ekfac"], tmp_path, "score", "--rank-by", "score")
    assert json.loads((score / "run.json").read_text())["rank_by"] == "score"
    assert summary_helpful(result.stdout) == by_score[:2]
    assert report_helpful(score) == by_score[:2]


def test_no_cosine_ranks_by_score_and_refuses_rank_by_cosine(cli, tiny_gpt2, fitted, tmp_path):
    out, result = scored(cli, tiny_gpt2, fitted["ekfac"], tmp_path, "plain", "--no-cosine")
    assert json.loads((out / "run.json").read_text())["rank_by"] == "score"
    influences = pd.read_csv(out / "influences.csv", dtype={"train_id": str})
    by_score = influences.sort_values(["influence_score", "train_id"], ascending=[False, True])["train_id"].tolist()
    assert summary_helpful(result.stdout) == by_score[:2]
    _, refused = scored(cli, tiny_gpt2, fitted["ekfac"], tmp_path, "refused", "--no-cosine", "--rank-by", "cosine",
                        expect=2)
    assert_one_line_error(refused, 2, "--rank-by", "--no-cosine")


def test_skip_done_scores_again_when_the_ranking_changes(cli, tiny_gpt2, fitted, tmp_path):
    folder = tmp_path / "f"
    write_json(folder / "train.json", TRAIN)
    write_json(folder / "query.json", QUERIES)
    command = ("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], folder, "--skip-done")
    cli(*command, "--quiet")
    assert "f: skipped" in cli(*command, "--rank-by", "cosine").stdout  # the default, spelled out
    again = cli(*command, "--rank-by", "score")
    assert f"Scoring {folder} again: scored with other rank-by ('cosine', now 'score')" in again.stderr
