#!/usr/bin/env bash
# test_hf_job.sh: the job dstrain replaces, at real sizes on paper and small for real.
#   - DeepSeek-LLM 7B and 67B (their published config.json, tests/data/): accepted, and
#     --plan prints their parameter counts and DeepSpeed's ZeRO formula, allocating nothing
#   - the worked example of the README: a Hugging Face LLaMA with its own tokenizer,
#     WikiText tokenized with it, fine-tuned with the sample DeepSpeed config, a sample
#     decoded with that tokenizer, the result written back and loaded in transformers, where
#     it gives the validation loss dstrain reported
# Needs ./train_gpt_cpu, Debian's PyTorch with transformers (/usr/bin/python3) and the
# `tokenizers` package in the python3 that prepares data.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_hf_job
PY_TORCH=${PYTHON_TORCH:-/usr/bin/python3}

# --- real sizes: --plan -----------------------------------------------------------------
# Parameter counts by hand (V = 102400, untied: embedding and lm_head V x C each; per layer
# q, o C x C, k, v C x (kv_heads x 128), gate, up, down C x F, two norms C; a final norm C):
#   7B:  2 x 102400 x 4096 + 30 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 4096 = 6,910,365,696
#   67B: 2 x 102400 x 8192 + 95 x (2 x 8192^2 + 2 x 8192 x 1024 + 3 x 8192 x 22016 + 2 x 8192) + 8192 = 67,425,001,472
# DeepSpeed's model-state formula per rank (fp16 mixed precision, Adam): 16 P, 4 P + 12 P / N, 2 P + 14 P / N.
plan() { # plan NAME PARAMS RANKS
    local out rc
    out=$(/usr/bin/time -f "maxrss %M" $BIN --hf-model tests/data/$1 --plan $3 --micro-batch 1 --seq-len 512 2>&1); rc=$?
    verdict=$(PLAN="$out" python3 - "$2" "$3" 2>&1 <<'PY'
import os, re, sys
P, N = int(sys.argv[1]), int(sys.argv[2])
text = os.environ["PLAN"]
rows = {int(l.split()[0]): l.split() for l in text.splitlines() if re.match(r"^[012] +[0-9]", l)}
want = {0: 16 * P, 1: 4 * P + 12 * P / N, 2: 2 * P + 14 * P / N}
problems = [f"{P} parameters not printed"] if f"{P} parameters" not in text else []
for stage, bytes_ in want.items():
    if stage not in rows or abs(float(rows[stage][6]) - bytes_ / 1e9) > 0.006:
        problems.append(f"stage {stage}: DeepSpeed column {rows.get(stage, ['?'] * 7)[6]}, want {bytes_ / 1e9:.2f} GB")
rss = int(re.search(r"maxrss (\d+)", text).group(1))
if rss > 200_000:
    problems.append(f"--plan used {rss} KB of memory: it must not allocate the model")
print("; ".join(problems) or "ok")
PY
)
    if [ $rc -eq 0 ] && [ "$verdict" = ok ]; then ok "$1 accepted; --plan $3: $2 parameters and DeepSpeed's formula for stages 0, 1, 2"
    else bad "$1 --plan $3" "exit $rc: $verdict" "$(tail -5 <<<"$out")"; fi
}
plan deepseek-llm-7b-base 6910365696 8
plan deepseek-llm-67b-base 67425001472 64

# --- the worked example, small ------------------------------------------------------------
MODEL=$TMP/tiny-deepseek
"$PY_TORCH" tests/make_tiny_hf.py $MODEL ../shared/data/wikitext/wiki.valid.raw > $TMP/make.log 2>&1 \
    || [ -f ../shared/data/wikitext/wiki.valid.raw ] || bad "no WikiText raw text in ../shared/data/wikitext"
