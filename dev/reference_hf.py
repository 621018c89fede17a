"""
Reference files whose model is built by Hugging Face transformers (LlamaForCausalLM, and
GPT2LMHeadModel so that a GPT-2 imported from transformers is checked against transformers'
own forward and backward), in the format of dev/reference.py (version 2), with its training
loop: the same DeepSpeed step, two 10-step runs (A: AdamW, B: Adam with L2).

    /usr/bin/python3 dev/reference_hf.py --config NAME [--out FILE]

writes dev/data/NAME_reference.bin (or FILE, which must end in .bin) and, next to it, the
initial weights as a Hugging Face directory: dev/data/NAME_reference/ (FILE without .bin;
config.json and model.safetensors, float32, from save_pretrained), which the header records
(hf_dir = 1). The logits are transformers' own; the loss is the cross-entropy of those logits
against the file's targets, computed here (not transformers' shifted labels); the gradients
are transformers' autograd through its modules.

The params, grads and final weights in the file are in dstrain's flat layout, which this
script builds from the transformers modules by itself (matrices (out, in), as PyTorch
stores nn.Linear weights; Vp = V rounded up to a multiple of 128, rows V..Vp-1 zero):
    LLaMA:  wte (Vp, C)                     = model.embed_tokens
            per layer: ln1w (C)             = input_layernorm
                       qkvw (C + 2 KV, C)   = [q_proj; k_proj; v_proj] (rows stacked),
                                              KV = num_key_value_heads * head size
                       attprojw (C, C)      = o_proj
                       ln2w (C)             = post_attention_layernorm
                       fcw (2 F, C)         = [gate_proj; up_proj] (rows stacked), F = intermediate_size
                       fcprojw (C, F)       = down_proj
            lnfw (C)                        = model.norm
            lm_head (Vp, C)                 = lm_head, only when untied
    GPT-2:  as dev/reference.py; transformers' Conv1D weights are (in, out) and are
            transposed: qkvw = c_attn.weight.T, attprojw = attn.c_proj.weight.T,
            fcw = c_fc.weight.T, fcprojw = mlp.c_proj.weight.T
transformers' LLaMA applies rotary embeddings the "rotate half" way: within a head of size
hs, element i < hs/2 pairs with element i + hs/2, at angle pos * rope_theta^(-2i/hs).
"""

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import (ARCH_GPT2, ARCH_LLAMA, VERSION, ModelFields,  # noqa: E402
                       TrainConfig, flatten, write_reference)


def padded(V):
    return (V + 127) // 128 * 128


def pad_rows(t, rows):
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def our_layout(hf, get):
    """The tensors of dstrain's flat layout, in order, from transformers model `hf`; get(p)
    gives what to take of parameter p (the weight or its gradient)."""
    c = hf.config
    Vp = padded(c.vocab_size)
    if c.model_type == "llama":
        m = hf.model
        yield pad_rows(get(m.embed_tokens.weight), Vp)
        for layer in m.layers:
            att, mlp = layer.self_attn, layer.mlp
            yield get(layer.input_layernorm.weight)
            yield torch.cat([get(att.q_proj.weight), get(att.k_proj.weight), get(att.v_proj.weight)])
            yield get(att.o_proj.weight)
            yield get(layer.post_attention_layernorm.weight)
            yield torch.cat([get(mlp.gate_proj.weight), get(mlp.up_proj.weight)])
            yield get(mlp.down_proj.weight)
        yield get(m.norm.weight)
        if not c.tie_word_embeddings:
            yield pad_rows(get(hf.lm_head.weight), Vp)
    elif c.model_type == "gpt2":
        m = hf.transformer
        yield pad_rows(get(m.wte.weight), Vp)
        yield get(m.wpe.weight)
        for h in m.h:
            att, mlp = h.attn, h.mlp
            yield from (get(h.ln_1.weight), get(h.ln_1.bias))
            yield from (get(att.c_attn.weight).t(), get(att.c_attn.bias))  # Conv1D: (in, out)
            yield from (get(att.c_proj.weight).t(), get(att.c_proj.bias))
            yield from (get(h.ln_2.weight), get(h.ln_2.bias))
            yield from (get(mlp.c_fc.weight).t(), get(mlp.c_fc.bias))
            yield from (get(mlp.c_proj.weight).t(), get(mlp.c_proj.bias))
        yield from (get(m.ln_f.weight), get(m.ln_f.bias))
    else:
        raise ValueError(f"no flat layout for model_type {c.model_type!r}")


