#!/usr/bin/env bash
# The GPU figures in one call, on one CUDA device: the tests that need CUDA, the embed, host-copy, train
# and sample benchmarks and the gpu-32px quality run (benchmarks/quality.py).
#
#   bash benchmarks/gpu.sh                  # all seven; results as JSON lines in $OUT (default ./gpu-results)
#   bash benchmarks/gpu.sh cuda embed sample   # only these (names: cuda, embed, copies, spy, train64, sample, quality)
#   QUALITY_TRAIN_SECONDS=600 QUALITY_LIMIT=1000 bash benchmarks/gpu.sh quality   # a longer training budget (off the device tool)
#   QUALITY_SET="train.loss_weight_floor=0 shapes.n_images=10000" bash benchmarks/gpu.sh quality   # preset overrides
#
# One device call runs at most 600 s. With the default limits (cuda 120 s, embed 150 s, copies 60 s,
# spy 120 s, train64 360 s, sample 180 s, quality 540 s) keep each call's sum under that:
# e.g. `cuda embed copies spy`, then `train64 sample`, then `quality`. On an H100 (eighth session) the
# quality run took 545 s with QUALITY_TRAIN_SECONDS=200: its compile probe alone took 155 s.
#
# A machine without duckdb, open_clip, pydantic, pydantic-settings or diffusers can take them as wheels
# in .whl/ (installed into /tmp/site; `bash benchmarks/gpu_wheels.sh` fetches them; prefect
# and mlflow are not needed). Each benchmark has its own time limit, so one that hangs still
# leaves the others' figures.
set -uo pipefail
# The profiled runs (embed --profile, the CUDA tests) start the profiler after CUDA graphs exist;
# CUPTI torn down and set up again around graphs has crashed processes (pytorch#75504).
export TEARDOWN_CUPTI=0
cd "$(dirname "$0")/.."
wanted() { local name=$1; shift; [[ $# -eq 0 ]] || [[ " $* " == *" $name "* ]]; }  # wanted NAME SELECTED...: none selected = all
selected=("$@")
for name in "${selected[@]}"; do
    case $name in cuda | embed | copies | spy | train64 | sample | quality) ;; *) echo "unknown benchmark '$name': choose from cuda, embed, copies, spy, train64, sample, quality" >&2; exit 2 ;; esac
done
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
    # SIGINT at the limit (py-spy saves its profile only on that), SIGKILL 15 s later.
    timeout -s INT -k 15 "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
    echo "rc=$? $(tail -c 2000 "$OUT/$name.json")"
}


if wanted cuda "${selected[@]}"; then
    # The tests that skip without CUDA (pinned copies, bf16 autocast, the stage's queued copies to the host).
    run cuda "${CUDA_TESTS_LIMIT:-120}" python3 -m pytest -q -p no:cacheprovider -rs -k cuda \
        tests/test_text_encoder.py tests/test_embed.py
    mv "$OUT/cuda.json" "$OUT/cuda.txt"  # pytest's report, not a JSON line
fi
if wanted embed "${selected[@]}"; then
    run embed "${EMBED_LIMIT:-150}" python3 benchmarks/embed.py --device cuda --captions 100000 --batch 1024 --profile  # graphs off and on
fi
if wanted copies "${selected[@]}"; then
    # The embed stage's copies between host and device against the alternatives, host time per call.
    run copies "${COPIES_LIMIT:-60}" python3 benchmarks/host_copies.py
fi
if wanted spy "${selected[@]}"; then
    # The embed benchmark again, CUDA graphs on, under py-spy (every thread, native frames too; gpu_wheels.sh
    # fetches it), summarized per thread by benchmarks/spy_summary.py: where the host's time goes.
    spy=$(command -v py-spy || echo /tmp/site/bin/py-spy)
    if [[ -x $spy ]]; then
        rm -f /tmp/embed-spy.raw  # never an earlier run's profile
        run spy "${SPY_LIMIT:-120}" "$spy" record --threads --idle --native -r 200 --format raw -o /tmp/embed-spy.raw -- \
            python3 benchmarks/embed.py --device cuda --captions 100000 --batch 1024 --naive-captions 64 --tokenize-captions 1000 \
            --cuda-graphs on
        python3 benchmarks/spy_summary.py /tmp/embed-spy.raw --top 15 >"$OUT/spy.txt" 2>&1
        gzip -c /tmp/embed-spy.raw >"$OUT/embed-spy.raw.gz"
        head -c 3000 "$OUT/spy.txt"
    else
        echo "== spy: no py-spy here (bash benchmarks/gpu_wheels.sh fetches it)"
    fi
fi
if wanted train64 "${selected[@]}"; then
    run train64 "${TRAIN_LIMIT:-360}" python3 benchmarks/train.py --device cuda --resolution 64 \
        --channels 128,256,384,512 --attention 0,1,1,1 --batch 128 --precision bf16 --modes eager,compiled --steps 20
fi
if wanted sample "${selected[@]}"; then
    # The steps table's sampler speeds on gpu-32px's UNet (random init: speed needs no training).
    run sample "${SAMPLE_LIMIT:-180}" python3 benchmarks/sample.py --preset gpu-32px \
        --set embed.encoder.allow_random_init=true --no-progress
fi
if wanted quality "${selected[@]}"; then
    # No CLIP weights can reach the box: the seeded random text tower, as the CPU demo uses.
    rm -rf /tmp/t2i-quality  # a finished run there would be returned as it is, with no training timed
    overrides=()
    read -ra pairs <<<"${QUALITY_SET:-}"  # split on spaces only, no globbing
    for kv in "${pairs[@]}"; do overrides+=(--set "$kv"); done
    run quality "${QUALITY_LIMIT:-540}" python3 benchmarks/quality.py --preset gpu-32px "${overrides[@]}" \
        --train-seconds "${QUALITY_TRAIN_SECONDS:-200}" --set embed.encoder.allow_random_init=true \
        --guidance "${QUALITY_GUIDANCE:-2,5}" --no-progress --data-root /tmp/t2i-quality --artifacts "$OUT/quality"
    # One file back: the grid, report, steps table and the training log (also of a run cut short).
    find /tmp/t2i-quality/runs -name metrics.jsonl -exec sh -c 'cp "$1" "$2/$(basename "$(dirname "$1")")-metrics.jsonl"' _ {} "$OUT" \; 2>/dev/null
    mkdir -p "$OUT/quality" && mv "$OUT"/*-metrics.jsonl "$OUT/quality/" 2>/dev/null
    tar -cf "$OUT/quality.tar" -C "$OUT" quality && rm -rf "$OUT/quality"
fi
