#!/usr/bin/env bash
# test_gpu_llama.sh: the GPU trainer on a Hugging Face LLaMA as a user runs it, under the CPU
# emulation of CUDA (../shared/cuda-emu: FP32 build, NCCL emulated over MPI, a GPU per rank).
# The model is dev/reference_hf.py's `llama` directory (grouped-query attention, untied
# lm_head, saved by transformers; make test writes it), loaded with --hf-model:
#   - the GPU's losses are the CPU trainer's on the same data (fp32 both: 1e-5);
#   - 2 ranks with ZeRO-2 over NCCL train as 1 rank does;
#   - a checkpoint saved by 2 ranks resumes on 1 (elastic) with the losses 2 ranks got;
#   - --hf-out on the GPU writes what the CPU trainer writes from the same checkpoint, byte
#     for byte (the export's loading in transformers is tests/test_hf.py's).
#   - --plan for DeepSeek-LLM 7B counts the activations a reader counts from the shapes.
# Skipped, with the reason, without the emulator, Open MPI or the model directory.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_gpu_llama
EMU=../shared/cuda-emu/run.sh
HF=dev/data/llama_reference
if [ ! -x "$EMU" ] || ! command -v mpirun >/dev/null || [ ! -f "$HF/config.json" ] || [ ! -x "$BIN" ]; then
    echo "skipped: needs the CUDA emulator at $EMU, Open MPI, $BIN and $HF (make test writes them)"
    summary; exit
fi
export OMP_NUM_THREADS=1
MPI=(mpirun --allow-run-as-root --oversubscribe)
# tokens below the model's vocabulary of 1000, in llm.c's shard format
python3 - "$TMP/train_000000.bin" <<'PY'
import random, struct, sys
from array import array
rng = random.Random(7)
tokens = array("H", (rng.randrange(1000) for _ in range(20000)))
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253)))
    tokens.tofile(f)
PY
printf '{"train_batch_size": 4, "zero_optimization": {"stage": 2}}\n' > "$TMP/z2.json"
RUN=(-c "$TMP/z2.json" --hf-model "$HF" --seq-len 64 --micro-batch 2 --train-data "$TMP/train_*.bin" --val-data "" --sample-tokens 0)
bin=$("$EMU" --precision FP32 --build-dir "$TMP/emu" --build-only train_gpt.cu 2>"$TMP/build.log" | tail -1)
# same_losses A.jsonl B.jsonl STEPS: "ok" when both logs have the steps STEPS ("3 4") with
# losses within 1e-5 of each other (sums in another order), else what differs
same_losses() {
    python3 - "$@" <<'PY'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if r.get("type") == "train"}
a, b, steps = losses(sys.argv[1]), losses(sys.argv[2]), [int(s) for s in sys.argv[3].split()]
ok = all(s in a and s in b and abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in steps)
print("ok" if ok else f"losses {a} vs {b} at steps {steps}")
PY
}
# check NAME VERDICT LOG: a line of results from same_losses' verdict
check() { if [ "$2" = ok ]; then ok "$1"; else bad "$1" "$2" "$(tail -3 "$3")"; fi; }

"$bin" "${RUN[@]}" --steps 4 --save-every 2 --checkpoint-dir "$TMP/gpu1" --hf-out "$TMP/export_gpu" --log "$TMP/gpu1.jsonl" > "$TMP/gpu1.log" 2>&1
$BIN "${RUN[@]}" --steps 4 --checkpoint-dir "" --log "$TMP/cpu1.jsonl" > "$TMP/cpu1.log" 2>&1
check "--hf-model on the GPU: the CPU trainer's losses for 4 steps" "$(same_losses "$TMP/cpu1.jsonl" "$TMP/gpu1.jsonl" "1 2 3 4")" "$TMP/gpu1.log"

