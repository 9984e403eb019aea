"""What every benchmark shares: where results go, JSON files, the float32 matmul peak FLOPs are compared with,
the synthetic word-level workload (words, tokenizer, random OLMo-2, prompt/completion records), the command-line
options of the model's shape, and the distance between two score matrices.

The benchmarks are scripts (``uv run python benchmarks/NAME.py``): Python puts this folder first on ``sys.path``,
so ``import common`` needs no path juggling. A benchmark imports this module (and ``bench_lds``, the quality
benchmark's LDS half), never another benchmark.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EOS = "<|endoftext|>"
# Runs run-query in this interpreter and writes the process's peak RSS (KB) to $IFQ_RSS_FILE at exit.
RUN_QUERY_WITH_RSS = (
    "import atexit, os, resource, sys\n"
    "atexit.register(lambda: open(os.environ['IFQ_RSS_FILE'], 'w').write("
    "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
    "from if_query.cli import run_query_app\n"
    "sys.argv[0] = 'run-query'\n"
    "run_query_app()\n"
)


def dump(value: Any, path: Path) -> None:
    """``value`` as indented JSON (UTF-8, non-ASCII kept), the parent folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_results(name: str, report: str, data: Any) -> Path:
    """A benchmark's report and its numbers: ``results/NAME.md`` and ``results/NAME.json``; the report's path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(report.rstrip("\n") + "\n", encoding="utf-8")
    dump(data, RESULTS / f"{name}.json")
    return path


def matmul_peak(repeats: int = 5, n: int = 2048, threads: int | None = None) -> float:
    """FLOP/s of the best of ``repeats`` float32 (n, n) @ (n, n) products (after one warm-up), with ``threads``
    torch threads (default: the current setting): the peak the benchmarks' FLOP counts are compared with."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(default)
    return 2 * n**3 / best


def add_model_arguments(parser, layers: int, hidden: int, mlp: int, heads: int, layer_stride: int | None = 2) -> None:
    """The random OLMo-2's shape options (bench_scale.build_model reads them), with this benchmark's defaults."""
    parser.add_argument("--layers", type=int, default=layers, help="decoder blocks")
    parser.add_argument("--hidden", type=int, default=hidden, help="hidden size")
    parser.add_argument("--mlp", type=int, default=mlp, help="MLP intermediate size")
    parser.add_argument("--heads", type=int, default=heads, help="attention heads")
    if layer_stride is not None:
        parser.add_argument("--layer-stride", type=int, default=layer_stride, help="track every Nth block's MLP")


def add_fit_and_score_arguments(parser, examples: int = 24, queries: int = 8, train: int = 16) -> None:
    """How many fitting sequences, queries and train examples a fit-then-score benchmark builds."""
    parser.add_argument("--examples", type=int, default=examples, help="fitting sequences")
    parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--train", type=int, default=train)


def fit_and_score_parser(doc: str, workdir: str, layers: int) -> argparse.ArgumentParser:
    """The options of a benchmark that fits factors on a random OLMo-2 (hidden 1024, MLP 2816, 16 heads, ``layers``
    blocks) and scores records: ``--workdir``, the fitting/scored record counts, the model's shape, ``--seed``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(workdir))
    add_fit_and_score_arguments(parser)
    add_model_arguments(parser, layers=layers, hidden=1024, mlp=2816, heads=16)
    parser.add_argument("--seed", type=int, default=0, help="model and records")
    return parser


# --------------------------------------------------------------------------------------------- workload


def synthetic_words(count: int, seed: int) -> list[str]:
    """``count`` distinct lower-case pseudo-words (letters only: the byte-level pre-tokenizer keeps each
    one whole, so one word is one token)."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = [a + b for a in syllables for b in syllables]
    words += [a + b + c for a in syllables[:20] for b in syllables for c in syllables[:10]]
    if count > len(words):
        raise SystemExit(f"--words {count}: at most {len(words)}")
    random.Random(seed).shuffle(words)
    return words[:count]


