"""Side-by-side benchmark: naive per-folder, padded-to-512 scoring vs if-query's multi-folder run.

    uv run python benchmarks/bench_query.py              # full run (about 10 minutes on a busy 2-core machine)
    uv run python benchmarks/bench_query.py --quick      # about 2 minutes
    uv run python benchmarks/bench_query.py --profile    # + one (a) and one (b) process under cProfile (~1 min more)
    uv run python benchmarks/bench_query.py --threads 1  # everything with one thread (steadier when shared)
    uv run python benchmarks/bench_query.py --help       # sizes and switches

Workload (shaped like the real one)
    ``--folders`` (8) query folders of ``--examples-per-folder`` (16) prompt/completion records, with
    train.json = query.json inside a folder and different examples across folders. Prompts have
    ``--prompt-min``..``--prompt-max`` (60..120) tokens, completions ``--completion-min``..``--completion-max``
    (6..10) tokens, plus EOS. The model is a randomly initialised GPT-2 (n_layer 4, n_embd 256, n_head 4,
    n_positions 512, vocabulary about 4k: 4.3M parameters) with a word-level tokenizer built offline with
    ``tokenizers`` (byte-level pre-tokenizer, one token per synthetic word, EOS ``<|endoftext|>``), both
    written with ``save_pretrained`` to a temporary directory. EK-FAC factors are fitted once, with the
    real ``fit-hessians`` CLI, on the union of all examples; both scoring approaches use them.

What is compared (every run is a subprocess of the venv's real console scripts, with ``--quiet``)
    (a) naive: one ``run-query`` process per folder (single mode: --train-json/--query-json/--output-dir,
        ``--score-batch-size 8 --max-length 512``), every sequence padded to 512 tokens.
        EMULATION: if-query has no fixed-padding option (it pads each batch to its own longest sequence),
        so the naive baseline reads files whose prompts are left-filled with random vocabulary words until
        each example is exactly ``--pad-to`` (512) tokens (checked with if-query's own ExampleTokenizer).
        Prompt tokens carry no label, so the measurement is still the completion loss, and a batch of
        512-token sequences costs the same compute as a batch padded to 512 (HF GPT-2 attention and the
        gradient hooks do the same dense work on masked positions). Only the cost is emulated: scores
        differ, since the context differs.
    (b) if-query: ONE ``run-query`` process over all folders, default options (dynamic padding, length
        sorting, model and factors loaded once, one gradient per distinct example).
    (b1) (full run only) the same with OMP_NUM_THREADS=1, because oversubscribed threads on a shared
        2-core machine can make torch's default (one thread per core) several times slower.
    All measured runs use torch's default thread count unless ``--threads N`` is given. The union fit that
    only produces the scoring factors is setup, not a measurement: it runs with one thread (faster and
    steadier on a busy machine).
    fit-hessians: the real CLI on ``--fit-examples`` (64) examples, dynamically padded vs the same examples
    left-filled to 512 tokens (same emulation), default batch sizes (8 covariance / 4 lambda).

How the time is measured and split
    Each measured process is timed as a whole (wall clock around the subprocess, interpreter start and
    imports included); nothing is injected into it. ``--profile`` (off by default) adds two more runs, not
    counted above, under ``python -m cProfile -o FILE`` on the console script itself: (b) over all folders
    and (a) for the first folder. The report lists their import time (cumulative time of importlib's
    ``_find_and_load``), if-query's functions by cumulative time and the top functions by own time (pstats);
    the .prof files are kept beside the report for ``python -m pstats``. By default the subprocesses share a
    warm bytecode cache (PYTHONPYCACHEPREFIX, in the system temp dir) because this sandbox sets
    PYTHONDONTWRITEBYTECODE=1, which would add about 8 s of compiling to every process; ``--no-pycache``
    measures that as it is.

What is counted (FLOPs; P = matmul weights = n_layer*12*d^2 + d*V, T = tokens of one example; tracked
modules = the MLP c_fc and c_proj of every block, with i = d_in + 1 (bias column) and o = d_out)
    useful FLOPs (what scoring needs; one gradient per distinct example, since query = train):
        forward          2*P*T + 2*n_layer*T^2*d     (causal QK^T and AV: half of the T x T products)
        backward         2*P*T + 4*n_layer*T^2*d     (input gradients only: Kronfluence freezes every
                                                      parameter, so autograd forms no weight gradient)
        per-example grad + whitening, per tracked module, the cheaper of the two exact orders:
                         2*T*o*i + 2*o*i*(o + i)       (outer products, then Q_g^T G Q_a)
                         2*T*(o^2 + i^2) + 2*T*o*i     (rotate the T token vectors, then outer products)
        dot products     2*N*N*sum(i*o) per folder (N = distinct examples)
        (the completion loss comes from the same forward, so it adds nothing)
    executed FLOPs: what the installed code asks of the CPU: batches of --score-batch-size sorted by length
        and padded to the batch's longest sequence (512 for the naive baseline). if-query's whitened path:
        forward + backward + per-example gradient + whitening once per distinct example (in the order the
        code picks for the padded length), the dot products, and, if the installed code does not take the
        losses from the gradient pass, one more forward for the completion losses. If the installed
        if-query has no whitened path, Kronfluence's streaming path is counted: query pass with
        rotate-in-and-back preconditioning, a train pass recomputing every gradient, and the loss pass.
    "real tokens" are the unpadded tokens of the distinct examples, each counted once, for both approaches.
    Peak: best of 10 float32 2048x2048 @ 2048x2048 torch.matmul, with torch's default thread count and
    with one thread, measured at the start and at the end of the run; the best of all is the peak.

Results: printed, and written to benchmarks/results/bench_query.md (``--output``), with the raw numbers in
bench_query.json and, with ``--profile``, the profiles bench_query_a.prof and bench_query_b.prof beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import RESULTS as RESULTS_DIR
from common import dump, matmul_peak, synthetic_words, word_tokenizer

DEFAULT_PYCACHE = Path(tempfile.gettempdir()) / "if-query-bench-pycache"
BIN = Path(sys.executable).parent  # the venv's bin: run-query / fit-hessians console scripts


# --------------------------------------------------------------------------------------------- workload


def build_gpt2(directory: Path, words: list[str], n_layer: int, n_embd: int, n_head: int, positions: int,
               seed: int) -> None:
    """A randomly initialised GPT-2 (no dropout) with :func:`common.word_tokenizer`'s vocabulary, saved."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = word_tokenizer(words)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def make_records(words: list[str], args: argparse.Namespace) -> list[list[dict]]:
    """``--folders`` lists of ``--examples-per-folder`` records (prompt and completion lengths from ``args``)."""
    rng = random.Random(args.seed + 1)
    folders = []
    for f in range(args.folders):
        records = []
        for k in range(args.examples_per_folder):
            n_prompt = rng.randint(args.prompt_min, args.prompt_max)
            n_completion = rng.randint(args.completion_min, args.completion_max)
            records.append({
                "pair_id": f"f{f}-{k:02d}",
                "prompt": " ".join(rng.choice(words) for _ in range(n_prompt)),
                "completion": " " + " ".join(rng.choice(words) for _ in range(n_completion)),
            })
        folders.append(records)
    return folders


