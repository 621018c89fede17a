"""
An independent PyTorch GPT-2 that writes the reference file test_gpt.c and test_gpt.cu
compare against: the initial weights, one micro batch's logits, loss and gradients, and
two short training runs done the way DeepSpeed does them (doc/deepspeed.md sections 4 to 6).

    /usr/bin/python3 dev/reference.py [--config NAME] [--out FILE]

--config picks one of CONFIGS below (default "base", written to dev/data/gpt2_reference.bin;
another NAME to dev/data/gpt2_reference_NAME.bin).

Parameter layout (one flat float32 buffer, matrices in PyTorch's (out, in) layout):
    wte (Vp, C), wpe (maxT, C),
    per layer: ln1_w (C), ln1_b (C), qkv_w (3C, C), qkv_b (3C), attn_proj_w (C, C),
               attn_proj_b (C), ln2_w (C), ln2_b (C), fc_w (4C, C), fc_b (4C),
               fc_proj_w (C, 4C), fc_proj_b (C),
    lnf_w (C), lnf_b (C).
GPT.parameters() enumerates the tensors in exactly this order (the modules below are
declared in it), so flattening parameters() gives the layout.

Reference file (little-endian, blocks back to back):
    int32   header[256]   magic 20261127, version, V, Vp, maxT, L, H, C, B, T, ga, steps,
                          num_params, warmup_num_steps, warmup_type (0 log, 1 linear),
                          version 2 adds: arch (1 GPT-2, 2 LLaMA), num_kv_heads, ffn_hidden,
                          tied, hf_dir (1: a Hugging Face directory of the initial weights
                          sits next to the file, at its path without ".bin"); the rest 0
    float32 hparams[16]   lr, beta1, beta2, eps, weight_decay, grad_clip,
                          warmup_min_lr, warmup_max_lr,
                          version 2 adds: norm_eps, rope_theta (0 for GPT-2),
                          initializer_range; the rest 0
    float32 params[num_params]          initial weights
    int32   inputs[ga][B][T], targets[ga][B][T]
    float32 logits[B][T][V], loss, grads[num_params]
                                        micro batch 0 at the initial weights (grads of its
                                        mean loss, not divided by ga)
    float32 losses_A[steps], grad_norms_A[steps], lrs_A[steps], params_final_A[num_params]
    float32 losses_B[steps], grad_norms_B[steps], lrs_B[steps], params_final_B[num_params]
Run A uses AdamW (DeepSpeed's default adam_w_mode = true); run B uses Adam with L2
weight decay (adam_w_mode = false). Both start from the same initial weights.
Version 1 is GPT-2 with its constants: num_kv_heads = H, ffn_hidden = 4 C, tied, LayerNorm
epsilon 1e-5, initializer_range 0.02. This script writes version 1 (its files stay byte for
byte what they were); dev/reference_hf.py writes version 2, with models built by Hugging Face
transformers (LLaMA, and GPT-2 as transformers has it) and the training loop below.
"""

import argparse
import copy
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MAGIC = 20261127
VERSION_GPT2 = 1  # GPT-2 with its constants (the header's first 15 words)
VERSION = 2       # any architecture: adds arch, num_kv_heads, ffn_hidden, tied, ... (above)
ARCH_GPT2, ARCH_LLAMA = 1, 2
WARMUP_TYPES = ("log", "linear")  # index = header[14]


# ----------------------------------------------------------------------------
# the model


