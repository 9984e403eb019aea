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
    "llama_gqa": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
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


@pytest.mark.parametrize("track", ["mlp", "attention", "all-linear"])
@pytest.mark.parametrize("family", ["llama", "llama_gqa", "olmo2", "qwen2", "gpt2", "gpt_neox", "opt"])
def test_the_plans_name_rule_agrees_with_the_probe(family, track):
    """Which modules read another's input, from names alone (the plan's meta-device model) and from a forward pass:
    gate/up and q/k/v (OPT declares k_proj first: it keeps the input). OPT's MLP sees flattened tokens (refused),
    its attention does not."""
    from if_query.model.tracking import find_tracked_modules, shared_inputs_by_name, track_modules

    if family == "opt" and track != "attention":
        with pytest.raises(InputError, match="flattened"):
            track_modules(build(family, layers=2), 1, track)
        return
    _, probed = track_modules(build(family, layers=2), 1, track)
    assert shared_inputs_by_name(find_tracked_modules(build(family, layers=2), 1, track)) == probed


ATTENTION_SUFFIXES = {
    "gpt2": {"attn.c_attn", "attn.c_proj"},
    "llama_gqa": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense"},
}


@pytest.mark.parametrize("family", sorted(ATTENTION_SUFFIXES))
def test_attention_and_all_linear_find_their_layers_of_every_block(family):
    model = build(family, layers=4)
    attention = find_tracked_modules(model, 2, "attention")
    assert sorted({m.layer for m in attention}) == [0, 2]  # --layer-stride applies to blocks, whatever the kind
    assert {m.name.split(".", 3)[3] for m in attention} == ATTENTION_SUFFIXES[family]
    every = find_tracked_modules(model, 1, "all-linear")
    assert {m.name.split(".", 3)[3] for m in every} == ATTENTION_SUFFIXES[family] | EXPECTED_SUFFIXES[family]
    assert not any("lm_head" in m.name or "embed" in m.name for m in every)
    for module in every:
        assert sorted(module.shape) == sorted(model.get_submodule(module.name).weight.shape)
    if family == "llama_gqa":  # grouped-query attention: k and v have 2 of the 4 heads
        shapes = {m.name.rsplit(".", 1)[1]: m.shape for m in attention if m.layer == 0}
        assert shapes == {"q_proj": [16, 16], "k_proj": [8, 16], "v_proj": [8, 16], "o_proj": [16, 16]}


def test_every_track_choice_is_one_kind():
    from if_query.config import TRACK_CHOICES, FitConfig
    from if_query.model.tracking import DEFAULT_TRACK, TRACK_KINDS

    assert tuple(TRACK_KINDS) == TRACK_CHOICES and DEFAULT_TRACK == FitConfig.track


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen2_moe"])
def test_mixture_of_experts_is_known_from_the_config(family):
    """Qwen2-MoE's shared expert has gate/up/down_proj linear layers: without the config's word the MLP finder
    would track it alone and silently leave the routed experts out."""
    from transformers import Qwen2MoeConfig

    config = (Qwen2MoeConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=16, moe_intermediate_size=8,
                             shared_expert_intermediate_size=16, num_attention_heads=4, num_key_value_heads=2,
                             num_experts=4, num_experts_per_tok=2, vocab_size=64)
              if family == "qwen2_moe" else tiny_config(family, len(make_tokenizer())))
    model = AutoModelForCausalLM.from_config(config)
    for track in ("mlp", "all-linear"):
        with pytest.raises(InputError, match=rf"^{track}: .* mixture-of-experts .*model.layers.0.mlp.experts and 1 "
                                             r"more.*--track attention works") as error:
            find_tracked_modules(model, 1, track)
        assert error.value.option == "track"
    assert {m.name.rsplit(".", 1)[1] for m in find_tracked_modules(model, 1, "attention")} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}


def test_attention_with_experts_of_its_own_is_refused_too():
    """JetMoE's attention is a mixture of experts (its query and output projections are 3-D expert parameters under
    self_attention.experts): --track attention would silently track only its kv_proj and router, and the refusal of
    the other kinds must not offer it."""
    from transformers import JetMoeConfig

    model = AutoModelForCausalLM.from_config(JetMoeConfig(
        num_hidden_layers=2, hidden_size=32, kv_channels=8, intermediate_size=16, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=64))
    for track in ("attention", "mlp", "all-linear"):
        with pytest.raises(InputError, match=rf"^{track}: .*; no --track kind works for it, its attention having "
                                             r"experts of its own$") as error:
            find_tracked_modules(model, 1, track)
        assert "--track attention works" not in str(error.value)
        # the attention's experts named where they are what refuses the kind, not for the MLP's (named otherwise)
        assert ("its attention's experts (model.layers.0.self_attention.experts and 1 more)" in str(error.value)) \
            == (track == "attention"), error.value


def test_older_transformers_experts_are_refused_as_experts_not_as_flattened_tokens():
    """Before transformers 5, experts were a list of linear layers fed the routed tokens, flattened: refused for
    being experts (from the config), before any probe could call them flattened-token MLPs."""
    from types import SimpleNamespace

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Module()
            self.mlp.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))
            self.mlp.experts[0].gate_proj = torch.nn.Linear(4, 8)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_local_experts=4, model_type="toy")
            self.layers = torch.nn.ModuleList([Block()])

    with pytest.raises(InputError, match=r"num_local_experts = 4\) and its experts \(layers.0.mlp.experts\)"):
        find_tracked_modules(Toy(), 1, "mlp")