def _example(record: dict):
    from if_query.data.records import Example

    return Example(record["pair_id"], record["prompt"], record["completion"])


def pad_record(record: dict, example_tokenizer, filler: list[str], pad_to: int, rng: random.Random) -> dict:
    """The naive baseline's record: the prompt left-filled with filler words to exactly ``pad_to`` tokens."""
    missing = pad_to - len(example_tokenizer(_example(record)))
    if missing < 0:
        raise SystemExit(f"{record['pair_id']}: longer than --pad-to {pad_to}")
    prefix = " ".join(rng.choice(filler) for _ in range(missing))
    padded = dict(record, prompt=(prefix + " " + record["prompt"]) if missing else record["prompt"])
    got = len(example_tokenizer(_example(padded)))
    if got != pad_to:
        raise SystemExit(f"padding emulation failed for {record['pair_id']}: {got} tokens, wanted {pad_to}")
    return padded


# --------------------------------------------------------------------------------------------- FLOPs


class FlopModel:
    """FLOP counts of the GPT-2 shaped model (see the module docstring for what is counted)."""

    def __init__(self, n_layer: int, d: int, vocab: int, inner: int | None = None):
        self.n_layer, self.d, self.vocab = n_layer, d, vocab
        inner = inner or 4 * d
        self.matmul_params = n_layer * (3 * d * d + d * d + 2 * d * inner) + d * vocab
        self.tracked = [(d + 1, inner), (inner + 1, d)] * n_layer  # (d_in + bias column, d_out): c_fc, c_proj
        self.grad_size = sum(i * o for i, o in self.tracked)

    def forward(self, t: int) -> float:
        return 2 * self.matmul_params * t + 2 * self.n_layer * t * t * self.d

    def backward(self, t: int) -> float:
        return 2 * self.matmul_params * t + 4 * self.n_layer * t * t * self.d

    @staticmethod
    def rotate_gradient(t: int, i: int, o: int) -> float:
        """Outer products, then Q_g^T G Q_a."""
        return 2 * t * o * i + 2 * o * i * (o + i)

    @staticmethod
    def rotate_tokens(t: int, i: int, o: int) -> float:
        """Rotate the T output gradients and inputs, then the outer products."""
        return 2 * t * (o * o + i * i) + 2 * t * o * i

    def whitened_gradient(self, t: int) -> float:
        """Per-example gradient + rotation into the eigenbasis, the cheaper exact order per module."""
        return sum(min(self.rotate_gradient(t, i, o), self.rotate_tokens(t, i, o)) for i, o in self.tracked)

    def dots(self, q: int, n: int) -> float:
        return 2 * q * n * self.grad_size

    def useful(self, lengths: list[int]) -> dict[str, float]:
        """One folder with query = train = ``lengths``."""
        return {
            "forward": sum(self.forward(t) for t in lengths),
            "backward": sum(self.backward(t) for t in lengths),
            "per-example grad + whitening": sum(self.whitened_gradient(t) for t in lengths),
            "dot products": self.dots(len(lengths), len(lengths)),
        }

    def executed(self, lengths: list[int], batch: int, pad_to: int | None, path: str) -> dict[str, float]:
        """One folder with query = train, as the installed if-query runs it (``path``: see ``scoring_path``)."""
        ordered = sorted(lengths)
        batches = [ordered[i : i + batch] for i in range(0, len(ordered), batch)]
        padded = [(len(b), pad_to or max(b)) for b in batches]
        fwd = sum(n * self.forward(t) for n, t in padded)
        bwd = sum(n * self.backward(t) for n, t in padded)
        n = len(lengths)
        if path == "kronfluence":  # query pass (outer products, rotate in and back), train pass, loss pass
            query = sum(b * (2 * t * o * i + 4 * o * i * (o + i)) for b, t in padded for i, o in self.tracked)
            train = sum(b * 2 * t * o * i for b, t in padded for i, o in self.tracked)
            return {"forward": 3 * fwd, "backward": 2 * bwd, "per-example grad + whitening": query + train,
                    "dot products": self.dots(n, n)}
        if "token rotation" in path:  # the cheaper order chosen per module and batch length
            grads = sum(b * (self.rotate_tokens(t, i, o) if t * (o * o + i * i) <= o * i * (o + i)
                             else self.rotate_gradient(t, i, o)) for b, t in padded for i, o in self.tracked)
        else:
            grads = sum(b * self.rotate_gradient(t, i, o) for b, t in padded for i, o in self.tracked)
        passes = 1 if "losses from the gradient pass" in path else 2
        return {"forward": passes * fwd, "backward": bwd, "per-example grad + whitening": grads,
                "dot products": self.dots(n, n)}


