# lib.sh: what the shell tests share. Source it from the repository root with TMP set:
# it makes a fresh $TMP and counts results; end a test script with `summary`.
rm -rf "$TMP"; mkdir -p "$TMP"
BIN=./train_gpt_cpu
passed=0; failed=0

ok()  { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; shift; for line in "$@"; do echo "    $line"; done; }

# expect_error NAME "text the error must contain" command...: a non-zero exit (not a crash)
# and the text on stderr
expect_error() {
    local name=$1 want=$2; shift 2
    local out rc
    out=$("$@" 2>&1 >/dev/null); rc=$?
    if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -qF -- "$want" <<<"$out"; then ok "$name"
    else bad "$name" "exit $rc, wanted an error containing: $want" "got: $out"; fi
}

# the runner's summary line; the exit status says whether everything passed
summary() {
    echo "$passed passed, $failed failed"
    [ $failed -eq 0 ]
}