"${MPI[@]}" -np 2 -x CUDA_EMU_DEVICE_COUNT=2 "$bin" "${RUN[@]}" --steps 4 --save-every 2 --checkpoint-dir "$TMP/gpu2" --log "$TMP/gpu2.jsonl" > "$TMP/gpu2.log" 2>&1
verdict=$(same_losses "$TMP/gpu1.jsonl" "$TMP/gpu2.jsonl" "1 2 3 4")
grep -q "(nccl backend)" "$TMP/gpu2.log" || verdict="no NCCL backend in the log: $verdict"
check "ZeRO-2 on 2 GPUs over NCCL: the losses of 1 GPU" "$verdict" "$TMP/gpu2.log"

cp -r "$TMP/gpu2" "$TMP/gpu2_on_1"
printf 'step_00000002\n' > "$TMP/gpu2_on_1/latest"
"$bin" "${RUN[@]}" --steps 4 --resume --checkpoint-dir "$TMP/gpu2_on_1" --log "$TMP/resumed.jsonl" > "$TMP/resumed.log" 2>&1
check "a checkpoint of 2 GPUs resumed on 1: steps 3 and 4 as 2 GPUs took them" "$(same_losses "$TMP/gpu2.jsonl" "$TMP/resumed.jsonl" "3 4")" "$TMP/resumed.log"

$BIN -c "$TMP/z2.json" --steps 0 --resume --checkpoint-dir "$TMP/gpu1" --hf-out "$TMP/export_cpu" > "$TMP/export_cpu.log" 2>&1
if [ -f "$TMP/export_gpu/model.safetensors" ] && cmp -s "$TMP/export_gpu/model.safetensors" "$TMP/export_cpu/model.safetensors" \
    && cmp -s "$TMP/export_gpu/config.json" "$TMP/export_cpu/config.json"; then
    ok "--hf-out on the GPU: byte for byte the CPU trainer's export of the same checkpoint"
else bad "--hf-out on the GPU: byte for byte the CPU trainer's export of the same checkpoint" "$(ls "$TMP"/export_* 2>&1 | head -5)" "$(tail -3 "$TMP/gpu1.log")" "$(tail -3 "$TMP/export_cpu.log")"; fi

# --plan 8 for DeepSeek-LLM 7B (micro batch 1, T 512; FP32 build): the activations column
# against the tensors the GPU trainer keeps, counted here from the shapes (each buffer a
# multiple of 256 bytes already at these sizes), plus cuBLASLt's 32 MiB workspace
out=$("$bin" --hf-model tests/data/deepseek-llm-7b-base --plan 8 --micro-batch 1 --seq-len 512 2>&1)
verdict=$(python3 - <<PY
L, C, NH, F, Vp, BT, x = 30, 4096, 32, 11008, 102400, 512, 4  # x: bytes of an FP32 build's activation
per_layer = x * (8 * C + 3 * F) + 4 * (2 + NH)  # per token: ln1 qkv(3C) atty residual2 ln2 fch(2F) fch_act(F) residual3; 2 rstd, lse
rest = x * (2 * C + Vp) + 4 * 3                 # per token: encoded lnf logits; lnf rstd, logits lse, loss
scratch = x * (6 * C + 3 * F) + 4 * NH          # per token: dresidual dln datty dqkv(3C) dfch(2F) dfch_act(F); attention D
column_sums = 4 * (BT // 128) * 2 * C
want = (BT * (L * per_layer + rest + scratch) + column_sums + 32 * 2**20) / 1e9
rows = [l.split() for l in """$out""".splitlines() if l.split()[:1] in (["0"], ["1"], ["2"])]
got = [float(r[7]) for r in rows]
print("ok" if len(got) == 3 and all(abs(g - want) < 0.006 for g in got) and "4-byte working weights" in """$out"""
      else f"activations {got} GB, counted {want:.3f} GB")
PY
)
if [ "$verdict" = ok ]; then ok "--plan 8 for DeepSeek-LLM 7B: the GPU trainer's activations as counted from the shapes"
else bad "--plan 8 for DeepSeek-LLM 7B: the GPU trainer's activations as counted from the shapes" "$verdict" "$(tail -6 <<<"$out")"; fi

summary
