"""if-query's lambda stage against Kronfluence's own: same files, same values, resumable, data-parallel."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import fit_args, save_tiny_model
from safetensors import safe_open

from if_query.fit import lambda_stage

LAMBDA_FILE = "lambda_matrix.safetensors"


def lambda_files(directory: Path) -> dict[str, tuple[dict, dict]]:
    """{file name: ({module: tensor}, safetensors metadata)} of the lambda stage's safetensors files."""
    out = {}
    for path in sorted((directory / "factors_hessian").glob("*.safetensors")):
        if path.name.startswith(("lambda_matrix", "num_lambda_processed")):
            with safe_open(str(path), framework="pt") as file:
                out[path.name] = ({key: file.get_tensor(key) for key in file.keys()}, file.metadata())
    return out


def kronfluence_lambda(model_dir: Path, data: Path, fitted: Path, out: Path, args: list[str]) -> Path:
    """Kronfluence's own lambda stage (its ``fit_lambda_matrices``) on ``fitted``'s covariances and
    eigenvectors, with the model, task, data order and factor arguments fit-hessians uses."""
    from kronfluence.utils.dataset import DataLoaderKwargs

    from if_query.config import FitConfig
    from if_query.data.hessian_data import load_hessian_examples
    from if_query.data.tokenization import Collator, ExampleTokenizer
    from if_query.kron.factors import FACTORS_NAME
    from if_query.kron.fit import CompletionLossTask, factor_arguments, make_analyzer, wrap_tracked_modules
    from if_query.model.loading import load_model, load_tokenizer
    from if_query.model.tracking import find_tracked_modules, make_trackable

    shutil.copytree(fitted, out)
    for path in (out / "factors_hessian").iterdir():
        if path.name.startswith(("lambda_matrix", "num_lambda_processed", "lambda_dataset", "factor_arguments")):
            path.unlink()
    options = dict(zip(args[::2], args[1::2], strict=True))
    config = FitConfig(model=str(model_dir), hessian_dataset=str(data), output_dir=str(out),
                       strategy=options.get("--strategy", "ekfac"), fisher=options.get("--fisher", "true"),
                       seed=int(options.get("--seed", 0)),
                       module_partitions=int(options.get("--module-partitions", 1)),
                       track=options.get("--track", "mlp"))
    tokenizer = load_tokenizer(config.model)
    examples = sorted(load_hessian_examples(config.hessian_dataset, ExampleTokenizer(tokenizer, 512), None), key=len)
    model = load_model(config.model, None, torch.float32)
    modules = find_tracked_modules(model, 1, config.track)
    model = make_trackable(model, modules)
    task = CompletionLossTask([m.name for m in modules], seed=config.seed)
    task.set_stage("lambda")
    model = wrap_tracked_modules(model, task)
    analyzer = make_analyzer(out, model, task, quiet=True)
    analyzer.fit_lambda_matrices(FACTORS_NAME, examples, per_device_batch_size=3,
                                 dataloader_kwargs=DataLoaderKwargs(collate_fn=Collator(tokenizer.pad_token_id)),
                                 factor_args=factor_arguments(
                                     config.strategy, config.fisher == "empirical", config.module_partitions,
                                     getattr(torch, config.eigendecomposition_dtype)))
    return out


def assert_lambdas_match(ours: dict, theirs: dict, tolerance: float = 1e-5) -> None:
    assert set(ours) == set(theirs) and LAMBDA_FILE in ours
    for name, (tensors, metadata) in theirs.items():
        assert ours[name][1] == metadata, name
        assert set(ours[name][0]) == set(tensors), name
        for module, reference in tensors.items():
            value = ours[name][0][module]
            assert value.dtype == reference.dtype and value.shape == reference.shape, (name, module)
            if reference.dtype == torch.int64:
                assert value.equal(reference), (name, module)
            else:
                error = float((value - reference).abs().max() / reference.abs().max())
                assert error <= tolerance, (name, module, error)


@pytest.fixture(scope="module")
def tiny_olmo2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-olmo2"), "olmo2")


CASES = [  # (family, options): EK-FAC with bias (GPT-2) and without (OLMo-2), diagonal, both Fishers, all linear layers
    ("gpt2", ["--strategy", "ekfac", "--fisher", "true"]),
    ("olmo2", ["--strategy", "ekfac", "--fisher", "true", "--seed", "3"]),
    ("gpt2", ["--strategy", "diagonal", "--fisher", "true"]),
    ("gpt2", ["--strategy", "ekfac", "--fisher", "empirical"]),
    ("olmo2", ["--strategy", "ekfac", "--fisher", "true", "--module-partitions", "2"]),
    ("gpt2", ["--strategy", "ekfac", "--fisher", "empirical", "--track", "all-linear"]),
]


