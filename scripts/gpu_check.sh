#!/usr/bin/env bash
# GPU check (run on a CUDA machine, e.g. with the device tool):
#   bash scripts/gpu_check.sh [OUT_DIR]
# Fits EK-FAC factors and scores the bundled test query with the bundled tiny GPT-2 on CPU in float32
# (the reference), then on the GPU in float32 and bfloat16, plainly and under
# `torchrun --nproc_per_node=1`, and compares each GPU run's scores with the CPU reference
# (Spearman rank correlation and max relative error of influence_score, max abs diff of cosine).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-${OUT:-/tmp/if-query-gpu-check}}
mkdir -p "$OUT"
MODEL=src/if_query/demo_data/tiny-gpt2
DATA=$MODEL/training_corpus.json
Q=src/if_query/demo_data/test_query
command -v uv >/dev/null || python3 -m pip install -q uv
uv sync --locked -q
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
uv run python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

run() {  # name, launcher..., -- extra args
  local name=$1; shift
  local start=$(date +%s.%N)
  "$@" fit-hessians --model $MODEL --hessian-dataset $DATA --output-dir "$OUT/f-$name" \
      --factor-batch-size 16 --lambda-batch-size 16 --quiet $EXTRA
  "$@" run-query --model $MODEL --factors-dir "$OUT/f-$name" --train-json $Q/train.json \
      --query-json $Q/query.json --output-dir "$OUT/r-$name" --quiet $EXTRA ${QUERY_EXTRA:-}
  echo "$name: $(echo "$(date +%s.%N) - $start" | bc) s"
}

EXTRA="--dtype float32" CUDA_VISIBLE_DEVICES="" run cpu-fp32 uv run
EXTRA="--dtype float32" run gpu-fp32 uv run
EXTRA="--dtype bfloat16" run gpu-bf16 uv run
EXTRA="--dtype float32" run torchrun-fp32 uv run torchrun --nproc_per_node=1 --no-python
EXTRA="--dtype bfloat16" run torchrun-bf16 uv run torchrun --nproc_per_node=1 --no-python
EXTRA="--dtype float32" QUERY_EXTRA="--engine kronfluence" run kron-fp32 uv run
EXTRA="--dtype bfloat16" QUERY_EXTRA="--engine kronfluence" run kron-bf16 uv run

uv run python - "$OUT" <<'PY'
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