@dataclass
class GPTConfig:
    vocab_size: int = 50257          # V: real tokens, the width of the logits
    padded_vocab_size: int = 50304   # Vp: rows of wte (rows V..Vp-1 are zero)
    max_seq_len: int = 1024          # maxT: rows of wpe
    num_layers: int = 12             # L
    num_heads: int = 12              # H
    channels: int = 768              # C


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, eps 1e-5; weight and bias are (C,)."""

    def __init__(self, C):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(C))
        self.bias = nn.Parameter(torch.empty(C))

    @torch.no_grad()
    def reset_parameters(self):
        # not the usual ones/zeros, so that a wrong gradient of either cannot hide
        self.weight.copy_(1.0 + 0.1 * torch.randn_like(self.weight))
        self.bias.copy_(0.02 * torch.randn_like(self.bias))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, eps=1e-5)


class Linear(nn.Module):
    """y = x @ weight.T + bias; weight is (out_features, in_features)."""

    def __init__(self, in_features, out_features, init_std):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.init_std = init_std

    @torch.no_grad()
    def reset_parameters(self):
        self.weight.normal_(0.0, self.init_std)
        self.bias.normal_(0.0, 0.02)  # nonzero, so that every path carries signal

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        C = config.channels
        # residual projections start smaller, as in GPT-2: std 0.02 / sqrt(2 L)
        resid_std = 0.02 / math.sqrt(2 * config.num_layers)
        self.num_heads = config.num_heads
        # declaration order = parameter layout order
        self.ln1 = LayerNorm(C)
        self.qkv = Linear(C, 3 * C, 0.02)        # output features [q | k | v]
        self.attn_proj = Linear(C, C, resid_std)
        self.ln2 = LayerNorm(C)
        self.fc = Linear(C, 4 * C, 0.02)
        self.fc_proj = Linear(4 * C, C, resid_std)

    def attention(self, x):
        """Causal multi-head self-attention. x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        H = self.num_heads
        hs = C // H
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, hs): head h is features h*hs .. (h+1)*hs-1
        q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)        # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
        att = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)              # heads side by side
        return self.attn_proj(y)

    def mlp(self, x):
        return self.fc_proj(F.gelu(self.fc(x), approximate="tanh"))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    """GPT-2 with a padded, tied token embedding; call reset_parameters() after seeding."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.channels
        self.wte = nn.Parameter(torch.empty(config.padded_vocab_size, C))
        self.wpe = nn.Parameter(torch.empty(config.max_seq_len, C))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.lnf = LayerNorm(C)

    @torch.no_grad()
    def reset_parameters(self):
        self.wte.normal_(0.0, 0.02)
        self.wte[self.config.vocab_size:].zero_()  # padding rows
        self.wpe.normal_(0.0, 0.02)
        for module in self.modules():
            if isinstance(module, (LayerNorm, Linear)):
                module.reset_parameters()

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) int64. Returns logits (B, T, V) and the mean loss (or None)."""
        T = idx.shape[1]
        x = F.embedding(idx, self.wte) + self.wpe[:T]
        for block in self.blocks:
            x = block(x)
        x = self.lnf(x)
        # output layer tied to the embedding, real tokens only: padding rows get no gradient
        logits = x @ self.wte[: self.config.vocab_size].t()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def flat(self, grads=False):
        """The parameters (or their gradients) in the flat layout."""
        return flatten(p.grad if grads else p for p in self.parameters())


