"""if-query plan: sizes from a config.json alone (OLMo-2-13B, Llama-3-8B), checked against sizes derived here from
the shapes, and against the memory a real CPU run takes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer, write_json
from transformers import AutoModelForCausalLM, Olmo2Config

from if_query.config import PlanConfig
from if_query.model import loading
from if_query.plan import command as plan_module

GB = 1e9
OLMO2_13B = {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", "hidden_size": 5120,
             "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
             "vocab_size": 100352, "max_position_embeddings": 4096, "attention_bias": False,
             "tie_word_embeddings": False}
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False}


def derived(config: dict, stride: int, sequences: int, tokens: int) -> dict:
    """The sizes, from the shapes alone (bfloat16 model, float32 factors; no biases in either family)."""
    h, i, layers, v = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    attention = 2 * h * h + 2 * h * kv
    norms = 2 * h + (h + kv if config["model_type"] == "olmo2" else 0)  # OLMo-2 norms q and k too
    parameters = 2 * v * h + layers * (attention + 3 * h * i + norms) + h
    blocks = len(range(0, layers, stride))
    covariances = blocks * 3 * (h * h + i * i) * 4  # gate (i x h), up (i x h), down (h x i): both sides each
    return {
        "parameters": parameters,
        "factors": covariances + blocks * 3 * ((h * h + i * i + h + i) * 4 + h * i * 4),  # + eigen + lambda
        "per_token": blocks * (i + h + i + h + i) * 2,  # up_proj reads gate_proj's input: kept once
        "workspace": sequences * i * h * 4,  # every sequence's whitened gradient of the largest module
        "token_factors": sequences * tokens * blocks * (3 * i + 2 * h) * 2,
        "model": parameters * 2,
    }


@pytest.mark.parametrize(("config", "stride"), [(OLMO2_13B, 2), (LLAMA3_8B, 1)], ids=["olmo2-13b", "llama3-8b"])
def test_the_plan_of_a_config_alone_matches_the_shapes(cli, tmp_path, monkeypatch, config, stride):
    write_json(tmp_path / "model" / "config.json", config)  # no tokenizer, no weights
    built, meta_model = [], loading.meta_model
    monkeypatch.setattr(loading, "meta_model", lambda c: built.append(meta_model(c)) or built[-1])
    expected = derived(config, stride, 50, 500)
    plans = plan_module.make_plans(PlanConfig(model=str(tmp_path / "model"), layer_stride=stride, sequences=50,
                                              tokens=500, score_batch_size=2))
    assert all(p.device.type == "meta" for p in built[0].parameters())  # nothing but meta tensors
    assert plans.fit.factors.total_bytes == expected["factors"]
    [(_, job)] = plans.folders
    folder = job.store
    assert job.at_once and folder.token_factor_bytes == expected["token_factors"] and not folder.spilled
    assert folder.workspace_used == expected["workspace"] and folder.at_once
    scoring = {part.name: part.bytes for part in folder.scoring.parts}
    assert scoring["model"] == expected["model"] and scoring["whitened gradients"] == expected["workspace"]
    assert folder.capture.fits and folder.scoring.fits  # one 80 GB GPU, --score-batch-size 2
    result = cli("plan", "--model", tmp_path / "model", "--layer-stride", stride, "--sequences", 50, "--tokens", 500,
                 "--score-batch-size", 2, "--module-partitions", 4, "--factor-batch-size", 4, "--lambda-batch-size", 2)
    text = result.stdout
    assert f"{expected['parameters'] / 1e9:.2f} B parameters" in text
    assert f"factors on disk {expected['factors'] / GB:.1f} GB" in text
    assert f"token factors {expected['per_token'] / 1e6:.1f} MB per token" in text
    assert "Everything fits." in text


def test_the_plan_counts_what_refinement_moves_from_the_shapes(cli, tmp_path):
    """``if-query plan --refine-steps``: OLMo-2-13B at stride 2, 50 sequences of 500 tokens (queries and train), the
    factors too large to keep beside the model: refinement moves the queries' token factors, every module's factors,
    the power iterations' start and each query's g onto the device, its v with the one engine call, and each query's
    g and v off it; all of it float32 vectors the size of the tracked weights, derived here from the shapes."""
    write_json(tmp_path / "model" / "config.json", OLMO2_13B)
    expected = derived(OLMO2_13B, 2, 50, 500)
    h, i = OLMO2_13B["hidden_size"], OLMO2_13B["intermediate_size"]
    vector = len(range(0, OLMO2_13B["num_hidden_layers"], 2)) * 3 * h * i * 4  # every tracked block in float32
    options = dict(model=str(tmp_path / "model"), layer_stride=2, sequences=50, tokens=500)
    [(_, plain)] = plan_module.make_plans(PlanConfig(**options)).folders
    [(_, job)] = plan_module.make_plans(PlanConfig(**options, refine_steps=5)).folders
    assert not job.resident and job.moved.engine_calls == 1  # the premise: factors copied, one call
    factors = job.store.factor_bytes
    onto = expected["token_factors"] + factors + vector + 50 * vector * 2
    assert (job.moved.refine_to_device, job.moved.refine_from_device) == (onto, 2 * 50 * vector)
    assert job.moved.to_device == plain.moved.to_device + onto
    assert job.moved.from_device == plain.moved.from_device + 2 * 50 * vector
    assert plain.moved.refine_to_device == plain.moved.refine_from_device == 0
    text = cli("plan", "--model", tmp_path / "model", "--layer-stride", 2, "--sequences", 50, "--tokens", 500,
               "--refine-steps", 5).stdout
    assert (f"of which --refine-steps: {2 * 50 * vector / 1e12:.1f} TB off the device (each query's gradient and "
            f"refined v), {onto / 1e12:.1f} TB onto it") in text


def test_a_plan_that_does_not_fit_says_so_and_what_to_change(cli, tmp_path):
    write_json(tmp_path / "model" / "config.json", OLMO2_13B)
    result = cli("plan", "--model", tmp_path / "model", "--layer-stride", 2, "--sequences", 50, "--tokens", 500,
                 "--gpu-memory-gb", 40)  # exit 0
    tail = result.stdout.split("Does not fit:", 1)[1]
    assert "covariance pass" in tail and "--module-partitions" in tail and "--score-batch-size" in tail
    assert re.search(r"model 27\.4 GB", result.stdout)  # decimal GB: 13.7 B parameters x 2 bytes


def _olmo2(directory: Path, layers: int = 4) -> Path:
    tokenizer = make_tokenizer()
    config = Olmo2Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, bos_token_id=0,
                         eos_token_id=0, pad_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


RSS_PROBE = """
import json, resource, sys
import if_query.cli, if_query.run.run_query, if_query.score.engine_scorer, if_query.score.engine
import transformers.models.olmo2.modeling_olmo2
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
baseline = rss()
sys.argv = ["run-query", *sys.argv[1:]]
try:
    if_query.cli.run_query_app()
