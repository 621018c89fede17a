#!/usr/bin/env bash
# CPU benchmark: one training step of GPT-2 124M (12 layers, 12 heads, 768 channels,
# micro batch 4, T = 64, fp32: forward, backward, clipping, AdamW) with dstrain's CPU
# trainer and with PyTorch, on the same machine in the same run, and their ratio.
#     bash dev/bench/cpu.sh [steps]
# PyTorch is Debian's python3-torch; with OpenBLAS installed (libopenblas0-pthread) it
# does its matrix products there, otherwise in the reference BLAS (far slower).
set -eu
cd "$(dirname "$0")/../.."
STEPS=${1:-6}
threads=$(nproc)
make --no-print-directory train_gpt_cpu data >/dev/null
log=$(mktemp)
echo "GPT-2 124M, micro batch 4, T 64, fp32, $threads threads; mean of steps 2..$STEPS"
OMP_NUM_THREADS=$threads ./train_gpt_cpu --layers 12 --heads 12 --dim 768 --seq-len 64 --micro-batch 4 --steps $STEPS \
    --val-every 0 --sample-tokens 0 --checkpoint-dir "" --log $log > /dev/null
ours=$(python3 -c "
import json, sys
rows = [json.loads(l) for l in open('$log') if '\"train\"' in l][1:]
print(sum(r['ms'] for r in rows) / len(rows))")
theirs=$(/usr/bin/python3 dev/bench/torch_step.py --layers 12 --heads 12 --dim 768 --seq-len 64 --micro-batch 4 --steps $((STEPS - 1)) --warmup 1 --threads $threads | sed -n 's/^torch_ms_per_step //p')
blas=$(/usr/bin/python3 -c "import torch; torch.ones(64, 64) @ torch.ones(64, 64); print('OpenBLAS' if 'openblas' in open('/proc/self/maps').read() else 'reference BLAS')")
rm -f $log
printf "\n%-28s %12s\n" "" "ms/step"
printf "%-28s %12.0f\n" "dstrain (train_gpt.c)" "$ours"
printf "%-28s %12.0f\n" "PyTorch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)') ($blas)" "$theirs"
python3 -c "print(f'\ndstrain takes {$ours / $theirs:.2f}x PyTorch\'s time per step')"
