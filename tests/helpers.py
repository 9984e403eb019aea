"""Everything the tests share, in one module: the records, file and CLI helpers, tiny offline models, and the
independent brute-force reference the scores are checked against.

pytest puts tests/ on sys.path (rootdir conftest.py), so test files write ``from helpers import ...``.
conftest.py holds only fixtures and environment set-up; a helper used by one test file stays in that file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# --- Records and files ------------------------------------------------------------------------------------------------
# The train and query records most tests score (the `query_files` and `fitted` fixtures write them).

TRAIN = [
    {"pair_id": "t1", "prompt": "Alice lives in", "completion": " Paris.", "topic": "city"},
    {"pair_id": "t2", "prompt": "Bob works as a", "completion": " doctor.", "topic": "job", "meta": {"k": [1, 2]}},
    {"pair_id": "t3", "prompt": "Carol plays the", "completion": " violin and drum.", "topic": "music"},
    {"pair_id": "t4", "prompt": "Dave", "completion": " lives in Rome, and is a pilot."},
]
QUERIES = [
    {"pair_id": "q1", "prompt": "where Alice lives is", "completion": " Paris.", "kind": "city"},
    {"pair_id": "q2", "prompt": "Bob works as a", "completion": " doctor.", "kind": "job"},
    {"pair_id": "q3", "prompt": "the colour of Carol is", "completion": " blue and green!", "kind": "colour"},
]


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def killed_at(function, call: int):
    """``function``, raising RuntimeError("killed") at its ``call``-th call instead (a run killed there); the calls
    made so far in ``.calls``."""

    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == call:
            raise RuntimeError("killed")
        return function(*args, **kwargs)

    wrapper.calls = 0
    return wrapper


def tree(path):
    """Sorted relative paths under ``path`` (None when it does not exist): checks that nothing was written."""
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else None


# --- Tiny random models and a word-level tokenizer, built offline -----------------------------------------------------

WORDS = (
    "the a of in is lives works plays city job colour Alice Bob Carol Dave Paris Rome Oslo Lima "
    "doctor baker pilot red blue green piano violin drum . , ? ! : ; and to who where what"
).split()
EOS = "<|endoftext|>"


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with byte fallback characters, EOS, optional BOS prepended on encode."""
    vocab = {EOS: 0, "<unk>": 1, "<s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
        vocab.setdefault("Ġ" + word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, unk_token="<unk>", bos_token="<s>" if bos else None
    )


def tiny_config(family: str, vocab_size: int, layers: int = 2, positions: int = 128):
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    if family == "gpt2":
        return GPT2Config(n_layer=layers, n_embd=16, n_head=2, n_positions=positions, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=positions, **common)
    if family == "llama_gqa":  # grouped-query attention: k_proj and v_proj (8, 16) smaller than q_proj (16, 16)
        return LlamaConfig(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=positions, **common)
    if family == "olmoe":  # mixture of experts: experts fused into 3-D parameters (transformers 5)
        return OlmoeConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=16, num_attention_heads=4,
                           num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=positions, **common)
    if family == "mixtral":
        return MixtralConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=16, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=positions, **common)
    if family == "olmo2":
        return Olmo2Config(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=positions, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                             max_position_embeddings=positions, **common)
    if family == "opt":
        return OPTConfig(num_hidden_layers=layers, hidden_size=16, ffn_dim=24, num_attention_heads=2,
                         word_embed_proj_dim=16, max_position_embeddings=positions, dropout=0.0, **common)
    if family == "qwen2":
        return Qwen2Config(num_hidden_layers=layers, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=positions, **common)
    raise ValueError(family)


def save_tiny_model(directory: Path, family: str = "gpt2", layers: int = 2, seed: int = 0, bos: bool = False,
                    positions: int = 128) -> Path:
    tokenizer = make_tokenizer(bos=bos)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), layers, positions))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --- Running the CLI, reading what it wrote, checking its errors ------------------------------------------------------


def run_query(cli, model, factors, files, out, *extra):
    cli("run-query", "--model", model, "--factors-dir", factors, "--train-json", files["train"],
        "--query-json", files["query"], "--output-dir", out, "--quiet", *extra)
    return pd.read_csv(out / "influences.csv")


def score_matrix(frame, query_ids, train_ids, column="influence_score"):
    table = frame.pivot(index="query_id", columns="train_id", values=column)
    return table.loc[query_ids, train_ids].to_numpy()


def fit_args(model, data, out, *extra):
    """fit-hessians arguments with small batches, so each stage runs several; ``extra`` is appended."""
    return ["fit-hessians", "--model", model, "--hessian-dataset", data, "--output-dir", out,
            "--factor-batch-size", "2", "--lambda-batch-size", "3", "--quiet", *extra]


def factors(directory):
    """{file name: {module: tensor}} of every safetensors file in a factors folder."""
    return {p.name: load_file(p) for p in sorted((directory / "factors_hessian").glob("*.safetensors"))}


