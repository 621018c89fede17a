#!/usr/bin/env bash
# dev/gpu_check.sh: everything of the GPU trainer that needs a GPU, in one run bounded by a
# deadline, ending with a one-screen summary table. Sections, most important first (the
# deadline cuts from the end):
#   1. build every CUDA target for this GPU's architecture (make cuda, the trainer in each
#      precision, and the CPU trainer);
#   2. test_gpt_cu in FP32, FP16 and BF16 against the reference file, and against the
#      transformers LLaMA reference (grouped-query attention, T 100) where there is one;
#   3. every dev/cuda kernel check (correctness against the CPU trainer, and benchmarks);
#   4. GPT-2 124M (12 layers, 12 heads, 768 channels, T 1024, micro batch 16), 10 steps in
#      each precision and once with --recompute: ms/step, tokens/s, MFU, memory, on
#      synthetic token shards it writes itself (no network, no dataset); then LLaMA at
#      DeepSeek-Coder 1.3B's shape (hidden 2048, 24 layers, 16 heads, intermediate 5504,
#      vocabulary 32256), T 2048, micro batch 8, in BF16 and FP16, loaded through --hf-model
#      from a Hugging Face directory it writes (norm weights 1, matrices 0: speed does not
#      depend on the values), with the memory per GPU next to ZeRO's formula;
#   5. ZeRO-2 with 2 ranks sharing this GPU against 1 rank, and a GPU checkpoint resumed by
#      the CPU trainer;
#   6. compute-sanitizer memcheck and racecheck on test_gpt_cu in FP32 and BF16.
#
#   dev/gpu_check.sh [--deadline SECONDS] [REFERENCE]
#
# --deadline (or GPU_CHECK_DEADLINE) bounds the whole run, default 480 s: each step's
# timeout is its own cap or the time left, whichever is shorter, and a section that no
# longer fits is skipped and reported as such. REFERENCE defaults to
# dev/data/gpt2_reference.bin; if it is missing, dev/reference.py writes it with the first
# of python3 (PATH) and /usr/bin/python3 that has PyTorch, else the CPU trainer does
# (test_gpt_cu_fp32 --write-cpu-reference). The LLaMA reference is
# dev/data/llama_t100_gqa4_reference.bin (make test writes it), or dev/reference_hf.py
# writes it where that Python also has transformers; otherwise its rows are skipped. Logs
# go to a new mktemp -d folder; where $OUT
# is set, the summary and a tarball of the logs are copied there too (2 files). Exit
# status 0 when everything that ran passed.
set -u

deadline=${GPU_CHECK_DEADLINE:-480}
while [ $# -gt 0 ]; do
    case $1 in
        --deadline) deadline=${2:-}; shift 2 || shift ;;
        --deadline=*) deadline=${1#*=}; shift ;;
        -h | --help) sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
ref=${1:+$(realpath -m -- "$1")} # the repository root is the working folder below
if ! [[ $deadline =~ ^[0-9]+$ ]]; then echo "gpu_check: the deadline is whole seconds, not '$deadline'" >&2; exit 2; fi
cd "$(dirname "$0")/.." || exit 2
ref=${ref:-dev/data/gpt2_reference.bin}
end=$((SECONDS + deadline))
reserve=10 # seconds kept for the summary

echo "== device"
if ! timeout 30 nvidia-smi -L 2>/dev/null | grep -q GPU; then
    echo "gpu_check: no GPU here (nvidia-smi is missing or lists none): nothing to check." >&2
    echo "Run it on a machine with an NVIDIA GPU; make test compiles the CUDA code everywhere." >&2
    exit 1
fi
timeout 30 nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
gpu=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
logs=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
summaries=("$logs/summary.txt") # each row is added as it comes, in case the run is killed
if [ -n "${OUT:-}" ] && mkdir -p "$OUT"; then summaries+=("$OUT/gpu_check_summary.txt"); fi
echo "deadline ${deadline} s; logs in $logs" | tee "${summaries[@]}"

