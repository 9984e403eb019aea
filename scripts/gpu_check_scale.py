"""The GPU check's second part (scripts/gpu_check.sh runs it): what the bundled 2-block GPT-2 never reaches.

A random OLMo-2 (gate_proj and up_proj share an input; the bundled GPT-2's tokenizer), fitted once, then run-query
on its device with: a folder whose token factors exceed one bounce slot (each module's slab over 256 MB at the
default size), blocks (a small --workspace-gb), a spill file (--host-memory-gb 0 --spill-dir), --no-cosine,
--per-token-scores, --refine-steps 2, and a corpus in several chunks (--train-dataset, a small --host-memory-gb)
against the same corpus at once. Exact variants must give the plain run's scores (max |difference| / max |score|
<= 1e-3, Spearman per query >= 0.999 on ranks that count scores within 1e-6 of the largest as ties); refined
scores must be finite. On CUDA, the engine's pipeline is timed on the
folder's store in-process: scoring wall time <= 1.2 x max(copy time, compute time), the copies timed alone (every
module's factors and slabs) and the compute alone (everything already on the device, factors kept).

    python scripts/gpu_check_scale.py OUT [--tokens N] [--device cuda|cpu]
Exits non-zero when a check fails; prints one line per check.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "src" / "if_query" / "demo_data" / "tiny-gpt2"
WORDS = [f"w{k}" for k in range(400)]


def tie_tolerant_spearman(got: torch.Tensor, ref: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Spearman per row, with scores within ``tolerance`` of each other (on the reference's scale) ranked as ties
    (average ranks on values snapped to a grid of that size): near-ties that trade places do not count."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        snapped = torch.round(x / tolerance)
        out = torch.empty_like(x)
        for row in range(x.shape[0]):
            _, inverse, counts = torch.unique(snapped[row], return_inverse=True, return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            out[row] = (starts + (counts - 1) / 2.0)[inverse].double()
        return out

    a, b = ranks(got), ranks(ref)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    norms = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norms > 0, (a * b).sum(dim=1) / norms.clamp_min(1e-30), torch.ones_like(norms))


def scores(path: Path) -> dict[tuple[str, str], float]:
    with open(path, newline="", encoding="utf-8") as file:
        return {(r["query_id"], r["train_id"]): float(r["influence_score"]) for r in csv.DictReader(file)}


def compare(name: str, got: dict, ref: dict) -> bool:
    queries, train = sorted({q for q, _ in ref}), sorted({t for _, t in ref})
    a = torch.tensor([[got[q, t] for t in train] for q in queries], dtype=torch.float64)
    b = torch.tensor([[ref[q, t] for t in train] for q in queries], dtype=torch.float64)
    largest = float(b.abs().max())
    rel = float((a - b).abs().max()) / largest
    rho = tie_tolerant_spearman(a, b, 1e-6 * largest)
    ok = rel <= 1e-3 and float(rho.min()) >= 0.999
    print(f"{name:<28} max rel err {rel:.2e}, Spearman min {float(rho.min()):.5f}: {'ok' if ok else 'FAILED'}")
    return ok


def build(out: Path, tokens: int, hidden: int, mlp: int) -> tuple[Path, Path, Path, Path]:
    """The random OLMo-2, the fitting data, a folder (queries = train) of about ``tokens`` tokens, a corpus."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Olmo2Config

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = Olmo2Config(num_hidden_layers=4, hidden_size=hidden, intermediate_size=mlp, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    model_dir = out / "olmo2"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    count = max(4, tokens // 200)
    records = [{"pair_id": f"r{k}", "prompt": text(13), "completion": text(30)} for k in range(count)]
    folder = out / "folder"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("query.json", "train.json"):
        (folder / name).write_text(json.dumps(records[:4] if name == "query.json" else records))
    fit = out / "fit.json"
    fit.write_text(json.dumps(records[: min(count, 16)]))
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text(60)}) + "\n" for _ in range(24)))
    return model_dir, fit, folder, corpus


def cli(*args: object, timeout: int = 240) -> None:
    subprocess.run([sys.executable, "-m", "if_query.cli", *map(str, args)], check=True, timeout=timeout)


