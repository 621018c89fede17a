#!/usr/bin/env bash
# Runs every test program and prints the combined "N passed, N failed" last.
# Each program prints its own summary line; a program that crashes counts as a failure.
set -u
cd "$(dirname "$0")/.."
mkdir -p tests/tmp
python3 tests/schedule_reference.py tests/tmp/sched

passed=0
failed=0
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

run ./test_dstrain tests/tmp
run ./test_gpt dev/data/gpt2_reference.bin
run bash tests/test_cli.sh
run bash tests/test_zero.sh
run python3 tests/test_data.py

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
