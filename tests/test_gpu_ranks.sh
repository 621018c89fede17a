#!/usr/bin/env bash
# test_gpu_ranks.sh: how the GPU trainer's ranks start, run under the CPU emulation of CUDA
# (../shared/cuda-emu) in the builds a user may have: MPI without NCCL (host staging, one
# GPU for two ranks), NCCL without MPI (mpirun's ranks refused), and ranks described by
# torchrun's variables in a build without NCCL (refused). Skipped, with the reason, where
# the emulator is not beside the checkout.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_gpu_ranks
EMU=../shared/cuda-emu/run.sh
if [ ! -x "$EMU" ] || ! command -v mpirun >/dev/null; then
    echo "skipped: needs the CUDA emulator at $EMU and Open MPI"
    summary; exit
fi
export OMP_NUM_THREADS=1
TINY=(--layers 2 --heads 2 --dim 32 --seq-len 64 --micro-batch 2 --steps 2 --val-every 0 --sample-tokens 0 --checkpoint-dir "")
build() { "$EMU" --precision FP32 --build-dir "$TMP/emu" --build-only "$@" train_gpt.cu 2>"$TMP/build.log" | tail -1; }
# same_losses A.jsonl B.jsonl: "ok" when both logs have 2 steps whose losses agree within
# 1e-5 (ranks sum in another order), else what differs
same_losses() {
    python3 - "$1" "$2" <<'PY'
import json, sys
sys.path.insert(0, "tests")
from compare import max_rel_diff_each
a, b = ([json.loads(l)["loss"] for l in open(p) if '"train"' in l] for p in sys.argv[1:])
print("ok" if len(a) == 2 and max_rel_diff_each(a, b) <= 1e-5 else f"losses {a} vs {b}")
PY
}

# MPI without NCCL: two ranks on the one emulated GPU stage device buffers through MPI, and
# train as one rank with the same global batch does (ZeRO-2; sums in another order: 1e-5)
bin=$(build --no-nccl)
printf '{"train_batch_size": 4, "zero_optimization": {"stage": 2}}\n' > "$TMP/z2.json"
mpirun --allow-run-as-root --oversubscribe -np 2 "$bin" -c "$TMP/z2.json" "${TINY[@]}" --log "$TMP/two.jsonl" > "$TMP/two.log" 2>&1; rc2=$?
"$bin" -c "$TMP/z2.json" "${TINY[@]}" --log "$TMP/one.jsonl" > "$TMP/one.log" 2>&1; rc1=$?
verdict=$(same_losses "$TMP/one.jsonl" "$TMP/two.jsonl")
if [ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && grep -q "staged through host memory" "$TMP/two.log" && [ "$verdict" = ok ]; then
    ok "MPI without NCCL: 2 ranks on one GPU staged through host memory, losses of 1 rank"
else bad "MPI without NCCL: 2 ranks on one GPU staged through host memory, losses of 1 rank" "exit $rc1/$rc2: $verdict" "$(tail -3 "$TMP/two.log")"; fi

# MPI and NCCL (emulated over MPI), a GPU for each of the two ranks: NCCL between them
bin=$(build)
mpirun --allow-run-as-root --oversubscribe -np 2 -x CUDA_EMU_DEVICE_COUNT=2 "$bin" -c "$TMP/z2.json" "${TINY[@]}" --log "$TMP/nccl.jsonl" > "$TMP/nccl.log" 2>&1; rc=$?
verdict=$(same_losses "$TMP/one.jsonl" "$TMP/nccl.jsonl")
if [ $rc -eq 0 ] && grep -q "(nccl backend)" "$TMP/nccl.log" && [ "$verdict" = ok ]; then
    ok "NCCL: 2 ranks with a GPU each, losses of 1 rank"
else bad "NCCL: 2 ranks with a GPU each, losses of 1 rank" "exit $rc: $verdict" "$(tail -3 "$TMP/nccl.log")"; fi

# NCCL without MPI: ranks that mpirun started would each train alone; refused
bin=$(build --no-mpi)
expect_error "NCCL without MPI: mpirun's ranks refused" "OMPI_COMM_WORLD_SIZE=2 asks for several ranks, but this trainer was built without MPI" \
    env OMPI_COMM_WORLD_SIZE=2 "$bin" "${TINY[@]}"

# torchrun's variables in a build without NCCL: nothing could connect the ranks; refused
bin=$(build --no-nccl --no-mpi)
expect_error "no NCCL: torchrun-style ranks refused" "ranks started this way meet through NCCL, and this trainer was built without it" \
    env RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29999 "$bin" "${TINY[@]}"

summary
