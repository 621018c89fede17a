#!/usr/bin/env bash
# CPU benchmark: one training step (forward, backward, clipping, AdamW; fp32; micro batch 4,
# T = 64) with dstrain's CPU trainer and with PyTorch, on the same machine in the same run,
# and their ratio, for two models:
#   GPT-2 124M  12 layers, 12 heads, 768 channels (PyTorch: dev/reference.py's GPT-2)
#   LLaMA       12 layers, 12 heads, 4 key/value heads, 768 channels, MLP 2048, untied
#               (PyTorch: transformers' LlamaForCausalLM, eager attention)
# Both use GPT-2's vocabulary (50257), the tokens of the data dstrain trains on.
#     bash dev/bench/cpu.sh [steps]
# PyTorch is Debian's python3-torch; with OpenBLAS installed (libopenblas0-pthread) it
# does its matrix products there, otherwise in the reference BLAS (far slower).
set -eu
cd "$(dirname "$0")/../.."
STEPS=${1:-6}
threads=$(nproc)
make --no-print-directory train_gpt_cpu data >/dev/null
log=$(mktemp)
trap 'rm -f $log' EXIT
GPT2=(--layers 12 --heads 12 --dim 768)
LLAMA=(--layers 12 --heads 12 --kv-heads 4 --dim 768)

# ms per step of dstrain, the mean of steps 2..STEPS
ours() {
    OMP_NUM_THREADS=$threads ./train_gpt_cpu "$@" --seq-len 64 --micro-batch 4 --steps $STEPS \
        --val-every 0 --sample-tokens 0 --checkpoint-dir "" --log $log > /dev/null
    python3 -c "
import json
rows = [json.loads(l) for l in open('$log') if '\"train\"' in l][1:]
print(sum(r['ms'] for r in rows) / len(rows))"
}
theirs() {
    /usr/bin/python3 dev/bench/torch_step.py "$@" --seq-len 64 --micro-batch 4 --vocab 50257 --steps $((STEPS - 1)) --warmup 1 \
        --threads $threads | sed -n 's/^torch_ms_per_step //p'
}
echo "micro batch 4, T 64, fp32, $threads threads; mean of steps 2..$STEPS"
gpt2_ours=$(ours "${GPT2[@]}")
gpt2_theirs=$(theirs "${GPT2[@]}")
llama_ours=$(ours --arch llama "${LLAMA[@]}" --ffn-dim 2048)
llama_theirs=$(theirs --arch llama "${LLAMA[@]}" --ffn 2048)
blas=$(/usr/bin/python3 -c "import torch; torch.ones(64, 64) @ torch.ones(64, 64); print('OpenBLAS' if 'openblas' in open('/proc/self/maps').read() else 'reference BLAS')")
torch_name="PyTorch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)') ($blas)"
printf "\n%-34s %12s %30s %12s\n" "model" "dstrain ms" "$torch_name ms" "ratio"
printf "%-34s %12.0f %30.0f %11.2fx\n" "GPT-2 124M" "$gpt2_ours" "$gpt2_theirs" "$(python3 -c "print($gpt2_ours / $gpt2_theirs)")"
printf "%-34s %12.0f %30.0f %11.2fx\n" "LLaMA 12L 768 GQA 12/4 MLP 2048" "$llama_ours" "$llama_theirs" "$(python3 -c "print($llama_ours / $llama_theirs)")"
echo "(ratio: dstrain's time per step over PyTorch's; PyTorch runs transformers' LlamaForCausalLM for the LLaMA row)"
