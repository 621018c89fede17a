#!/usr/bin/env bash
# test_scaling.sh: dev/bench/scaling.sh on 1 and 2 CPU ranks (one OpenMP thread each, the
# tiny default model, configs/ds_config.json: ZeRO-2): both rows, and that their columns
# say what they should: no bytes sent on 1 rank and some on 2, utilisation in (0, 100]%
# (one thread per rank: its CPU time cannot exceed the wall time), peak RSS per rank at
# least the ZeRO formula's model states (RSS holds them), speed-up the ratio of the s/step
# printed, tokens/s the step's tokens over s/step. Needs ./train_gpt_cpu built with MPI.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_scaling

if ! command -v mpirun >/dev/null || ! grep -q "MPI_Init" <(strings $BIN 2>/dev/null); then
    bad "the scaling benchmark needs Open MPI and a trainer built with it (apt-get install openmpi-bin libopenmpi-dev; make)"
    summary; exit
fi
export OMP_NUM_THREADS=1 # 2 ranks share 2 cores

expect_error "--ranks 1 refused" "--ranks must be a whole number of at least 2" bash dev/bench/scaling.sh --ranks 1
expect_error "an unknown option is named" "unknown option '--rank'" bash dev/bench/scaling.sh --rank 2
expect_error "a missing trainer is named" "no trainer './nothing'" bash dev/bench/scaling.sh --trainer ./nothing

timeout 120 bash dev/bench/scaling.sh --trainer $BIN --ranks 2 --steps 4 > $TMP/table.txt 2> $TMP/err.txt
rc=$?
if [ $rc -eq 0 ]; then ok "scaling.sh on 1 and 2 CPU ranks"; else bad "scaling.sh on 1 and 2 CPU ranks: exit $rc" "$(cat $TMP/err.txt)"; fi
cat $TMP/table.txt

# one check per line: "ok NAME" or "bad NAME: why"
python3 - $TMP/table.txt > $TMP/checks.txt 2> $TMP/checks.err <<'PY'
import re, sys
text = open(sys.argv[1]).read()
tokens = int(re.search(r"train_batch_size (\d+)", text).group(1)) * int(re.search(r"sequence length (\d+)", text).group(1))
rows = {}
for line in text.split("\nranks ", 1)[-1].splitlines()[1:]:  # the rows under the header
    f = line.split()  # ranks, s/step "s", speed-up, tokens/s, util, peak "GB", formula "GB", sent "MB"
    if len(f) == 12:
        rows[int(f[0])] = dict(s=float(f[1]), speedup=float(f[3].rstrip("x")), tps=float(f[4]), util=f[5],
                               peak=float(f[6]), formula=float(f[8]), sent=float(f[10]))
def check(name, cond, why=""):
    print(f"ok {name}" if cond else f"bad {name}: {why}")
check("both rows, 1 and 2 ranks", sorted(rows) == [1, 2], f"rows {sorted(rows)}")
if sorted(rows) == [1, 2]:
    one, two = rows[1], rows[2]
    check("bytes sent per step: 0 on 1 rank, more on 2", one["sent"] == 0 and two["sent"] > 0, f"{one['sent']} and {two['sent']} MB")
    for r, row in rows.items():
        u = [int(x) for x in re.findall(r"\d+", row["util"])]
        check(f"{r} rank(s): utilisation in (0, 100]%", row["util"].endswith("%") and u and all(0 < x <= 100 for x in u), row["util"])
        check(f"{r} rank(s): peak RSS per rank at least the formula's model states", 0 < row["formula"] <= row["peak"],
              f"{row['peak']} GB, formula {row['formula']} GB")
        check(f"{r} rank(s): tokens/s = {tokens} tokens per step / s/step", abs(row["tps"] * row["s"] / tokens - 1) < 0.005,
              f"{row['tps']} tokens/s at {row['s']} s/step")
    # s/step is printed to 4 significant digits (5e-4 relative) and the speed-up to 0.01:
    # the bound is what that rounding allows
    ratio = one["s"] / two["s"]
    slack = 0.005 + ratio * 1e-3
    check("speed-up = 1 rank's s/step over 2 ranks'", one["speedup"] == 1.0 and abs(two["speedup"] - ratio) <= slack,
          f"{two['speedup']} against {one['s']} / {two['s']}")
    check("the formula is smaller on 2 ranks (ZeRO-2 partitions gradients and optimizer states)", two["formula"] < one["formula"],
          f"{one['formula']} and {two['formula']} GB")
PY
[ $? -eq 0 ] || bad "the table could be read" "$(cat $TMP/checks.err)"
while read -r verdict rest; do
    if [ "$verdict" = ok ]; then ok "$rest"; else bad "$rest"; fi
done < $TMP/checks.txt
summary
