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