def time_pipeline(model_dir: Path, factors_dir: Path, folder: Path, device: torch.device) -> bool:
    """The folder's store scored in-process three ways: copies alone, compute alone, the pipeline."""
    from transformers import AutoModelForCausalLM

    from if_query.data.records import load_examples
    from if_query.data.tokenization import ExampleTokenizer
    from if_query.kron.factors import HessianFactors
    from if_query.model.loading import load_tokenizer
    from if_query.model.tracking import find_tracked_modules, shared_inputs_by_name
    from if_query.plan.sizes import Shape, bounce_slot_bytes
    from if_query.score import engine
    from if_query.score.capture import capture_token_factors
    from if_query.score.store import TokenFactorStore
    from if_query.score.transfer import FACTORS, Transfers

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    modules = shared_inputs_by_name(find_tracked_modules(model, 1, "mlp"))
    shapes = [Shape.of(m) for m in modules]
    tokenizer = ExampleTokenizer(load_tokenizer(str(model_dir), None), 512)
    examples = [tokenizer(e, "train.json") for e in load_examples(folder / "train.json")]
    store = TokenFactorStore({m.name: (m.out_features, m.in_features) for m in modules}, [len(e) for e in examples],
                             torch.float32, 10**12, None, {m.name: m.input_from for m in modules if m.input_from})
    linears = {m.name: model.get_submodule(m.name) for m in modules}
    capture_token_factors(model, linears, examples, store, [[k] for k in range(len(examples))],
                          tokenizer.tokenizer.pad_token_id or 0, device)
    factors = HessianFactors(factors_dir)
    transfers = Transfers(device, bounce_bytes=bounce_slot_bytes(shapes, factors.strategy))
    side = engine.Side(store, range(len(examples)))

    def timed(work) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    def copies() -> None:
        for shape in shapes:
            with transfers.streams.copying(shape.name):
                for source in factors.ranges(shape.name).values():
                    transfers.to_device(source, FACTORS)
                if not shape.shares_input:
                    transfers.to_device(store.slab_source("inputs", shape.name))
                transfers.to_device(store.slab_source("output_grads", shape.name))
            torch.cuda.current_stream(device).wait_stream(transfers.streams.copy)

    setup = engine.Setup(factors, shapes, None, device, transfers=transfers)
    engine.score(side, side, setup, 4 * 10**9, False)  # warm: kernels, allocator
    copy_time = timed(copies)
    resident = engine.Setup(factors, shapes, None, device, transfers=transfers, resident={})
    engine.score(side, side, resident, 4 * 10**9, False)  # factors kept from here on
    on_device = {kind: {s.name: store.slab_source(kind, s.name).to(device) for s in shapes if kind == "output_grads"
                        or not s.shares_input} for kind in ("inputs", "output_grads")}
    original = store.slab_source
    store.slab_source = lambda kind, name: on_device[kind][store.input_of[name] if kind == "inputs" else name]
    in_place = engine.Setup(factors, shapes, None, device, transfers=Transfers(device, staged=False),
                            resident=resident.resident)
    compute_time = timed(lambda: engine.score(side, side, in_place, 4 * 10**9, False))
    store.slab_source = original
    pipeline_time = timed(lambda: engine.score(side, side, setup, 4 * 10**9, False))
    ok = pipeline_time <= 1.2 * max(copy_time, compute_time)
    print(f"pipeline timing: scoring {pipeline_time:.2f} s, copies alone {copy_time:.2f} s, compute alone "
          f"{compute_time:.2f} s (scoring <= 1.2 x the larger: {'ok' if ok else 'FAILED'}); "
          f"{store.nbytes / 1e9:.2f} GB of token factors, {store.tokens} tokens")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, default=24000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    out = args.out
    model_dir, fit, folder, corpus = build(out, args.tokens, args.hidden, args.mlp)
    factors = out / "factors"
    common = ("--dtype", "float32", "--matmul-precision", "ieee", "--quiet")
    cli("fit-hessians", "--model", model_dir, "--hessian-dataset", fit, "--output-dir", factors,
        "--factor-batch-size", 4, "--lambda-batch-size", 4, *common)
    runs = {"plain": (), "blocks": ("--workspace-gb", "0.001"), "spill": ("--host-memory-gb", "0", "--spill-dir",
                                                                          out / "spill"),
            "no-cosine": ("--no-cosine",), "per-token": ("--per-token-scores",), "refine": ("--refine-steps", "2")}
    ok = True
    for name, extra in runs.items():
        start = time.perf_counter()
        cli("run-query", "--model", model_dir, "--factors-dir", factors, "--query-json", folder / "query.json",
            "--train-json", folder / "train.json", "--output-dir", out / name, *common, *extra)
        print(f"run-query {name}: {time.perf_counter() - start:.1f} s")
    reference = scores(out / "plain" / "influences.csv")
    for name in ("blocks", "spill", "no-cosine", "per-token"):
        ok &= compare(name, scores(out / name / "influences.csv"), reference)
    refined = scores(out / "refine" / "influences.csv")
    finite = all(v == v and abs(v) != float("inf") for v in refined.values())
    print(f"{'refine (2 steps)':<28} finite: {'ok' if finite else 'FAILED'}")
    ok &= finite
    for name, extra in (("corpus-at-once", ()), ("corpus-chunks", ("--host-memory-gb", "0.02"))):
        cli("run-query", "--model", model_dir, "--factors-dir", factors, "--query-json", folder / "query.json",
            "--train-dataset", corpus, "--output-dir", out / name, *common, *extra)
    plan = json.loads((out / "corpus-chunks" / "run.json").read_text())["plan"]
    chunked = plan["mode"] == "chunks" and plan["chunks"] >= 2
    print(f"{'corpus in chunks':<28} {plan['chunks']} chunks: {'ok' if chunked else 'FAILED (one chunk)'}")
    ok &= chunked and compare("corpus chunks vs at once", scores(out / "corpus-chunks" / "influences.csv"),
                              scores(out / "corpus-at-once" / "influences.csv"))
    if args.device == "cuda":
        ok &= time_pipeline(model_dir, factors, folder, torch.device("cuda"))
    else:
        print("pipeline timing: not on a GPU (skipped)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
