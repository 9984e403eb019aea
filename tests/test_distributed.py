"""distributed.py under a torchrun that is emulated: CUDA calls recorded instead of made (no GPU here)."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from if_query import distributed
from if_query.kron import fit as kron_fit
from if_query.model import loading


@pytest.fixture
def rank_3_of_8(monkeypatch):
    """The environment of torchrun's rank 3 of 8 on a CUDA host; records set_device and init_process_group."""
    calls = []
    for key, value in {"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init_process_group", kwargs)))
    return calls


def test_the_nccl_group_is_started_on_the_ranks_gpu_with_a_long_timeout(rank_3_of_8):
    gpu = torch.device("cuda", 3)
    assert distributed.device() == gpu
    distributed.start_data_parallel()
    assert rank_3_of_8 == [("set_device", gpu), ("init_process_group", {
        "backend": "nccl", "timeout": distributed.PROCESS_GROUP_TIMEOUT, "device_id": gpu})]
    # rank 0 alone eigendecomposes 120 matrices (up to 13824²) and writes ~52 GB while the others wait
    assert distributed.PROCESS_GROUP_TIMEOUT >= timedelta(days=1)


def test_the_analyzer_is_made_after_the_group_is_started(rank_3_of_8, monkeypatch, tmp_path):
    order = []
    monkeypatch.setattr(kron_fit, "start_data_parallel", lambda: order.append("group"))
    monkeypatch.setattr(kron_fit, "Analyzer", lambda **kwargs: order.append("analyzer"))
    kron_fit.make_analyzer(tmp_path / "factors", torch.nn.Linear(2, 2), None, quiet=True)
    assert order == ["group", "analyzer"]


def test_fit_hessians_sets_the_ranks_gpu_and_starts_its_group_before_the_model_loads(rank_3_of_8, monkeypatch,
                                                                                       tiny_gpt2, tmp_path):
    """Loading first would make a CUDA context on GPU 0 in every rank: the rank's device is chosen first."""
    from helpers import TRAIN, write_json

    from if_query.config import FitConfig
    from if_query.fit.fit_hessians import fit_hessians

    class Loaded(Exception):
        pass

    def load_model(*args, **kwargs):
        rank_3_of_8.append(("load_model", None))
        raise Loaded

    monkeypatch.setattr(loading, "load_model", load_model)
    data = write_json(tmp_path / "hessian.json", TRAIN)
    with pytest.raises(Loaded):
        fit_hessians(FitConfig(model=str(tiny_gpt2), hessian_dataset=str(data), output_dir=str(tmp_path / "f")),
                     quiet=True)
    assert [name for name, _ in rank_3_of_8] == ["set_device", "init_process_group", "load_model"]
    assert rank_3_of_8[0] == ("set_device", torch.device("cuda", 3))


def test_run_query_with_kronfluence_starts_its_group_before_the_model_loads(rank_3_of_8, monkeypatch, cli, tiny_gpt2,
                                                                            fitted, query_files, tmp_path):
    from if_query.run import compatibility

    class Loaded(Exception):
        pass

    def load_model(*args, **kwargs):
        rank_3_of_8.append(("load_model", None))
        raise Loaded

    monkeypatch.setattr(compatibility, "load_model", load_model)
    result = cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json",
                 query_files["train"], "--query-json", query_files["query"], "--output-dir", tmp_path / "out",
                 "--engine", "kronfluence", "--quiet", expect=None)
    assert result.exit_code == 1 and "Loaded" in result.stderr  # it stopped where the model loads
    assert [name for name, _ in rank_3_of_8] == ["set_device", "init_process_group", "load_model"]


def test_kronfluences_state_reuses_an_initialised_group(monkeypatch, tmp_path):
    """What start_data_parallel relies on: Kronfluence's State starts no group of its own when one exists."""
    from kronfluence.utils.state import State

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    State._reset_state()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a second process group"))
            state = State()
        assert state.num_processes == 1 and state.device == torch.device("cuda", 0)
    finally:
        State._reset_state()
        dist.destroy_process_group()


def test_each_rank_loads_its_model_straight_onto_its_gpu(rank_3_of_8, monkeypatch):
    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs)
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    loading.load_model("some/model", None, torch.bfloat16)
    assert seen["device_map"] == {"": torch.device("cuda", 3)} and seen["dtype"] == torch.bfloat16