def scoring_path() -> str:
    """Which algorithm the installed if-query uses for query = train without per-token scores."""
    try:
        from if_query.score import engine  # noqa: F401 - the token-factor engine: one pass, token rotation
    except ImportError:
        return "kronfluence"
    return "whitened, token rotation, losses from the gradient pass"


def measure_peak() -> dict:
    """The float32 matmul peak with the default thread count and with one thread; the larger is the peak."""
    import torch

    default_threads = torch.get_num_threads()
    result = {"default_threads": default_threads}
    for threads in dict.fromkeys([default_threads, 1]):
        result[f"threads_{threads}"] = matmul_peak(repeats=10, threads=threads)
    result["peak_flops"] = max(v for k, v in result.items() if k.startswith("threads_"))
    return result


# --------------------------------------------------------------------------------------------- processes


class Processes:
    """Starts the CLIs and times each process as a whole (wall clock), optionally under cProfile."""

    def __init__(self, work: Path, pycache: Path | None):
        self.work = work
        self.log = work / "log.txt"
        self.pycache = pycache
        self.count = 0

    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        if self.pycache is not None:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(self.pycache)
        env.update(extra or {})
        return env

    def run(self, command: list[str], extra_env: dict | None = None, profile: Path | None = None) -> dict:
        """Run ``command`` and return its wall time; with ``profile``, under ``python -m cProfile -o profile``
        (``command[0]`` is then a console script of the venv, which is a Python file)."""
        self.count += 1
        if profile is not None:
            profile.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "cProfile", "-o", str(profile), *command]
        env = self.env(extra_env)
        start = time.perf_counter()
        with open(self.log, "a", encoding="utf-8") as out:
            prefix = "".join(f"{k}={v} " for k, v in (extra_env or {}).items())
            out.write(f"$ {prefix}{' '.join(command)}\n")
            out.flush()
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
        wall = time.perf_counter() - start
        if result.returncode:
            raise SystemExit(f"command failed ({result.returncode}); see {self.log}:\n  {' '.join(command)}")
        return {"wall_s": wall}


