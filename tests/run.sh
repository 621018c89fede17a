#!/usr/bin/env bash
# Runs every test program and prints the combined "N passed, N failed, N skipped" last.
# Each program prints its own summary line; a program that crashes counts as a failure.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_dstrain  # the counters, and $TMP for test_dstrain's files
python3 tests/schedule_reference.py "$TMP/sched"

skipped=0
run() {
    echo "== $*"
    local out rc summary
    out=$("$@" 2>&1); rc=$?
    echo "$out"
    summary=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -1)
    if [ -z "$summary" ]; then
        echo "FAIL $* (exit $rc, no summary)"
        failed=$((failed + 1))
        return
    fi
    passed=$((passed + $(echo "$summary" | cut -d' ' -f1)))
    failed=$((failed + $(echo "$summary" | cut -d' ' -f3)))
    if [ $rc -ne 0 ] && [ "$(echo "$summary" | cut -d' ' -f3)" = "0" ]; then
        echo "FAIL $* (exit $rc)"
        failed=$((failed + 1))
    fi
}

run ./test_compare
run python3 tests/test_compare.py
run ./test_dstrain "$TMP"
run ./test_gpt dev/data/gpt2_reference.bin
run bash tests/test_cli.sh
run bash tests/test_zero.sh
run python3 tests/test_data.py
run bash tests/test_build.sh
run bash tests/test_gpu_ranks.sh

# The GPU trainer: wherever nvcc exists every CUDA target must compile (a failed build is a
# failed test); its tests run where nvidia-smi -L lists a GPU, and are skipped elsewhere.
cuda_tests() {
    local nvcc gpu=0 arch="" out p
    nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
    if [ -z "$nvcc" ]; then
        echo "== GPU trainer: no nvcc, not built; its 3 tests (test_gpt_cu_fp32, _fp16, _bf16) skipped"
        skipped=$((skipped + 3))
        return
    fi
    nvidia-smi -L 2>/dev/null | grep -q GPU && gpu=1
    [ $gpu -eq 1 ] || arch="CUDA_ARCHS=80" # without a GPU the build is a compile check: one architecture keeps it short
    echo "== make cuda $arch"
    if out=$(make --no-print-directory -j"$(nproc)" cuda $arch 2>&1); then
        echo "$out" | tail -1
        passed=$((passed + 1))
    else
        echo "$out" | tail -40
        echo "FAIL make cuda (the CUDA targets do not compile)"
        failed=$((failed + 1))
        return
    fi
    if [ $gpu -eq 1 ]; then
        for p in fp32 fp16 bf16; do run ./test_gpt_cu_$p dev/data/gpt2_reference.bin; done
    else
        echo "== GPU tests skipped: no GPU (nvidia-smi -L lists none); test_gpt_cu_fp32, _fp16, _bf16 compiled, not run"
        skipped=$((skipped + 3))
    fi
}
cuda_tests

echo
kept
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