class HFModel(nn.Module):
    """A transformers causal LM as dev/reference.py's train() and write_reference() use a
    model: model(idx, targets) -> (logits, mean loss), model.flat(grads) -> flat layout."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx, targets=None):
        logits = self.hf(input_ids=idx, use_cache=False).logits   # (B, T, V)
        loss = None
        if targets is not None:  # token t predicts targets[t]: no shift
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def flat(self, grads=False):
        return flatten(our_layout(self.hf, (lambda p: p.grad) if grads else (lambda p: p)))


def model_fields(c):
    """The header's description of transformers config c, refusing what dstrain's
    architectures do not have."""
    if c.model_type == "llama":
        assert c.hidden_act == "silu" and not c.attention_bias and not c.mlp_bias \
            and c.rope_scaling is None and c.pretraining_tp == 1, "not dstrain's LLaMA"
        return ModelFields(c.vocab_size, padded(c.vocab_size), c.max_position_embeddings,
                           c.num_hidden_layers, c.num_attention_heads, c.hidden_size,
                           arch=ARCH_LLAMA, num_kv_heads=c.num_key_value_heads,
                           ffn_hidden=c.intermediate_size, tied=int(c.tie_word_embeddings),
                           hf_dir=1, norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                           initializer_range=c.initializer_range)
    assert c.model_type == "gpt2" and c.activation_function == "gelu_new" \
        and c.tie_word_embeddings and c.scale_attn_weights \
        and not c.scale_attn_by_inverse_layer_idx and not c.reorder_and_upcast_attn, \
        "not dstrain's GPT-2"
    return ModelFields(c.vocab_size, padded(c.vocab_size), c.n_positions, c.n_layer, c.n_head,
                       c.n_embd, arch=ARCH_GPT2, num_kv_heads=c.n_head,
                       ffn_hidden=c.n_inner or 4 * c.n_embd, tied=1, hf_dir=1,
                       norm_eps=c.layer_norm_epsilon, rope_theta=0.0,
                       initializer_range=c.initializer_range)


# ----------------------------------------------------------------------------
# configurations


@dataclass
class HFReferenceConfig:
    make_config: Callable  # -> the transformers config (imports transformers when called)
    B: int
    T: int
    ga: int
    steps: int
    grad_clip: float  # chosen from the runs' gradient norms, well away from each of them


def llama(**kwargs):
    from transformers import LlamaConfig
    return LlamaConfig(num_hidden_layers=2, vocab_size=1000, initializer_range=0.02,
                       attn_implementation="eager", torch_dtype=torch.float32, **kwargs)


def gpt2(**kwargs):
    from transformers import GPT2Config
    return GPT2Config(vocab_size=1000, bos_token_id=999, eos_token_id=999,
                      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, attn_implementation="eager", torch_dtype=torch.float32,
                      **kwargs)


# Small and quick, like dev/reference.py's: 2 layers, a 1000-token vocabulary (padded to 1024),
# B 2, 2 micro batches, 10 steps. The LLaMA ones set what LlamaConfig could leave to its
# defaults, and differ from each other in it, so that a reader that ignores a field fails:
# rms_norm_eps 1e-5 / 1e-6 (transformers' default), rope_theta 10000 / 500000, untied / tied.
CONFIGS = {
    # head size 16, groups of 2 query heads per key/value head, an FFN width that is no
    # multiple of 8
    "llama": HFReferenceConfig(
        lambda: llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=172, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False),
        B=2, T=64, ga=2, steps=10, grad_clip=0.6),
    # groups of 4, T 100 (rotary positions past 64, attention over two tiles) below
    # max_position_embeddings 128, tied embeddings
    "llama_t100_gqa4": HFReferenceConfig(
        lambda: llama(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=344, max_position_embeddings=128, rms_norm_eps=1e-6,
                      rope_theta=500000.0, tie_word_embeddings=True),
        B=2, T=100, ga=2, steps=10, grad_clip=1.6),
    # GPT-2 as transformers builds it (GPT2LMHeadModel, Conv1D weights)
    "hf_gpt2": HFReferenceConfig(
        lambda: gpt2(n_layer=2, n_embd=64, n_head=4, n_positions=64),
        B=2, T=64, ga=2, steps=10, grad_clip=1.05),
}


def build(config):
    """transformers' model of `config`, initialised by transformers (from torch's RNG),
    then norm weights 1 + 0.1 n and biases 0.02 n as dev/reference.py does: not the usual
    ones and zeros, so that a wrong gradient of either, or a norm weight or bias left out
    of the forward, cannot hide."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32,
                                          attn_implementation="eager")
    hf.eval()  # no dropout (the configs have none either)
    assert hf.config._attn_implementation == "eager"
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(0.02 * torch.randn_like(p) if name.endswith(".bias")
                        else 1.0 + 0.1 * torch.randn_like(p))
    return hf


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--config", required=True, choices=CONFIGS, help="configuration")
    parser.add_argument("--out", help="reference file to write, ending in .bin (default:"
                        " dev/data/CONFIG_reference.bin); the Hugging Face directory is its"
                        " path without .bin")
    parser.add_argument("--seed", type=int, default=1337, help="torch seed (default: %(default)s)")
    args = parser.parse_args()
    if args.out is None:
        args.out = os.path.join(repo, "dev", "data", f"{args.config}_reference.bin")
    if not args.out.endswith(".bin"):
        parser.error("--out must end in .bin (the Hugging Face directory is its path without it)")
    hf_dir = args.out[: -len(".bin")]

    t0 = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a fixed thread count keeps the sums, and the file, reproducible
    rc = CONFIGS[args.config]
    hf = build(rc.make_config())
    fields = model_fields(hf.config)
    model = HFModel(hf)
    # the layout covers every parameter once, plus the padding rows of wte (and lm_head)
    P, padding = model.flat().numel(), (fields.Vp - fields.V) * fields.C
    assert P == sum(p.numel() for p in hf.parameters()) + padding * (2 - fields.tied)
    assert fields.tied == (hf.get_output_embeddings().weight is hf.get_input_embeddings().weight)

    if os.path.isdir(hf_dir):
        shutil.rmtree(hf_dir)
    hf.save_pretrained(hf_dir, safe_serialization=True)

    inputs = torch.randint(0, fields.V, (rc.ga, rc.B, rc.T))
    targets = torch.randint(0, fields.V, (rc.ga, rc.B, rc.T))
    write_reference(args.out, model, fields, VERSION, inputs, targets,
                    TrainConfig(grad_clip=rc.grad_clip), rc.steps, t0)
    print(f"wrote {hf_dir}/: {', '.join(sorted(os.listdir(hf_dir)))}")


if __name__ == "__main__":
    main()
