#!/usr/bin/env bash
# GPU check: does if-query on CUDA give the CPU's scores? Exits non-zero when a threshold below is missed.
#
# On the device machine (no package registry there: no uv; its own python3 and torch):
#   bash scripts/gpu_wheels.sh                                  # here, once: the packages its image lacks
#   device run, carry [".whl"]: bash scripts/gpu_check.sh "$OUT"
# The project runs from src/ (PYTHONPATH). It fits EK-FAC factors and scores the bundled test query with the
# bundled tiny GPT-2 on the CPU in float32 (the reference), then on the GPU in float32 and bfloat16, plainly and
# under torchrun, and with --engine kronfluence, and compares each run's influence scores with the reference:
#   float32 (--matmul-precision ieee): max |difference| / max |score| <= 1e-3, Spearman per query >= 0.999
#     (cuBLAS and MKL round float32 sums differently; no TF32)
#   bfloat16 (weights and token factors; factors fitted in bfloat16 too): max |difference| / max |score| <= 0.05,
#     Spearman per query (over the 16 train records): mean >= 0.90, min >= 0.70 (bfloat16 keeps 8 bits of mantissa,
#     and near-zero scores trade ranks; calibrated on this script's CPU run, where bfloat16 gives 9.3e-3, a mean of
#     0.943 and a minimum of 0.803 against float32)
# torchrun uses 2 ranks where the machine has 2 or more GPUs: fit-hessians data parallel (NCCL reductions), and
# run-query sharding two copies of the folder. With one GPU, NCCL will not put two ranks on it: torchrun runs one
# rank, and sharding and the reductions stay untested (the script says so).
# Then scripts/gpu_check_scale.py: a random OLMo-2 (gate/up shared inputs) with more tokens than one bounce slot,
# blocks, a spill file, --no-cosine, --per-token-scores, --refine-steps 2 and a corpus in chunks against the plain
# run's scores, and the pipeline's timing on CUDA (scoring <= 1.2 x max(copies alone, compute alone)).
# Only a GPU checks the page-locked stores (the plan page-locks token-factor stores in RAM up to a quarter of the
# free RAM, cudaHostRegister, so the device copies straight from and into them): that registering succeeds, that
# the copies from them are asynchronous, and what it gains; the CPU tests check only the plan's decision and the
# bytes that go direct against those through the bounce slots.
# Each run has its own timeout (RUN_TIMEOUT, seconds) and the whole script a deadline (DEADLINE, 300 s: the device
# budget also pays the machine's start and a rerun). Also runs on a CPU-only machine (every "GPU" run then runs
# on the CPU; SCALE_ARGS="--tokens 1600 --hidden 64 --mlp 256" keeps the second part small): a check of the script.
set -uo pipefail
if [ -z "${IFQ_UNDER_DEADLINE:-}" ]; then
  IFQ_UNDER_DEADLINE=1 timeout "${DEADLINE:-300}" bash "$0" "$@"
  code=$?
  [ "$code" -eq 124 ] && echo "GPU check FAILED: past the ${DEADLINE:-300} s deadline"
  exit "$code"
fi
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${1:-${OUT:-/tmp/if-query-gpu-check}}
PY=${PYTHON:-python3}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/if-query-site \
      .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/if-query-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import kronfluence, if_query.cli" \
  || { echo "a package is missing: run scripts/gpu_wheels.sh here and carry .whl"; exit 1; }
MODEL=src/if_query/demo_data/tiny-gpt2
DATA=$MODEL/training_corpus.json
Q=src/if_query/demo_data/test_query
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'gpus', torch.cuda.device_count())"
RANKS=$(( GPUS >= 2 ? 2 : 1 ))
if [ "$RANKS" -lt 2 ]; then
  echo "one GPU (or none): torchrun runs 1 rank; folder sharding and NCCL reductions stay untested here"
fi
failed=0

