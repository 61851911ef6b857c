#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh needs on a lent GPU machine, fetched here into .whl/ (that
# machine reaches no registry; its image has torch, pyarrow, pillow, numpy, pytest, tqdm,
# regex, huggingface-hub, safetensors and timm, but not these). Versions are the ones this
# checkout's .venv runs, so the GPU runs the code CI tests.
#
#   bash benchmarks/gpu_wheels.sh                  # for the device's Python 3.12
#   PYVER=3.11 bash benchmarks/gpu_wheels.sh       # for another Python (e.g. to try the set here)
#
# Then pass `carry: [".whl"]` to the device call (.gitignore keeps .whl/ out of git); gpu.sh
# installs them into /tmp/site itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
PYSPY_VERSION=0.4.3
# What `tasks.embed`, `tasks.settings` and open_clip import beyond that image, and diffusers
# for train64's baseline (prefect and mlflow are optional there: tasks.prefect_compat and the
# benchmarks run without them).
PACKAGES=(duckdb open_clip_torch ftfy wcwidth pydantic pydantic_core annotated-types typing-inspection
          pydantic-settings python-dotenv diffusers importlib_metadata)
[[ -x $PY ]] || { echo "no $PY: run 'make install' first (the versions come from it)" >&2; exit 2; }
rm -rf .whl && mkdir .whl
platforms=()
for n in 17 24 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
# py-spy, for `gpu.sh spy`: a profiler, not a dependency, so not in .venv; one static binary.
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 -d .whl "py-spy==$PYSPY_VERSION"
ls -1 .whl
size=$(du -sm .whl | cut -f1)
echo "$(ls .whl | wc -l) wheels, ${size} MiB (a device call carries at most 64 MiB in all)"
(( size < 60 )) || { echo "too big to carry" >&2; exit 1; }