@pytest.mark.parametrize(("family", "options"), CASES, ids=[f"{f}-{'-'.join(o[1::2])}" for f, o in CASES])
def test_lambda_equals_kronfluences(cli, tiny_gpt2, tiny_olmo2, fitted, tmp_path, family, options):
    model = tiny_gpt2 if family == "gpt2" else tiny_olmo2
    cli(*fit_args(model, fitted["data"], tmp_path / "ours", *options))
    theirs = kronfluence_lambda(model, fitted["data"], tmp_path / "ours", tmp_path / "theirs", options)
    ours_files, theirs_files = lambda_files(tmp_path / "ours"), lambda_files(theirs)
    assert_lambdas_match(ours_files, theirs_files)
    for name in ("lambda_dataset_metadata.json", "factor_arguments.json"):
        assert (json.loads((tmp_path / "ours" / "factors_hessian" / name).read_text())
                == json.loads((theirs / "factors_hessian" / name).read_text()))
    if "--module-partitions" in options:
        assert any("module_partition1" in name for name in ours_files)
    if "true" in options:  # the comparison can tell the labels apart: the data's labels give another lambda
        kronfluence_lambda(model, fitted["data"], tmp_path / "ours", tmp_path / "theirs-empirical",
                           [*options[:2], "--fisher", "empirical"])
        other = lambda_files(tmp_path / "theirs-empirical")[LAMBDA_FILE][0]
        module = next(iter(other))
        reference = theirs_files[LAMBDA_FILE][0][module]
        assert float((other[module] - reference).abs().max() / reference.abs().max()) > 1e-2


@pytest.mark.parametrize("partitions", ["1", "2"])
def test_interrupted_lambda_stage_resumes_to_the_same_files(cli, tiny_gpt2, fitted, tmp_path, monkeypatch,
                                                           partitions):
    args = ("--module-partitions", partitions)
    cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "whole", *args))
    original = lambda_stage.forward_backward
    calls = []
    stop_at = 2 if partitions == "1" else 5  # mid-stage; with 2 groups of 3 batches: the second group's 2nd

    def interrupt(*positional, **keywords):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return original(*positional, **keywords)

    with monkeypatch.context() as patch:
        patch.setattr(lambda_stage, "forward_backward", interrupt)
        result = cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "resumed", *args), expect=None)
    assert result.exit_code == 130
    left = sorted(p.name for p in (tmp_path / "resumed" / "factors_hessian").iterdir())
    assert not [name for name in left if name.endswith(".tmp")]
    lambdas = {name for name in left if name.startswith(("lambda_matrix", "num_lambda"))}
    if partitions == "1":
        assert not lambdas
    else:  # the first group is kept and not recomputed
        assert lambdas == {"lambda_matrix_data_partition0_module_partition0.safetensors",
                           "num_lambda_processed_data_partition0_module_partition0.safetensors"}
    calls.clear()
    with monkeypatch.context() as patch:
        patch.setattr(lambda_stage, "forward_backward", interrupt)
        stop_at = 0
        cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "resumed", *args))
    assert len(calls) == 3  # 7 examples in batches of 3, once: the whole stage, or only the missing group
    whole, resumed = lambda_files(tmp_path / "whole"), lambda_files(tmp_path / "resumed")
    assert set(whole) == set(resumed)
    for name, (tensors, metadata) in whole.items():
        assert resumed[name][1] == metadata
        for module, value in tensors.items():
            torch.testing.assert_close(resumed[name][0][module], value, rtol=0, atol=0)
    if partitions == "2":  # no metadata on the aggregated file: byte-identical
        assert ((tmp_path / "whole" / "factors_hessian" / LAMBDA_FILE).read_bytes()
                == (tmp_path / "resumed" / "factors_hessian" / LAMBDA_FILE).read_bytes())


def _tracked(model_dir: Path):
    from if_query.data.tokenization import Collator, ExampleTokenizer
    from if_query.model.loading import load_model, load_tokenizer
    from if_query.model.tracking import find_tracked_modules, make_trackable

    model = load_model(str(model_dir), None, torch.float32)
    modules = find_tracked_modules(model, 1)
    model = make_trackable(model, modules)
    linears = {m.name: model.get_submodule(m.name) for m in modules}
    tokenizer = ExampleTokenizer(load_tokenizer(str(model_dir)), 512).tokenizer  # sets the padding token
    return model, linears, Collator(tokenizer.pad_token_id)


def _examples(model_dir: Path, data: Path):
    from if_query.data.hessian_data import load_hessian_examples
    from if_query.data.tokenization import ExampleTokenizer
    from if_query.model.loading import load_tokenizer

    tokenizer = ExampleTokenizer(load_tokenizer(str(model_dir)), 512)
    return sorted(load_hessian_examples(str(data), tokenizer, None), key=len)


