"""
Tests of the Python comparison helpers (tests/compare.py) and of ckpt_compare.py, which the
ZeRO tests use: each must fail on one NaN, one inf and all NaN, in either operand, and pass
equal values and values within tolerance.

    python3 tests/test_compare.py

Prints one line per check, then "N passed, N failed"; exits non-zero when a check fails.
"""
import array
import math
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compare import max_rel_diff_each, rel_diff  # noqa: E402
from checks import check, summary  # noqa: E402



REF = [0.5, -1.0, 2.0, 0.25, -4.0, 1.5, 3.0, -0.75]
BAD = {"one NaN": (5, [math.nan]), "one inf": (0, [math.inf]), "one -inf": (7, [-math.inf]), "all NaN": (0, [math.nan] * len(REF))}


def spoiled(kind):
    index, values = BAD[kind]
    x = list(REF)
    x[index:index + len(values)] = values
    return x, index


def test_rel_diff():
    check("rel_diff: equal tensors differ by 0", rel_diff(REF, list(REF)) == (0.0, None))
    close = list(REF)
    close[2] += 1e-5
    d, bad = rel_diff(close, REF)
    check("rel_diff: 1e-5 off over max |ref| 4 is 2.5e-6", bad is None and abs(d - 2.5e-6) < 1e-12, f"{d}, {bad}")
    for kind in BAD:
        x, index = spoiled(kind)
        for name, (a, b) in {"result": (x, REF), "reference": (REF, x)}.items():
            d, bad = rel_diff(a, b)
            check(f"rel_diff: {kind} in the {name} fails every tolerance, at element {index}", not d <= 1e30 and bad == index, f"{d}, {bad}")


def test_max_rel_diff_each():
    check("max_rel_diff_each: equal losses differ by 0", max_rel_diff_each(REF, list(REF)) == 0.0)
    check("max_rel_diff_each: within 1e-5", 0 < max_rel_diff_each([10.0, 9.0], [10.0, 9.00001]) <= 1.2e-6)
    for kind in BAD:
        x, _ = spoiled(kind)
        check(f"max_rel_diff_each: {kind} fails", not max_rel_diff_each(x, REF) <= 1e30 and not max_rel_diff_each(REF, x) <= 1e30)
    check("max_rel_diff_each: different lengths fail", not max_rel_diff_each(REF, REF[:-1]) <= 1e30)


def write_checkpoint(folder, weights):
    """A one-rank checkpoint folder as ckpt_compare.py reads it: model.bin and the optimizer
    file (int64 header[128], then floats), and state.bin (the header alone)."""
    os.makedirs(folder)
    n = len(weights)
    header = [0] * 128
    header[4], header[5], header[6] = 0, n, n  # offset, count, parameters
    floats = array.array("f", weights).tobytes()
    with open(os.path.join(folder, "optim_rank0000_of_0001.bin"), "wb") as f:
        f.write(struct.pack("<128q", *header) + floats * 3)  # master, m, v
    with open(os.path.join(folder, "model.bin"), "wb") as f:
        f.write(struct.pack("<128q", *header) + floats)
    with open(os.path.join(folder, "state.bin"), "wb") as f:
        f.write(struct.pack("<128q", *header))


def ckpt_compare(a, b, *flags):
    return subprocess.run([sys.executable, os.path.join(HERE, "ckpt_compare.py"), a, b, *flags], capture_output=True, text=True)


def test_ckpt_compare():
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(os.path.join(tmp, "ref"), REF)
        write_checkpoint(os.path.join(tmp, "same"), REF)
        close = list(REF)
        close[1] = -1.00001
        write_checkpoint(os.path.join(tmp, "close"), close)
        r = ckpt_compare(os.path.join(tmp, "same"), os.path.join(tmp, "ref"))
        check("ckpt_compare: identical folders pass at tolerance 0", r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr)
        r = ckpt_compare(os.path.join(tmp, "close"), os.path.join(tmp, "ref"), "--tolerance", "1e-5")
        check("ckpt_compare: 1e-5 / 4 passes at tolerance 1e-5", r.returncode == 0, r.stdout + r.stderr)
        r = ckpt_compare(os.path.join(tmp, "close"), os.path.join(tmp, "ref"))
        check("ckpt_compare: the same fails at tolerance 0", r.returncode != 0, r.stdout + r.stderr)
        for kind in BAD:
            x, index = spoiled(kind)
            folder = os.path.join(tmp, kind.replace(" ", "_"))
            write_checkpoint(folder, x)
            for a, b in ((folder, os.path.join(tmp, "ref")), (os.path.join(tmp, "ref"), folder)):
                r = ckpt_compare(a, b, "--tolerance", "1e30")
                check(f"ckpt_compare: {kind} fails at any tolerance and is named",
                      r.returncode != 0 and f"NaN or inf at element {index}" in r.stdout, r.stdout + r.stderr)


def main():
    test_rel_diff()
    test_max_rel_diff_each()
    test_ckpt_compare()
    sys.exit(summary())


if __name__ == "__main__":
    main()
