"""run_plan.py: one plan, made once by rank 0 and followed by every rank (torchrun on CPU, gloo, 2 ranks that read
different free memory); a corpus read once whatever the number of chunks; partial results kept by finished rows,
resumed with another budget and another number of ranks; GB = 10^9 bytes in every command; the README's recipes as
`if-query plan` plans them."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import QUERIES, TRAIN, assert_close_to_largest, killed_at, write_json
from test_plan import OLMO2_13B

from if_query.config import FitConfig, PlanConfig, QueryConfig, ReportConfig, cli_fields
from if_query.data import corpus
from if_query.plan import memory
from if_query.plan.command import make_plans
from if_query.score import engine

TORCHRUN = Path(sys.executable).with_name("torchrun")
PROBE = Path(__file__).with_name("torchrun_probe.py")
WORDS = "the a of in is lives works plays city job Alice Bob Carol Dave Paris Rome Oslo Lima and to".split()
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside the interpreter")


def write_documents(path: Path, count: int) -> Path:
    rng = np.random.default_rng(1)
    path.write_text("".join(json.dumps({"id": f"d{k}", "text": " ".join(rng.choice(WORDS, int(rng.integers(3, 16)))),
                                        "n": k}) + "\n" for k in range(count)))
    return path


def torchrun(tmp_path: Path, free_bytes: int, *arguments, expect: int = 0, **env_vars
             ) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """run-query on 2 ranks through the probe; each rank's record of what it read and did."""
    out = tmp_path / f"probe-{len(list(tmp_path.glob('probe-*')))}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PROBE_FREE_BYTES": str(free_bytes),
           "PROBE_OUT": str(out), **env_vars}
    result = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", str(PROBE), *map(str, arguments)],
                            capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == expect, result.stderr[-3000:]
    return result, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def frame(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "influences.csv", dtype={"train_id": str, "query_id": str})


@needs_torchrun
def test_a_killed_corpus_run_resumes_on_two_ranks_that_read_other_free_memory(cli, tiny_gpt2, fitted, tmp_path,
                                                                                monkeypatch):
    documents = write_documents(tmp_path / "docs.jsonl", 24)
    queries = write_json(tmp_path / "q.json", QUERIES)
    common = ["--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--query-json", queries, "--train-dataset",
              documents, "--max-length", 12]
    cli("run-query", *common, "--output-dir", tmp_path / "whole", "--host-memory-gb", 1, "--quiet")  # at once
    whole = frame(tmp_path / "whole")
    windows = whole["train_id"].nunique()
    # Killed after three chunks: default options, 120 KB free (a 60 KB budget).
    with monkeypatch.context() as patch:
        patch.setattr(memory, "host_memory_available", lambda: 120_000)
        patch.setattr(engine, "score", killed_at(engine.score, 4))
        cli("run-query", *common, "--output-dir", tmp_path / "resumed", expect=1)
    done = np.fromfile(tmp_path / "resumed" / ".if-query-partial" / "done.bin", dtype=np.uint8)[:windows]
    assert 0 < done.sum() < windows
    # Resumed on 2 ranks, default options: rank 0 reads 80 KB free (a 20 KB budget each), rank 1 160 KB, and more
    # on each read.
    result, ranks = torchrun(tmp_path, 80_000, *common, "--output-dir", tmp_path / "resumed")
    assert f"{done.sum()} of {windows} train examples already scored" in result.stderr
    assert len(ranks[0]["reads"]) == 1 and ranks[1]["reads"] == []  # free memory read once, by rank 0
    assert all(rank["scored"] for rank in ranks)  # the chunks were split
    assert sum(ranks[0]["scored"]) + sum(ranks[1]["scored"]) == windows - done.sum()  # each row not done, once
    resumed = frame(tmp_path / "resumed")
    assert (resumed[["query_id", "train_id"]] == whole[["query_id", "train_id"]]).all().all()
    assert_close_to_largest(resumed["influence_score"], whole["influence_score"], 1e-5)
    assert float((resumed["influence_cosine"] - whole["influence_cosine"]).abs().max()) <= 1e-5
    plan = json.loads((tmp_path / "resumed" / "run.json").read_text())["plan"]
    assert plan["host_budget_bytes"] == ranks[0]["reads"][0] // 2 // 2  # half the free RAM, shared by 2 ranks
    assert plan["world_size"] == 2
    assert plan["resumed_rows"] == done.sum() and plan["ranks"].startswith("2 ranks split the chunks")
    assert not (tmp_path / "resumed" / ".if-query-partial").exists()