rows=()   # the summary table
failed=0  # 1 once anything that ran did not pass
left() { echo $((end - SECONDS - reserve)); }

# row SECTION RESULT SECONDS KEY: one line of the summary (FAIL and TIMEOUT fail the run)
row() {
    rows+=("$(printf '%-26s %-7s %4ss  %s' "$1" "$2" "$3" "$4")")
    echo "${rows[-1]}" | tee -a "${summaries[@]}"
    case $2 in FAIL | TIMEOUT) failed=1 ;; esac
}

# step NAME CAP MIN CMD...: runs CMD, output to $logs/NAME.log (in $log), for at most CAP
# seconds and never past the deadline; skipped when fewer than MIN seconds are left. Sets
# result (PASS, FAIL, TIMEOUT or SKIP), why and took; returns 0 on PASS.
step() {
    local name=$1 cap=$2 min=$3 t
    shift 3
    log=$logs/$name.log why="" took=0 t=$(left)
    : > "$log"
    if ((t < min)); then
        result=SKIP why="deadline: ${t}s left, needs ${min}s"
        return 1
    fi
    ((t > cap)) && t=$cap
    # a shell function runs in a child bash, where timeout can reach it
    if declare -F "$1" > /dev/null; then set -- bash -c "$(declare -f "$1")"'; "$@"' _ "$@"; fi
    local t0=$SECONDS
    timeout -k 5 "$t" "$@" > "$log" 2>&1 & # waited for in the background, so that a signal ends it at once
    running=$!
    wait $running
    local rc=$?
    running=""
    took=$((SECONDS - t0))
    case $rc in
        0) result=PASS ;;
        124 | 137) result=TIMEOUT why="killed after ${t}s" ;;
        *) result=FAIL why="exit $rc" ;;
    esac
    [ "$result" = PASS ]
}
# demote REASON: the last step exited 0 but its output says it failed
demote() { [ "$result" = PASS ] && result=FAIL why=$1; }
# record SECTION [KEY]: the summary row of the last step, with its log's tail on failure
record() {
    local key=${2:-}
    [ "$result" = SKIP ] && key=""
    [ -n "$why" ] && key="$why${key:+; $key}"
    row "$1" "$result" "$took" "$key"
    case $result in FAIL | TIMEOUT) tail -n 15 "$log" | sed 's/^/    | /' ;; esac
}