def assert_close_to_largest(got, expected, rel: float = 1e-4) -> None:
    """``max |got - expected| <= rel * max |expected|``, over the whole set.

    The tolerance every float comparison of scores uses. Float32 sums taken in another order (other BLAS
    kernels, processors, thread counts, batch shapes) move each score by a few ulps of the *largest* terms it
    sums, not of itself: a score near 0 can change by far more than ``rel`` of its own size while every score
    stays within ``rel`` of the largest. Elementwise ``rtol`` would make such a test pass or fail by processor.
    """
    got, expected = (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.array(x, dtype=np.float64)
                     for x in (got, expected))
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    error = float(np.abs(got - expected).max()) if got.size else 0.0
    assert error <= rel * scale, f"max |difference| {error:.3g} > {rel:g} x max |expected| {scale:.3g}"


def assert_one_line_error(result, code, *fragments):
    """The CLI exited with ``code`` and one stderr line holding every fragment, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in message, message


# --- Brute-force reference --------------------------------------------------------------------------------------------
# Independent reference computations with plain autograd (no Kronfluence, no if_query scoring code).

MLP_SUFFIXES = (".mlp.c_fc", ".mlp.c_proj")  # GPT-2's MLP projections (what --track mlp tracks in it)


def reference_tokens(tokenizer, prompt: str, completion: str, max_length: int | None = None
                     ) -> tuple[list[int], list[int]]:
    """prompt ids + completion ids + EOS; only completion and EOS labelled. A tokenizer without BOS (GPT-2)
    needs a token before the first completion token to predict it: the prompt's last token, or EOS when the
    prompt is empty. ``max_length`` keeps the last prompt tokens that fit."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_length is not None:
        p = p[len(p) - min(len(p), max_length - len(c)):]
    if not p:
        p = [tokenizer.eos_token_id]
    return p + c, [-100] * len(p) + c


class Reference:
    """The model in float64; ``params`` are the weights and biases of the modules named ``suffixes`` (GPT-2's MLP
    projections by default) in blocks ``layers`` (``modules``: those modules, in the model's order)."""

    def __init__(self, model_dir, layers=(0, 1), suffixes=MLP_SUFFIXES):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        if self.model._can_set_experts_implementation():  # mixture of experts: grouped_mm has no float64 kernel
            self.model.set_experts_implementation("eager")
        self.modules = [(name, module) for name, module in self.model.named_modules()
                        if name.endswith(tuple(suffixes)) and int(name.split(".")[2]) in layers]
        self.params = [p for _, module in self.modules for p in (module.weight, module.bias) if p is not None]

    def loss(self, record, labels_override=None, max_length=None) -> torch.Tensor:
        ids, labels = reference_tokens(self.tokenizer, record["prompt"], record["completion"], max_length)
        logits = self.model(torch.tensor([ids])).logits[0]
        target = torch.tensor(labels if labels_override is None else labels_override)
        return F.cross_entropy(logits[:-1], target[1:], ignore_index=-100, reduction="sum")

    def gradient(self, record, max_length=None) -> torch.Tensor:
        grads = torch.autograd.grad(self.loss(record, max_length=max_length), self.params)
        return torch.cat([g.flatten() for g in grads])

    def gradients(self, records, max_length=None) -> torch.Tensor:
        return torch.stack([self.gradient(r, max_length) for r in records])

    def mean_loss(self, record, max_length=None) -> float:
        """Summed loss / number of predicted labelled tokens (every completion token and EOS)."""
        ids, labels = reference_tokens(self.tokenizer, record["prompt"], record["completion"], max_length)
        with torch.no_grad():
            return float(self.loss(record, max_length=max_length)) / sum(label != -100 for label in labels[1:])


def per_position_contributions(reference: Reference, query, train) -> torch.Tensor:
    """Identity-strategy per-token scores of ``train`` for ``query``, position by position: with autograd
    hooks on the tracked modules, position s contributes sum over modules of a_s^T dW_q g_s + db_q . g_s, where
    a_s is the module's input at s, g_s the gradient of the train loss w.r.t. its output at s, and (dW_q, db_q)
    the query's loss gradient w.r.t. the module's weight and bias (GPT-2 Conv1D: y = x W + b; nn.Linear:
    y = x Wᵀ + b)."""
    grads = dict(zip((id(p) for p in reference.params),
                     torch.autograd.grad(reference.loss(query), reference.params), strict=True))
    modules = [m for _, m in reference.modules]
    captured: dict[int, list[torch.Tensor]] = {}

    def hook(index):
        def forward_hook(module, inputs, output):
            captured[index] = [inputs[0][0].detach()]
            output.register_hook(lambda grad: captured[index].append(grad[0].detach()))
        return forward_hook

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
    try:
        reference.loss(train).backward()
    finally:
        for handle in handles:
            handle.remove()
        reference.model.zero_grad(set_to_none=True)
    total = 0
    for i, module in enumerate(modules):
        inputs, output_grads = captured[i]
        weight = grads[id(module.weight)]
        pattern = "si,oi,so->s" if isinstance(module, torch.nn.Linear) else "si,io,so->s"
        total = total + torch.einsum(pattern, inputs, weight, output_grads)
        if module.bias is not None:
            total = total + output_grads @ grads[id(module.bias)]
    return total
