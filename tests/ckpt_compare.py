"""Compares two dstrain checkpoint folders saved on any numbers of ranks.

    python3 tests/ckpt_compare.py FOLDER_A FOLDER_B [--tolerance REL] [--ignore-scaler]

The fp32 master weights and Adam moments are rebuilt from every optim_rank*_of_*.bin
(each holds a contiguous partition and its global offset) and compared element for
element; model.bin and the counters of state.bin too (not the number of ranks, and not
the loss scaler's state with --ignore-scaler, to compare an fp16 run with an fp32 one).
Prints "identical", or the largest difference relative to the tensor's scale, and exits
non-zero when a difference exceeds the tolerance (default 0: bit for bit) or a tensor holds
a NaN or inf (tests/compare.py). Standard library only.
"""
import array
import glob
import os
import struct
import sys

from compare import rel_diff

HEADER = 1024  # int64 header[128]
# header words, as dstrain.h's enums name them
OPTIM_OFFSET, OPTIM_COUNT, OPTIM_NUM_PARAMS = 4, 5, 6
STATE_WORLD_SIZE, STATE_SCALE, STATE_END = 11, 20, 24  # [2, 11) counters and data position, [12, 20) seed and RNG, [20, 24) loss scaler


def header(path):
    with open(path, "rb") as f:
        return struct.unpack("<128q", f.read(HEADER))


def floats(path, offset, count):
    a = array.array("f")
    with open(path, "rb") as f:
        f.seek(offset)
        a.frombytes(f.read(4 * count))
    return a


def optimizer_state(folder):
    files = sorted(glob.glob(os.path.join(folder, "optim_rank*_of_*.bin")))
    if not files:
        sys.exit(f"{folder}: no optimizer files")
    n = header(files[0])[OPTIM_NUM_PARAMS]
    state = [array.array("f", bytes(4 * n)) for _ in range(3)]
    for path in files:
        h = header(path)
        lo, count = h[OPTIM_OFFSET], h[OPTIM_COUNT]
        for k in range(3):
            part = floats(path, HEADER + 4 * k * count, count)
            keep = max(0, min(count, n - lo))  # padding beyond the parameters is not state
            state[k][lo:lo + keep] = part[:keep]
    return {"master": state[0], "adam_m": state[1], "adam_v": state[2]}, len(files)


def compare(name, a, b, report):
    """Appends name's verdict to report and returns its relative difference."""
    d, bad = rel_diff(a, b)
    if bad is not None:
        report.append(f"{name} has NaN or inf at element {bad} ({a[bad]} vs {b[bad]})")
    else:
        report.append(f"{name} {'identical' if d == 0 else f'rel diff {d:.2e}'}")
    return d


def main():
    a, b = sys.argv[1], sys.argv[2]
    tol = float(sys.argv[sys.argv.index("--tolerance") + 1]) if "--tolerance" in sys.argv else 0.0
    sa, fa = optimizer_state(a)
    sb, fb = optimizer_state(b)
    worst = 0.0
    report = []
    for key in sa:
        worst = max(worst, compare(key, sa[key], sb[key], report))
    ma = floats(os.path.join(a, "model.bin"), HEADER, len(sa["master"]))
    mb = floats(os.path.join(b, "model.bin"), HEADER, len(sb["master"]))
    worst = max(worst, compare("model.bin", ma, mb, report))
    ha, hb = header(os.path.join(a, "state.bin")), header(os.path.join(b, "state.bin"))
    # everything but the number of ranks (and the loss scaler with --ignore-scaler)
    last = STATE_SCALE if "--ignore-scaler" in sys.argv else STATE_END
    counters_equal = ha[:STATE_WORLD_SIZE] == hb[:STATE_WORLD_SIZE] and ha[STATE_WORLD_SIZE + 1:last] == hb[STATE_WORLD_SIZE + 1:last]
    report.append("state counters " + ("identical" if counters_equal else f"differ: {ha[:last]} vs {hb[:last]}"))
    print(f"{a} ({fa} optimizer files) vs {b} ({fb}): " + ", ".join(report))
    sys.exit(0 if worst <= tol and counters_equal else 1)


if __name__ == "__main__":
    main()
