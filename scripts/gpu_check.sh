#!/usr/bin/env bash
# GPU check, on the device machine (no package registry there: no uv; its own python3 and torch):
#   bash scripts/gpu_wheels.sh                                  # here, once: the packages its image lacks
#   device run, carry [".whl"]: bash scripts/gpu_check.sh "$OUT"
# The project runs from src/ (PYTHONPATH). Fits EK-FAC factors and scores the bundled test query with the
# bundled tiny GPT-2 on CPU in float32 (the reference), then on the GPU in float32 and bfloat16, plainly and
# under torchrun (--nproc_per_node=1), and with --engine kronfluence, and compares each GPU run's scores with
# the CPU reference (Spearman rank correlation and max relative error of influence_score, max abs diff of
# cosine). Also runs on a CPU-only machine (every "GPU" run then runs on the CPU): a check of the script.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${1:-${OUT:-/tmp/if-query-gpu-check}}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/if-query-site \
      .whl/*.whl
  export PYTHONPATH=/tmp/if-query-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import kronfluence, datasets, if_query.cli" \
  || { echo "a package is missing: run scripts/gpu_wheels.sh here and carry .whl"; exit 1; }
MODEL=src/if_query/demo_data/tiny-gpt2
DATA=$MODEL/training_corpus.json
Q=src/if_query/demo_data/test_query
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

run() {  # name, launcher... (the launcher runs `-m if_query.cli COMMAND ...`)
  local name=$1; shift
  local start=$EPOCHREALTIME
  "$@" -m if_query.cli fit-hessians --model $MODEL --hessian-dataset $DATA --output-dir "$OUT/f-$name" \
      --factor-batch-size 16 --lambda-batch-size 16 --quiet $EXTRA
  "$@" -m if_query.cli run-query --model $MODEL --factors-dir "$OUT/f-$name" --train-json $Q/train.json \
      --query-json $Q/query.json --output-dir "$OUT/r-$name" --quiet $EXTRA ${QUERY_EXTRA:-}
  echo "$name: $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $start}") s"
}

TORCHRUN="$PY -m torch.distributed.run --nproc_per_node=1"
EXTRA="--dtype float32" CUDA_VISIBLE_DEVICES="" run cpu-fp32 $PY
EXTRA="--dtype float32" run gpu-fp32 $PY
EXTRA="--dtype bfloat16" run gpu-bf16 $PY
EXTRA="--dtype float32" run torchrun-fp32 $TORCHRUN
EXTRA="--dtype bfloat16" run torchrun-bf16 $TORCHRUN
EXTRA="--dtype float32" QUERY_EXTRA="--engine kronfluence" run kron-fp32 $PY
EXTRA="--dtype bfloat16" QUERY_EXTRA="--engine kronfluence" run kron-bf16 $PY

$PY - "$OUT" <<'PY'
import sys
from pathlib import Path
import pandas as pd
out = Path(sys.argv[1])
ref = pd.read_csv(out / "r-cpu-fp32" / "influences.csv")
print(f"{'run':<16}{'spearman':>10}{'max rel err':>14}{'max |dcos|':>12}")
for name in ("gpu-fp32", "gpu-bf16", "torchrun-fp32", "torchrun-bf16", "kron-fp32", "kron-bf16"):
    run = pd.read_csv(out / f"r-{name}" / "influences.csv")
    assert (run[["query_id", "train_id"]] == ref[["query_id", "train_id"]]).all().all()
    a, b = ref["influence_score"], run["influence_score"]
    rho = a.rank().corr(b.rank())
    rel = ((a - b).abs() / a.abs().max()).max()
    dcos = (ref["influence_cosine"] - run["influence_cosine"]).abs().max()
    print(f"{name:<16}{rho:>10.5f}{rel:>14.2e}{dcos:>12.2e}")
PY