def _short(filename: str) -> str:
    """A profiled function's file, from its package on (``site-packages/`` and ``src/`` dropped)."""
    for marker in ("site-packages/", "/src/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def summarize_profile(profile: Path, limit: int = 15) -> dict:
    """A cProfile file: its profiled total, its import time (cumulative time of ``_find_and_load``, outermost
    calls only), if-query's own functions by cumulative time (module bodies left out: they are imports) and
    all functions by own time (pstats' tottime)."""
    import pstats

    stats = pstats.Stats(str(profile)).stats

    def label(filename: str, line: int, name: str) -> str:
        return f"{_short(filename)}:{line}({name})" if line else name

    imports = sum(ct for (filename, _, name), (_, _, _, ct, _) in stats.items()
                  if name == "_find_and_load" and "importlib._bootstrap" in filename)
    own = sorted(((ct, nc, label(*key)) for key, (_, nc, _, ct, _) in stats.items()
                  if "if_query/" in key[0] and key[2] != "<module>"), key=lambda row: -row[0])
    hot = sorted(((tt, nc, label(*key)) for key, (_, nc, tt, _, _) in stats.items()), key=lambda row: -row[0])
    return {"total_s": max(ct for _, _, _, ct, _ in stats.values()), "imports_s": imports,
            "if_query_cumulative": [{"function": f, "s": t, "calls": n} for t, n, f in own[:limit]],
            "own_time": [{"function": f, "s": t, "calls": n} for t, n, f in hot[:limit]]}


# --------------------------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def pct(value: float) -> str:
    return f"{100 * value:.1f}%" if value >= 0.001 else f"{100 * value:.2f}%"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="about 2 minutes: 2 folders, one run each, no fit-hessians comparison, no "
                             "one-thread row")
    parser.add_argument("--folders", type=int, default=8)
    parser.add_argument("--examples-per-folder", type=int, default=16)
    parser.add_argument("--prompt-min", type=int, default=60)
    parser.add_argument("--prompt-max", type=int, default=120)
    parser.add_argument("--completion-min", type=int, default=6)
    parser.add_argument("--completion-max", type=int, default=10)
    parser.add_argument("--pad-to", type=int, default=512, help="naive baseline: tokens per example")
    parser.add_argument("--fit-examples", type=int, default=64, help="examples of the fit-hessians comparison")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--words", type=int, default=2000, help="synthetic words (vocab = 2 x words + 2)")
    parser.add_argument("--score-batch-size", type=int, default=8, help="naive baseline's --score-batch-size")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the if-query multi-folder CLI (best/median)")
    parser.add_argument("--no-streaming-baseline", action="store_true",
                        help="skip (a0): the naive loop with Kronfluence's streaming scorer")
    parser.add_argument("--naive-repeats", type=int, default=1, help="runs of the naive per-folder loop (best)")
    parser.add_argument("--no-one-thread", action="store_true", help="skip row (b1), OMP_NUM_THREADS=1")
    parser.add_argument("--no-fit-compare", action="store_true", help="skip the fit-hessians comparison")
    parser.add_argument("--profile", action="store_true",
                        help="also one (b) run and one (a) process under cProfile: top cumulative functions")
    parser.add_argument("--no-pycache", action="store_true",
                        help="leave PYTHONDONTWRITEBYTECODE as it is (every process compiles its imports)")
    parser.add_argument("--pycache", default=str(DEFAULT_PYCACHE), help="bytecode cache directory (reused)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every measured process and the peak (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "bench_query.md"), help="markdown report path")
    args = parser.parse_args()
    if args.quick:
        args.folders = min(args.folders, 2)
        args.repeats = 1
        args.naive_repeats = 1
        args.no_one_thread = True
        args.no_fit_compare = True
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bench_start = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_query."))
    if args.workdir and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = run_benchmark(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report += f"\nTotal benchmark time: {time.perf_counter() - bench_start:.0f} s.\n"
    print("\n" + report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report, encoding="utf-8")
    print(f"(written to {output})")


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class Workload:
    """The model, the folders (dynamically padded and padded to ``--pad-to``) and the fitting data, in ``work``."""

    model_dir: Path
    example_tokenizer: object  # if_query.data.tokenization.ExampleTokenizer
    lengths: list[list[int]]  # tokens of each example, per folder
    dyn_dirs: list[Path]  # (b)'s folders
    pad_dirs: list[Path]  # (a)'s folders: prompts left-filled to --pad-to tokens
    union: list[dict]  # every folder's records: the scoring factors' fitting data
    fit_records: list[dict]  # the fit-hessians comparison's records
    flops: FlopModel
    n_params: int

    @property
    def real_tokens(self) -> int:
        return sum(sum(ls) for ls in self.lengths)

    @property
    def n_examples(self) -> int:
        return sum(map(len, self.lengths))

    @property
    def vocab(self) -> int:
        return len(self.example_tokenizer.tokenizer)


def build_workload(args: argparse.Namespace, work: Path) -> Workload:
    from if_query.data.tokenization import ExampleTokenizer
    from if_query.model.loading import load_tokenizer

    model_dir = work / "model"
    words = synthetic_words(args.words, args.seed)
    build_gpt2(model_dir, words, args.n_layer, args.n_embd, args.n_head, max(512, args.pad_to), args.seed)
    example_tokenizer = ExampleTokenizer(load_tokenizer(str(model_dir)), 512)
    folders = make_records(words, args)
    rng = random.Random(args.seed + 2)
    lengths: list[list[int]] = []
    dyn_dirs, pad_dirs = [], []
    for f, records in enumerate(folders):
        padded = [pad_record(r, example_tokenizer, words, args.pad_to, rng) for r in records]
        lengths.append([len(example_tokenizer(_example(r))) for r in records])
        for base, recs, dirs in ((work / "queries", records, dyn_dirs), (work / "naive", padded, pad_dirs)):
            folder = base / f"folder_{f}"
            dump(recs, folder / "train.json")
            dump(recs, folder / "query.json")
            dirs.append(folder)
    union = [r for records in folders for r in records]
    dump(union, work / "union.json")
    fit_records = union[: args.fit_examples]
    dump(fit_records, work / "fit_dynamic.json")
    dump([pad_record(r, example_tokenizer, words, args.pad_to, rng) for r in fit_records], work / "fit_padded.json")
    flops = FlopModel(args.n_layer, args.n_embd, len(example_tokenizer.tokenizer))
    n_params = sum(v.numel() for v in _load_state(model_dir).values() if v.dim())
    return Workload(model_dir, example_tokenizer, lengths, dyn_dirs, pad_dirs, union, fit_records, flops, n_params)


class Commands:
    """The run-query command lines of (a) (one per padded folder) and (b) (one over all folders)."""

    def __init__(self, args: argparse.Namespace, w: Workload, factors: Path):
        self.args, self.w, self.factors = args, w, factors
        self.multi = [str(BIN / "run-query"), "--model", str(w.model_dir), "--factors-dir", str(factors),
                      *map(str, w.dyn_dirs), "--quiet"]

    def naive(self, folder: Path, *extra: str) -> list[str]:
        return [str(BIN / "run-query"), "--model", str(self.w.model_dir), "--factors-dir", str(self.factors),
                "--train-json", str(folder / "train.json"), "--query-json", str(folder / "query.json"),
                "--output-dir", str(folder / "results"), "--score-batch-size", str(self.args.score_batch_size),
                "--max-length", "512", "--quiet", *extra]


def measure_scoring(args: argparse.Namespace, procs: Processes, w: Workload, commands: Commands) -> dict:
    """(a), (b), and where asked (a0) and (b1): each a list of runs' ``{"wall_s"}`` (None when skipped)."""

    def naive_loop(*extra: str) -> list[dict]:
        return [procs.run(commands.naive(folder, *extra)) for folder in w.pad_dirs]

    naive_runs, multi_runs = [], []
    # Interleaved (b, a, b, a, ...) so that bursts of load from other users hit both sides alike.
    for i in range(max(args.naive_repeats, args.repeats)):
        if i < args.repeats:
            multi_runs.append(procs.run(commands.multi))
            say(f"(b) if-query multi-folder: {multi_runs[-1]['wall_s']:.1f} s")
        if i < args.naive_repeats:
            naive_runs.append(naive_loop())
            say(f"(a) naive per-folder padded: {sum(r['wall_s'] for r in naive_runs[-1]):.1f} s")
    streaming = None
    if not args.no_streaming_baseline:
        # Kronfluence's own pairwise path per folder (query gradients, a pass over the train set, a
        # self-influence pass): the approach before if-query's one-gradient-per-example path.
        streaming = naive_loop("--engine", "kronfluence")
        say(f"(a0) naive per-folder padded, Kronfluence streaming: {sum(r['wall_s'] for r in streaming):.1f} s")
    check_results(w.dyn_dirs + w.pad_dirs, args.examples_per_folder)
    one_thread = None
    if not args.no_one_thread:
        one_thread = procs.run(commands.multi, extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        say(f"(b1) if-query multi-folder, OMP_NUM_THREADS=1: {one_thread['wall_s']:.1f} s")
    return {"naive_runs": naive_runs, "multi_runs": multi_runs, "streaming": streaming, "one_thread": one_thread}


def measure_fits(args: argparse.Namespace, procs: Processes, w: Workload) -> dict:
    """fit-hessians on the padded and the dynamically padded fitting records (empty with --no-fit-compare)."""
    fit = {}
    if not args.no_fit_compare:
        work = procs.work
        for name in ("padded", "dynamic"):
            fit[name] = procs.run([str(BIN / "fit-hessians"), "--model", str(w.model_dir), "--hessian-dataset",
                                   str(work / f"fit_{name}.json"), "--output-dir", str(work / f"fit_{name}"),
                                   "--strategy", "ekfac", "--factor-batch-size", "8", "--lambda-batch-size", "4",
                                   "--quiet"])
            say(f"fit-hessians {name}: {fit[name]['wall_s']:.1f} s")
    return fit


def measure_profiles(procs: Processes, w: Workload, commands: Commands, output: Path) -> dict:
    """One (b) and one (a) process under cProfile, their profiles beside ``output``."""
    profile = {}
    for name, command in (("b", commands.multi), ("a", commands.naive(w.pad_dirs[0]))):
        prof = output.with_name(f"{output.stem}_{name}.prof")
        run = procs.run(command, profile=prof)
        profile[name] = {"wall_s": run["wall_s"], "file": prof.name, **summarize_profile(prof)}
        say(f"profiled ({name}) run under cProfile: {run['wall_s']:.1f} s")
    return profile


def accounting(args: argparse.Namespace, w: Workload, path: str) -> dict[str, dict[str, float]]:
    """Useful FLOPs, and executed FLOPs of (b) (batches of 8, dynamic padding) and (a), by part."""
    totals: dict[str, dict[str, float]] = {"useful": {}, "executed_dynamic": {}, "executed_padded": {}}
    for ls in w.lengths:
        for key, parts in (("useful", w.flops.useful(ls)),
                           ("executed_dynamic", w.flops.executed(ls, 8, None, path)),
                           ("executed_padded", w.flops.executed(ls, args.score_batch_size, args.pad_to, path))):
            for k, v in parts.items():
                totals[key][k] = totals[key].get(k, 0.0) + v
    return totals


def run_benchmark(args: argparse.Namespace, work: Path) -> str:
    import torch

    path = scoring_path()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    procs = Processes(work, None if args.no_pycache else Path(args.pycache))
    w = build_workload(args, work)
    say(f"workdir {work}; model {w.n_params / 1e6:.2f}M params ({w.flops.matmul_params / 1e6:.2f}M matmul "
        f"weights), vocab {w.vocab}; {args.folders} folders x {args.examples_per_folder} examples, {w.real_tokens} "
        f"real tokens (mean {w.real_tokens / w.n_examples:.1f}/example); if-query scoring path: {path}")
    warm = procs.run([sys.executable, "-c", "import if_query.cli, if_query.run.run_query, if_query.fit.fit_hessians\n"
                      "try:\n import if_query.report.html, if_query.report.summary\nexcept ImportError:\n pass"])
    say(f"import warm-up (bytecode cache {'off' if args.no_pycache else procs.pycache}): {warm['wall_s']:.1f} s")
    peaks = [measure_peak()]
    say(f"peak float32 matmul: {peaks[0]['peak_flops'] / 1e9:.1f} GFLOP/s")
    factors = work / "factors"  # the scoring factors: setup, not measured
    fit_union = procs.run([str(BIN / "fit-hessians"), "--model", str(w.model_dir), "--hessian-dataset",
                           str(work / "union.json"), "--output-dir", str(factors), "--strategy", "ekfac", "--quiet"],
                          extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    say(f"fit-hessians on the union ({len(w.union)} examples, 1 thread, setup): {fit_union['wall_s']:.1f} s")
    commands = Commands(args, w, factors)
    runs = measure_scoring(args, procs, w, commands)
    fit = measure_fits(args, procs, w)
    output = Path(args.output)
    profile = measure_profiles(procs, w, commands, output) if args.profile else None
    peaks.append(measure_peak())
    flops = accounting(args, w, path)

    lines = [scoring_section(args, w, path, runs, flops, peaks),
             f"(a) wall per process: {', '.join(fmt(r['wall_s']) for r in best_naive(runs))} s (each one pays "
             "interpreter start, imports and loading; `--profile` splits one). Import warm-up process (not "
             f"counted above): {warm['wall_s']:.1f} s.\n"]
    if fit:
        lines.append(fit_section(fit, w.fit_records, w.example_tokenizer, args))
    lines.append(f"fit-hessians on the union of {len(w.union)} examples (the scoring factors; setup, one thread): "
                 f"{fmt(fit_union['wall_s'])} s.\n")
    if profile:
        lines.append(profile_section(profile))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps({
        "args": vars(args), "peaks": peaks, "naive_runs": runs["naive_runs"], "multi_runs": runs["multi_runs"],
        "one_thread": runs["one_thread"], "fit": fit, "fit_union": fit_union, "warm_up": warm,
        "useful_flops": flops["useful"], "executed_dynamic": flops["executed_dynamic"],
        "executed_padded": flops["executed_padded"], "real_tokens": w.real_tokens, "lengths": w.lengths,
        "profile": profile, "scoring_path": path,
    }, indent=1), encoding="utf-8")
    return "\n".join(lines)


def best_naive(runs: dict) -> list[dict]:
    """The fastest run of (a)'s per-folder loop (its processes)."""
    return min(runs["naive_runs"], key=lambda loop: sum(r["wall_s"] for r in loop))


def workload_lines(args: argparse.Namespace, w: Workload, path: str, flops: dict, peaks: list[dict]) -> list[str]:
    """The report's paragraphs on the workload, the peak and the FLOP counts."""
    import torch

    useful, exec_dyn, exec_pad = flops["useful"], flops["executed_dynamic"], flops["executed_padded"]
    start_default = peaks[0][f"threads_{peaks[0]['default_threads']}"]
    end_default = peaks[1][f"threads_{peaks[1]['default_threads']}"]
    peak = max(p["peak_flops"] for p in peaks)
    return [
        f"Workload: {args.folders} folders x {args.examples_per_folder} examples (train.json = query.json), prompts "
        f"{args.prompt_min}-{args.prompt_max} tokens, completions {args.completion_min}-{args.completion_max} (+EOS): "
        f"{w.real_tokens} real tokens in {w.n_examples} distinct examples (mean {w.real_tokens / w.n_examples:.1f})."
        f" Model: random GPT-2, n_layer {args.n_layer}, n_embd {args.n_embd}, n_head {args.n_head}, vocab "
        f"{w.vocab}: {w.n_params / 1e6:.2f}M parameters, {w.flops.matmul_params / 1e6:.2f}M matmul weights; EK-FAC "
        f"on {len(w.flops.tracked)} MLP modules ({w.flops.grad_size / 1e6:.2f}M tracked weights with biases). "
        f"if-query scoring path: {path}. "
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, default {peaks[0]['default_threads']} "
        f"threads; bytecode cache {'off (PYTHONDONTWRITEBYTECODE)' if args.no_pycache else 'warm'}.\n",
        "Peak float32 matmul (2048^3, best of 10; default threads / 1 thread): start "
        f"{start_default / 1e9:.1f} / {peaks[0]['threads_1'] / 1e9:.1f}, "
        f"end {end_default / 1e9:.1f} / {peaks[1]['threads_1'] / 1e9:.1f} GFLOP/s; "
        f"peak used: **{peak / 1e9:.1f} GFLOP/s**.\n",
        f"Useful FLOPs: {sum(useful.values()) / 1e9:.0f} GFLOP ("
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in useful.items()) + "). Executed: if-query "
        f"{sum(exec_dyn.values()) / 1e9:.0f} GFLOP (" + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in exec_dyn.items())
        + f"); naive padded {sum(exec_pad.values()) / 1e9:.0f} GFLOP ("
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in exec_pad.items()) + ").\n",
    ]


