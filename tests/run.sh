#!/usr/bin/env bash
# Runs every test program and prints the combined "N passed, N failed, N skipped" last.
# Each program prints its own summary line; a program that crashes counts as a failure.
# Arguments: the PyTorch reference files for test_gpt and the GPU tests (`make test` passes
# every configuration of dev/reference.py and dev/reference_hf.py; default: the ones in dev/data).
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_dstrain  # the counters, and $TMP for test_dstrain's files
python3 tests/schedule_reference.py "$TMP/sched"
refs=("$@")
[ $# -gt 0 ] || refs=(dev/data/*reference*.bin)

skipped=0
# count OUTPUT STATUS NAME: adds a program's last "N passed, N failed[, N skipped]" line to
# the totals; no such line, or a failing status with no failed test, is one more failure
count() {
    local summary p f s
    summary=$(echo "$1" | grep -E '^[0-9]+ passed, [0-9]+ failed' | tail -1)
    if [ -z "$summary" ]; then
        echo "FAIL $3 (exit $2, no summary)"
        failed=$((failed + 1))
        return
    fi
    read -r p _ f _ s _ <<<"${summary//,/}"
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + ${s:-0}))
    if [ "$2" -ne 0 ] && [ "$f" = 0 ]; then
        echo "FAIL $3 (exit $2)"
        failed=$((failed + 1))
    fi
}

run() {
    echo "== $*"
    local out rc
    out=$("$@" 2>&1); rc=$?
    echo "$out"
    count "$out" $rc "$*"
}

run ./test_compare
run python3 tests/test_compare.py
run ./test_dstrain "$TMP"
for r in "${refs[@]}"; do run ./test_gpt "$r"; done
run bash tests/test_cli.sh
run "${PYTHON_TORCH:-/usr/bin/python3}" tests/test_hf.py  # with transformers: Debian's PyTorch plus pip's transformers
run bash tests/test_zero.sh
run bash tests/test_zero.sh llama
run bash tests/test_scaling.sh
run bash tests/test_hf_job.sh
run python3 tests/test_data.py
run python3 tests/test_plot.py
run bash tests/test_build.sh
run bash tests/test_gpu_ranks.sh
run bash tests/test_gpu_llama.sh

# The GPU code under the CUDA emulator (../shared/cuda-emu/README.md), where there is no GPU:
# test_gpt.cu on every reference and each dev/cuda check, in FP32, FP16 and BF16, each on a
# line of its own with its time. A dev/cuda check is one test (it prints PASS or FAIL). Status
# 87 is CUDA the emulator lacks: a skip that gives the emulator's reason.
# On this project's 2-core machine (shared) a clean run took 634 s, 128 s of it the builds.
EMU=../shared/cuda-emu/run.sh

# one build folder per program and precision: the emulator rewrites sources into it, so
# builds in separate folders can run side by side
emu_dir() { echo "build-emu/$1/$(basename "$2" .cu)"; }

# emu PRECISION FILE [ARGS...]: runs FILE under the emulator, as one line of results
emu() {
    local p=$1 f=$2; shift 2
    local name="emulated $f${1:+ $*} ($p)" out rc t0=$SECONDS before=$failed
    out=$("$EMU" -q --precision "$p" --build-dir "$(emu_dir "$p" "$f")" "$f" -- "$@" 2>&1); rc=$?
    name+=", $((SECONDS - t0)) s"
    if [ $rc -eq 87 ]; then
        echo "skip $name: $(grep -m1 'cuda-emu: not emulated' <<<"$out")"
        skipped=$((skipped + 1))
    elif [[ $f == dev/cuda/* ]]; then
        if [ $rc -eq 0 ] && grep -qx PASS <<<"$out"; then ok "$name"
        else bad "$name: exit $rc" "$(tail -n 40 <<<"$out")"; fi
    else
        count "$out" $rc "$name"
        local verdict=ok
        [ $failed -eq $before ] || verdict=FAIL
        grep -q '^skipped: ' <<<"$out" && verdict=skip
        printf '%-4s %s: %s %s\n' $verdict "$name" "$(grep -E '^[0-9]+ passed, [0-9]+ failed' <<<"$out" | tail -1)" "$(grep -m1 '^skipped: ' <<<"$out")"
        [ $verdict != FAIL ] || tail -n 60 <<<"$out"
    fi
}

emu_tests() {
    local p f t0=$SECONDS programs=(test_gpt.cu dev/cuda/*.cu)
    if [ ! -x "$EMU" ]; then
        echo "== GPU tests skipped: no GPU and no CUDA emulator ($EMU)"
        skipped=$((skipped + 3 * (${#refs[@]} + ${#programs[@]} - 1)))
        return
    fi
    echo "== the GPU code under the CUDA emulator: building ${#programs[@]} programs in 3 precisions"
    for p in FP32 FP16 BF16; do
        for f in "${programs[@]}"; do
            [ "$(jobs -rp | wc -l)" -lt "$(nproc)" ] || wait -n
            "$EMU" -q --build-only --precision $p --build-dir "$(emu_dir $p "$f")" "$f" >/dev/null 2>&1 & # a failure shows in the run
        done
    done
    wait
    echo "   built in $((SECONDS - t0)) s"
    for p in FP32 FP16 BF16; do
        for r in "${refs[@]}"; do emu $p test_gpt.cu "$r"; done
        for f in "${programs[@]:1}"; do emu $p "$f"; done
    done
    echo "   the emulated tests took $((SECONDS - t0)) s"
}

# The GPU trainer: wherever nvcc exists every CUDA target must compile (a failed build is a
# failed test). Where nvidia-smi -L lists a GPU its tests run natively; elsewhere, under the
# emulator.
cuda_tests() {
    local nvcc gpu=0 arch="" built=0 out p r
    nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
    nvidia-smi -L 2>/dev/null | grep -q GPU && gpu=1
    if [ -z "$nvcc" ]; then
        echo "== make cuda skipped: no nvcc"
        skipped=$((skipped + 1))
    else
        [ $gpu -eq 1 ] || arch="CUDA_ARCHS=80" # without a GPU the build is a compile check: one architecture keeps it short
        echo "== make cuda $arch"
        if out=$(make --no-print-directory -j"$(nproc)" cuda $arch 2>&1); then
            echo "$out" | tail -1
            passed=$((passed + 1))
            built=1
        else
            echo "$out" | tail -40
            echo "FAIL make cuda (the CUDA targets do not compile)"
            failed=$((failed + 1))
        fi
    fi
    if [ $gpu -eq 0 ]; then
        emu_tests
    elif [ $built -eq 1 ]; then
        for p in fp32 fp16 bf16; do for r in "${refs[@]}"; do run ./test_gpt_cu_$p "$r"; done; done
    else
        echo "== GPU tests skipped: the CUDA targets were not built"
        skipped=$((skipped + 3 * ${#refs[@]}))
    fi
}
cuda_tests

echo
kept
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