def word_tokenizer(words: list[str]):
    """A word-level tokenizer (byte-level pre-tokenizer: one token per synthetic word, with and
    without a leading space), EOS ``<|endoftext|>`` = 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, "<unk>": 1}
    for word in words:
        vocab[word] = len(vocab)
        vocab["Ġ" + word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="<unk>")


def model_shape(args: argparse.Namespace) -> dict[str, int]:
    """The shape options :func:`add_model_arguments` added, as :func:`build_olmo2`'s keyword arguments."""
    return {"layers": args.layers, "hidden": args.hidden, "mlp": args.mlp, "heads": args.heads}


def build_olmo2(directory: Path, words: list[str], *, layers: int, hidden: int, mlp: int, heads: int,
                seed: int) -> dict:
    """A randomly initialised OLMo-2 (untied head, 512 positions) with :func:`word_tokenizer`'s vocabulary, saved
    under ``directory`` unless a model is already there (the benchmarks cache it); returns ``{"vocab": size}``."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    tokenizer = word_tokenizer(words)
    config = Olmo2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    torch.manual_seed(seed)
    if not (directory / "config.json").exists():
        Olmo2ForCausalLM(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return {"vocab": len(tokenizer)}


def long_prompt_records(words: list[str], count: int, rng: random.Random) -> list[dict]:
    """``count`` records of a 140-240-word prompt and a 6-10-word completion (150-250 tokens), ids ``c00``..."""
    records = []
    for k in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(140, 240)))
        completion = " " + " ".join(rng.choice(words) for _ in range(rng.randint(6, 10)))
        records.append({"pair_id": f"c{k:02d}", "prompt": prompt, "completion": completion})
    return records


def olmo2_and_records(directory: Path, args: argparse.Namespace, count: int) -> list[dict]:
    """The fit-and-score benchmarks' workload: :func:`build_olmo2` of ``args``' shape and seed in ``directory``
    (2000 synthetic words), and ``count`` :func:`long_prompt_records` of those words (seed + 1)."""
    words = synthetic_words(2000, args.seed)
    build_olmo2(directory, words, **model_shape(args), seed=args.seed)
    return long_prompt_records(words, count, random.Random(args.seed + 1))


def olmo2_forward_backward_flops(lengths: list[int], args: argparse.Namespace) -> float:
    """Useful FLOPs of a frozen-weight forward and backward pass of :func:`build_olmo2`'s model (``args``' shape)
    over sequences of ``lengths`` tokens: 4 P T + 6 L T^2 d, P = the blocks' matmul weights (attention q, k, v, o
    and MLP gate, up, down; the LM head runs at the few labelled positions only), activation gradients only."""
    d, f, layers = args.hidden, args.mlp, args.layers
    weights = layers * (4 * d * d + 3 * d * f)
    return sum(4 * weights * t + 6 * layers * t * t * d for t in lengths)


def fit_hessians_cli(model: Path, data: Path, factors: Path, layer_stride: int, batch_size: int = 4) -> None:
    """Fit EK-FAC factors with the real fit-hessians command (quiet, overwriting)."""
    subprocess.run([sys.executable, "-m", "if_query.cli", "fit-hessians", "--model", str(model),
                    "--hessian-dataset", str(data), "--output-dir", str(factors), "--layer-stride", str(layer_stride),
                    "--factor-batch-size", str(batch_size), "--lambda-batch-size", str(batch_size), "--quiet",
                    "--overwrite"], check=True)


# --------------------------------------------------------------------------------------------- scores


def compare_scores(scores, reference) -> dict[str, float]:
    """Distance of ``scores`` (queries, train) from ``reference`` (same shape, torch tensors): max |difference| /
    max |reference|, the Spearman correlation of each query's train ranking (mean, min), and the mean overlap
    of each query's top 5."""

    def ranks(values):
        return values.argsort(dim=-1).argsort(dim=-1).double()

    a, b = ranks(scores), ranks(reference)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    spearman = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))
    k = min(5, scores.shape[1])
    top = [len(set(x.tolist()) & set(y.tolist())) / k
           for x, y in zip(scores.topk(k, dim=1).indices, reference.topk(k, dim=1).indices, strict=True)]
    return {"max_rel_error": float((scores - reference).abs().max() / reference.abs().max()),
            "spearman_mean": float(spearman.mean()), "spearman_min": float(spearman.min()),
            "top5_overlap": sum(top) / len(top)}
