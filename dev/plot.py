"""
Plots the JSON-lines logs that the trainers write with --log: one PNG, several runs overlaid.

    python3 dev/plot.py LOG.jsonl [LOG2.jsonl ...] [-o OUT.png]

Writes OUT.png (default: the first log's path with .png for its extension, run.jsonl ->
run.png) and prints its path. The image is always 1600x1200 pixels (16x12 inches at 100
dpi), with these panels:
    training and validation loss against steps, and against tokens trained;
    the fp16 loss scale, an x on each skipped (overflow) step: only when a log has
    "loss_scale" (otherwise it prints "no fp16 loss scaling in these logs");
    tokens/s; learning rate.
Each run has one colour, named in the legend by its file name (by the path as given when
two file names are equal).

The records read are {"type": "train", "step", "loss", "lr", "ms", "tokens_per_s", with
fp16 "loss_scale" and "overflow", optionally "tokens"} and {"type": "val", "step",
"val_loss"}; other keys and other types are ignored. Tokens trained are the record's
"tokens" (cumulative, all ranks) where present, else the running sum of tokens_per_s x ms
/ 1000 (the tokens of each step, rounded to whole tokens). A resumed run appends to its
log, so a step logged twice (training redone from the checkpoint) keeps its last record.

A malformed log (a line that is not a JSON object, a record without a key it needs, no
training records, an unreadable file) ends the script with one line naming the file and
line, and exit status 1. Needs matplotlib (python3 -m pip install matplotlib).
"""
import argparse
import bisect
import json
import os
import sys

try:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter, MaxNLocator
except ImportError:
    sys.exit("error: dev/plot.py needs matplotlib: python3 -m pip install matplotlib")

WIDTH_IN, HEIGHT_IN, DPI = 16, 12, 100  # 1600x1200 px: the size the docstring promises
NUMBER = (int, float)
TRAIN_KEYS = {"step": int, "loss": NUMBER, "lr": NUMBER, "ms": NUMBER, "tokens_per_s": NUMBER}
VAL_KEYS = {"step": int, "val_loss": NUMBER}
FP16_KEYS = {"loss_scale": NUMBER, "overflow": bool}
VAL_STYLE = {"ls": "--", "lw": 1.5, "marker": "o", "ms": 5, "mec": "black", "mew": 0.5}


def is_a(value, kind):
    # bool is an int to Python, but true is no step or loss
    return isinstance(value, kind) and (isinstance(value, bool) == (kind is bool))


def check_keys(record, keys, where):
    for key, kind in keys.items():
        if not is_a(record.get(key), kind):
            what = {int: "an integer", bool: "true or false"}.get(kind, "a number")
            got = f"got {json.dumps(record[key])}" if key in record else "it is missing"
            sys.exit(f"error: {where}: a {record['type']} record needs \"{key}\", {what}; {got}")


def read_log(path):
    """Returns the train and val records of a log, each a list sorted by step."""
    train, val = {}, {}
    try:
        # a byte that is not UTF-8 becomes U+FFFD: a JSON error on its line, not a decoding error
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        sys.exit(f"error: {path}: cannot read: {e.strerror or e}")
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"error: {where}: not JSON: {e.msg} (column {e.pos + 1})")
        if not isinstance(record, dict) or "type" not in record:
            sys.exit(f"error: {where}: not a log record (a JSON object with a \"type\")")
        if record["type"] == "train":
            check_keys(record, TRAIN_KEYS, where)
            if "loss_scale" in record:
                check_keys(record, FP16_KEYS, where)
            if "tokens" in record:
                check_keys(record, {"tokens": NUMBER}, where)
            train[record["step"]] = record
        elif record["type"] == "val":
            check_keys(record, VAL_KEYS, where)
            val[record["step"]] = record
    if not train:
        sys.exit(f"error: {path}: no training records (\"type\": \"train\") in its {len(lines)} lines")
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def cumulative_tokens(train):
    total, tokens = 0, []
    for r in train:
        total = r["tokens"] if "tokens" in r else total + round(r["tokens_per_s"] * r["ms"] / 1000)
        tokens.append(total)
    return tokens