def scoring_section(args: argparse.Namespace, w: Workload, path: str, runs: dict, flops: dict,
                    peaks: list[dict]) -> str:
    """The scoring benchmark's heading, workload paragraphs and table of (a), (a0), (b), (b1)."""
    peak = max(p["peak_flops"] for p in peaks)
    useful = sum(flops["useful"].values())
    executed_dyn, executed_pad = sum(flops["executed_dynamic"].values()), sum(flops["executed_padded"].values())
    naive_runs, multi_runs = runs["naive_runs"], runs["multi_runs"]
    naive_wall = sum(r["wall_s"] for r in best_naive(runs))
    multi_wall = min(r["wall_s"] for r in multi_runs)

    def row(label: str, processes: int, wall: float, wall_note: str, executed: float) -> str:
        return (f"| {label} | {processes} | {fmt(wall)}{wall_note} | {naive_wall / wall:.1f}x | "
                f"{w.real_tokens / wall:.0f} | {pct(useful / wall / peak)} | {executed / 1e9:.0f} | "
                f"{pct(executed / wall / peak)} |")

    lines = ["## if-query scoring benchmark\n", *workload_lines(args, w, path, flops, peaks),
             "| approach | processes | wall s (start, imports, loading included) | speed-up | real tok/s "
             "| useful % of peak | executed GFLOP | executed % of peak |", "|---|---|---|---|---|---|---|---|"]
    naive_note = f" (best of {len(naive_runs)})" if len(naive_runs) > 1 else ""
    lines.append(row(f"(a) naive: run-query per folder, padded to {args.pad_to}", args.folders, naive_wall,
                     naive_note, executed_pad))
    if runs["streaming"]:
        streaming_wall = sum(r["wall_s"] for r in runs["streaming"])
        lines.append(f"| (a0) naive with Kronfluence's streaming scorer (`--engine kronfluence`), padded to "
                     f"{args.pad_to} | {args.folders} | {fmt(streaming_wall)} | {naive_wall / streaming_wall:.1f}x | "
                     "n/a | n/a | n/a | n/a |")
    multi_med = statistics.median(r["wall_s"] for r in multi_runs)
    multi_note = f" (best of {len(multi_runs)}, median {fmt(multi_med)})" if len(multi_runs) > 1 else ""
    lines.append(row(f"(b) if-query: one run-query, {args.folders} folders", 1, multi_wall, multi_note,
                     executed_dyn).replace(f"| {naive_wall / multi_wall:.1f}x |",
                                           f"| **{naive_wall / multi_wall:.1f}x** |"))
    if runs["one_thread"]:
        lines.append(row("(b1) = (b) with OMP_NUM_THREADS=1", 1, runs["one_thread"]["wall_s"], "", executed_dyn))
    lines.append("")
    return "\n".join(lines)


