#!/usr/bin/env bash
# The GPU figures in one call: the embed and train benchmarks on one CUDA device.
#
#   bash benchmarks/gpu.sh            # results as JSON lines in $OUT (default ./gpu-results)
#
# A machine without prefect, mlflow, duckdb, open_clip or diffusers can take them as wheels
# in .whl/ (installed into /tmp/site). Each benchmark has its own time limit, so one that
# hangs still leaves the others' figures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cpus", __import__("os").cpu_count())' | tee -a "$OUT/gpu.txt"

run() {  # run NAME SECONDS CMD...: stdout's JSON line to $OUT/NAME.json, the log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
    echo "rc=$? $(tail -c 2000 "$OUT/$name.json")"
}

run embed "${EMBED_LIMIT:-120}" python3 benchmarks/embed.py --device cuda --captions 100000 --batch 1024
run train64 "${TRAIN_LIMIT:-360}" python3 benchmarks/train.py --device cuda --resolution 64 \
    --channels 128,256,384,512 --attention 0,1,1,1 --batch 128 --precision bf16 --modes eager,compiled --steps 20
