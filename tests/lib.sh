# lib.sh: what the test scripts share. Source it from the repository root as
# `. tests/lib.sh NAME`: it counts results (end with `summary`) and makes $TMP, a folder
# of this run's own (/tmp/NAME.XXXXXX), so that runs side by side in one checkout never
# meet. $TMP is removed at exit, unless a check failed: then `summary` says where it is.
TMP=$(mktemp -d -t "$1.XXXXXX") || exit 1
trap '[ $failed -ne 0 ] || rm -rf "$TMP"' EXIT
BIN=./train_gpt_cpu
passed=0; failed=0

# a script that runs its checks on several models names them with PREFIX
ok()  { passed=$((passed + 1)); echo "ok   ${PREFIX:-}$1"; }
bad() { failed=$((failed + 1)); echo "FAIL ${PREFIX:-}$1"; shift; for line in "$@"; do echo "    $line"; done; }

# expect_error NAME "text the error must contain" command...: a non-zero exit (not a crash)
# and the text on stderr
expect_error() {
    local name=$1 want=$2; shift 2
    local out rc
    out=$("$@" 2>&1 >/dev/null); rc=$?
    if [ $rc -ne 0 ] && [ $rc -lt 128 ] && grep -qF -- "$want" <<<"$out"; then ok "$name"
    else bad "$name" "exit $rc, wanted an error containing: $want" "got: $out"; fi
}

# where the files are when a check failed (then they are kept)
kept() { [ $failed -eq 0 ] || echo "files kept in $TMP"; }

# the runner's summary line; the exit status says whether everything passed
summary() {
    kept
    echo "$passed passed, $failed failed"
    [ $failed -eq 0 ]
}
