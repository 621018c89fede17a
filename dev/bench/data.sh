#!/usr/bin/env bash
# Data pipeline benchmark (figures, not a test):
#  1. tokenization: MB/s and tokens/s of data/prepare.py against tiktoken called
#     directly, on the same text in the same run, with 1 core and with every core
#     (dev/bench/data_tokenize.py);
#  2. the C data loader (dstrain.h): batches/s of dataloader_next (dev/bench/loader_bench.c)
#     next to what the trainers consume: the CPU trainer measured on a short run with its
#     default model, the GPU trainer's target for GPT-2 124M (a target, not a measurement).
#
#   bash dev/bench/data.sh
#
# Environment: PYTHON (a Python with tiktoken; default python3), CC (default gcc),
# SKIP_TRAIN=1 skips the CPU trainer run (about a minute on a 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
CC=${CC:-gcc}
GPU_TARGET_TOKENS_PER_S=1000000  # GPT-2 124M on one H100: the project's target, not measured here

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cpu_model=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || true)
echo "machine: $(nproc) cores (${cpu_model:-unknown CPU}), load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"

echo
echo "== 1. tokenization (same text, same run)"
"$PYTHON" dev/bench/data_tokenize.py

echo
echo "== 2. data loader"
shards="data/wikitext/wikitext_train_*.bin"
if ! compgen -G "$shards" > /dev/null; then
    echo "preparing the default dataset first: $PYTHON data/prepare.py"
    "$PYTHON" data/prepare.py > "$tmp/prepare.log" || { cat "$tmp/prepare.log"; exit 1; }
fi
"$CC" -O2 -fopenmp dev/bench/loader_bench.c -lm -o "$tmp/loader_bench"
echo "dataloader_next on $shards, shuffled, nothing else running:"
"$tmp/loader_bench" "$shards" 2 | tee "$tmp/loader.txt"
loader_small=$(awk '$1 == 4 && $3 == 64 {print $6}' "$tmp/loader.txt")
loader_large=$(awk '$1 == 16 && $3 == 1024 {print $6}' "$tmp/loader.txt")

cpu_tokens="not measured (SKIP_TRAIN=1)"
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
    [ -x ./train_gpt_cpu ] || make --no-print-directory train_gpt_cpu > "$tmp/make.log"
    echo
    echo "CPU trainer, default model and data: ./train_gpt_cpu --steps 3 --sample-tokens 0 --checkpoint-dir \"\" --val-every 0 --val-batches 1"
    ./train_gpt_cpu --steps 3 --sample-tokens 0 --checkpoint-dir "" --val-every 0 --val-batches 1 \
        > "$tmp/train.log" 2>&1 || { cat "$tmp/train.log"; exit 1; }
    grep -E '^(model|training):' "$tmp/train.log" || true
    grep -E '^step +[0-9]+/' "$tmp/train.log" || true
    # tok/s of every step but the first (warm-up)
    cpu_tokens=$(grep -E '^step +[0-9]+/' "$tmp/train.log" | tail -n +2 |
        grep -oE '[0-9.]+ tok/s' | awk '{s += $1; n++} END {if (n) printf "%.0f", s / n}')
    [ -n "$cpu_tokens" ] || cpu_tokens="not measured (no step lines)"
fi

echo
echo "== loader against what the trainers consume (tokens/s)"
awk -v small="$loader_small" -v large="$loader_large" -v cpu="$cpu_tokens" -v gpu="$GPU_TARGET_TOKENS_PER_S" 'BEGIN {
    printf "%-52s %14s %14s\n", "", "tokens/s", "loader / it"
    printf "%-52s %14.3g %14s\n", "loader, B=4 T=64 (measured)", small, ""
    printf "%-52s %14.3g %14s\n", "loader, B=16 T=1024 (measured)", large, ""
    if (cpu ~ /^[0-9.]+$/)
        printf "%-52s %14.3g %13.0fx\n", "CPU trainer, default model (measured, mean of steps 2-3)", cpu, small / cpu
    else
        printf "%-52s %14s\n", "CPU trainer, default model", cpu
    printf "%-52s %14.3g %13.0fx\n", "GPU trainer, GPT-2 124M on an H100 (TARGET, not measured)", gpu, large / gpu
}'
