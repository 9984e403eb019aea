"""LoRA / PEFT adapters (model/adapter.py): --track lora scores through the adapter's own matrices, --track mlp through
the model with the adapter merged in, each against brute-force autograd; factors of one adapter refused for another."""

import json
import re
import shutil
import warnings

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    QUERIES,
    TRAIN,
    assert_close_to_largest,
    assert_one_line_error,
    fit_args,
    reference_tokens,
    run_query,
    save_tiny_model,
    write_json,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny Llama and two LoRA adapters over it (q, v, up and down projections), lora_B not zero: PEFT starts it at
    zero, which would make every lora_A gradient zero and the test trivial."""
    root = tmp_path_factory.mktemp("lora")
    base_dir = save_tiny_model(root / "base", "llama")
    made = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, init_lora_weights=False,
                            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
        peft_model = get_peft_model(base, config)
        assert all(p.abs().max() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)  # the premise
        peft_model.save_pretrained(root / f"adapter{seed}")
        made.append(root / f"adapter{seed}")
    return base_dir, made


def gradient_dots(model, params, tokenizer):
    """Brute force: the summed-loss gradients of ``params`` for each record (float64), then query · train."""
    def gradients(records):
        rows = []
        for record in records:
            ids, labels = reference_tokens(tokenizer, record["prompt"], record["completion"])
            logits = model(torch.tensor([ids])).logits[0]
            loss = F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100, reduction="sum")
            rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)
    return gradients(QUERIES) @ gradients(TRAIN).T


@pytest.mark.parametrize("track", ["lora", "mlp"])
def test_an_adapter_scores_as_brute_force_autograd(adapters, tmp_path, cli, track):
    base_dir, (adapter, _) = adapters
    data = write_json(tmp_path / "fit.json", TRAIN)
    cli(*fit_args(adapter, data, tmp_path / "factors", "--strategy", "identity", "--track", track))
    files = {"train": write_json(tmp_path / "t.json", TRAIN), "query": write_json(tmp_path / "q.json", QUERIES)}
    with warnings.catch_warnings(record=True) as shown:  # what the user would see of loading the adapter
        warnings.simplefilter("always")
        cli("run-query", "--model", adapter, "--factors-dir", tmp_path / "factors", "--train-json", files["train"],
            "--query-json", files["query"], "--output-dir", tmp_path / "out", "--quiet")
    assert not [w for w in shown if "is_gradient_checkpointing" in str(w.message)]  # transformers' rename, peft's use
    frame = pd.read_csv(tmp_path / "out" / "influences.csv")
    got = frame.pivot(index="query_id", columns="train_id", values="influence_score")
    got = got.loc[[q["pair_id"] for q in QUERIES], [t["pair_id"] for t in TRAIN]].to_numpy()

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    model = PeftModel.from_pretrained(base, adapter).eval()  # eval: LoRA's dropout off, as if-query runs it
    if track == "lora":
        params = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
        assert len(params) == 2 * 4 * 2  # (A, B) x 4 projections x 2 blocks
    else:
        model = model.merge_and_unload()
        params = [p for n, p in model.named_parameters() if ".mlp." in n]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    assert_close_to_largest(got, gradient_dots(model, params, AutoTokenizer.from_pretrained(base_dir)))


def test_factors_of_one_adapter_are_refused_for_another_and_lora_needs_an_adapter(adapters, tmp_path, cli):
    base_dir, (first, second) = adapters
    data = write_json(tmp_path / "fit.json", TRAIN)
    cli(*fit_args(first, data, tmp_path / "factors", "--strategy", "identity", "--track", "lora"))
    files = {"train": write_json(tmp_path / "t.json", TRAIN), "query": write_json(tmp_path / "q.json", QUERIES)}
    result = cli("run-query", "--model", second, "--factors-dir", tmp_path / "factors", "--train-json",
                 files["train"], "--query-json", files["query"], "--output-dir", tmp_path / "out", expect=2)
    assert_one_line_error(result, 2, "weights fingerprint")
    assert not (tmp_path / "out" / "influences.csv").exists()
    result = cli(*fit_args(base_dir, data, tmp_path / "base-factors", "--track", "lora"), expect=2)
    assert_one_line_error(result, 2, "--track lora", "adapter folder")
    other_base = save_tiny_model(tmp_path / "other-base", "llama", seed=7)  # the same shapes, other weights
    result = cli("run-query", "--model", first, "--base-model", other_base, "--factors-dir", tmp_path / "factors",
                 "--train-json", files["train"], "--query-json", files["query"], "--output-dir", tmp_path / "o2",
                 expect=2)  # the adapter is the fitted one: the base is what is wrong, not the factors
    assert_one_line_error(result, 2, f"was fitted for the adapter {first} over other base weights",
                          "give --base-model the base it was fitted on")
    assert "--overwrite" not in result.stderr


def test_the_base_model_comes_from_the_adapter_or_from_base_model(adapters, tmp_path, cli):
    base_dir, (adapter, _) = adapters
    moved = tmp_path / "moved-adapter"  # an adapter whose recorded base is not where it says
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "./no-such-base"}))
    data = write_json(tmp_path / "fit.json", TRAIN)
    result = cli(*fit_args(moved, data, tmp_path / "factors", "--strategy", "identity"), expect=2)
    assert_one_line_error(result, 2, "./no-such-base: model folder not found", f"the base model of the adapter {moved}",
                          "--base-model")
    assert not result.stderr.startswith("error: --")  # no flag put before a message that names its own
    cli(*fit_args(moved, data, tmp_path / "factors", "--strategy", "identity", "--base-model", base_dir))
    files = {"train": write_json(tmp_path / "t.json", TRAIN), "query": write_json(tmp_path / "q.json", QUERIES)}
    frame = run_query(cli, moved, tmp_path / "factors", files, tmp_path / "out", "--base-model", base_dir)
    cli(*fit_args(adapter, data, tmp_path / "same", "--strategy", "identity"))  # the same adapter, base recorded
    same = run_query(cli, adapter, tmp_path / "same", files, tmp_path / "same-out")
    assert_close_to_largest(frame["influence_score"], same["influence_score"], 1e-6)


def test_plan_sizes_the_adapter_matrices_that_track_lora_tracks(adapters, cli):
    _, (adapter, _) = adapters
    text = cli("plan", "--model", adapter, "--track", "lora", "--sequences", 10, "--tokens", 16).stdout
    assert "Tracked: 16 LoRA matrices (lora_A, lora_B) of 2 blocks (--track lora" in text
    assert re.search(r"largest module \S+\.lora_[AB]\.default", text)  # sized as the adapter's own layers
    from if_query.plan.estimates import _in_block  # how the plan's memory lines name a streamed module's factors

    assert _in_block("base_model.model.model.layers.0.mlp.up_proj.lora_B.default") == "up_proj.lora_B"  # not default
    assert _in_block("model.layers.0.mlp.up_proj") == "up_proj"


def test_an_adapters_errors_name_the_adapter_not_a_flag_before_them(adapters, tmp_path, cli):
    base_dir, (adapter, _) = adapters
    bare = tmp_path / "bare-base"  # the base's weights without its tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base_dir / name, bare / name)
    data = write_json(tmp_path / "fit.json", TRAIN)
    result = cli(*fit_args(adapter, data, tmp_path / "factors", "--base-model", bare), expect=2)
    assert_one_line_error(result, 2, f"{bare}: the model folder has no tokenizer",
                          f"the base model of the adapter {adapter}")
    assert not result.stderr.startswith("error: --")  # --model is the adapter, not this folder
    elsewhere = tmp_path / "elsewhere"  # an adapter of modules the base does not have
    shutil.copytree(adapter, elsewhere)
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    result = cli("plan", "--model", elsewhere, "--track", "lora", "--sequences", 2, "--tokens", 8, expect=2)
    assert_one_line_error(result, 2, f"cannot add the adapter {elsewhere}")
    assert not result.stderr.startswith("error: --")
    result = cli(*fit_args(base_dir, data, tmp_path / "f2", "--base-model", base_dir), expect=2)
    assert result.stderr.startswith("error: --base-model is for a LoRA/PEFT adapter folder")  # the flag said once
    assert result.stderr.count("--base-model") == 1, result.stderr


def test_an_adapter_whose_base_moved_is_indexed_with_base_model(adapters, tmp_path, cli):
    base_dir, (adapter, _) = adapters
    moved = tmp_path / "moved-adapter"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    data = write_json(tmp_path / "fit.json", TRAIN)
    cli(*fit_args(moved, data, tmp_path / "factors", "--strategy", "identity", "--track", "lora", "--base-model",
                  base_dir))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t["prompt"] + t["completion"]}) for t in TRAIN))
    common = ("index", "--model", moved, "--factors-dir", tmp_path / "factors", "--train-dataset", corpus,
              "--output-dir", tmp_path / "index", "--quiet")
    result = cli(*common, expect=2)  # no base recorded: the message names the flag that index takes
    assert_one_line_error(result, 2, "names no base model", "give --base-model")
    assert result.stderr.startswith("error: /")  # the message as it is, no flag before it
    cli(*common, "--base-model", base_dir)
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["complete"]