def _rank_worker(rank: int, world: int, model_dir: str, data: str, factors: str, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, linears, collate = _tracked(Path(model_dir))
        state = SimpleNamespace(process_index=rank, num_processes=world, use_distributed=True,
                                device=torch.device("cpu"))
        lambdas = lambda_stage.lambda_group(model, linears, Path(factors), True, _examples(Path(model_dir), Path(data)),
                                            2, collate, state, lambda_stage.sampled_loss(0))
        if rank == 0:
            torch.save(lambdas, out)
    finally:
        dist.destroy_process_group()


def test_ranks_share_the_examples_and_sum_onto_rank_0(tiny_gpt2, fitted, tmp_path):
    """torchrun's path on CPU (gloo instead of NCCL): 2 ranks, each half of the examples, summed on rank 0,
    equal one process's lambda."""
    import torch.multiprocessing as mp

    factors = fitted["ekfac"] / "factors_hessian"
    context = mp.get_context("spawn")
    env_backup = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        processes = [context.Process(target=_rank_worker, args=(rank, 2, str(tiny_gpt2), str(fitted["data"]),
                                                                str(factors), str(tmp_path / "store"),
                                                                str(tmp_path / "summed.pt")))
                     for rank in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=300)
    finally:
        for key, value in env_backup.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert [p.exitcode for p in processes] == [0, 0]
    summed = torch.load(tmp_path / "summed.pt")
    model, linears, collate = _tracked(tiny_gpt2)
    examples = _examples(tiny_gpt2, fitted["data"])
    state = SimpleNamespace(process_index=0, num_processes=1, use_distributed=False, device=torch.device("cpu"))
    single = lambda_stage.lambda_group(model, linears, factors, True, examples, 2, collate, state,
                                       lambda_stage.sampled_loss(0))
    assert set(summed) == set(single)
    for name, value in single.items():
        torch.testing.assert_close(summed[name], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()))
    assert lambda_stage.shard(list(range(7)), 1, 2) == [1, 3, 5]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [3, 60])  # short: token vectors rotated; long: summed gradients rotated
def test_both_rotation_orders_give_kronfluences_formula(bias, tokens):
    """Kronfluence's update (factor/tracker: (Q_gᵀ ∇W Q_a)² summed over examples, ∇W = einsum of the padded
    batch) against the accumulator, for both orders it may choose."""
    torch.manual_seed(0)
    out, inp, batch = 12, 7, 3
    linear = torch.nn.Linear(inp, out, bias=bias)
    width = inp + int(bias)
    q_a = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))[0].float()
    q_g = torch.linalg.qr(torch.randn(out, out, dtype=torch.float64))[0].float()
    lengths = [tokens, tokens - 2, 1]
    inputs = torch.randn(batch, tokens, inp)
    output_grads = torch.randn(batch, tokens, out)
    for row, length in enumerate(lengths):
        output_grads[row, length:] = 0  # right padding: no output gradient
    rotate_tokens = tokens * (out**2 + width**2) <= out * width * (out + width)
    assert rotate_tokens == (tokens == 3)
    for eigenvectors in ((q_a, q_g), None):
        accumulator = lambda_stage._Accumulator(linear, eigenvectors, torch.device("cpu"))
        accumulator.add(inputs, output_grads, lengths)
        padded = torch.cat([inputs, torch.ones(batch, tokens, 1)], dim=-1) if bias else inputs
        gradients = torch.einsum("b...i,b...o->bio", output_grads.double(), padded.double())  # (batch, out, in')
        if eigenvectors is not None:
            gradients = q_g.double().T @ gradients @ q_a.double()
        expected = gradients.square().sum(dim=0).float()
        torch.testing.assert_close(accumulator.value, expected, rtol=1e-5, atol=1e-6 * float(expected.max()))


def test_eigendecomposition_dtype_option(cli, tiny_gpt2, fitted, tmp_path):
    out = tmp_path / "f"
    cli(*fit_args(tiny_gpt2, fitted["data"], out, "--eigendecomposition-dtype", "float32"))
    arguments = json.loads((out / "factors_hessian" / "factor_arguments.json").read_text())
    assert arguments["eigendecomposition_dtype"] == "torch.float32"
    assert json.loads((out / "metadata.json").read_text())["fit"]["eigendecomposition_dtype"] == "float32"
    result = cli(*fit_args(tiny_gpt2, fitted["data"], out), expect=None)  # float64 (default) into a float32 fit
    assert result.exit_code == 2 and "eigendecomposition_dtype" in result.stderr
    result = cli(*fit_args(tiny_gpt2, fitted["data"], tmp_path / "g", "--eigendecomposition-dtype", "float16"),
                 expect=None)
    assert result.exit_code == 2 and "--eigendecomposition-dtype" in result.stderr