run() {  # name, launcher... (the launcher runs `-m if_query.cli COMMAND ...`)
  local name=$1; shift
  local start=$EPOCHREALTIME
  if ! timeout "$RUN_TIMEOUT" "$@" -m if_query.cli fit-hessians --model $MODEL --hessian-dataset $DATA \
      --output-dir "$OUT/f-$name" --factor-batch-size 16 --lambda-batch-size 16 --quiet $EXTRA \
    || ! timeout "$RUN_TIMEOUT" "$@" -m if_query.cli run-query --model $MODEL --factors-dir "$OUT/f-$name" \
      "$OUT/q-$name"/*/ --quiet $EXTRA ${QUERY_EXTRA:-}; then
    echo "$name: FAILED to run"; failed=1; return
  fi
  echo "$name: $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $start}") s"
}

folders() {  # name, copies: copies of the bundled query folder, scored into each folder's results/
  for k in $(seq 1 "$2"); do mkdir -p "$OUT/q-$1/$k" && cp $Q/query.json $Q/train.json "$OUT/q-$1/$k/"; done
}

TORCHRUN="$PY -m torch.distributed.run --nproc_per_node=$RANKS"
for name in cpu-fp32 gpu-fp32 gpu-bf16 kron-fp32 kron-bf16; do folders $name 1; done
for name in torchrun-fp32 torchrun-bf16; do folders $name "$RANKS"; done
EXTRA="--dtype float32 --matmul-precision ieee" CUDA_VISIBLE_DEVICES="" run cpu-fp32 $PY
EXTRA="--dtype float32 --matmul-precision ieee" run gpu-fp32 $PY
EXTRA="--dtype bfloat16" run gpu-bf16 $PY
EXTRA="--dtype float32 --matmul-precision ieee" run torchrun-fp32 $TORCHRUN
EXTRA="--dtype bfloat16" run torchrun-bf16 $TORCHRUN
EXTRA="--dtype float32 --matmul-precision ieee" QUERY_EXTRA="--engine kronfluence" run kron-fp32 $PY
EXTRA="--dtype bfloat16" QUERY_EXTRA="--engine kronfluence" run kron-bf16 $PY

$PY - "$OUT" <<'PY' || failed=1
import csv
import sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
LIMITS = {"fp32": (1e-3, 0.999, 0.999), "bf16": (0.05, 0.90, 0.70)}  # max rel error, Spearman mean and min


def scores(path: Path) -> dict[tuple[str, str], float]:
    with open(path, newline="", encoding="utf-8") as file:
        return {(r["query_id"], r["train_id"]): float(r["influence_score"]) for r in csv.DictReader(file)}


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=1).argsort(dim=1).double()


reference = scores(out / "q-cpu-fp32" / "1" / "results" / "influences.csv")
queries = sorted({q for q, _ in reference})
train = sorted({t for _, t in reference})
ref = torch.tensor([[reference[q, t] for t in train] for q in queries], dtype=torch.float64)
print(f"{'run':<22}{'max rel err':>12}{'spearman mean':>15}{'spearman min':>14}  verdict")
bad = False
for run_dir in sorted(out.glob("q-*/*/results")):
    name = f"{run_dir.parent.parent.name.removeprefix('q-')}/{run_dir.parent.name}"
    if name == "cpu-fp32/1":
        continue
    found = scores(run_dir / "influences.csv")
    got = torch.tensor([[found[q, t] for t in train] for q in queries], dtype=torch.float64)
    rel = float((got - ref).abs().max() / ref.abs().max())
    a, b = ranks(got), ranks(ref)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    rho = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))
    limit_rel, limit_mean, limit_min = LIMITS["bf16" if "bf16" in name else "fp32"]
    ok = rel <= limit_rel and float(rho.mean()) >= limit_mean and float(rho.min()) >= limit_min
    bad |= not ok
    print(f"{name:<22}{rel:>12.2e}{float(rho.mean()):>15.5f}{float(rho.min()):>14.5f}  {'ok' if ok else 'FAILED'}")
sys.exit(1 if bad else 0)
PY
# shellcheck disable=SC2086
$PY scripts/gpu_check_scale.py "$OUT/scale" ${SCALE_ARGS:-} || failed=1
if [ "$failed" -ne 0 ]; then echo "GPU check FAILED"; else echo "GPU check passed"; fi
exit "$failed"
