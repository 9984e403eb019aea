"""Corpus benchmark: exact scores of a few queries against thousands of training documents in bounded memory.

    uv run python benchmarks/bench_corpus.py            # N = 500 and 2,000, + Kronfluence at 500 (about 2 h here)
    uv run python benchmarks/bench_corpus.py --full     # + N = 8,000
    uv run python benchmarks/bench_corpus.py --quick    # N = 200 and 800, a smaller model, --host-memory-gb 1 (~25 min)
    uv run python benchmarks/bench_corpus.py --quick --chunks-only   # N = 200 in 2 chunks and in 200 (~10 min)

Workload. A random OLMo-2 of 8 blocks, hidden 768, MLP 2048 (bench_scale.py's model family), --layer-stride 2
(4 blocks, 12 projections; 123 KB of float32 token factors per token, gate_proj's and up_proj's shared input
kept once), EK-FAC fitted once on 64 documents. 8 queries (prompt/completion records) against N documents of
130-170 tokens in a JSON Lines corpus (``--train-dataset``), ``--host-memory-gb 4``: 2,000 documents are about
37 GB of token factors, more than this machine's RAM, so the train side is streamed in chunks.

Measured per run (a subprocess of the real run-query): wall time, peak RSS of the process, peak disk use of the
output directory and the temp dir (sampled every 0.2 s: the partial results and any spill file), time per
train token (whole run; and the increment between the two largest N, which removes the fixed costs: start-up,
the queries' pass, the factors' first reads). The floor, measured in the same run: one frozen-weight forward and
backward pass over 500 of the same documents (batches of 8), per token. ``--no-cosine`` runs at the largest N
too. ``--engine kronfluence`` at the smallest N only, on the same documents as train.json records (prompt "",
completion = the document: the same tokens, EOS appended; it cannot read a corpus). The smallest N again with a host
budget that leaves one document per chunk (100+ chunks): reads per document (every run counts the documents
``corpus.py`` reads, by name) and CPU time per document against the few-chunk run of the same corpus.
Results: printed and written to benchmarks/results/bench_corpus.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import common  # noqa: E402

SAMPLE_S = 0.2
# run-query, counting each document the corpus reader reads (by name) into IFQ_READS_FILE
RUN_QUERY_COUNTING_READS = (
    "import atexit, collections, json, os\n"
    "from if_query import corpus\n"
    "reads = collections.Counter()\n"
    "class Counted(corpus.Document):\n"
    "    def __init__(self, name, *args):\n"
    "        reads[name] += 1\n"
    "        super().__init__(name, *args)\n"
    "corpus.Document = Counted\n"
    "atexit.register(lambda: open(os.environ['IFQ_READS_FILE'], 'w').write(json.dumps(reads)))\n"
) + common.RUN_QUERY_WITH_RSS


def directory_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
    return total


def run(name: str, options: list[str], work: Path, tmp: Path) -> dict:
    """One run-query process: wall time, peak RSS, peak disk of its output and temp directories (kept in the
    work dir: a rerun of the benchmark measures only what is missing)."""
    measured = work / f"measured-{name}.json"
    if measured.exists():
        return json.loads(measured.read_text())
    result = _run(name, options, work, tmp)
    measured.write_text(json.dumps(result))
    return result


def _run(name: str, options: list[str], work: Path, tmp: Path) -> dict:
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    rss_file, reads_file = work / f"rss-{name}.txt", work / f"reads-{name}.json"
    reads_file.unlink(missing_ok=True)
    env = {**os.environ, "IFQ_RSS_FILE": str(rss_file), "IFQ_READS_FILE": str(reads_file), "TMPDIR": str(tmp)}
    peak = {"disk": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            peak["disk"] = max(peak["disk"], directory_bytes(out, tmp))

    sampler = threading.Thread(target=sample, daemon=True)
    print(f"[bench_corpus] {name}: {' '.join(options)}", file=sys.stderr, flush=True)
    start, cpu_before = time.perf_counter(), _children_cpu_s()
    sampler.start()
    completed = subprocess.run([sys.executable, "-c", RUN_QUERY_COUNTING_READS, *options, "--output-dir", str(out)],
                               env=env, capture_output=True, text=True)
    (work / f"log-{name}.txt").write_text(completed.stderr)  # the plan line: chunks, their size, bytes moved
    wall, cpu = time.perf_counter() - start, _children_cpu_s() - cpu_before
    done.set()
    sampler.join()
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed:\n{completed.stderr[-3000:]}")
    chunks = re.search(r"in (\d+) chunks", completed.stderr)
    reads = list(json.loads(reads_file.read_text()).values())
    return {"name": name, "wall_s": wall, "cpu_s": cpu, "peak_rss_gb": int(rss_file.read_text()) * 1024 / 1e9,
            "peak_disk_gb": peak["disk"] / 1e9, "chunks": int(chunks.group(1)) if chunks else 1,
            "reads_per_document": sum(reads) / len(reads) if reads else None, "most_reads": max(reads, default=None)}


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes: on a shared machine, the work a run did
    (with one torch thread), where its wall time also counts the other jobs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def floor_seconds_per_token(model_dir: Path, documents: list[str], batch: int = 8) -> float:
    """CPU seconds of a frozen-weight forward and backward pass (activation gradients only), per token, in this
    process."""
    import torch

    from if_query.data.tokenization import TokenizedExample, collate, prepare_tokenizer
    from if_query.model.loading import load_model, load_tokenizer
    from if_query.score.capture import forward_backward, frozen_weights

    tokenizer = prepare_tokenizer(load_tokenizer(str(model_dir)))
    model = load_model(str(model_dir), None, torch.float32, torch.device("cpu"))
    examples = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(TokenizedExample(tuple(ids), tuple(ids)))
    tokens = sum(len(e) for e in examples)
    start = time.process_time()  # CPU seconds, as the runs' are counted
    with frozen_weights(model):
        for k in range(0, len(examples), batch):
            forward_backward(model, collate(examples[k : k + batch], tokenizer.pad_token_id))
    return (time.process_time() - start) / tokens


def corpus(words: list[str], count: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(129, 169))) for _ in range(count)]


def prepare(args, work: Path) -> tuple[Path, Path, dict[int, Path], Path, list[str]]:
    """The model, its factors, a corpus file per N, the queries; the documents (for the floor)."""
    words = common.synthetic_words(2000, args.seed)
    model_dir = work / "model"
    common.build_olmo2(model_dir, words, **common.model_shape(args), seed=args.seed)
    rng = random.Random(args.seed + 1)
    documents = corpus(words, max(args.sizes), rng)
    corpora = {}
    for n in args.sizes:
        path = work / f"corpus-{n}.jsonl"
        path.write_text("".join(json.dumps({"id": f"doc{k}", "text": t}) + "\n" for k, t in enumerate(documents[:n])))
        corpora[n] = path
    queries = work / "query.json"
    queries.write_text(json.dumps([{"pair_id": f"q{k}", "prompt": " ".join(rng.choice(words) for _ in range(40)),
                                    "completion": " " + " ".join(rng.choice(words) for _ in range(8))}
                                   for k in range(args.queries)]))
    factors = work / "factors"
    if not (factors / "metadata.json").exists():
        fit_data = work / "fit.json"
        fit_data.write_text(json.dumps([{"pair_id": f"f{k}", "prompt": "", "completion": t}
                                        for k, t in enumerate(corpus(words, args.fit, rng))]))
        common.fit_hessians_cli(model_dir, fit_data, factors, layer_stride=2, batch_size=8)
    return model_dir, factors, corpora, queries, documents


def many_chunks_budget(args, queries: Path, documents: list[str]) -> float:
    """--host-memory-gb that holds the queries' token factors and one and a half documents': a chunk per document."""
    per_token = (args.layers // 2) * (3 * args.mlp + 2 * args.hidden) * 4  # stride 2, float32, gate/up input once
    query_tokens = sum(len(f"{q['prompt']}{q['completion']}".split()) + 1 for q in json.loads(queries.read_text()))
    document_tokens = sum(len(t.split()) + 1 for t in documents) / len(documents)
    return per_token * (query_tokens + 1.5 * document_tokens) / 1e9


def report(runs: list[dict], floor: float, args) -> str:
    lines = [f"# bench_corpus ({args.layers} blocks, hidden {args.hidden}, MLP {args.mlp}, stride 2, {args.queries} "
             f"queries, --host-memory-gb {args.host_memory_gb})", "",
             "| run | N | train tokens | chunks | reads per document (most) | wall s | CPU s | CPU s per document | "
             "CPU s per 1k train tokens | peak RSS GB | peak disk GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        reads = "" if r.get("reads_per_document") is None else f"{r['reads_per_document']:.2f} ({r['most_reads']})"
        lines.append(f"| {r['name']} | {r['n']} | {r['tokens']} | {r['chunks']} | {reads} | {r['wall_s']:.0f} | "
                     f"{r['cpu_s']:.0f} | {r['cpu_s'] / r['n']:.3f} | {1000 * r['cpu_s'] / r['tokens']:.2f} | "
                     f"{r['peak_rss_gb']:.2f} | {r['peak_disk_gb']:.4f} |")
    cosine = sorted((r for r in runs if r["name"].startswith("if-query N")), key=lambda r: r["n"])
    lines += ["", f"Floor (frozen-weight forward + backward over 500 documents, this process): "
              f"{1000 * floor:.2f} CPU s per 1k tokens. Times are CPU seconds (user + system, one torch thread): "
              "the machine may be shared, which wall times also count."]
    few = [r for r in cosine if r["n"] == min(args.sizes)]
    many = [r for r in runs if r["name"].startswith("if-query many chunks")]
    if few and many:
        lines.append(f"N = {many[0]['n']} in {many[0]['chunks']} chunks against {few[0]['chunks']}: "
                     f"{many[0]['cpu_s'] / few[0]['cpu_s']:.2f}x the CPU time per document; reads per document "
                     f"{many[0]['reads_per_document']:.2f} and {few[0]['reads_per_document']:.2f}.")
    if len(cosine) >= 2:
        a, b = cosine[-2], cosine[-1]
        increment = (b["cpu_s"] - a["cpu_s"]) / (b["tokens"] - a["tokens"])
        lines.append(f"Increment from N = {a['n']} to {b['n']}: {1000 * increment:.2f} CPU s per 1k tokens = "
                     f"{increment / floor:.2f}x the floor; RSS {b['peak_rss_gb'] / a['peak_rss_gb']:.2f}x, disk "
                     f"{(b['peak_disk_gb'] + 1e-9) / (a['peak_disk_gb'] + 1e-9):.2f}x.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/if-query-bench-corpus"))
    common.add_model_arguments(parser, layers=8, hidden=768, mlp=2048, heads=12, layer_stride=None)  # stride 2, fixed
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--fit", type=int, default=64, help="fitting documents")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--host-memory-gb", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="also N = 8,000")
    parser.add_argument("--quick", action="store_true",
                        help="4 blocks, hidden 512, MLP 1408, N = 200 and 800, --host-memory-gb 1")
    parser.add_argument("--chunks-only", action="store_true",
                        help="only the smallest N, in a few chunks and in one document per chunk (and the floor)")
    args = parser.parse_args()
    if args.full:
        args.sizes = sorted({*args.sizes, 8000})
    if args.quick:
        args.layers, args.hidden, args.mlp, args.heads, args.sizes, args.fit = 4, 512, 1408, 8, [200, 800], 16
        args.host_memory_gb = 1.0  # 42 KB of token factors per token: 800 documents need about 5 GB, 200 about 1.3
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    model_dir, factors, corpora, queries, documents = prepare(args, work)
    options = ["--model", str(model_dir), "--factors-dir", str(factors), "--query-json", str(queries),
              "--max-length", "512", "--host-memory-gb", str(args.host_memory_gb), "--score-batch-size", "8"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-", dir=work))
    runs = []
    small = min(args.sizes)
    for n in [small] if args.chunks_only else args.sizes:
        tokens = sum(len(t.split()) + 1 for t in documents[:n])  # one token per word, plus EOS
        runs.append({**run(f"if-query N={n}", [*options, "--train-dataset", str(corpora[n])], work, tmp), "n": n,
                     "tokens": tokens})
    budget = many_chunks_budget(args, queries, documents)
    many = [*options[: options.index("--host-memory-gb")], "--host-memory-gb", f"{budget:.6f}",
            *options[options.index("--host-memory-gb") + 2 :]]
    runs.append({**run(f"if-query many chunks N={small}", [*many, "--train-dataset", str(corpora[small])], work,
                       tmp), "n": small, "tokens": runs[0]["tokens"]})
    if not args.chunks_only:
        n = max(args.sizes)
        runs.append({**run(f"if-query --no-cosine N={n}", [*options, "--train-dataset", str(corpora[n]),
                                                            "--no-cosine"], work, tmp), "n": n,
                     "tokens": runs[len(args.sizes) - 1]["tokens"]})
        records = work / f"train-{small}.json"
        records.write_text(json.dumps([{"pair_id": f"doc{k}", "prompt": "", "completion": t}
                                       for k, t in enumerate(documents[:small])]))
        runs.append({**run(f"kronfluence N={small}", [*options, "--train-json", str(records), "--engine",
                                                      "kronfluence"], work, tmp), "n": small,
                     "tokens": runs[0]["tokens"]})
    floor = floor_seconds_per_token(model_dir, documents[:500])
    text = report(runs, floor, args)
    print(text)
    common.write_results("bench_corpus", text, {"runs": runs, "floor_s_per_token": floor,
                                         "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
