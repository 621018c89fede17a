"""
Time one PyTorch GPT-2 training step on the CPU, for comparison with dstrain's trainers.

    /usr/bin/python3 dev/bench/torch_step.py [--layers 12 --heads 12 --dim 768 ...]

One step: zero_grad, forward, loss, backward, clip_grad_norm_(1.0), AdamW step, with the
model of dev/reference.py (GPT-2 124M by default: V = 50257 padded to 50304). The last
line printed is machine-readable: `torch_ms_per_step <float>`.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference import GPT, GPTConfig  # noqa: E402  (dev/reference.py)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="L (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=12, help="H (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=768, help="C (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64,
                        help="T, also the model's maxT (default: %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=4, help="B (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: all cores, %(default)s)")
    args = parser.parse_args()
    if args.dim % args.heads or min(args.layers, args.heads, args.dim, args.seq_len,
                                    args.micro_batch, args.steps, args.threads) < 1 \
            or args.warmup < 0:
        parser.error("sizes, --steps and --threads must be positive, --dim a multiple of "
                     "--heads, --warmup not negative")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = GPTConfig(max_seq_len=args.seq_len, num_layers=args.layers,
                       num_heads=args.heads, channels=args.dim)
    model = GPT(config)
    model.reset_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  eps=1e-8, weight_decay=0.1)
    B, T = args.micro_batch, args.seq_len
    inputs = torch.randint(0, config.vocab_size, (B, T))
    targets = torch.randint(0, config.vocab_size, (B, T))
    num_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s); GPT-2 L={args.layers} "
          f"H={args.heads} C={args.dim}, {num_params:,} parameters; B={B} T={T}")

    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        elapsed = time.perf_counter() - t0
        timed = step >= args.warmup
        if timed:
            times.append(elapsed)
        print(f"step {step}: loss {loss.item():.4f}  {elapsed * 1e3:.1f} ms"
              f"{'' if timed else ' (warmup)'}")

    ms = 1e3 * sum(times) / len(times)
    print(f"mean over {len(times)} step(s): {ms:.1f} ms/step, {B * T / (ms / 1e3):.1f} tokens/s")
    print(f"torch_ms_per_step {ms:.3f}")


if __name__ == "__main__":
    main()