except SystemExit as exit:
    assert not exit.code, exit.code
print(json.dumps({"baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def test_the_plan_predicts_a_cpu_runs_memory(cli, tmp_path):
    """A folder of 120 sequences of 200 tokens on a small OLMo-2, on the CPU: the planned RAM (over 1 GB, mostly
    token factors) against the growth of the run's peak RSS over its baseline after imports: within 25%."""
    import random

    model = _olmo2(tmp_path / "model")
    words = "the a of in is lives works plays city job Alice Bob Carol Dave Paris Rome Oslo Lima".split()
    rng = random.Random(0)
    records = [{"pair_id": f"r{k}", "prompt": " ".join(rng.choice(words) for _ in range(190)),
                "completion": " " + " ".join(rng.choice(words) for _ in range(8))} for k in range(120)]
    folder = tmp_path / "folder"
    write_json(folder / "train.json", records)
    write_json(folder / "query.json", records)
    cli("fit-hessians", "--model", model, "--hessian-dataset", folder / "train.json", "--output-dir", tmp_path / "f",
        "--strategy", "identity", "--max-examples", 2, "--quiet")
    [(_, job)] = plan_module.make_plans(PlanConfig(model=str(model), folders=[folder], device="cpu",
                                                   strategy="identity", layer_stride=1)).folders
    planned = job.store
    predicted = planned.host.total
    assert predicted >= 1 * GB and planned.token_factor_bytes >= 0.8 * predicted
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", RSS_PROBE, "--model", str(model), "--factors-dir",
                             str(tmp_path / "f"), str(folder), "--quiet"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["baseline"]
    print(f"planned {predicted / GB:.3f} GB, measured growth {growth / GB:.3f} GB")
    assert 0.75 * predicted <= growth <= 1.25 * predicted, (growth, predicted)


def test_the_plans_module_groups_are_kronfluences():
    """The fit's memory is planned per group of modules: the groups Kronfluence's fit makes (``make_modules_partition``,
    sizes differing by one, the larger first), not groups of ceil(n / p) (4 modules in 3 were planned as 2 + 2)."""
    from kronfluence.module.utils import make_modules_partition

    from if_query.plan.estimates import module_groups
    from if_query.plan.sizes import Shape

    for count in range(1, 13):
        shapes = [Shape(f"m{k}", 1, 1, False) for k in range(count)]
        for partitions in range(1, count + 1):
            groups = [[s.name for s in group] for group in module_groups(shapes, partitions)]
            assert groups == make_modules_partition([s.name for s in shapes], partitions), (count, partitions)


TINY_GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 256, "n_inner": 1024,
             "n_layer": 4, "n_head": 4, "vocab_size": 1000, "n_positions": 128, "bos_token_id": 0, "eos_token_id": 0}
SMALL_FIT = ("--strategy", "kfac", "--tokens", 16, "--factor-batch-size", 1, "--lambda-batch-size", 1)


def test_a_model_alone_plans_the_fit_and_says_scoring_was_not_planned(cli, tmp_path):
    """No folder, --sequences or --documents: the fit's stages are planned (memory and time) and the plan says how
    to plan scoring too, with exit 0 (it was an error)."""
    model = write_json(tmp_path / "model" / "config.json", TINY_GPT2).parent
    text = cli("plan", "--model", model).stdout
    # --tokens 512, cut to the model's 128 positions (the heading said 512 and sized 128)
    fit = text.split("fit-hessians (ekfac, 10000 sequences of 128 tokens, --module-partitions 1):\n", 1)[1]
    for stage in ("covariance pass", "eigendecomposition (rank 0)", "lambda pass"):
        assert re.search(rf"^  device, {re.escape(stage)}: .* of 80\.0 GB: fits$", fit, flags=re.MULTILINE), stage
    assert re.search(r"fit-hessians FLOPs: .*; \d+ s at the stated peaks", fit)
    assert "run-query: not planned; to plan it, give --sequences N" in text and "run-query," not in text
    assert text.endswith("fit-hessians fits; run-query was not planned.\n")


def _fewest_by_brute_force(config: dict, limit: float, rest: int) -> int | None:
    """The fewest module partitions whose largest group's covariances fit in ``limit`` besides ``rest`` bytes, from
    the shapes of a GPT-2 built here (Conv1D weights are (in, out); a bias: in + 1) and Kronfluence's own groups."""
    from kronfluence.module.utils import make_modules_partition
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**config))
    covariance = {name: ((m.weight.shape[0] + 1) ** 2 + m.weight.shape[1] ** 2) * 4
                  for name, m in model.named_modules() if name.endswith((".mlp.c_fc", ".mlp.c_proj"))}
    for count in range(1, len(covariance) + 1):
        groups = make_modules_partition(list(covariance), count)
        if rest + max(sum(covariance[name] for name in group) for group in groups) <= limit:
            return count
    return None