def tokens_at(steps, tokens, step):
    """Tokens trained by the end of step (validation runs after a step's update)."""
    i = bisect.bisect_right(steps, step)
    return tokens[i - 1] if i else 0


def plot_run(axes, train, val, label, color):
    steps = [r["step"] for r in train]
    tokens = cumulative_tokens(train)
    val_steps = [r["step"] for r in val]
    val_loss = [r["val_loss"] for r in val]
    val_tokens = [tokens_at(steps, tokens, s) for s in val_steps]
    loss = [r["loss"] for r in train]
    for ax, x, val_x in ((axes["step"], steps, val_steps), (axes["tokens"], tokens, val_tokens)):
        ax.plot(x, loss, color=color, lw=1, alpha=0.7, label=label)
        # above every run's noisy training loss, where it stays visible
        ax.plot(val_x, val_loss, zorder=3, **VAL_STYLE, color=color)
    axes["speed"].plot(steps, [r["tokens_per_s"] for r in train], color=color, lw=1)
    axes["lr"].plot(steps, [r["lr"] for r in train], color=color, lw=1)
    fp16 = [r for r in train if "loss_scale" in r]
    if fp16:
        skipped = [r for r in fp16 if r["overflow"]]
        axes["scale"].plot([r["step"] for r in fp16], [r["loss_scale"] for r in fp16], color=color, lw=1,
                           drawstyle="steps-post", label=f"{label}: {len(skipped)} skipped")
        # at the scale the skipped step tried; the scaler lowers it after (hysteresis permitting)
        axes["scale"].plot([r["step"] for r in skipped], [r["loss_scale"] for r in skipped], color=color,
                           ls="", marker="x", ms=8, mew=2)


def make_axes(fp16):
    fig = plt.figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(3 if fp16 else 2, 2, height_ratios=[3, 2, 2] if fp16 else [3, 2])
    axes = {"step": fig.add_subplot(grid[0, 0]), "tokens": fig.add_subplot(grid[0, 1]),
            "speed": fig.add_subplot(grid[1, 0]), "lr": fig.add_subplot(grid[1, 1])}
    if fp16:
        axes["scale"] = fig.add_subplot(grid[2, :])
    titles = {"step": ("loss against steps", "step"), "tokens": ("loss against tokens trained", "tokens"),
              "speed": ("tokens/s", "step"), "lr": ("learning rate", "step"),
              "scale": ("fp16 loss scale (x: a skipped step)", "step")}
    for name, ax in axes.items():
        title, xlabel = titles[name]
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if xlabel == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes["tokens"].xaxis.set_major_formatter(EngFormatter())
    axes["speed"].yaxis.set_major_formatter(EngFormatter())
    if fp16:
        axes["scale"].set_yscale("log", base=2)
    return fig, axes


def add_legends(axes):
    styles = [Line2D([], [], color="gray", lw=1, label="training"),
              Line2D([], [], **VAL_STYLE, color="gray", label="validation")]
    axes["tokens"].legend(handles=styles, loc="upper right")
    axes["step"].legend(loc="upper right", title="run")
    if "scale" in axes:
        axes["scale"].legend(loc="lower left")


def main():
    parser = argparse.ArgumentParser(description="Plots dstrain's --log files into one PNG.")
    parser.add_argument("logs", nargs="+", metavar="LOG.jsonl")
    parser.add_argument("-o", "--out", help="the PNG to write (default: the first log with .png)")
    args = parser.parse_args()
    runs = [read_log(path) for path in args.logs]
    names = [os.path.basename(path) for path in args.logs]
    labels = names if len(set(names)) == len(names) else args.logs
    fp16 = any("loss_scale" in r for train, _ in runs for r in train)
    if not fp16:
        print("no fp16 loss scaling in these logs")
    fig, axes = make_axes(fp16)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((train, val), label) in enumerate(zip(runs, labels)):
        plot_run(axes, train, val, label, colors[i % len(colors)])
    add_legends(axes)
    out = args.out or os.path.splitext(args.logs[0])[0] + ".png"
    try:
        fig.savefig(out, dpi=DPI)
    except OSError as e:
        sys.exit(f"error: {out}: cannot write: {e.strerror or e}")
    print(out)


if __name__ == "__main__":
    main()
