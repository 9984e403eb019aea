#!/usr/bin/env bash
# Here (with a package registry), before a GPU check: the wheels of the packages the GPU machine's image lacks,
# into .whl/ (git-ignored), for the device tool to carry:
#   bash scripts/gpu_wheels.sh
#   device run, carry [".whl"]: bash scripts/gpu_check.sh "$OUT"
# The image has python3 3.12 with torch, transformers, accelerate, pandas, typer, safetensors, pyarrow ...
# (../.library/device/KINDS.md); these are the rest of what if-query imports, at uv.lock's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
locked() { grep -A1 "^name = \"$1\"$" uv.lock | sed -n 's/^version = "\(.*\)"/\1/p'; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "kronfluence==$(locked kronfluence)" "einconv==$(locked einconv)" "datasets==$(locked datasets)" \
    "dill==$(locked dill)" "multiprocess==$(locked multiprocess)" "peft==$(locked peft)"
ls .whl