@needs_torchrun
def test_a_folder_over_the_budget_with_no_train_only_rows_is_scored_by_one_rank(tiny_gpt2, fitted, tmp_path):
    folders = []
    for name, records in (("a", QUERIES), ("b", TRAIN)):  # train = query: nothing to split across ranks
        write_json(tmp_path / name / "train.json", records)
        write_json(tmp_path / name / "query.json", records)
        folders.append(tmp_path / name)
    # 20 KB free on rank 0 (a 10 KB budget): each folder's token factors (about 40 KB) exceed it
    result, ranks = torchrun(tmp_path, 20_000, "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], *folders)
    assert "2 of 2 folders scored" in result.stdout
    assert ranks[0]["captured"] == [len(QUERIES)] and ranks[1]["captured"] == [len(TRAIN)]  # each folder, once
    for folder in folders:
        assert json.loads((folder / "results" / "run.json").read_text())["plan"]["mode"] == "chunks"


@needs_torchrun
def test_a_split_job_that_fails_on_rank_0_alone_fails_on_every_rank(tiny_gpt2, fitted, tmp_path):
    """Rank 0 runs out of memory scoring the train rows that are queries, before the chunk rounds: every rank
    hears of it and gives the folder up, instead of the others waiting in a round rank 0 never joins."""
    rng = np.random.default_rng(3)
    train = TRAIN + [{"pair_id": f"r{k}", "prompt": " ".join(rng.choice(WORDS, 6)), "completion": " Paris."}
                     for k in range(12)]
    write_json(tmp_path / "f" / "train.json", train)
    write_json(tmp_path / "f" / "query.json", QUERIES + TRAIN[:1])  # train rows that are queries: TRAIN[0], [1]
    result, ranks = torchrun(tmp_path, 100_000, "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"],
                             tmp_path / "f", expect=1, PROBE_FAIL_FIRST_SCORE="1")
    assert "2 ranks split the chunks" in result.stderr  # the premise: a split job
    assert "FAILED" in result.stderr and "OutOfMemoryError" in result.stderr
    assert "0 of 1 folders scored, 1 failed" in result.stdout
    assert ranks[1]["scored"] == []  # rank 1 scored no chunk: the failure stopped the job before the rounds


@needs_torchrun
def test_a_split_jobs_counted_bytes_are_every_ranks_and_the_plans(tiny_gpt2, fitted, tmp_path):
    """A job split across 2 ranks, planned as on GPUs that keep the factors, copying through the device path's buffers
    on the CPU, with --refine-steps: run.json's counted bytes are both ranks' summed (each captures and refines the
    queries, each copies the factors once) and equal the plan's, kind by kind."""
    rng = np.random.default_rng(3)
    train = TRAIN + [{"pair_id": f"r{k}", "prompt": " ".join(rng.choice(WORDS, 6)), "completion": " Paris."}
                     for k in range(12)]
    write_json(tmp_path / "f" / "train.json", train)
    write_json(tmp_path / "f" / "query.json", QUERIES)
    result, ranks = torchrun(tmp_path, 100_000, "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"],
                             tmp_path / "f", "--refine-steps", 1, PROBE_STAGED="1")
    assert "2 ranks split the chunks" in result.stderr and all(rank["scored"] for rank in ranks)  # the premise
    plan = json.loads((tmp_path / "f" / "results" / "run.json").read_text())["plan"]
    planned, counted = plan["moved"], dict(plan["moved_counted"])
    assert counted.pop("page_locked_bytes") == plan["page_locked_bytes"]
    assert counted == {key: value for key, value in planned.items() if key != "engine_calls"}, (planned, counted)
    assert counted["refine_bytes_from_device"] > 0 and plan["factors_resident"]


