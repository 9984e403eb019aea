"""memory.py: this rank's share of the host, free device memory with cached blocks counted, RAM-backed spill
directories, and an out-of-memory error as one folder's failure (CUDA emulated: no GPU here)."""

import pytest
import torch
from helpers import QUERIES, TRAIN, write_json

from if_query.plan import memory
from if_query.plan.run_plan import resolve_budgets
from if_query.score.engine_scorer import EngineScorer

GB = 10**9


def test_the_host_share_is_divided_among_the_ranks_on_the_host(monkeypatch):
    monkeypatch.setattr(memory, "host_memory_available", lambda: 512 * GB)
    assert resolve_budgets(None, None, torch.device("cpu"), local_ranks=1).host == 256 * GB
    budgets = resolve_budgets(None, None, torch.device("cpu"), local_ranks=8)  # each rank: an eighth of the half
    assert budgets.host == 32 * GB
    assert budgets.workspace_for(0) == 16 * GB  # a quarter of the free RAM, an eighth of it per rank


def test_the_workspace_is_the_same_for_every_folder_whatever_the_allocator_cached(monkeypatch):
    """After a folder, the caching allocator keeps its blocks reserved: mem_get_info calls them used. The
    workspace counts them as free, so the second folder gets the first one's plan."""
    device = torch.device("cuda", 0)
    state = {"free": 54 * GB, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (state["free"], 80 * GB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: state["allocated"])
    monkeypatch.setattr(memory, "host_memory_available", lambda: 512 * GB)
    first = resolve_budgets(None, None, device, 1).workspace_for(0)
    state.update(free=12 * GB, reserved=44 * GB, allocated=2 * GB)  # 42 GB cached but unused after folder 1
    assert resolve_budgets(None, None, device, 1).workspace_for(0) == first == 27 * GB


@pytest.mark.parametrize(("path", "expected"), [("/tmp/spill", "tmpfs"), ("/dev/shm/x", "tmpfs"),
                                                ("/local/nvme/spill", None), ("/", None)])
def test_a_spill_directory_in_ram_is_recognised(path, expected):
    mounts = ("overlay / overlay rw 0 0\ntmpfs /tmp tmpfs rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n"
              "/dev/nvme0n1 /local/nvme ext4 rw 0 0\n")
    assert memory.ram_filesystem(path, mounts) == expected


def test_running_out_of_memory_fails_that_folder_only(cli, tiny_gpt2, fitted, tmp_path, monkeypatch):
    folders = []
    for name in ("a", "b", "c"):
        write_json(tmp_path / name / "train.json", TRAIN)
        write_json(tmp_path / name / "query.json", QUERIES if name != "b" else QUERIES[:1])
        folders.append(tmp_path / name)
    score, released = EngineScorer.score, []

    def score_or_run_out(self, queries, train, *args, **kwargs):
        if len(queries) == 1:  # folder b
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 79.10 GiB of which 3.12 GiB is free.")
        return score(self, queries, train, *args, **kwargs)

    monkeypatch.setattr(EngineScorer, "score", score_or_run_out)
    monkeypatch.setattr("if_query.run.run_query.release_memory", lambda device: released.append(device))
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], *folders, expect=1)
    assert "2 of 3 folders scored, 1 failed" in result.stdout
    [line] = [line for line in result.stderr.splitlines() if "FAILED" in line]
    assert line.startswith(f"{folders[1]}: FAILED: out of memory on cpu (CUDA out of memory. Tried to allocate "
                           "20.00 GiB)") and "--workspace-gb" in line and "--score-batch-size" in line
    assert released == [torch.device("cpu")]
    assert (folders[2] / "results" / "influences.csv").exists() and not (folders[1] / "results").exists()
    single = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json",
                 folders[1] / "train.json", "--query-json", folders[1] / "query.json", "--output-dir",
                 tmp_path / "single", expect=1)
    assert single.stderr.strip().splitlines()[-1].startswith("error: out of memory on cpu")
    assert "Traceback" not in single.stderr
