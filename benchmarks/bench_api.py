"""One loaded Attributor against one run-query process per request: what a web app pays per small query set.

    uv run python benchmarks/bench_api.py                 # 3 requests, 2 rounds (about 4 minutes here)
    uv run python benchmarks/bench_api.py --requests 5 --rounds 3 --threads 1

Workload: the bundled tiny GPT-2 (``if_query.demo_model()``) and its 240 training records as the train side;
each request is one query record (a fact of the demo's world). Factors are fitted once (setup, not measured)
with ``fit_hessians`` on the same records.

Measured, in rounds that interleave the two approaches (every process the venv's interpreter, timed as a whole):
    (a) one ``run-query`` process per request (``--query-json``, ``--train-json``, ``--output-dir``, ``--quiet``),
        as a client that shells out does: interpreter start, imports, model and factor load and scoring, each time.
    (b) one process that imports ``if_query``, builds one ``Attributor`` (model, tokenizer and factors loaded once)
        and calls ``score`` once per request, writing nothing; it reports its load time and each call's time.
Scores are checked equal between (a) and (b) (relative to the largest), so the two do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import write_results

# A fact of the demo's world per request (its prompt and completion, as the world states it).
REQUESTS = [("Quecos Weall works as a", " saltcarver."), ("Jivosh Krand lives in", " Calveth."),
            ("The favourite colour of Sates Taim is", " glaucet."), ("Vorzeal Nath lives in", " Belmora."),
            ("Krivell Graskrur works as a", " bellfounder.")]

# Process (b): one Attributor, one call per request; prints its times and scores as JSON.
ATTRIBUTOR = """
import json, sys, time
start = time.perf_counter()
from if_query import Attributor
model, factors, train, requests = json.loads(sys.argv[1])
with Attributor(model=model, factors_dir=factors, quiet=True) as attributor:
    loaded = time.perf_counter() - start
    calls, scores = [], []
    for request in requests:
        t = time.perf_counter()
        results = attributor.score(request, train=train)
        calls.append(time.perf_counter() - t)
        scores.append(results.influences.sort_values("train_id")["influence_score"].tolist())
print(json.dumps({"loaded": loaded, "calls": calls, "scores": scores}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3, help="query sets per round, one record each (at most 5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running (a) then (b)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every measured process")
    args = parser.parse_args()
    from if_query import demo_model, fit_hessians

    model = demo_model()
    train = str(model / "training_corpus.json")
    requests = [[{"pair_id": f"r{i}", "prompt": p, "completion": c}] for i, (p, c) in
                enumerate(REQUESTS[: args.requests])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    work = Path(tempfile.mkdtemp(prefix="bench_api-"))
    factors = work / "factors"
    fit_hessians(model=str(model), hessian_dataset=train, output_dir=str(factors), quiet=True)
    run_query = Path(sys.executable).parent / "run-query"
    rounds = []
    for round_ in range(args.rounds):
        per_process, cli_scores = [], []
        for i, request in enumerate(requests):  # (a)
            query = work / f"q{i}.json"
            query.write_text(json.dumps(request))
            out = work / f"a{round_}-{i}"
            t = time.perf_counter()
            subprocess.run([str(run_query), "--model", str(model), "--factors-dir", str(factors), "--query-json",
                            str(query), "--train-json", train, "--output-dir", str(out), "--quiet"],
                           check=True, env=env)
            per_process.append(time.perf_counter() - t)
            cli = pd.read_csv(out / "influences.csv").sort_values("train_id")
            cli_scores.append(cli["influence_score"].tolist())
        t = time.perf_counter()  # (b)
        done = subprocess.run([sys.executable, "-c", ATTRIBUTOR,
                               json.dumps([str(model), str(factors), train, requests])],
                              check=True, env=env, capture_output=True, text=True)
        whole = time.perf_counter() - t
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        largest = max(abs(s) for scores in cli_scores for s in scores)
        differ = max(abs(a - b) for x, y in zip(cli_scores, measured["scores"], strict=True)
                     for a, b in zip(x, y, strict=True)) / largest
        rounds.append({"processes": per_process, "attributor_process": whole, "attributor_load": measured["loaded"],
                       "calls": measured["calls"], "relative_difference": differ})
        print(f"round {round_}: (a) {sum(per_process):.1f} s in {len(requests)} processes; (b) {whole:.1f} s "
              f"(load {measured['loaded']:.1f} s, calls {', '.join(f'{c:.2f}' for c in measured['calls'])} s); "
              f"scores differ by {differ:.1e} of the largest", flush=True)
    threads = args.threads or "default"
    lines = [f"# bench_api: {len(requests)} requests, {args.rounds} rounds, OMP_NUM_THREADS={threads}",
             "", "| round | (a) processes, s each | (a) total, s | (b) process, s | (b) load, s | (b) calls, s each | "
             "(a) / (b) | scores differ (of largest) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rounds):
        ratio = sum(r["processes"]) / r["attributor_process"]
        lines.append(f"| {i} | {', '.join(f'{p:.1f}' for p in r['processes'])} | {sum(r['processes']):.1f} | "
                     f"{r['attributor_process']:.1f} | {r['attributor_load']:.1f} | "
                     f"{', '.join(f'{c:.2f}' for c in r['calls'])} | {ratio:.1f}x | {r['relative_difference']:.1e} |")
    print("\n".join(lines))
    print(f"written to {write_results('bench_api', chr(10).join(lines), rounds)}")


if __name__ == "__main__":
    main()