def _fit_warnings(config: dict, limit: float) -> list[str]:
    """What fit-hessians warns before fitting a GPT-2 of ``config`` (on the meta device here) with SMALL_FIT's
    options, on a GPU of ``limit`` bytes."""
    from transformers import GPT2Config

    from if_query.config import FitConfig
    from if_query.fit.fit_hessians import fit_warnings
    from if_query.model.tracking import find_tracked_modules

    model = loading.meta_model(GPT2Config(**config))
    fit = FitConfig(model="m", hessian_dataset="d.json", output_dir="out", strategy="kfac", factor_batch_size=1,
                    lambda_batch_size=1)
    return fit_warnings(model, find_tracked_modules(model), fit, torch.bfloat16, [16] * 4, int(limit))


def test_a_fit_that_does_not_fit_names_the_fewest_module_partitions_that_do(cli, tmp_path):
    """On a 25 MB "GPU" the covariance pass of 8 modules needs more than one partition: the plan names the fewest
    count N that fits (N fits, N - 1 does not: the same size function at both, and a brute force over Kronfluence's
    groups of the modules' covariances), and fit-hessians warns in the same words; on 10 MB not even one module per
    partition fits, and it says what that would need."""
    model = write_json(tmp_path / "model" / "config.json", TINY_GPT2).parent
    text = cli("plan", "--model", model, *SMALL_FIT, "--gpu-memory-gb", 0.025).stdout
    line = next(line for line in text.splitlines() if "device, covariance pass" in line)
    fewest = int(re.search(r"DOES NOT FIT; --module-partitions (\d+) \(the fewest that fit both passes\)", line)[1])
    assert fewest >= 2 and f"--module-partitions {fewest} (the fewest" in text.split("Does not fit:")[1]

    def fit(partitions: int):
        return plan_module.make_plans(PlanConfig(model=str(model), strategy="kfac", tokens=16, factor_batch_size=1,
                                                 lambda_batch_size=1, gpu_memory_gb=0.025,
                                                 module_partitions=partitions)).fit

    assert fit(fewest).covariance.fits and fit(fewest).lambdas.fits
    assert not fit(fewest - 1).covariance.fits
    rest = sum(part.bytes for part in fit(1).covariance.parts if not part.name.startswith("covariances"))
    assert _fewest_by_brute_force(TINY_GPT2, 0.025 * GB, rest) == fewest

    warned = _fit_warnings(TINY_GPT2, 0.025 * GB)  # fit-hessians' check on a GPU of that size: the plan's words
    assert line.strip() in warned and len(warned) == 2  # and the eigendecomposition's (--eigendecomposition-dtype)

    text = cli("plan", "--model", model, *SMALL_FIT, "--gpu-memory-gb", 0.01).stdout
    assert _fewest_by_brute_force(TINY_GPT2, 0.01 * GB, rest) is None
    each = fit(8).covariance  # one module per partition: 8 tracked modules
    assert (f"no --module-partitions fits: with one module per partition (8), the covariance pass needs "
            f"{plan_module.human_bytes(each.total)}") in text


