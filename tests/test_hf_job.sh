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

summary
