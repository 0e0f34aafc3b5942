#!/usr/bin/env bash
# The GPU measurements of fxsight in one command, for a lent GPU machine (the device tool's
# `run`, with carry=[".whl"] and timeout_s=600). Prepare the wheels here first, once:
#   bash perf/gpu_run.sh --fetch
# `--fetch` downloads (into .whl/, ignored by git) transformers at the version CI tests
# (the GPU image's is older) and nnsight with what it needs there (Python 3.12).
# On the GPU machine, `bash perf/gpu_run.sh` installs them into /tmp, runs
# `python3 -m perf --device cuda --write` (perf/bench_gpu.py: about 7 minutes, stopping
# itself at 480 s) and copies its results and log to $OUT. Arguments after the script's
# name go to `python3 -m perf` (`--quick`, `--only gpu/forward`; without `--only`, the GPU
# benchmark's parts all run); FXSIGHT_GPU_RUN_DEVICE=cpu runs them on a CPU, a smoke test
# of the script that stores nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    PIP=${PIP:-.venv/bin/pip}
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        transformers==5.24.0 nnsight==0.8.1 greenlet==3.5.6 pydantic==2.14.4 \
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    ls -la .whl
    exit
fi

OUT=${OUT:-/tmp/fxsight-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/transformers-*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fx-site \
        .whl/transformers-*.whl && export PYTHONPATH=/tmp/fx-site
fi
if compgen -G ".whl/nnsight-*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/nnsight-site \
        $(ls .whl/*.whl | grep -v transformers-) && \
        export FXSIGHT_BENCH_NNSIGHT_PATH=/tmp/nnsight-site
fi
DEVICE=${FXSIGHT_GPU_RUN_DEVICE:-cuda}
ARGS=("$@")
[[ " $* " == *" --only "* ]] || ARGS+=(--only gpu)  # (the GPU benchmark only, anywhere)
WRITE=(--write)
[[ "$DEVICE" == cuda* ]] || WRITE=()  # (a smoke run on a CPU stores nothing)
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee "$OUT/gpu.log"
python3 -m perf --device "$DEVICE" "${WRITE[@]}" "${ARGS[@]}" 2>&1 | tee -a "$OUT/gpu.log"
status=$?
cp perf/results/gpu.md perf/results/gpu.json docs/performance.md "$OUT"/ 2>/dev/null
exit $status
