#!/usr/bin/env bash
# Every GPU check, in one call, under 8 minutes whatever happens (each step has a time limit; typically ~6):
#   0. setup: orjson from device-wheels/ (or shared/device-wheels/) when the Python lacks it; batchrun from this
#      working tree (a shim on PYTHONPATH maps kernels/ to batchrun.kernels as pyproject's package-dir does:
#      nothing is installed);
#   1. the kernel tests compiled for the GPU (TRITON_INTERPRET unset);
#   2. the kernel bench: the planned path (prepare_step once, attend per layer) at prefix 1k/8k/32k x group
#      16/64/256, own 512, against SDPA and the torch cascade; its headline point is prefix 8192, group 64;
#   3. benchmarks/gpu_e2e.py: a random Llama shaped as Qwen2.5-0.5B (14 query / 2 KV heads: GQA ratio 7, head
#      size 64); greedy fp32 `batchrun run --device cuda` against transformers' generate (identical tokens);
#      the same in bf16 (token agreement, divergences at near-ties); bf16 throughput of batchrun, batchrun
#      --no-share and transformers' generate, after a warm-up run;
#   then a short table. Logs go to $OUT (the device tool's folder; 6 files) or build/gpu_check.
#
#   bash benchmarks/gpu_check.sh                    # python3 (the device image's); PYTHON=... to choose
#   KERNEL_BENCH_ARGS="--own 64" bash benchmarks/gpu_check.sh  # other bench options (keep prefix 8192, group 64)
#   E2E_ARGS="--tiny" bash benchmarks/gpu_check.sh  # a quick end-to-end smoke test instead of the 0.5B model
#   SKIP=tests,bench bash benchmarks/gpu_check.sh   # leave steps out (tests, bench, e2e)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=$(mkdir -p "${OUT:-build/gpu_check}" && cd "${OUT:-build/gpu_check}" && pwd)
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}  # the whole script's limit (8 minutes); the device tool's is 600 s a command
SKIP=${SKIP:-}
unset TRITON_INTERPRET  # compiled kernels on the GPU, not the CPU interpreter
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }
left() { echo $((TOTAL_S - SECONDS)); }
status() {  # an exit code (or "skip") as the table's status
    if [ "$1" = skip ]; then echo skipped; elif [ "$1" -eq 0 ]; then echo ok
    elif [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then echo "FAILED (time)"; else echo "FAILED (rc $1)"; fi
}

# ---- 0. setup ---------------------------------------------------------------------------------------------
setup_notes=()
WHEELS=$(for d in device-wheels shared/device-wheels; do compgen -G "$d/orjson-*.whl" >/dev/null && echo "$d"; done \
    | head -n 1)  # carried beside the tree, or in the session's shared/ folder
if ! "$PY" -c "import orjson" 2>/dev/null; then
    if [ -n "$WHEELS" ]; then  # pip picks the one for this Python
        "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$WHEELS" \
            --target "$SCRATCH/site" orjson 2>&1 | tail -n 3 \
            && export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}" \
            && setup_notes+=("orjson installed from $WHEELS/")
    else
        setup_notes+=("orjson missing and no device-wheels/ or shared/device-wheels/ orjson-*.whl")
    fi
fi
# batchrun from this tree, never an installed copy: a package whose __path__ is src/batchrun, plus kernels/.
mkdir -p "$SCRATCH/shim/batchrun"
ln -s "$PWD/kernels" "$SCRATCH/shim/batchrun/kernels"
cat >"$SCRATCH/shim/batchrun/__init__.py" <<EOF
# batchrun from the working tree $PWD: its modules from src/batchrun, batchrun.kernels from kernels/
__path__ = [__path__[0], "$PWD/src/batchrun"]
__file__ = "$PWD/src/batchrun/__init__.py"
exec(compile(open(__file__, encoding="utf-8").read(), __file__, "exec"))
EOF
export PYTHONPATH="$SCRATCH/shim${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import os, orjson, batchrun.cli, batchrun.kernels, batchrun.model.spec as s; print('batchrun from', \
os.path.dirname(os.path.dirname(s.__file__)) + ', kernels from', os.path.dirname(os.path.realpath(\
batchrun.kernels.__file__)), '(working tree, not installed)')" >"$SCRATCH/setup.txt" 2>&1
setup_rc=$?
setup_notes+=("$(tail -n 1 "$SCRATCH/setup.txt")")
"$PY" -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda',
      torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tail -n 1 | tee "$SCRATCH/env.txt"

# ---- 1. kernel tests, compiled (xdist, where present, compiles the variants in parallel) -------------------
tests_rc=skip; tests_line="SKIP=tests"
if ! skipped tests; then
    XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
    # shellcheck disable=SC2086  # XDIST is a list of options
    timeout -k 5 "${KERNEL_TESTS_TIMEOUT_S:-150}" "$PY" -m pytest tests/test_kernels.py -q -p no:cacheprovider \
        $XDIST 2>&1 | tee "$LOG_DIR/kernel_tests.log"
    tests_rc=${PIPESTATUS[0]}
    tests_line=$(grep -E "[0-9]+ (passed|failed|error|skipped)" "$LOG_DIR/kernel_tests.log" | tail -n 1 | tr -d '=')
