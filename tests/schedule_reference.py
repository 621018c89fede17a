"""Learning-rate schedules computed independently from DeepSpeed's formulas
(doc/deepspeed.md section 6), for test_dstrain.c to compare against.

Writes, into the folder given as argument, one ds_config file per case
(sched_N.json) and expected.txt with lines "sched_N.json it lr" for it = -1 .. 40.
Standard library only.
"""
import json
import math
import os
import sys

CASES = [
    {"scheduler": None, "lr": 3e-4},
    {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_num_steps": 10}}, "lr": 5e-4},
    {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_num_steps": 7, "warmup_type": "linear"}}, "lr": 2e-4},
    {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 1}}, "lr": 1e-3},  # W = max(2, 1)
    {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": 2e-3, "warmup_num_steps": 5, "total_num_steps": 30}}, "lr": 1e-3},
    {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 4, "total_num_steps": 20, "warmup_type": "linear"}}, "lr": 1e-3},
    {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 35, "warmup_num_steps": 6, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.01}}, "lr": 6e-4},
    {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 25, "warmup_num_steps": 5, "warmup_type": "linear"}}, "lr": 1e-3},
]


def gamma(it, W, kind):
    return math.log(it + 1) / math.log(W) if kind == "log" else it / W


def lr(case, it):
    base = case["lr"]
    s = case["scheduler"]
    if s is None:
        return base
    p = s["params"]
    kind = p.get("warmup_type", "log")
    W = max(2, p.get("warmup_num_steps", 1000))
    lo = p.get("warmup_min_lr", 0.0)
    if s["type"] == "WarmupLR":
        hi = p.get("warmup_max_lr", base)
        if it < 0:
            return lo
        return lo + (hi - lo) * (gamma(it, W, kind) if it < W else 1.0)
    if s["type"] == "WarmupDecayLR":
        hi = p.get("warmup_max_lr", 0.001)
        T = p["total_num_steps"]
        if it < 0:
            return lo
        if it < W:
            return lo + (hi - lo) * gamma(it, W, kind)
        return lo + (hi - lo) * max(0.0, (T - it) / max(1, T - W))
    if s["type"] == "WarmupCosineLR":
        T = p["total_num_steps"]
        wmin = p.get("warmup_min_ratio", 0.0)
        cmin = p.get("cos_min_ratio", 1e-4)
        if it < 0:
            return 0.0
        if it < W:
            ratio = wmin + gamma(it, W, kind) * (1 - wmin)
        else:
            prog = min(1.0, (it - W + 1) / max(1, T - W))
            ratio = max(0.0, cmin + (1 - cmin) * (1 + math.cos(math.pi * prog)) / 2)
        return base * ratio
    raise ValueError(s["type"])


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    lines = []
    for i, case in enumerate(CASES):
        cfg = {"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": case["lr"]}}}
        if case["scheduler"]:
            cfg["scheduler"] = case["scheduler"]
        name = f"sched_{i}.json"
        with open(os.path.join(out, name), "w") as f:
            json.dump(cfg, f, indent=2)
        for it in range(-1, 41):
            lines.append(f"{name} {it} {lr(case, it):.17g}")
    with open(os.path.join(out, "expected.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