def flatten(tensors):
    """Concatenate tensors into one flat float32 tensor (the parameter layout)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


# ----------------------------------------------------------------------------
# DeepSpeed's training step


@dataclass
class TrainConfig:
    lr: float = 1e-3                 # optimizer lr (= warmup_max_lr)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0           # DeepSpeed's gradient_clipping; 0 = off
    warmup_min_lr: float = 1e-4
    warmup_max_lr: float = 1e-3
    warmup_num_steps: int = 4
    warmup_type: str = "log"


def warmup_lr(it, tc):
    """DeepSpeed WarmupLR: the lr after `it` schedule steps (it = -1 before the first)."""
    W = max(2, tc.warmup_num_steps)
    if it < 0:
        gamma = 0.0
    elif it < W:
        gamma = math.log(it + 1) / math.log(W) if tc.warmup_type == "log" else it / W
    else:
        gamma = 1.0
    return tc.warmup_min_lr + (tc.warmup_max_lr - tc.warmup_min_lr) * gamma


def train(model, inputs, targets, tc, steps, adam_w_mode):
    """Train `model` in place for `steps` optimizer steps, each over all micro batches
    in inputs/targets (ga, B, T). `model(x, y)` returns (logits, mean loss) and
    `model.flat()` the flat parameters. Returns per-step losses, grad norms (before
    clipping) and learning rates, as float32 arrays, and the final flat parameters."""
    params = list(model.parameters())
    # adam_w_mode false is Adam with L2 decay: g += wd * p before the moments
    optimizer_class = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    optimizer = optimizer_class(params, lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                eps=tc.eps, weight_decay=tc.weight_decay)
    ga = inputs.shape[0]
    losses, norms, lrs = [], [], []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=False)
        micro_losses = []
        for x, y in zip(inputs, targets):
            _, loss = model(x, y)
            (loss / ga).backward()
            micro_losses.append(loss.item())
        # global L2 norm of all gradients, accumulated in float64
        norm = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in params))
        if tc.grad_clip > 0:
            coef = tc.grad_clip / (norm + 1e-6)
            if coef < 1.0:
                for p in params:
                    p.grad.mul_(coef)
        # update number `step` uses the schedule's lr at it = step - 1
        lr = warmup_lr(step - 1, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        losses.append(sum(micro_losses) / ga)
        norms.append(norm)
        lrs.append(lr)
    return [np.array(a, dtype=np.float32) for a in (losses, norms, lrs)] + [model.flat()]


# ----------------------------------------------------------------------------
# the reference file


@dataclass
class ReferenceConfig:
    model: GPTConfig
    B: int
    T: int
    ga: int
    steps: int
    grad_clip: float  # chosen from the runs' gradient norms, well away from each of them


# The base configuration is one attention tile of the GPU kernels (64 queries x 64 keys,
# head size 16) with GPT-2's vocabulary. The others take attention across tiles: T not a
# multiple of 64 (the online-softmax rescale, the causal mask in a partial tile, the
# multi-tile backward) and head sizes 32, 64 and 128 (DeepSeek's); maxT above T leaves rows
# of wpe unused. B 2, so that the second sequence starts at a row that is not a multiple
# of the tile. A 1000-token vocabulary keeps them small and quick under the CUDA emulator
# (the base covers GPT-2's).
def small(T, maxT, heads, channels, grad_clip):
    return ReferenceConfig(GPTConfig(vocab_size=1000, padded_vocab_size=1024, max_seq_len=maxT,
                                     num_layers=2, num_heads=heads, channels=channels),
                           B=2, T=T, ga=2, steps=10, grad_clip=grad_clip)


CONFIGS = {
    # gradient norms are about 0.55 on the first steps and 0.71-0.88 later, so a clip of
    # 0.65 is inactive on steps 0-3 (0-4 in run B) and active after, never within 0.06
    "base": ReferenceConfig(GPTConfig(max_seq_len=64, num_layers=2, num_heads=4, channels=64),
                            B=4, T=64, ga=2, steps=10, grad_clip=0.65),
    # gradient norms 0.55-1.11: every step clipped
    "t100_hs32": small(T=100, maxT=128, heads=2, channels=64, grad_clip=0.45),
    # gradient norms 0.93-2.31: every step clipped
    "t130_hs64": small(T=130, maxT=160, heads=2, channels=128, grad_clip=0.75),
    # gradient norms 0.90-1.33 and 1.72-3.01: steps 4-8 of run A and 5-9 of run B clipped;
    # one head (the others cover several), so that C and the emulator's time stay small
    "t130_hs128": small(T=130, maxT=130, heads=1, channels=128, grad_clip=1.5),
}


@dataclass
class ModelFields:
    """What the header records of the model (version 1: the first six only)."""
    V: int
    Vp: int
    maxT: int
    L: int
    H: int
    C: int
    arch: int = ARCH_GPT2
    num_kv_heads: int = 0
    ffn_hidden: int = 0
    tied: int = 1
    hf_dir: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 0.0
    initializer_range: float = 0.02


def gpt2_fields(config):
    return ModelFields(config.vocab_size, config.padded_vocab_size, config.max_seq_len,
                       config.num_layers, config.num_heads, config.channels,
                       num_kv_heads=config.num_heads, ffn_hidden=4 * config.channels)


def write_reference(path, model, fields, version, inputs, targets, tc, steps, t0):
    """Computes what the reference file holds with `model` (see train() for what it must
    provide) from its current weights, writes it to `path` and prints a summary."""
    ga, B, T = inputs.shape
    params = model.flat()

    # micro batch 0 at the initial weights
    logits, loss = model(inputs[0], targets[0])
    loss.backward()
    grads = model.flat(grads=True)

    # the two training runs are independent: one thread each (torch releases the GIL)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(train, copy.deepcopy(model), inputs, targets, tc, steps,
                               adam_w_mode) for adam_w_mode in (True, False)]
        run_a, run_b = [future.result() for future in futures]

    f = fields
    header = np.zeros(256, dtype=np.int32)
    header[:15] = [MAGIC, version, f.V, f.Vp, f.maxT, f.L, f.H, f.C, B, T, ga, steps,
                   params.numel(), tc.warmup_num_steps, WARMUP_TYPES.index(tc.warmup_type)]
    hparams = np.zeros(16, dtype=np.float32)
    hparams[:8] = [tc.lr, tc.beta1, tc.beta2, tc.eps, tc.weight_decay, tc.grad_clip,
                   tc.warmup_min_lr, tc.warmup_max_lr]
    if version >= 2:
        header[15:20] = [f.arch, f.num_kv_heads, f.ffn_hidden, f.tied, f.hf_dir]
        hparams[8:11] = [f.norm_eps, f.rope_theta, f.initializer_range]
    else:
        assert (f.arch, f.num_kv_heads, f.ffn_hidden, f.tied, f.norm_eps, f.initializer_range) \
            == (ARCH_GPT2, f.H, 4 * f.C, 1, 1e-5, 0.02) and not f.hf_dir, \
            "version 1 is GPT-2 with its constants"
    blocks = [header, hparams, params, inputs, targets, logits, loss, grads, *run_a, *run_b]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as out:
        for block in blocks:
            if isinstance(block, torch.Tensor):
                block = block.detach().numpy()
            dtype = "<i4" if np.issubdtype(np.asarray(block).dtype, np.integer) else "<f4"
            out.write(np.ascontiguousarray(block, dtype=dtype).tobytes())

    print(f"wrote {path}: {os.path.getsize(path):,} bytes, {params.numel():,} parameters,"
          f" {time.time() - t0:.1f} s")
    print(f"micro batch 0 loss at the initial weights: {loss.item():.6f}")
    for name, (losses, norms, lrs, _) in (("A (AdamW)", run_a), ("B (Adam, L2)", run_b)):
        print(f"run {name}: clip {tc.grad_clip}")
        for step in range(steps):
            clipped = "clipped" if norms[step] + 1e-6 > tc.grad_clip else ""
            print(f"  step {step}: loss {losses[step]:.6f}  grad norm {norms[step]:.4f}"
                  f"  lr {lrs[step]:.3e}  {clipped}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--config", default="base", choices=CONFIGS,
                        help="configuration (default: %(default)s)")
    parser.add_argument("--out", help="reference file to write (default: dev/data/gpt2_reference.bin,"
                        " or dev/data/gpt2_reference_CONFIG.bin for another --config)")
    parser.add_argument("--seed", type=int, default=1337, help="torch seed (default: %(default)s)")
    args = parser.parse_args()
    if args.out is None:
        suffix = "" if args.config == "base" else "_" + args.config
        args.out = os.path.join(repo, "dev", "data", f"gpt2_reference{suffix}.bin")

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a fixed thread count keeps the sums, and the file, reproducible
    rc = CONFIGS[args.config]
    config = rc.model
    model = GPT(config)
    model.reset_parameters()
    inputs = torch.randint(0, config.vocab_size, (rc.ga, rc.B, rc.T))
    targets = torch.randint(0, config.vocab_size, (rc.ga, rc.B, rc.T))
    write_reference(args.out, model, gpt2_fields(config), VERSION_GPT2, inputs, targets,
                    TrainConfig(grad_clip=rc.grad_clip), rc.steps, t0)


if __name__ == "__main__":
    main()