def _load_state(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def fit_section(fit: dict, fit_records: list[dict], example_tokenizer, args: argparse.Namespace) -> str:
    tokens = sum(len(example_tokenizer(_example(r))) for r in fit_records)
    lines = ["### fit-hessians (EK-FAC), dynamic padding vs padded to "
             f"{args.pad_to}, {len(fit_records)} examples\n",
             "| fitting data | tokens | wall s (start, imports, loading included) | speed-up |",
             "|---|---|---|---|"]
    for name, label, n_tokens in (("padded", f"padded to {args.pad_to} (emulated)", len(fit_records) * args.pad_to),
                                  ("dynamic", "dynamic padding (if-query)", tokens)):
        speed = fit["padded"]["wall_s"] / fit[name]["wall_s"]
        speed_text = f"**{speed:.1f}x**" if name == "dynamic" else "1.0x"
        lines.append(f"| {label} | {n_tokens} | {fmt(fit[name]['wall_s'])} | {speed_text} |")
    return "\n".join(lines) + "\n"


def profile_section(profile: dict) -> str:
    lines = ["### Where the time goes (cProfile, `--profile`)\n",
             "Two more processes, not counted above, under `python -m cProfile -o FILE` on the run-query console "
             "script (profiling slows Python-heavy code down): (b) over all folders and (a) for the first "
             "folder. Imports are the cumulative time of importlib's `_find_and_load`. Open a profile with "
             "`python -m pstats FILE`.\n"]
    for name, label in (("b", "(b) if-query, one run-query over all folders"), ("a", "(a) naive, one folder")):
        run = profile[name]
        lines.append(f"{label}: wall {fmt(run['wall_s'])} s, profiled {fmt(run['total_s'])} s, imports "
                     f"{fmt(run['imports_s'])} s ({run['file']}).\n")
        for key, title in (("if_query_cumulative", "if-query's functions, cumulative s"),
                           ("own_time", "all functions, own s (tottime)")):
            lines.append(f"| {title} | s | calls |")
            lines.append("|---|---|---|")
            for entry in run[key]:
                lines.append(f"| `{entry['function']}` | {fmt(entry['s'], 2)} | {entry['calls']} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def check_results(folders: list[Path], n: int) -> None:
    import pandas as pd

    for folder in folders:
        frame = pd.read_csv(folder / "results" / "influences.csv")
        if len(frame) != n * n or not frame["influence_score"].notna().all():
            raise SystemExit(f"{folder}: unexpected results ({len(frame)} rows)")


if __name__ == "__main__":
    main()