def test_a_corpus_of_hundreds_of_chunks_is_read_and_tokenized_once(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    documents = write_documents(tmp_path / "docs.jsonl", 240)
    reads, tokenized = Counter(), Counter()

    class CountedDocument(corpus.Document):
        def __init__(self, name, *args):
            reads[name] += 1
            super().__init__(name, *args)

    tokenizer_class = type(cli_tokenizer(tiny_gpt2))
    call = tokenizer_class.__call__

    def counting_call(self, text, *args, **kwargs):
        tokenized.update(text if isinstance(text, list) else [text])
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(corpus, "Document", CountedDocument)
    monkeypatch.setattr(tokenizer_class, "__call__", counting_call)
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["identity"], "--query-json",
                 write_json(tmp_path / "q.json", QUERIES[:1]), "--train-dataset", documents, "--output-dir",
                 tmp_path / "out", "--host-memory-gb", 0.00003, "--no-cosine")
    chunks = int(re.search(r"Chunks: \d+ train sequences in (\d+) chunks", result.stderr).group(1))
    assert chunks >= 100
    texts = [json.loads(line)["text"] for line in documents.read_text().splitlines()]
    assert reads == Counter({f"d{k}": 1 for k in range(240)})  # every document read once, train.csv included
    assert all(tokenized[text] == 1 for text in texts)  # and tokenized once
    assert len(pd.read_csv(tmp_path / "out" / "train.csv")) == 240


def cli_tokenizer(model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def test_every_memory_option_counts_gigabytes_of_ten_to_the_nine_bytes(cli, tiny_gpt2, fitted, query_files,
                                                                      tmp_path):
    query = QueryConfig(model="m", factors_dir="f", folders=[Path("x")], host_memory_gb=1, workspace_gb=1)
    plan = PlanConfig(model="m", host_memory_gb=1, workspace_gb=1)
    assert query.host_memory_bytes == query.workspace_bytes == plan.host_memory_bytes == plan.workspace_bytes == 10**9
    for config_class in (FitConfig, QueryConfig, PlanConfig, ReportConfig):
        for spec in cli_fields(config_class):
            if spec.name.endswith("_gb"):
                assert "10^9" in spec.metadata["help"], (config_class.__name__, spec.name)
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json", query_files["train"],
        "--query-json", query_files["query"], "--output-dir", tmp_path / "out", "--host-memory-gb", 1, "--quiet")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["plan"]["host_budget_bytes"] == 10**9
    write_json(tmp_path / "model" / "config.json", OLMO2_13B)
    [(_, job)] = make_plans(PlanConfig(model=str(tmp_path / "model"), sequences=4, host_memory_gb=1,
                                       workspace_gb=1)).folders
    assert job.store.host_budget == job.store.workspace_budget == 10**9


def test_the_readmes_recipes_are_what_if_query_plan_plans(tmp_path):
    """The 8-GPU folder recipe and the 13B corpus recipe: the chunk count and rank split the README quotes."""
    write_json(tmp_path / "model" / "config.json", OLMO2_13B)
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    [(_, folder)] = make_plans(PlanConfig(model=str(tmp_path / "model"), layer_stride=2, sequences=50, tokens=500,
                                          gpus=8, score_batch_size=2)).folders
    assert folder.store.spilled and not folder.chunks and not folder.split
    assert "a folder of 50 × 500 tokens is not split: one rank scores it, its token factors spilled" in readme
    [(_, corpus_job)] = make_plans(PlanConfig(model=str(tmp_path / "model"), layer_stride=2, documents=100_000,
                                              queries=16, tokens=512, gpus=8, host_ram_gb=1000)).folders
    sizes = sorted({len(c.rows) for c in corpus_job.chunks})
    assert corpus_job.split and {c.rank for c in corpus_job.chunks} == set(range(8))
    rounds = -(-len(corpus_job.chunks) // 8)
    assert (f"chunks of {sizes[-1]} documents ({len(corpus_job.chunks):,} chunks, {rounds:,} rounds of 8: chunk k "
            "on rank k mod 8)") in readme
