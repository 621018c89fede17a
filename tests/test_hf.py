#!/usr/bin/env python3
"""
test_hf.py: Hugging Face models in and out of dstrain, checked with transformers itself.
Tiny LlamaForCausalLM (untied, tied) and GPT2LMHeadModel models are saved with
save_pretrained (float32, sharded, bfloat16, float16, and GPT-2 the way the original
openai-community/gpt2 file names its tensors); `./train_gpt_cpu --hf-model IN --steps 0
--hf-out OUT` converts them, and OUT must load with from_pretrained with a state_dict
equal to IN's, exactly (16-bit inputs: their exact fp32 values). Then: a sharded export,
training from a Hugging Face model (its first loss is transformers' loss, its export equals
the checkpoint's model.bin converted), and bad inputs refused by name.

    /usr/bin/python3 tests/test_hf.py     (needs PyTorch and transformers: Debian's python3)
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings

try:
    import torch
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
except ImportError as e:  # the runner counts this as a skip
    print(f"skipped: {e} (run with a Python that has PyTorch and transformers, such as Debian's /usr/bin/python3)")
    print("0 passed, 0 failed, 1 skipped")
    sys.exit(0)

os.environ["HF_HUB_OFFLINE"] = "1"
warnings.filterwarnings("ignore")  # transformers' FutureWarnings about tokenizer defaults
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BIN = "./train_gpt_cpu"
TMP = tempfile.mkdtemp(prefix="test_hf.")
passed = failed = 0


def ok(name):
    global passed
    passed += 1
    print(f"ok   {name}")


def bad(name, *lines):
    global failed
    failed += 1
    print(f"FAIL {name}")
    for line in lines:
        print(f"    {line}")


def check(name, cond, *why):
    ok(name) if cond else bad(name, *why)


def tmp(*parts):
    return os.path.join(TMP, *parts)


def run(*args):
    p = subprocess.run([BIN, *args], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def expect_error(name, want, *args):
    """a non-zero exit (not a crash) and `want` in the output"""
    rc, out = run(*args)
    check(name, 0 < rc < 128 and want in out, f"exit {rc}, wanted an error containing: {want}", f"got: {out.strip()[-400:]}")


def randomize(model):
    """every parameter random (norm weights around 1), so a misplaced tensor shows"""
    torch.manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.0, 0.1)
    return model


def save_tokenizer(path):
    """a small word-level tokenizer of 300 tokens, saved the way AutoTokenizer reads it"""
    vocab = {f"w{i}": i for i in range(299)}
    vocab["<unk>"] = 299
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="w1", eos_token="w2")
    fast.save_pretrained(path)


def llama(tied=False, **kw):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, **kw)
    return randomize(transformers.LlamaForCausalLM(cfg))


def gpt2(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=128, **kw)
    return randomize(transformers.GPT2LMHeadModel(cfg))


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


def same_weights(a, b):
    """'' if the state_dicts are equal bit for bit, else what differs"""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return f"keys differ: {sorted(set(sa) ^ set(sb))[:5]}"
    for k in sa:
        if sa[k].dtype != torch.float32 or sb[k].dtype != torch.float32 or not torch.equal(sa[k], sb[k]):
            return f"tensor {k} differs ({sa[k].dtype}, {sb[k].dtype})"
    return ""


CONFIG_KEYS = {"llama": ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "max_position_embeddings", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "initializer_range",
                         "hidden_act", "bos_token_id", "eos_token_id"],
               "gpt2": ["n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "layer_norm_epsilon", "n_inner", "activation_function",
                        "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id"]}


def config_diff(a, b, expect=None):
    """config keys that differ between the loaded models (expect: values b must have instead)"""
    expect = expect or {}
    return [f"{k}: {getattr(a.config, k)} -> {getattr(b.config, k)}" for k in CONFIG_KEYS[a.config.model_type]
            if expect.get(k, getattr(a.config, k)) != getattr(b.config, k)]


def convert_and_compare(name, src, extra=(), expect_config=None):
    """--hf-model src --steps 0 --hf-out: loads in transformers with src's weights and configuration"""
    out = tmp(name + ".out")
    rc, log = run("--hf-model", src, "--steps", "0", "--hf-out", out, *extra)
    if rc != 0:
        bad(f"{name}: converts", f"exit {rc}", log.strip()[-600:])
        return None
    a, b = load(src), load(out)
    diff, cdiff = same_weights(a, b), config_diff(a, b, expect_config)
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        same_logits = torch.equal(a(x).logits, b(x).logits)
    check(f"{name}: the export loads with from_pretrained, same state_dict, configuration and logits",
          not diff and not cdiff and same_logits, diff, "; ".join(cdiff), f"logits equal: {same_logits}")
    return out


def safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


# --- models from transformers, converted both ways ------------------------------------
tok_dir = tmp("tokenizer")
save_tokenizer(tok_dir)

m = llama(rms_norm_eps=1e-5, rope_theta=500000.0)
m.save_pretrained(tmp("llama"), safe_serialization=True)
save_tokenizer(tmp("llama"))
out = convert_and_compare("llama untied, float32", tmp("llama"))
if out:
    files = sorted(os.listdir(out))
    check("llama: the export has config.json, model.safetensors and the tokenizer, no temporary folder",
          {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(files)
          and not os.path.exists(out + ".tmp"), files)
    header = safetensors_header(os.path.join(out, "model.safetensors"))
    check("llama: float32 tensors, q/k/v and gate/up separate, lm_head written, metadata format pt",
          header["__metadata__"] == {"format": "pt"} and header["model.layers.1.self_attn.k_proj.weight"]["shape"] == [32, 64]
          and header["model.layers.0.mlp.up_proj.weight"]["shape"] == [172, 64] and header["lm_head.weight"]["shape"] == [300, 64]
          and all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__"), str(header)[:300])
    ta, tb = transformers.AutoTokenizer.from_pretrained(tmp("llama")), transformers.AutoTokenizer.from_pretrained(out)
    check("llama: AutoTokenizer loads the export's tokenizer", ta("w5 w7 w298")["input_ids"] == tb("w5 w7 w298")["input_ids"])
    # the export read back: the same model again, and dstrain's config.json keys survive a second round
    convert_and_compare("llama: dstrain's own export, converted again", out)

m = llama(tied=True, bos_token_id=None, eos_token_id=[2, 5])
m.save_pretrained(tmp("llama_tied"), safe_serialization=True)
out = convert_and_compare("llama tied, no BOS, a list of EOS", tmp("llama_tied"), expect_config={"eos_token_id": 2})
if out:
    header = safetensors_header(os.path.join(out, "model.safetensors"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    check("llama tied: no lm_head in the file, bos_token_id null, eos_token_id the first of the list",
          "lm_head.weight" not in header and cfg["tie_word_embeddings"] is True and cfg["bos_token_id"] is None and cfg["eos_token_id"] == 2, cfg)

m = llama()
m.save_pretrained(tmp("llama_sharded"), safe_serialization=True, max_shard_size="40KB")
check("llama sharded: transformers wrote an index and shards", os.path.exists(tmp("llama_sharded", "model.safetensors.index.json")))
convert_and_compare("llama sharded input (model.safetensors.index.json)", tmp("llama_sharded"))
out = convert_and_compare("llama sharded export (--hf-shard-size 50000)", tmp("llama_sharded"), ["--hf-shard-size", "50000"])
if out:
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    total = sum(os.path.getsize(os.path.join(out, f)) - 8 - struct.unpack("<Q", open(os.path.join(out, f), "rb").read(8))[0] for f in shards)
    n = len(shards)
    check("sharded export: model-0000K-of-0000N files, each at most the shard size (or one tensor), an index with the total size",
          n > 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)] and index["metadata"]["total_size"] == total
          and set(index["weight_map"].values()) == set(shards) and len(index["weight_map"]) == 2 * 9 + 3
          and all(os.path.getsize(os.path.join(out, f)) < 50000 + 4096 or len(safetensors_header(os.path.join(out, f))) == 2 for f in shards),
          shards, index["metadata"])

m = llama()
m.to(torch.bfloat16).save_pretrained(tmp("llama_bf16"), safe_serialization=True)
convert_and_compare("llama bfloat16 input: exactly its values in float32", tmp("llama_bf16"))

g = gpt2()
g.save_pretrained(tmp("gpt2"), safe_serialization=True)
save_tokenizer(tmp("gpt2"))
out = convert_and_compare("gpt2, float32", tmp("gpt2"))
if out:
    header = safetensors_header(os.path.join(out, "model.safetensors"))
    check("gpt2: Conv1D weights stored (in, out) as transformers has them, no lm_head",
          header["transformer.h.0.attn.c_attn.weight"]["shape"] == [64, 192] and header["transformer.h.1.mlp.c_proj.weight"]["shape"] == [256, 64]
          and "lm_head.weight" not in header, str(header)[:300])

gpt2().half().save_pretrained(tmp("gpt2_f16"), safe_serialization=True)
convert_and_compare("gpt2 float16 input: exactly its values in float32", tmp("gpt2_f16"))

# the original openai-community/gpt2 file: no "transformer." prefix, attention mask buffers
g = gpt2()
os.makedirs(tmp("gpt2_bare"))
g.config.save_pretrained(tmp("gpt2_bare"))
sd = {k[len("transformer."):]: v.contiguous() for k, v in g.state_dict().items() if k.startswith("transformer.")}
for layer in range(2):
    sd[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
    sd[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
save_file(sd, tmp("gpt2_bare", "model.safetensors"), metadata={"format": "pt"})
convert_and_compare("gpt2 as openai-community/gpt2 stores it (no prefix, mask buffers ignored)", tmp("gpt2_bare"))

# --- training from a Hugging Face model, and its export ---------------------------------
# Every sequence of the data is one 128-token pattern, so the first batch is known whatever the
# order: the trainer's first loss must be transformers' loss of the same model on it.
torch.manual_seed(7)
pattern = torch.randint(0, 300, (128,))
tokens = pattern.repeat(16).tolist() + [pattern[0].item()]
with open(tmp("train_000000.bin"), "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253)))
    f.write(struct.pack(f"<{len(tokens)}H", *tokens))
for arch in ("gpt2", "llama"):
    g = load(tmp(arch))
    with torch.no_grad():
        logits = g(pattern[None]).logits[0]
        hf_loss = torch.nn.functional.cross_entropy(logits, torch.roll(pattern, -1)).item()
    ck = tmp(f"ck_{arch}")
    rc, log = run("--hf-model", tmp(arch), "--train-data", tmp("train_*.bin"), "--val-data", "", "--steps", "2", "--micro-batch", "2",
                  "--lr", "1e-2", "--sample-tokens", "0", "--checkpoint-dir", ck, "--log", tmp(f"train_{arch}.jsonl"), "--hf-out", tmp(f"trained_{arch}"))
    if rc != 0:
        bad(f"training from --hf-model {arch} with --hf-out", f"exit {rc}", log.strip()[-600:])
        continue
    losses = [json.loads(line)["loss"] for line in open(tmp(f"train_{arch}.jsonl")) if '"train"' in line]
    check(f"training from --hf-model {arch}: the first loss is transformers' loss of that model (the weights are placed right)",
          abs(losses[0] - hf_loss) <= 1e-4 * abs(hf_loss), f"dstrain {losses[0]}, transformers {hf_loss}")
    trained = load(tmp(f"trained_{arch}"))
    check(f"--hf-out after training {arch}: the trained weights (not the initial ones), with the tokenizer",
          same_weights(g, trained) != "" and os.path.exists(tmp(f"trained_{arch}", "tokenizer.json")))
    rc1, log1 = run("--init-from", os.path.join(ck, "step_00000002", "model.bin"), "--steps", "0", "--hf-out", tmp(f"from_bin_{arch}"))
    rc2, log2 = run("--resume", "--checkpoint-dir", ck, "--hf-model", tmp(arch), "--steps", "0", "--hf-out", tmp(f"from_resume_{arch}"))
    check(f"{arch}: --init-from model.bin --steps 0 --hf-out and --resume --steps 0 --hf-out: the same model as the export after training",
          rc1 == 0 and rc2 == 0 and same_weights(trained, load(tmp(f"from_bin_{arch}"))) == "" and same_weights(trained, load(tmp(f"from_resume_{arch}"))) == ""
          and os.path.exists(tmp(f"from_resume_{arch}", "tokenizer.json")), log1[-300:], log2[-300:])

# --- bad inputs are refused by name ------------------------------------------------------
shutil.copytree(tmp("llama"), tmp("truncated"))
st = tmp("truncated", "model.safetensors")
os.truncate(st, os.path.getsize(st) - 100)
expect_error("truncated safetensors: names the file and a tensor", f"safetensors file '{st}': tensor '",
             "--hf-model", tmp("truncated"), "--steps", "0", "--hf-out", tmp("never"))

m = llama()
sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
os.makedirs(tmp("missing"))
m.config.save_pretrained(tmp("missing"))
save_file(sd, tmp("missing", "model.safetensors"), metadata={"format": "pt"})
expect_error("missing tensor: names it", f"'{tmp('missing', 'model.safetensors')}': missing tensor 'model.layers.1.mlp.up_proj.weight'",
             "--hf-model", tmp("missing"), "--steps", "0", "--hf-out", tmp("never"))

sd = {k: v.contiguous() for k, v in m.state_dict().items()}
sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
os.makedirs(tmp("extra"))
m.config.save_pretrained(tmp("extra"))
save_file(sd, tmp("extra", "model.safetensors"), metadata={"format": "pt"})
expect_error("a tensor the model does not have: names it", "tensor 'model.layers.0.self_attn.q_proj.bias' is not a parameter of the llama model",
             "--hf-model", tmp("extra"), "--steps", "0", "--hf-out", tmp("never"))

shutil.copytree(tmp("llama"), tmp("biased"))
cfg = json.load(open(tmp("biased", "config.json")))
cfg["attention_bias"] = True
json.dump(cfg, open(tmp("biased", "config.json"), "w"))
expect_error("attention_bias in config.json: names the file and key", f"'{tmp('biased', 'config.json')}': key 'attention_bias' is true",
             "--hf-model", tmp("biased"), "--steps", "0", "--hf-out", tmp("never"))
cfg["attention_bias"] = False
cfg["model_type"] = "mistral"
json.dump(cfg, open(tmp("biased", "config.json"), "w"))
expect_error("unknown model_type: says what is supported", "model_type \"mistral\" is not supported (supported: \"llama\"",
             "--hf-model", tmp("biased"), "--steps", "0", "--hf-out", tmp("never"))
check("nothing written by the refused conversions", not os.path.exists(tmp("never")) and not os.path.exists(tmp("never.tmp")))

os.makedirs(tmp("precious"))
open(tmp("precious", "notes.txt"), "w").write("mine")
expect_error("--hf-out refuses a non-empty folder it did not write", "is not empty and not an earlier export of dstrain",
             "--hf-model", tmp("llama"), "--steps", "0", "--hf-out", tmp("precious"))
check("... and leaves it as it was", os.listdir(tmp("precious")) == ["notes.txt"])
expect_error("--hf-out is checked before training", "is not empty and not an earlier export of dstrain",
             "--hf-model", tmp("gpt2"), "--train-data", tmp("train_*.bin"), "--val-data", "", "--steps", "1", "--hf-out", tmp("precious"))
os.makedirs(tmp("empty"))
rc1, log1 = run("--hf-model", tmp("llama_sharded"), "--steps", "0", "--hf-out", tmp("empty"), "--hf-shard-size", "50000")
rc2, log2 = run("--hf-model", tmp("gpt2_f16"), "--steps", "0", "--hf-out", tmp("empty") + "/")
check("--hf-out fills an empty folder, then replaces its own earlier export (no file of it left)",
      rc1 == 0 and rc2 == 0 and sorted(os.listdir(tmp("empty"))) == ["config.json", "model.safetensors"]
      and load(tmp("empty")).config.model_type == "gpt2" and not os.path.exists(tmp("empty.old")), log1[-300:], log2[-300:])
expect_error("--hf-model and --init-from together refused", "--hf-model and --init-from both give the initial weights",
             "--hf-model", tmp("llama"), "--init-from", "x.bin", "--steps", "0", "--hf-out", tmp("never"))
expect_error("--steps 0 --hf-out without weights to convert", "--steps 0 --hf-out converts weights: give --hf-model DIR",
             "--steps", "0", "--hf-out", tmp("never"))
rc, log = run("--help")
check("--help documents --hf-model, --hf-out and --hf-shard-size", rc == 0 and all(f in log for f in ["--hf-model", "--hf-out", "--hf-shard-size"]))

if failed == 0:
    shutil.rmtree(TMP)
else:
    print(f"files kept in {TMP}")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
