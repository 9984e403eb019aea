"""Models whose MLP sees flattened tokens (OPT reshapes to (batch * tokens, hidden) before fc1/fc2)
are refused: per-example gradients would be per-token."""

import json
import shutil

import pytest
import torch
from helpers import assert_one_line_error, make_tokenizer, save_tiny_model, tiny_config
from torch import nn
from transformers import AutoModelForCausalLM

from if_query.errors import InputError
from if_query.fit.metadata import METADATA_FILE, canonical_model
from if_query.model.fingerprint import weights_fingerprint
from if_query.model.tracking import TrackedModule, find_tracked_modules, probe_inputs


@pytest.mark.parametrize("family", ["gpt2", "llama", "olmo2", "gpt_neox", "qwen2"])
def test_token_shaped_families_pass(family):
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(make_tokenizer()))).eval()
    probe_inputs(model, find_tracked_modules(model))


def test_opt_is_refused():
    model = AutoModelForCausalLM.from_config(tiny_config("opt", len(make_tokenizer()))).eval()
    with pytest.raises(InputError, match=r"OPTForCausalLM \(model type 'opt'\) is not supported.*flattened"):
        probe_inputs(model, find_tracked_modules(model))


class Toy(nn.Module):
    """An embedding and one MLP projection, fed (batch, tokens, features) or flattened tokens."""

    def __init__(self, flatten):
        super().__init__()
        self.flatten = flatten
        self.embed = nn.Embedding(10, 4)
        self.fc1 = nn.Linear(4, 4)

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        return self.fc1(hidden.reshape(-1, 4) if self.flatten else hidden)


def test_the_probe_sees_the_real_input_shape():
    tracked = [TrackedModule("fc1", 0, 4, 4, True)]
    probe_inputs(Toy(flatten=False), tracked)
    with pytest.raises(InputError, match=r"fc1: \[4, 4\] for 2 sequences of 2 tokens"):
        probe_inputs(Toy(flatten=True), tracked)
    model = Toy(flatten=True)
    with pytest.raises(InputError):
        probe_inputs(model, tracked)
    assert not model.fc1._forward_pre_hooks  # hooks removed after the probe
    assert torch.equal(model(torch.tensor([[1, 2]])), model.fc1(model.embed(torch.tensor([1, 2]))))


def test_fit_and_query_refuse_opt(cli, fitted, query_files, tmp_path):
    opt = save_tiny_model(tmp_path / "opt", "opt")
    result = cli("fit-hessians", "--model", opt, "--hessian-dataset", query_files["train"], "--output-dir",
                 tmp_path / "f", expect=None)
    assert_one_line_error(result, 2, "OPTForCausalLM", "'opt'", "flattened", "every token for an example")
    assert not (tmp_path / "f").exists()

    # Factors that an older if-query fitted for OPT (metadata naming OPT's fc1/fc2) are refused too.
    old = shutil.copytree(fitted["ekfac"], tmp_path / "old-opt-fit")
    metadata = json.loads((old / METADATA_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(opt)
    metadata["fit"]["model"] = canonical_model(str(opt))
    metadata["fit"]["weights_fingerprint"] = weights_fingerprint(str(opt))["digest"]
    metadata["tracked_modules"] = [{"name": m.name, "layer": m.layer, "shape": m.shape, "bias": m.bias}
                                   for m in find_tracked_modules(model)]
    assert any(m["name"].endswith("fc1") for m in metadata["tracked_modules"])
    (old / METADATA_FILE).write_text(json.dumps(metadata))
    result = cli("run-query", "--model", opt, "--factors-dir", old, "--train-json", query_files["train"],
                 "--query-json", query_files["query"], "--output-dir", tmp_path / "out", expect=None)
    assert_one_line_error(result, 2, "OPTForCausalLM", "flattened")
    assert not (tmp_path / "out").exists()