finish() {
    trap - INT TERM
    local s=$SECONDS
    {
        printf '\n== summary: %s, %dm%02ds (deadline %ds)\n' "$gpu" $((s / 60)) $((s % 60)) "$deadline"
        printf '%-26s %-7s %5s  %s\n' section result time "key numbers"
        printf '%s\n' "${rows[@]}"
        local skipped
        skipped=$(printf '%s\n' "${rows[@]}" | grep -c '^.\{27\}SKIP ')
        if ((failed)); then echo -n "SOME GPU CHECKS FAILED"; else echo -n "everything that ran passed"; fi
        echo " ($skipped skipped; logs: $logs)"
    } | tee "${summaries[@]}"
    if [ ${#summaries[@]} -gt 1 ]; then
        (cd "$logs" && find . -maxdepth 1 -type f \( -name '*.log' -o -name '*.jsonl' -o -name '*.json' -o -name '*.txt' \) -print0 |
            tar -czf "$OUT/gpu_check_logs.tar.gz" --null -T -)
        echo "summary and logs copied to $OUT (gpu_check_summary.txt, gpu_check_logs.tar.gz)"
    fi
    exit "$failed"
}
running="" log="" # the step under way, and its log
trap '[ -n "$running" ] && kill "$running"; row interrupted FAIL 0 "by a signal, during ${log##*/}"; finish' INT TERM

py=$(command -v python3 || command -v /usr/bin/python3) # the synthetic data and the logs
export py                                                # (write_shard runs in a child bash)
torch_py=""                                              # dev/reference.py
for p in python3 /usr/bin/python3; do
    if command -v "$p" > /dev/null && timeout 30 "$p" -c "import torch" 2> /dev/null; then torch_py=$(command -v "$p") && break; fi
done

echo "== build ($(nproc) jobs)"
make --no-print-directory clean-cuda > /dev/null # binaries copied from elsewhere may be for another architecture
step build 300 30 make --no-print-directory -j"$(nproc)" cuda train_gpt_cu_fp32 train_gpt_cu_fp16 train_gpt_cu_bf16 train_gpt_cpu
record build "$(grep -o 'compute capability.*' "$log" | tail -n 1 | sed 's/nvcc: [^;]*; //')"
if [ "$result" != PASS ]; then
    row "everything else" SKIP 0 "the build did not pass"
    finish
fi

echo "== reference tests"
if [ -f "$ref" ]; then
    ref_kind=$(basename "$ref")
elif [ -n "$torch_py" ]; then
    ref_kind="PyTorch ($torch_py)"
    step reference 120 20 "$torch_py" dev/reference.py --out "$ref" || rm -f "$ref"
    record "reference (PyTorch)" "$ref"
fi
if [ ! -f "$ref" ]; then # no PyTorch: the same configuration computed by the CPU trainer
    ref=$logs/cpu_reference.bin ref_kind="the CPU trainer"
    step cpu_reference 120 10 ./test_gpt_cu_fp32 --write-cpu-reference "$ref" || rm -f "$ref"
    record "reference (CPU trainer)" "${torch_py:+dev/reference.py failed; }no PyTorch reference"
fi
# reference_tests FILE NAME KEY MISSING WHY: test_gpt_cu in each precision on FILE, rows
# "test_gpt_cu_<p>NAME"; without the file, rows MISSING (FAIL or SKIP) saying WHY
reference_tests() {
    local file=$1 name=$2 key=$3 missing=$4 why=$5 p counts
    for p in fp32 fp16 bf16; do
        if [ ! -f "$file" ]; then
            row "test_gpt_cu_$p$name" "$missing" 0 "$why"
            continue
        fi
        step "test_gpt_cu_$p${name// /_}" 90 15 "./test_gpt_cu_$p" "$file"
        counts=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
        [ -n "$counts" ] || demote "no 'N passed, N failed' line"
        record "test_gpt_cu_$p$name" "${counts:+$counts, }$key"
    done
}
reference_tests "$ref" "" "reference: $ref_kind" FAIL "no reference file"
llama_ref=dev/data/llama_t100_gqa4_reference.bin
if [ ! -f "$llama_ref" ] && [ -n "$torch_py" ] && timeout 60 "$torch_py" -c "import transformers, safetensors" 2> /dev/null; then
    step reference_llama 120 20 "$torch_py" dev/reference_hf.py --config llama_t100_gqa4 --out "$llama_ref" || rm -f "$llama_ref"
    record "reference (transformers)" "$llama_ref"
fi
reference_tests "$llama_ref" " LLaMA" "GQA groups of 4, T 100" SKIP "no $llama_ref (make test writes it; or transformers for dev/reference_hf.py)"

echo "== kernel checks (dev/cuda)"
kernels=0
for k in dev/cuda/*; do # the built checks: one per kernel, or one per kernel and precision
    [[ -f $k && -x $k && $(basename "$k") != *.* ]] || continue
    kernels=$((kernels + 1))
    step "cuda_$(basename "$k")" 60 10 "./$k"
    tail -n 1 "$log" | grep -qx PASS || demote "no PASS line"
    record "$k" "$(grep -c '^  ok ' "$log") ok, $(grep -c '^  FAIL ' "$log") FAIL, $(grep -c '^  bench ' "$log") benchmarks"
done
((kernels > 0)) || row "dev/cuda" FAIL 0 "make cuda built no kernel checks"

# synthetic data in llm.c's shard format: int32 header[256] (magic 20240520, version 1,
# token count), then uint16 tokens below the vocabulary size (default GPT-2's)
# shellcheck disable=SC2317 # run by step
write_shard() { # $1 path, $2 vocabulary size
    "$py" - "$1" "${2:-50257}" << 'EOF'
import random, struct, sys
from array import array
n = 1 << 21
rng = random.Random(1337)
tokens = array("H", (rng.randrange(int(sys.argv[2])) for _ in range(n)))
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, n, *([0] * 253)))
    tokens.tofile(f)
EOF
}
write_config() { # $1 file, $2 precision keys, $3 micro batch (default 16)
    printf '{"train_micro_batch_size_per_gpu": %d, "gradient_accumulation_steps": 1, %s "zero_optimization": {"stage": 0}}\n' "${3:-16}" "$2" > "$1"
}
# the means of steps 4-10 of a run's JSON-lines log (steps 1-3 warm up): one summary cell
bench_numbers() { # $1 log
    "$py" - "$1" << 'EOF'
import json, math, sys
rows = [r for r in map(json.loads, filter(str.strip, open(sys.argv[1]))) if r.get("type") == "train" and r["step"] > 3]
mean = lambda k: sum(r.get(k, math.nan) for r in rows) / len(rows)
print(f"{mean('ms'):.1f} ms/step, {mean('tokens_per_s') / 1e3:.0f}k tok/s, MFU {100 * mean('mfu'):.1f}%, "
      f"{mean('memory_gb'):.1f} GB, loss {rows[-1]['loss']:.2f}")
EOF
}
bench() { # $1 name, $2 precision, extra flags after
    local name=$1 p=$2
    shift 2
    rm -f "$logs/$name.jsonl"
    step "bench_$name" 60 15 "./train_gpt_cu_$p" -c "$logs/$p.json" --layers 12 --heads 12 --dim 768 --seq-len 1024 --steps 10 \
        --train-data "$logs/bench_train_*.bin" --val-data "" --checkpoint-dir "" --sample-tokens 0 --log "$logs/$name.jsonl" "$@"
    local numbers
    numbers=$(bench_numbers "$logs/$name.jsonl" 2> /dev/null) || demote "no steps 4-10 in its log"
    record "124M $name" "$numbers"
}

echo "== benchmark: GPT-2 124M, T 1024, micro batch 16, 10 steps (means of steps 4-10)"
write_config "$logs/fp32.json" ""
write_config "$logs/fp16.json" '"fp16": {"enabled": true},'
write_config "$logs/bf16.json" '"bf16": {"enabled": true},'
if [ -z "$py" ]; then
    row "124M benchmark" SKIP 0 "no python3 to write the synthetic data and read the logs"
elif step shard 60 20 write_shard "$logs/bench_train_000000.bin"; then
    bench bf16 bf16
    bench bf16-recompute bf16 --recompute
    bench fp16 fp16
    bench fp32 fp32
else
    record "124M benchmark" "writing the synthetic data"
fi

# A Hugging Face directory of DeepSeek-Coder 1.3B's shape: config.json and one bf16
# model.safetensors, norm weights 1 and every matrix 0, as a sparse file written at once.
# shellcheck disable=SC2317 # run by step
write_llama_dir() { # $1 directory
    "$py" - "$1" << 'EOF'
import json, math, os, struct, sys
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
L, C, H, KV, F, V = 24, 2048, 16, 16, 5504, 32256
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": C, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": KV, "intermediate_size": F, "vocab_size": V,
           "max_position_embeddings": 16384, "rope_theta": 100000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "initializer_range": 0.02}, open(os.path.join(d, "config.json"), "w"))
kv = KV * (C // H)
shapes = [("model.embed_tokens.weight", [V, C])]
for l in range(L):
    p = f"model.layers.{l}."
    shapes += [(p + "input_layernorm.weight", [C]), (p + "self_attn.q_proj.weight", [C, C]), (p + "self_attn.k_proj.weight", [kv, C]),
               (p + "self_attn.v_proj.weight", [kv, C]), (p + "self_attn.o_proj.weight", [C, C]),
               (p + "post_attention_layernorm.weight", [C]), (p + "mlp.gate_proj.weight", [F, C]),
               (p + "mlp.up_proj.weight", [F, C]), (p + "mlp.down_proj.weight", [C, F])]
shapes += [("model.norm.weight", [C]), ("lm_head.weight", [V, C])]
header, end, norms = {}, 0, []
for name, shape in shapes:
    size = 2 * math.prod(shape)
    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [end, end + size]}
    if len(shape) == 1:
        norms.append((end, shape[0]))
    end += size
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(os.path.join(d, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for offset, n in norms:
        f.seek(8 + len(h) + offset)
        f.write(b"\x80\x3f" * n)  # bf16 1.0
    f.truncate(8 + len(h) + end)
EOF
}
bench_llama() { # $1 name, $2 precision, extra flags after
    local name=$1 p=$2 numbers formula
    shift 2
    rm -f "$logs/llama_$name.jsonl"
    step "bench_llama_$name" 120 40 "./train_gpt_cu_$p" -c "$logs/llama_$p.json" --hf-model "$logs/llama_1.3b" --seq-len 2048 --steps 10 \
        --train-data "$logs/llama_train_*.bin" --val-data "" --checkpoint-dir "" --sample-tokens 0 --log "$logs/llama_$name.jsonl" "$@"
    numbers=$(bench_numbers "$logs/llama_$name.jsonl" 2> /dev/null) || demote "no steps 4-10 in its log"
    formula=$(grep -m1 -o 'formula for stage.*' "$log")
    record "1.3B LLaMA $name" "$numbers${formula:+; ZeRO $formula}"
}

echo "== benchmark: LLaMA at DeepSeek-Coder 1.3B's shape, T 2048, micro batch 8, 10 steps (means of steps 4-10)"
write_config "$logs/llama_fp16.json" '"fp16": {"enabled": true},' 8
write_config "$logs/llama_bf16.json" '"bf16": {"enabled": true},' 8
if [ -z "$py" ]; then
    row "1.3B LLaMA benchmark" SKIP 0 "no python3 to write the model and the data"
elif step llama_files 60 20 bash -c "$(declare -f write_shard write_llama_dir); write_shard '$logs/llama_train_000000.bin' 32256 && write_llama_dir '$logs/llama_1.3b'"; then
    bench_llama bf16 bf16
    bench_llama fp16 fp16
else
    record "1.3B LLaMA benchmark" "writing the model directory and data"
fi

# ZeRO on one GPU and checkpoints shared with the CPU trainer, on a small model:
#  - 2 ranks sharing this GPU (MPI with host staging, as NCCL refuses two ranks per GPU),
#    stage 2, against 1 rank with the same 4 sequences per step as 2 accumulation steps;
#  - a GPU checkpoint resumed by the CPU trainer continues with the losses the GPU gets.
# fp32 on both sides; different summation orders keep losses within 1e-4 relative.
echo "== ZeRO stage 2: 2 ranks on one GPU vs 1 rank; GPU checkpoint resumed on the CPU"
small=(--layers 2 --heads 4 --dim 128 --seq-len 64 --train-data "$logs/bench_train_*.bin" --val-data "" --sample-tokens 0 --steps 8)
zero_config() { # $1 file, $2 micro batch, $3 accumulation steps
    printf '{"train_micro_batch_size_per_gpu": %d, "gradient_accumulation_steps": %d, "zero_optimization": {"stage": 2, "reduce_bucket_size": 100000}}\n' "$2" "$3" > "$1"
}
same_losses() { # $1 $2 JSON-lines logs: the losses of the steps both have agree to 1e-4
    "$py" - "$1" "$2" << 'EOF'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, open(path))) if r.get("type") == "train"}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(set(a) & set(b))
worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps) if steps else 1
print(f"{len(steps)} steps, largest loss difference {worst:.1e}")
sys.exit(0 if steps and worst <= 1e-4 else 1)
EOF
}
# compare SECTION LOG_A LOG_B: the row of the last step, failed unless its losses match LOG_A's
compare() {
    local verdict
    verdict=$(same_losses "$2" "$3" 2>&1 | tail -n 1) || demote "losses differ"
    record "$1" "$verdict"
}
# mpi_launch: sets mpi to a launch of 2 ranks with the launcher of the MPI that the trainer
# links (Open MPI's mpirun/mpiexec with its root and oversubscription flags, else MPICH's
# mpiexec), or leaves it empty with the reason in no_mpi
mpi_launch() {
    local libs flavour l
    mpi=() no_mpi=""
    libs=$(ldd ./train_gpt_cu_fp32 2> /dev/null)
    if ! grep -qE 'libmpi|libmpich' <<< "$libs"; then no_mpi="the trainer was built without MPI" && return; fi
    flavour=mpich
    grep -qE 'libmpi\.so\.4|libopen-(pal|rte)' <<< "$libs" && flavour=openmpi
    for l in mpirun mpiexec; do
        command -v "$l" > /dev/null || continue
        if timeout 10 "$l" --version 2>&1 | grep -qE 'Open MPI|OpenRTE'; then
            [ $flavour = openmpi ] && mpi=("$l" --allow-run-as-root --oversubscribe -n 2) && return
        elif [ $flavour = mpich ]; then
            mpi=("$l" -n 2) && return
        fi
    done
    no_mpi="no $flavour launcher (mpirun/mpiexec) for the trainer's MPI"
}
zero_config "$logs/zero_1rank.json" 2 2
zero_config "$logs/zero_2ranks.json" 2 1
if [ -z "$py" ] || [ ! -f "$logs/bench_train_000000.bin" ]; then
    row "ZeRO-2 and checkpoint" SKIP 0 "no synthetic data (see the benchmark)"
else
    step zero_1rank 60 10 ./train_gpt_cu_fp32 -c "$logs/zero_1rank.json" "${small[@]}" --save-every 4 \
        --checkpoint-dir "$logs/ckpt_gpu" --log "$logs/zero_1rank.jsonl"
    record "1 rank, checkpoints"
    mpi_launch
    if [ ${#mpi[@]} -eq 0 ]; then
        row "ZeRO-2, 2 ranks on 1 GPU" SKIP 0 "$no_mpi"
    elif step zero_2ranks 60 10 "${mpi[@]}" ./train_gpt_cu_fp32 -c "$logs/zero_2ranks.json" "${small[@]}" \
        --checkpoint-dir "" --log "$logs/zero_2ranks.jsonl"; then
        compare "ZeRO-2, 2 ranks on 1 GPU" "$logs/zero_1rank.jsonl" "$logs/zero_2ranks.jsonl"
    else
        record "ZeRO-2, 2 ranks on 1 GPU" "${mpi[*]}"
    fi
    if [ -d "$logs/ckpt_gpu" ]; then
        cp -r "$logs/ckpt_gpu" "$logs/ckpt_cpu"
        printf 'step_00000004\n' > "$logs/ckpt_cpu/latest"
        if step zero_cpu 60 10 ./train_gpt_cpu -c "$logs/zero_1rank.json" "${small[@]}" --resume \
            --checkpoint-dir "$logs/ckpt_cpu" --log "$logs/zero_cpu.jsonl"; then
            compare "GPU checkpoint on the CPU" "$logs/zero_1rank.jsonl" "$logs/zero_cpu.jsonl"
        else
            record "GPU checkpoint on the CPU"
        fi
    else
        row "GPU checkpoint on the CPU" SKIP 0 "no GPU checkpoint (see 1 rank)"
    fi
fi

echo "== compute-sanitizer on the small reference tests"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null)
if [ -z "$sanitizer" ]; then
    row compute-sanitizer SKIP 0 "not installed"
elif [ ! -f "$ref" ]; then
    row compute-sanitizer SKIP 0 "no reference file"
else
    for tool in memcheck racecheck; do
        for p in fp32 bf16; do # started only with its whole cap left: a cut run would say nothing
            step "${tool}_$p" 100 100 "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 "./test_gpt_cu_$p" "$ref"
            record "$tool test_gpt_cu_$p" "$(grep -hoE '(ERROR|RACECHECK) SUMMARY: .*' "$log" | tail -n 1)"
        done
    done
fi
finish
