import pytest
import torch
from helpers import assert_close_to_largest, make_tokenizer, tiny_config
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from if_query.errors import InputError
from if_query.model.tracking import find_tracked_modules, make_trackable

EXPECTED_SUFFIXES = {
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
    "llama": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "olmo2": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "qwen2": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt_neox": {"mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "opt": {"fc1", "fc2"},
}


def build(family, layers=4):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, len(make_tokenizer()), layers))


@pytest.mark.parametrize("family", sorted(EXPECTED_SUFFIXES))
def test_finds_mlp_projections_of_every_block(family):
    model = build(family)
    modules = find_tracked_modules(model)
    assert sorted({m.layer for m in modules}) == [0, 1, 2, 3]
    for layer in range(4):
        suffixes = {m.name.split(f".{layer}.", 1)[1] for m in modules if m.layer == layer}
        assert suffixes == EXPECTED_SUFFIXES[family]
    names = {m.name for m in modules}
    assert not any("attn" in n or "attention" in n or "lm_head" in n or "embed" in n for n in names)
    for module in modules:  # shapes are (out, in) of the projection
        weight = model.get_submodule(module.name).weight
        assert sorted(module.shape) == sorted(weight.shape)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_layer_stride_keeps_every_nth_block(family):
    modules = find_tracked_modules(build(family, layers=5), layer_stride=2)
    assert sorted({m.layer for m in modules}) == [0, 2, 4]


def test_no_mlp_modules_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(InputError, match="no MLP projections"):
        find_tracked_modules(model)


def test_conv1d_swap_is_numerically_identical():
    model = build("gpt2", layers=2)
    modules = find_tracked_modules(model)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        before = model(ids).logits
        make_trackable(model, modules)
        after = model(ids).logits
    assert all(isinstance(model.get_submodule(m.name), torch.nn.Linear) for m in modules)
    assert isinstance(model.get_submodule("transformer.h.0.attn.c_proj"), Conv1D)  # attention untouched
    assert_close_to_largest(after, before, 1e-5)  # another kernel (addmm of a transpose): float32 rounding only


@pytest.mark.parametrize("family", ["llama", "olmo2", "gpt2"])
def test_modules_that_see_one_input_are_found(family):
    """gate_proj and up_proj see the very same tensor (their token factors are kept once); nothing else does,
    even though the probe's freed activations could reuse each other's memory."""
    from if_query.model.tracking import track_modules

    _, modules = track_modules(build(family, layers=3), 1)
    shared = {m.name: m.input_from for m in modules if m.input_from}
    if family == "gpt2":
        assert shared == {}
    else:
        assert shared == {f"model.layers.{i}.mlp.up_proj": f"model.layers.{i}.mlp.gate_proj" for i in range(3)}


def test_matmul_precision_is_set_explicitly_whatever_was_set_before(monkeypatch):
    from if_query.model.loading import CUDA_MATMUL_PRECISION, resolve_matmul_precision, set_matmul_precision

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # a caller (or a library) enabled TF32
        set_matmul_precision("ieee")
        assert matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"
        set_matmul_precision("tf32")
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
    assert resolve_matmul_precision("auto", torch.device("cpu")) == "ieee"  # the CPU has no TF32
    assert resolve_matmul_precision("auto", torch.device("cuda", 0)) == CUDA_MATMUL_PRECISION
    assert resolve_matmul_precision("tf32", torch.device("cpu")) == "tf32"


@pytest.mark.parametrize("family", ["llama", "olmo2", "qwen2", "gpt2", "gpt_neox"])
def test_the_plans_name_rule_agrees_with_the_probe(family):
    from if_query.model.tracking import find_tracked_modules, shared_inputs_by_name, track_modules

    _, probed = track_modules(build(family, layers=2), 1)
    assert shared_inputs_by_name(find_tracked_modules(build(family, layers=2))) == probed
