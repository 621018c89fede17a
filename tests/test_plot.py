"""
Tests of dev/plot.py on logs the CPU trainer writes: a tiny fp32 run and an fp16 run with
injected overflows (DSTRAIN_INJECT_INF, README "Test-only fault injection") plotted alone
and overlaid, into PNGs of the documented 1600x1200 pixels; tokens trained as documented;
and a malformed line, a record without a key, a log without training records and a missing
file each refused with one line naming the file (and line), no traceback.

    python3 tests/test_plot.py

Needs matplotlib, ./train_gpt_cpu and the prepared data (make train_gpt_cpu data). Prints
one line per check, then "N passed, N failed"; exits non-zero when a check fails. Its files
go to a temporary folder, removed when every check passes.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
import plot  # noqa: E402
from checks import check, counts, summary  # noqa: E402

PLOT = os.path.join(REPO, "dev", "plot.py")
TINY = ["--layers", "1", "--heads", "2", "--dim", "32", "--seq-len", "32", "--steps", "20",
        "--val-every", "10", "--val-batches", "4", "--sample-tokens", "0", "--checkpoint-dir", ""]
TOKENS_PER_STEP = 2 * 32  # micro batch 2 x seq len 32, one rank
FP16_CONFIG = {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True, "initial_scale_power": 32},
               "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5, "total_num_steps": 20}}}
OVERFLOW_STEPS = [4, 5, 13]


def train(tmp, name, *args, env=None):
    """Runs the CPU trainer with --log; returns the log's train and val records."""
    log = os.path.join(tmp, name + ".jsonl")
    r = subprocess.run(["./train_gpt_cpu", *TINY, *args, "--log", log], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    records = [json.loads(line) for line in open(log)] if r.returncode == 0 else []
    runs = [[x for x in records if x["type"] == t] for t in ("train", "val")]
    check(f"trainer writes {name}.jsonl: 20 train, 2 val records", [len(x) for x in runs] == [20, 2],
          f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
    return log, runs[0]


def plot_cmd(*args):
    return subprocess.run([sys.executable, PLOT, *args], capture_output=True, text=True)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, which follows the 8-byte signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def expect_plot(name, args, out, fp16):
    r = plot_cmd(*args)
    said = "no fp16 loss scaling in these logs" in r.stdout
    size = png_size(out) if r.returncode == 0 and os.path.isfile(out) else None
    check(f"{name}: {os.path.basename(out)} is a 1600x1200 PNG, its path printed, "
          f"{'a loss scale panel' if fp16 else 'says no fp16 loss scaling'}",
          size == (1600, 1200) and r.stdout.strip().endswith(out) and said != fp16,
          f"exit {r.returncode}, size {size}, stdout {r.stdout.strip()!r}, stderr {r.stderr.strip()[-300:]!r}")


def expect_error(name, path, error, args=None):
    """dev/plot.py on args (default: path) fails with one line: path, then error."""
    r = plot_cmd(*(args or [path]))
    lines = r.stderr.strip().splitlines()
    check(f"{name}: refused with {os.path.basename(path)}{error}", r.returncode != 0 and len(lines) == 1
          and f"{path}{error}" in lines[0] and "Traceback" not in r.stderr,
          f"exit {r.returncode}, stderr {r.stderr.strip()[-500:]!r}")


def write(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def test_errors(tmp, log):
    lines = open(log).readlines()
    bad = write(os.path.join(tmp, "truncated.jsonl"), lines[:4] + [lines[4][:30] + "\n"] + lines[5:])
    expect_error("a line that is not JSON", bad, ":5: not JSON")
    record = json.loads(lines[2])
    del record["loss"]
    bad = write(os.path.join(tmp, "noloss.jsonl"), lines[:2] + [json.dumps(record) + "\n"] + lines[3:])
    expect_error("a train record without loss", bad, ':3: a train record needs "loss"')
    bad = write(os.path.join(tmp, "valonly.jsonl"), [x for x in lines if '"val"' in x])
    expect_error("no training records", bad, ": no training records")
    missing = os.path.join(tmp, "missing.jsonl")
    expect_error("a missing file, after a good one", missing, ": cannot read", [log, missing])


def run(tmp):
    trainer = all(os.path.exists(os.path.join(REPO, p)) for p in ("train_gpt_cpu", "data/wikitext"))
    check("./train_gpt_cpu and data/wikitext present (make train_gpt_cpu data)", trainer)
    if not trainer:
        return
    fp32, fp32_train = train(tmp, "fp32", "--micro-batch", "2")
    config = write(os.path.join(tmp, "fp16.json"), [json.dumps(FP16_CONFIG)])
    fp16, fp16_train = train(tmp, "fp16", "-c", config, env={"DSTRAIN_INJECT_INF": ",".join(map(str, OVERFLOW_STEPS))})
    check("fp16 log: the injected steps skipped", [r["step"] for r in fp16_train if r.get("overflow")] == OVERFLOW_STEPS)

    tokens = plot.cumulative_tokens(fp32_train)
    check("tokens trained without \"tokens\": running sum of tokens_per_s x ms / 1000",
          tokens == [TOKENS_PER_STEP * r["step"] for r in fp32_train], f"{tokens[:5]}...")
    given = [{**r, "tokens": 1000 * r["step"]} for r in fp32_train]
    check("tokens trained: the log's \"tokens\" where present", plot.cumulative_tokens(given)[-1] == 20000)
    lines = open(fp32).readlines()
    train_records, val_records = plot.read_log(write(os.path.join(tmp, "resumed.jsonl"), lines + lines[-6:]))
    check("a resumed log's repeated steps are kept once", [r["step"] for r in train_records] == list(range(1, 21))
          and [r["step"] for r in val_records] == [10, 20])

    expect_plot("one fp32 log", [fp32], os.path.join(tmp, "fp32.png"), fp16=False)
    both = os.path.join(tmp, "both.png")
    expect_plot("fp32 and fp16 overlaid, -o", [fp32, fp16, "-o", both], both, fp16=True)
    test_errors(tmp, fp32)


def main():
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="test_plot.")
    try:
        run(tmp)
    finally:
        if counts["failed"]:
            print(f"files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"({time.time() - t0:.1f} s)")
    sys.exit(summary())


if __name__ == "__main__":
    main()