fi

# ---- 2. kernel bench: the grid, its headline point read from the same run ----------------------------------
bench_rc=skip; headline_rc=skip; headline="SKIP=bench"
if ! skipped bench; then
    # shellcheck disable=SC2086  # KERNEL_BENCH_ARGS is a list of options
    timeout -k 5 100 "$PY" benchmarks/kernel_bench.py ${KERNEL_BENCH_ARGS:-} --json "$LOG_DIR/kernel_bench.json" \
        2>&1 | tee "$LOG_DIR/kernel_bench.md"
    bench_rc=${PIPESTATUS[0]}
    headline=$("$PY" - "$LOG_DIR/kernel_bench.json" <<'EOF' 2>&1
import json, sys
d = json.load(open(sys.argv[1]))
r = next(r for r in d["rows"] if (r["prefix_len"], r["group_size"]) == (8192, 64))
sdpa = "SDPA not measured" if r["sdpa_us"] is None else f"{r['sdpa_us'] / r['cascade_us']:.2f}x SDPA flash"
torch_c = "" if r["torch_cascade_us"] is None else f", {r['torch_cascade_us'] / r['cascade_us']:.2f}x torch cascade"
print(f"cascade {r['cascade_us']:.1f} us (prepare {r['prepare_us']:.0f} us host): {sdpa}{torch_c}; "
      f"{r['cascade_gbps']:.0f} GB/s = {100 * r['cascade_gbps'] / d['copy_gbps']:.0f}% of copy bandwidth "
      f"({d['copy_gbps']:.0f} GB/s); max abs diff {r['max_abs_diff']:.1e}")
EOF
)
    headline_rc=$?
    headline=$(tail -n 1 <<<"$headline")
fi

# ---- 3. end to end: gpu_e2e.py (its own steps share the time that is left) ---------------------------------
e2e_rc=skip
if ! skipped e2e; then
    budget=$(( $(left) - 25 ))
    [ "$budget" -gt "${E2E_BUDGET_S:-300}" ] && budget=${E2E_BUDGET_S:-300}
    if [ "$budget" -ge 30 ]; then
        # shellcheck disable=SC2086  # E2E_ARGS is a list of options
        timeout -k 5 $((budget + 15)) "$PY" benchmarks/gpu_e2e.py --out-dir "$LOG_DIR" --budget-s "$budget" \
            ${E2E_ARGS:-} 2>&1 | tee "$SCRATCH/e2e.md"
        e2e_rc=${PIPESTATUS[0]}
    else
        e2e_rc=124; echo "| e2e (gpu_e2e.py) | not run | out of time (${budget}s left for it) |" >"$SCRATCH/e2e.md"
    fi
fi

# ---- the summary ------------------------------------------------------------------------------------------
{
    echo
    echo "## GPU check summary ($(cat "$SCRATCH/env.txt"); ${SECONDS}s)"
    echo
    echo "| check | status | detail |"
    echo "| --- | --- | --- |"
    echo "| setup | $(status $setup_rc) | $(printf '%s; ' "${setup_notes[@]}" | sed 's/; $//') |"
    echo "| kernel tests (compiled) | $(status $tests_rc) | ${tests_line:-no pytest summary} |"
    echo "| kernel bench (${KERNEL_BENCH_ARGS:-grid}) | $(status $bench_rc) | table below; kernel_bench.json |"
    echo "| kernel headline P=8192 G=64 own 512 | $(status $headline_rc) | $headline |"
    if skipped e2e; then
        echo "| e2e | skipped | |"
    elif grep -q "^| e2e " "$SCRATCH/e2e.md"; then
        grep "^| e2e " "$SCRATCH/e2e.md"
    else
        echo "| e2e (gpu_e2e.py) | $(status $e2e_rc) | no table: see gpu_e2e.log |"
    fi
    echo
    grep -E "^\|" "$LOG_DIR/kernel_bench.md" 2>/dev/null | grep -v "^| check" || true
    echo
    sed -n '/^| system /,/^$/p' "$SCRATCH/e2e.md" 2>/dev/null
    echo "logs: $LOG_DIR (kernel_tests.log, kernel_bench.md, kernel_bench.json, gpu_e2e.log, gpu_e2e.json, summary.md)"
} | tee "$LOG_DIR/summary.md"
for rc in "$setup_rc" "$tests_rc" "$bench_rc" "$headline_rc" "$e2e_rc"; do
    [ "$rc" = skip ] || [ "$rc" -eq 0 ] || exit 1
done
