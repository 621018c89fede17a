#!/usr/bin/env bash
# dev/gpu_check.sh: everything of the GPU trainer that needs a GPU, in one run of a few
# minutes (under 5 on an H100), ending with a summary table:
#   1. build every CUDA target for this GPU's architecture (make cuda, and the trainer in
#      each precision);
#   2. test_gpt_cu in FP32, FP16 and BF16 against the PyTorch reference file;
#   3. every dev/cuda kernel check (correctness against the CPU trainer, and benchmarks);
#   4. a benchmark of GPT-2 124M (12 layers, 12 heads, 768 channels, T = 1024, micro batch
#      16) for each precision and once with --recompute: ms/step, tokens/s, MFU, memory,
#      on synthetic token shards it writes itself (no network, no dataset needed).
#
#   dev/gpu_check.sh [REFERENCE]
#
# REFERENCE defaults to dev/data/gpt2_reference.bin. If it is missing it is generated with
# /usr/bin/python3 dev/reference.py where PyTorch is installed, and otherwise written by the
# CPU trainer (test_gpt_cu_fp32 --write-cpu-reference; the summary says which). Logs:
# tests/tmp/gpu_check/. Exit status 0 when every test and check passed.
set -u
cd "$(dirname "$0")/.."
start=$(date +%s)
out=tests/tmp/gpu_check
mkdir -p "$out"
ref=${1:-dev/data/gpt2_reference.bin}
summary=()  # lines of the final table
status=0

elapsed() { local s=$(( $(date +%s) - start )); printf "%dm%02ds" $((s / 60)) $((s % 60)); }
note() { summary+=("$(printf '%-28s %s' "$1" "$2")"); }

echo "== device"
if ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "no GPU: nvidia-smi -L lists none; nothing to check here (make test compiles the CUDA code everywhere)"
    exit 1
fi
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
[ -n "$nvcc" ] && "$nvcc" --version | tail -n 1

echo "== build ($(nproc) jobs)"
t0=$(date +%s)
make --no-print-directory clean-cuda > /dev/null # binaries copied from elsewhere may be for another architecture
if make --no-print-directory -j"$(nproc)" cuda train_gpt_cu_fp32 train_gpt_cu_fp16 train_gpt_cu_bf16 > "$out/build.log" 2>&1; then
    tail -n 1 "$out/build.log"
    note "build" "ok ($(( $(date +%s) - t0 )) s)"
else
    tail -n 40 "$out/build.log"
    echo "FAIL: the CUDA build failed (log: $out/build.log)"
    exit 1
fi

echo "== reference tests"
ref_kind="PyTorch"
if [ ! -f "$ref" ] && /usr/bin/python3 -c "import torch" 2>/dev/null; then
    echo "generating $ref with dev/reference.py"
    timeout 600 /usr/bin/python3 dev/reference.py --out "$ref" > "$out/reference.log" 2>&1 || { tail -n 20 "$out/reference.log"; rm -f "$ref"; }
fi
if [ ! -f "$ref" ]; then # no PyTorch here: the same configuration computed by the CPU trainer
    ref=$out/cpu_reference.bin
    ref_kind="the CPU trainer (no PyTorch reference here)"
    echo "no PyTorch reference: writing $ref with the CPU trainer"
    timeout 600 ./test_gpt_cu_fp32 --write-cpu-reference "$ref" || rm -f "$ref"
fi
for p in fp32 fp16 bf16; do
    if [ ! -f "$ref" ]; then
        note "test_gpt_cu_$p" "FAIL: no reference file (see above)"
        status=1
        continue
    fi
    timeout 300 "./test_gpt_cu_$p" "$ref" > "$out/test_gpt_cu_$p.log" 2>&1
    rc=$?
    cat "$out/test_gpt_cu_$p.log"
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$out/test_gpt_cu_$p.log" | tail -n 1)
    if [ $rc -eq 0 ] && [ -n "$line" ]; then note "test_gpt_cu_$p" "$line (reference: $ref_kind)"
    else note "test_gpt_cu_$p" "FAIL (exit $rc${line:+, $line}; reference: $ref_kind)"; status=1; fi