# (the decode-only tokenizer file goes where prepare.py says: data/tiny-deepseek_tokenizer.bin)
python3 data/prepare.py --dataset wikitext --tokenizer $MODEL --out-dir $TMP/data > $TMP/prepare.log 2>&1
DECODE=$(grep -oE '[^ ]*tiny-deepseek_tokenizer\.bin' $TMP/prepare.log | head -1)
if [ -f $TMP/data/wikitext-tiny-deepseek_train_000000.bin ] && [ -f "$DECODE" ]; then
    ok "WikiText tokenized with the model's own tokenizer ($(grep -m1 'train:' $TMP/prepare.log | sed 's/ in .*//'))"
else bad "WikiText tokenized with the model's own tokenizer" "$(tail -3 $TMP/prepare.log)"; fi
# one epoch with the sample DeepSpeed config, unchanged (fp16 dynamic loss scaling, AdamW 5e-5, ZeRO-2)
$BIN --hf-model $MODEL -c configs/ds_config.json --seq-len 64 --epochs 1 \
    --train-data "$TMP/data/wikitext-tiny-deepseek_train_*.bin" --val-data "$TMP/data/wikitext-tiny-deepseek_val_*.bin" \
    --val-every 0 --val-batches 8 --tokenizer "$DECODE" --sample-tokens 32 \
    --checkpoint-dir $TMP/ckpt --log $TMP/job.jsonl --hf-out $TMP/out > $TMP/job.log 2>&1; rc=$?
sample=$(awk '/^sample \(32 tokens/ {on = 1; next} on && /^---$/ {if (++n == 2) exit; next} on {print}' $TMP/job.log | tr -d '\n')
if [ $rc -eq 0 ] && grep -q "epochs: 1 x" $TMP/job.log && [ ${#sample} -gt 20 ]; then
    ok "fine-tuned one epoch with configs/ds_config.json; a sample decoded with the model's tokenizer: ${sample:0:60}..."
else bad "fine-tuned one epoch with configs/ds_config.json, with a sample" "exit $rc" "$(grep -m2 -e error -e sample $TMP/job.log)"; fi
# transformers loads the export; on dstrain's validation sequences (the first 8 x 4 of the
# split, in order) its loss is dstrain's final validation loss, and lower than the model's
# before fine-tuning
verdict=$("$PY_TORCH" - $MODEL $TMP/out $TMP/data/wikitext-tiny-deepseek_val_000000.bin $TMP/job.jsonl 2>&1 <<'PY'
import json, struct, sys
import torch, transformers
before, after, shard, log = sys.argv[1:]
T, n = 64, 32
with open(shard, "rb") as f:
    header = struct.unpack("<256i", f.read(1024))
    tokens = torch.tensor(struct.unpack(f"<{header[2]}H", f.read(2 * header[2])), dtype=torch.long)
seqs = torch.stack([tokens[i * T:i * T + T + 1] for i in range(n)])
def loss(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(seqs[b:b + 4, :T]).logits.flatten(0, 1), seqs[b:b + 4, 1:].flatten()).item()
                  for b in range(0, n, 4)]
    return sum(losses) / len(losses)
ours = [json.loads(l)["val_loss"] for l in open(log) if '"val"' in l][-1]
trained, untrained = loss(after), loss(before)
tok = transformers.AutoTokenizer.from_pretrained(after)
problems = []
if abs(trained - ours) > 1e-5 * abs(ours):  # fp32 on both sides: logits agree to about 1e-6
    problems.append(f"transformers' loss of the export {trained:.7f} != dstrain's {ours:.7f}")
if not trained < untrained:
    problems.append(f"no learning: {untrained:.4f} before, {trained:.4f} after")
if tok("The game").input_ids[0] != tok.bos_token_id:
    problems.append("the exported tokenizer does not start with BOS")
print("; ".join(problems) or f"ok {untrained:.4f} {trained:.4f}")
PY
)
verdict=$(tail -1 <<<"$verdict") # transformers' warnings come first
if [[ $verdict == ok* ]]; then
    read -r _ before after <<<"$verdict"
    ok "the export loads in transformers with its tokenizer; validation loss $before before, $after after, as dstrain measured it"
else bad "the export loads in transformers and gives dstrain's validation loss" "$verdict"; fi

summary