def test_a_cpu_plan_prints_sizes_without_times_and_counts_a_tiny_models_parameters(cli, tmp_path):
    """--device cpu: no seconds anywhere (the stated peaks are a GPU's; they were an H100's), memory as RAM, and the
    parameter count of a model of 172,288 parameters in full (it printed "0.00 B"), as the model built here counts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {**TINY_GPT2, "n_embd": 64, "n_inner": 256, "n_layer": 2, "n_head": 2}
    model = write_json(tmp_path / "model" / "config.json", config).parent
    text = cli("plan", "--model", model, "--device", "cpu", "--sequences", 10).stdout
    count = sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(**config)).parameters())
    assert count > 0 and f"(gpt2): {count:,} parameters, " in text
    assert not re.search(r"\d s\b|seconds|TFLOP/s", text), text
    assert "no times" in text and "device," not in text
    assert re.search(r"^  RAM, covariance pass: .* of 512\.0 GB: fits$", text, flags=re.MULTILINE)  # --host-ram-gb
    assert re.search(r"fit-hessians FLOPs: .*FLOP$", text, flags=re.MULTILINE)
    assert text.endswith("Everything fits.\n")


def _llama_modules(config: dict, track: str) -> list[tuple[int, int, bool]]:
    """One block's tracked modules of ``track`` as (out, in, reads an earlier one's input), from the config alone:
    q_proj (h x h), k_proj and v_proj (kv x h, grouped-query attention, reading q_proj's input), o_proj (h x h);
    gate_proj and up_proj (i x h, up reading gate's input), down_proj (h x i)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    attention = [(h, h, False), (kv, h, True), (kv, h, True), (h, h, False)]
    mlp = [(i, h, False), (i, h, True), (h, i, False)]
    return {"mlp": mlp, "attention": attention, "all-linear": attention + mlp}[track]


@pytest.mark.parametrize("track", ["attention", "all-linear"])
def test_the_plan_sizes_the_kind_of_layers_tracked(cli, tmp_path, track):
    """Llama-3-8B (grouped-query attention: k and v 4x smaller than q) with --track attention and all-linear: the
    factors (EK-FAC) and token factors per token of the modules derived here from the config."""
    write_json(tmp_path / "model" / "config.json", LLAMA3_8B)
    modules, blocks = _llama_modules(LLAMA3_8B, track), LLAMA3_8B["num_hidden_layers"]
    factors = blocks * sum((2 * (a * a + g * g) + a + g + a * g) * 4 for g, a, _ in modules)
    per_token = blocks * sum(g + (0 if shared else a) for g, a, shared in modules) * 2  # bfloat16
    result = cli("plan", "--model", tmp_path / "model", "--track", track, "--sequences", 8, "--tokens", 64)
    text = result.stdout
    what = "attention projections" if track == "attention" else "linear layers"
    assert f"Tracked: {blocks * len(modules)} {what} of {blocks} blocks (--track {track}" in text
    assert f"factors on disk {factors / GB:.1f} GB" in text
    assert f"token factors {per_token / 1e6:.1f} MB per token" in text
    assert "k_proj, v_proj read q_proj's input" in text


CHUNKS, SPILLED, REFINE = ("--host-memory-gb", "0.00005"), ("--host-memory-gb", "0.00001"), ("--refine-steps", "1")


@pytest.mark.parametrize(("extra", "locked", "resident"), [
    ((), True, True), ((), False, True), (CHUNKS, True, True), (CHUNKS, False, True), (SPILLED, True, True),
    (SPILLED, False, True), (REFINE, True, True), ((*CHUNKS, *REFINE), False, False),
    ((*SPILLED, *REFINE), True, True),
], ids=["at-once-page-locked", "at-once-bounced", "chunks-page-locked", "chunks-bounced", "chunks-spilled-page-locked",
        "chunks-spilled-bounced", "refine-at-once", "refine-chunks-copied-per-call", "refine-chunks-spilled"])
def test_the_bytes_a_run_moves_and_its_pinned_buffers_are_the_plans(cli, tiny_gpt2, fitted, query_files, tmp_path,
                                                                     monkeypatch, extra, locked, resident):
    """A run on the CPU through the device path's copies (staged transfers, unpinned buffers) planned as for a GPU
    (a device 1 TB large: the factors stay resident across a chunked job's calls; ``resident`` False: a device of
    unstated size, the factors copied with every call): the bytes it counts onto the device (token factors, factors
    and what --refine-steps moves) and off it are the plan's, in run.json, kind by kind (a kind counted on one side
    only fails), and so are its pinned buffers; so are the bytes that go straight from and into page-locked stores
    (the plan's decision, within its limit; none with a limit of 0: all through the bounce slots and the landing
    buffer), and the most it page-locks at once."""
    import dataclasses

    from helpers import run_query

    from if_query.plan import run_plan
    from if_query.score import engine_scorer
    from if_query.score.transfer import Transfers

    if not locked:
        monkeypatch.setattr(run_plan, "PAGE_LOCK_SHARE", 0.0)

    held = []

    class Staged(Transfers):
        def __init__(self, device, **options):
            super().__init__(device, staged=True, **options)

        def close(self):
            held.append(self.pinned_bytes)
            super().close()

    context = engine_scorer.EngineScorer.context
    monkeypatch.setattr(engine_scorer, "Transfers", Staged)
    monkeypatch.setattr(engine_scorer.EngineScorer, "context", lambda self: dataclasses.replace(
        context(self), device_type="cuda", device_limit=10**12 if resident else None))
    run_query(cli, tiny_gpt2, fitted["ekfac"], query_files, tmp_path / "out", *extra)
    plan = json.loads((tmp_path / "out" / "run.json").read_text())["plan"]
    assert plan["mode"] == ("chunks" if "--host-memory-gb" in extra else "at once")
    planned, counted = plan["moved"], dict(plan["moved_counted"])
    assert counted.pop("page_locked_bytes") == plan["page_locked_bytes"]
    assert counted == {key: value for key, value in planned.items() if key != "engine_calls"}, (planned, counted)
    assert counted["factor_bytes_to_device"] > 0 and counted["from_device_bytes"] > 0  # the premise: bytes moved
    refined = "--refine-steps" in extra
    assert (counted["refine_bytes_to_device"] > 0 and counted["refine_bytes_from_device"] > 0) == refined
    if locked and not plan["spilled"]:  # the premise: stores page-locked, their token factors copied straight
        assert plan["page_locked_bytes"] > 0 and counted["direct_from_device_bytes"] > 0
        token_factors = (counted["to_device_bytes"] - counted["factor_bytes_to_device"]
                         - counted["refine_bytes_to_device"])
        refined_slabs = plan["token_factor_bytes"] if refined else 0  # the queries' store, once, to form their g
        assert counted["direct_to_device_bytes"] == token_factors + refined_slabs
    elif not locked:
        assert plan["page_locked_bytes"] == counted["direct_to_device_bytes"] == 0
    if "--host-memory-gb" in extra:
        assert plan["factors_resident"] == resident and planned["engine_calls"] > 1  # several calls
    assert held == [plan["pinned_bytes"]]  # sized once from the plan, returned at the end


@pytest.mark.parametrize("extra", [(), ("--top-train", "1", "--per-token-scores"), ("--refine-steps", "1")],
                         ids=["plain", "kept-per-token", "refined"])
def test_factors_kept_on_the_device_serve_the_next_folder_which_moves_none(cli, tiny_gpt2, fitted, tmp_path,
                                                                          monkeypatch, extra):
    """Two folders in one run, planned as on a GPU that holds every module's factors beside the model: the plan
    keeps them from folder to folder (not with --refine-steps), so the second folder moves no factor bytes (planned,
    counted), and its scores are a run of that folder alone (also where --top-train's per-token pass scores the
    first folder again)."""
    import dataclasses

    import pandas as pd
    from helpers import QUERIES, TRAIN, assert_close_to_largest

    from if_query.score import engine_scorer
    from if_query.score.transfer import Transfers

    class Staged(Transfers):
        def __init__(self, device, **options):
            super().__init__(device, staged=True, **options)

    context = engine_scorer.EngineScorer.context
    monkeypatch.setattr(engine_scorer, "Transfers", Staged)
    monkeypatch.setattr(engine_scorer.EngineScorer, "context",
                        lambda self: dataclasses.replace(context(self), device_type="cuda", device_limit=10**12))
    folders = []
    for name, train, queries in (("a", TRAIN, QUERIES), ("b", TRAIN[:3], QUERIES[:2])):
        folder = tmp_path / name
        write_json(folder / "train.json", train)
        write_json(folder / "query.json", queries)
        folders.append(folder)
    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], *folders, "--quiet", *extra)
    first, second = (json.loads((f / "results" / "run.json").read_text())["plan"] for f in folders)
    if "--refine-steps" in extra:  # refinement's inverse holds its own copy of the factors: none kept beside it
        assert not first["factors_kept_across_jobs"] and not second["factors_already_on_device"]
        assert second["moved_counted"]["factor_bytes_to_device"] > 0
        return
    assert first["factors_kept_across_jobs"] and not first["factors_already_on_device"]
    assert first["moved"]["factor_bytes_to_device"] == first["moved_counted"]["factor_bytes_to_device"] > 0
    assert second["factors_already_on_device"]
    for key in ("to_device_bytes", "factor_bytes_to_device", "from_device_bytes"):
        assert second["moved"][key] == second["moved_counted"][key], (second["moved"], second["moved_counted"])
    assert second["moved_counted"]["factor_bytes_to_device"] == 0 and second["moved_counted"]["to_device_bytes"] > 0

    cli("run-query", "--model", tiny_gpt2, "--factors-dir", fitted["ekfac"], "--train-json", folders[1] / "train.json",
        "--query-json", folders[1] / "query.json", "--output-dir", tmp_path / "alone", "--quiet", *extra)
    alone = json.loads((tmp_path / "alone" / "run.json").read_text())["plan"]
    assert alone["moved_counted"]["factor_bytes_to_device"] == first["moved"]["factor_bytes_to_device"]  # alone: moved
    kept, fresh = (pd.read_csv(path / "influences.csv") for path in (folders[1] / "results", tmp_path / "alone"))
    assert (kept[["query_id", "train_id"]] == fresh[["query_id", "train_id"]]).all().all()
    assert_close_to_largest(kept["influence_score"], fresh["influence_score"], 1e-6)
