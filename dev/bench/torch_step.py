"""
Time one PyTorch training step on the CPU, for comparison with dstrain's trainers.

    /usr/bin/python3 dev/bench/torch_step.py [--layers 12 --heads 12 --dim 768 ...]
    /usr/bin/python3 dev/bench/torch_step.py --arch llama --kv-heads 4 --ffn 2048 [...]

One step: zero_grad, forward, loss, backward, clip_grad_norm_(1.0), AdamW step, fp32.
--arch gpt2 (default) times the model of dev/reference.py (GPT-2 124M by default: V = 50257
padded to 50304); --arch llama times Hugging Face transformers' LlamaForCausalLM with eager
attention and untied lm_head (default V = 32000), as dev/reference_hf.py builds it, the loss
the cross-entropy of its logits. The last line printed is machine-readable:
`torch_ms_per_step <float>`.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference import GPT, GPTConfig  # noqa: E402  (dev/reference.py)


def build(args):
    """The model to time: model(inputs, targets) returns (logits, mean loss)."""
    if args.arch == "gpt2":
        config = GPTConfig(vocab_size=args.vocab, padded_vocab_size=(args.vocab + 127) // 128 * 128,
                           max_seq_len=args.seq_len, num_layers=args.layers,
                           num_heads=args.heads, channels=args.dim)
        model = GPT(config)
        model.reset_parameters()
        return model, f"GPT-2 L={args.layers} H={args.heads} C={args.dim} V={args.vocab}"
    import transformers
    from reference_hf import HFModel  # dev/reference_hf.py
    config = transformers.LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.dim,
                                      num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads,
                                      intermediate_size=args.ffn, vocab_size=args.vocab,
                                      max_position_embeddings=args.seq_len,
                                      tie_word_embeddings=False, attn_implementation="eager",
                                      torch_dtype=torch.float32)
    hf = transformers.LlamaForCausalLM(config)
    assert hf.config._attn_implementation == "eager"
    return HFModel(hf), (f"LLaMA (transformers {transformers.__version__}) L={args.layers} "
                         f"H={args.heads} KV={args.kv_heads} C={args.dim} F={args.ffn} "
                         f"V={args.vocab}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"),
                        help="our GPT-2 or transformers' LLaMA (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=12, help="L (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=12, help="H (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=768, help="C (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int,
                        help="LLaMA: key/value heads (default: --heads)")
    parser.add_argument("--ffn", type=int, help="LLaMA: intermediate_size (default: LLaMA's"
                        " rule, 2/3 of 4 C rounded up to a multiple of 256: 2048 for C 768)")
    parser.add_argument("--vocab", type=int,
                        help="V (default: 50257 for gpt2, 32000 for llama)")
    parser.add_argument("--seq-len", type=int, default=64,
                        help="T, also the model's maxT (default: %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=4, help="B (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: all cores, %(default)s)")
    args = parser.parse_args()
    if args.arch == "gpt2" and (args.kv_heads is not None or args.ffn is not None):
        parser.error("--kv-heads and --ffn are for --arch llama (GPT-2: heads and 4 * dim)")
    if args.kv_heads is None:
        args.kv_heads = args.heads
    if args.ffn is None:
        args.ffn = (2 * 4 * args.dim // 3 + 255) // 256 * 256
    if args.vocab is None:
        args.vocab = 50257 if args.arch == "gpt2" else 32000
    if args.dim % args.heads or args.heads % args.kv_heads \
            or min(args.layers, args.heads, args.kv_heads, args.dim, args.ffn, args.vocab,
                   args.seq_len, args.micro_batch, args.steps, args.threads) < 1 \
            or args.warmup < 0:
        parser.error("sizes, --steps and --threads must be positive, --dim a multiple of "
                     "--heads, --heads of --kv-heads, --warmup not negative")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, description = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  eps=1e-8, weight_decay=0.1)
    B, T = args.micro_batch, args.seq_len
    inputs = torch.randint(0, args.vocab, (B, T))
    targets = torch.randint(0, args.vocab, (B, T))
    num_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s); {description}, "
          f"{num_params:,} parameters; B={B} T={T}")

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