done

echo "== kernel checks (dev/cuda)"
for src in dev/cuda/*.cu; do
    k=dev/cuda/$(basename "$src" .cu)
    timeout 300 "./$k" > "$out/$(basename "$k").log" 2>&1
    rc=$?
    cat "$out/$(basename "$k").log"
    if [ $rc -eq 0 ] && tail -n 1 "$out/$(basename "$k").log" | grep -q PASS; then note "$k" "PASS"
    else note "$k" "FAIL (exit $rc)"; status=1; fi
done

# synthetic data in llm.c's shard format: int32 header[256] (magic 20240520, version 1,
# token count), then uint16 tokens
write_shard() { # $1 path
    python3 - "$1" <<'EOF'
import random, struct, sys
from array import array
n = 1 << 21
rng = random.Random(1337)
tokens = array("H", (rng.randrange(50257) for _ in range(n)))
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
    tokens.tofile(f)
EOF
}
write_config() { # $1 file, $2 precision keys
    printf '{"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, %s "zero_optimization": {"stage": 0}}\n' "$2" > "$1"
}
# the mean of steps 6-20 of a run's JSON-lines log: one row of the table
bench_row() { # $1 log, $2 name
    python3 - "$1" "$2" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if r.get("type") == "train" and r["step"] > 5]
mean = lambda k: sum(r.get(k, float("nan")) for r in rows) / len(rows)
mfu = mean("mfu") * 100 if all("mfu" in r for r in rows) else float("nan")
mem = mean("memory_gb") if all("memory_gb" in r for r in rows) else float("nan")
print(f"{sys.argv[2]:<16} {mean('ms'):9.1f} {mean('tokens_per_s'):11.0f} {mfu:6.1f}% {mem:8.2f} GB   loss {rows[-1]['loss']:.3f}")
EOF
}
bench_rows=()
bench() { # $1 name, $2 precision, extra flags after
    local name=$1 p=$2
    shift 2
    rm -f "$out/$name.jsonl"
    timeout 300 "./train_gpt_cu_$p" -c "$out/$p.json" --layers 12 --heads 12 --dim 768 --seq-len 1024 --steps 20 \
        --train-data "$out/bench_train_*.bin" --val-data "" --checkpoint-dir "" --sample-tokens 0 --log "$out/$name.jsonl" "$@" \
        > "$out/bench_$name.log" 2>&1
    local rc=$?
    grep -E "^(device|precision|  (rank|activations|device)|step +(1|20)/)" "$out/bench_$name.log"
    if [ $rc -ne 0 ]; then
        tail -n 5 "$out/bench_$name.log"
        bench_rows+=("$(printf '%-16s FAIL (exit %d, log %s)' "$name" $rc "$out/bench_$name.log")")
        status=1
    else
        bench_rows+=("$(bench_row "$out/$name.jsonl" "$name")")
    fi
}

echo "== benchmark: GPT-2 124M, T 1024, micro batch 16, 20 steps (mean of steps 6-20)"
if command -v python3 > /dev/null; then
    write_shard "$out/bench_train_000000.bin"
    write_config "$out/fp32.json" ""
    write_config "$out/fp16.json" '"fp16": {"enabled": true},'
    write_config "$out/bf16.json" '"bf16": {"enabled": true},'
    bench bf16 bf16
    bench bf16-recompute bf16 --recompute
    bench fp16 fp16
    bench fp32 fp32
else
    bench_rows+=("SKIPPED: no python3 to write the synthetic data and read the logs")
fi

# ZeRO on one GPU and checkpoints shared with the CPU trainer, on a small model:
#  - 2 ranks sharing this GPU (MPI with host staging, as NCCL refuses two ranks per GPU),
#    stage 2, against 1 rank with the same 4 sequences per step as 2 accumulation steps;
#  - a GPU checkpoint resumed by the CPU trainer continues with the losses the GPU gets.
# fp32 on both sides; different summation orders keep losses within 1e-4 relative.
echo "== ZeRO stage 2: 2 ranks on one GPU vs 1 rank; GPU checkpoint resumed on the CPU"
small=(--layers 2 --heads 4 --dim 128 --seq-len 64 --train-data "$out/bench_train_*.bin" --val-data "" --sample-tokens 0)
zero_config() { # $1 file, $2 micro batch, $3 accumulation steps
    printf '{"train_micro_batch_size_per_gpu": %d, "gradient_accumulation_steps": %d, "zero_optimization": {"stage": 2, "reduce_bucket_size": 100000}}\n' "$2" "$3" > "$1"
}
same_losses() { # $1 $2 JSON-lines logs: the losses of the steps both have agree to 1e-4
    python3 - "$1" "$2" <<'EOF'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if r.get("type") == "train"}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(a) & set(b))
worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps) if steps else 1
print(f"{len(steps)} steps, largest loss difference {worst:.1e}")
sys.exit(0 if steps and worst <= 1e-4 else 1)
EOF
}
zero_config "$out/zero_1rank.json" 2 2
zero_config "$out/zero_2ranks.json" 2 1
rm -rf "$out/ckpt_gpu" "$out/ckpt_cpu" "$out"/zero_*.jsonl
timeout 300 ./train_gpt_cu_fp32 -c "$out/zero_1rank.json" "${small[@]}" --steps 8 --save-every 4 --checkpoint-dir "$out/ckpt_gpu" --log "$out/zero_1rank.jsonl" > "$out/zero_1rank.log" 2>&1
if command -v mpirun > /dev/null; then
    timeout 300 mpirun --allow-run-as-root --oversubscribe -np 2 ./train_gpt_cu_fp32 -c "$out/zero_2ranks.json" "${small[@]}" --steps 8 --checkpoint-dir "" \
        --log "$out/zero_2ranks.jsonl" > "$out/zero_2ranks.log" 2>&1
    if verdict=$(same_losses "$out/zero_1rank.jsonl" "$out/zero_2ranks.jsonl"); then note "ZeRO-2, 2 ranks on 1 GPU" "ok ($verdict)"
    else note "ZeRO-2, 2 ranks on 1 GPU" "FAIL ($verdict; logs $out/zero_*.log)"; status=1; fi
else
    note "ZeRO-2, 2 ranks on 1 GPU" "SKIPPED: no mpirun"
fi
make --no-print-directory train_gpt_cpu > /dev/null 2>&1
cp -r "$out/ckpt_gpu" "$out/ckpt_cpu"
printf 'step_00000004\n' > "$out/ckpt_cpu/latest"
timeout 300 ./train_gpt_cpu -c "$out/zero_1rank.json" "${small[@]}" --steps 8 --resume --checkpoint-dir "$out/ckpt_cpu" --log "$out/zero_cpu.jsonl" > "$out/zero_cpu.log" 2>&1
if verdict=$(same_losses "$out/zero_1rank.jsonl" "$out/zero_cpu.jsonl"); then note "GPU checkpoint on the CPU" "ok ($verdict)"
else note "GPU checkpoint on the CPU" "FAIL ($verdict; log $out/zero_cpu.log)"; status=1; fi

echo
echo "== summary ($gpu, $(elapsed))"
for line in "${summary[@]}"; do echo "$line"; done
echo
printf '%-16s %9s %11s %7s %11s\n' "GPT-2 124M" "ms/step" "tokens/s" "MFU" "memory"
for line in "${bench_rows[@]}"; do echo "$line"; done
echo
[ $status -eq 0 ] && echo "all GPU checks passed" || echo "SOME GPU CHECKS FAILED (logs: $out)"
exit $status
