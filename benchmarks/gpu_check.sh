#!/usr/bin/env bash
# The GPU check, in one call: the kernel tests compiled for the GPU (TRITON_INTERPRET unset), the kernel
# bench, then a short table. Logs go to $OUT (the device tool's folder) or build/gpu_check.
#   benchmarks/gpu_check.sh                       # python3 (the device image's); PYTHON=... to choose
#   KERNEL_BENCH_ARGS="--prefix 32768 --group 256 --own 512" benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=${OUT:-build/gpu_check}
mkdir -p "$LOG_DIR"
unset TRITON_INTERPRET  # compiled kernels on the GPU, not the CPU interpreter
export PYTHONUNBUFFERED=1

# batchrun may not be installed there: put src/batchrun with kernels/ as batchrun.kernels on the path.
if ! "$PY" -c "import batchrun.kernels" 2>/dev/null; then
    SHIM=$(mktemp -d)
    cp -r src/batchrun "$SHIM/batchrun"
    ln -s "$PWD/kernels" "$SHIM/batchrun/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

# ---- kernel tests, compiled (xdist, where present, compiles the variants in parallel)
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
"$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider $XDIST 2>&1 | tee "$LOG_DIR/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}
tests_line=$(grep -E "passed|failed|error" "$LOG_DIR/kernel_tests.log" | tail -n 1)

# ---- kernel bench
# shellcheck disable=SC2086  # KERNEL_BENCH_ARGS is a list of options
"$PY" benchmarks/kernel_bench.py ${KERNEL_BENCH_ARGS:---quick} --json "$LOG_DIR/kernel_bench.json" 2>&1 \
    | tee "$LOG_DIR/kernel_bench.md"
bench_rc=${PIPESTATUS[0]}

# ---- end-to-end `batchrun run` GPU check: TO BE ADDED HERE by the engine owners --------------------------
# Run `batchrun run` on CUDA over a small plan, compare with the CPU torch backend's output, and set
# e2e_rc / e2e_line for the summary below.
e2e_rc=0
e2e_line="not added yet"
# ---- end of the end-to-end check ------------------------------------------------------------------------

status() { if [ "$1" -eq 0 ]; then echo ok; else echo "FAILED (rc $1)"; fi; }
echo
echo "## GPU check summary"
echo
echo "| check | status | detail |"
echo "| --- | --- | --- |"
echo "| kernel tests (compiled) | $(status "$tests_rc") | ${tests_line:-no pytest summary} |"
echo "| kernel bench | $(status "$bench_rc") | table below; $LOG_DIR/kernel_bench.json |"
echo "| end-to-end batchrun run | $(status "$e2e_rc") | $e2e_line |"
echo
grep -E "^\|" "$LOG_DIR/kernel_bench.md" || true
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$e2e_rc" -eq 0 ]
