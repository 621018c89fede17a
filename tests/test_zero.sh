#!/usr/bin/env bash
# test_zero.sh: ZeRO stages 0, 1 and 2 on 1, 2 and 4 CPU ranks over MPI (oversubscribing
# the cores): same losses and weights for the same global batch, memory per rank,
# checkpoints saved on 4 ranks resumed on 2 and 1, batch refusal on 8 ranks, and a stuck
# or killed rank ending the run instead of hanging. Needs ./train_gpt_cpu built with MPI.
#     bash tests/test_zero.sh [gpt2|llama]
# With llama, the same checks of ZeRO, accumulation, fp16 scaling and elastic resume run on
# a tiny LLaMA (grouped-query attention, untied lm_head: regions on both ends of the
# buffer); the checks that do not depend on the model (8 ranks, stuck ranks) run once.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_zero

if ! command -v mpirun >/dev/null || ! grep -q "MPI_Init" <(strings $BIN 2>/dev/null); then
    bad "ZeRO tests need Open MPI and a trainer built with it (apt-get install openmpi-bin libopenmpi-dev; make)"
    summary; exit
fi
export OMP_NUM_THREADS=1   # several ranks share 2 cores
MPI=(mpirun --allow-run-as-root --oversubscribe)
ARCH=${1:-gpt2}
case $ARCH in
    gpt2) MODEL=(--layers 2 --heads 2 --dim 32) ;;
    llama) MODEL=(--arch llama --layers 2 --heads 4 --kv-heads 2 --dim 32 --ffn-dim 48); PREFIX="llama: " ;;
    *) echo "usage: $0 [gpt2|llama]"; exit 2 ;;
esac
TINY=("${MODEL[@]}" --seq-len 32 --val-every 0 --val-batches 8 --sample-tokens 0)

# config STAGE MICRO_BATCH ACCUM FP16 -> a ds_config; tiny buckets so every region spans several
config() {
    local f=$TMP/s$1_mb$2_ga$3_$4.json
    cat > $f <<JSON
{"train_micro_batch_size_per_gpu": $2, "gradient_accumulation_steps": $3,
 "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
 "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}},
 "fp16": {"enabled": $4}, "gradient_clipping": 0.5,
 "zero_optimization": {"stage": $1, "reduce_bucket_size": 50000, "allgather_bucket_size": 30000, "overlap_comm": true}}
JSON
    echo $f
}
# run NAME RANKS CONFIG [flags]: trains 6 steps, checkpoint in $TMP/NAME, log $TMP/NAME.jsonl
run() {
    local name=$1 ranks=$2 cfg=$3; shift 3
    timeout 300 "${MPI[@]}" -np $ranks $BIN -c $cfg "${TINY[@]}" --steps 6 --checkpoint-dir $TMP/$name --log $TMP/$name.jsonl "$@" > $TMP/$name.log 2>&1 \
        || echo "    ($name exited with $?: $(grep -m1 error $TMP/$name.log))"
}
same_checkpoint() { python3 tests/ckpt_compare.py "$@" > $TMP/compare.txt 2>&1; }
losses() { grep '"train"' $1 | sed 's/.*"loss": \([^,]*\),.*/\1/' | tr '\n' ' '; }

# --- bitwise where the reduction order is fixed ------------------------------------------
# The same 4 sequences per step: 1 rank with 2 accumulation steps of 2, or 2 ranks with 2
# each. A sum of two addends does not depend on order and the loss scale and 1/2 are
# powers of two, so every stage on 2 ranks reproduces the 1-rank stage-2 run bit for bit
# (stage 2 accumulates each micro batch's complete gradient, as two ranks do).
run w1_s2 1 $(config 2 2 2 true)
for stage in 0 1 2; do
    run w2_s$stage 2 $(config $stage 2 1 true)
    if same_checkpoint $TMP/w1_s2/step_00000006 $TMP/w2_s$stage/step_00000006 && [ "$(losses $TMP/w1_s2.jsonl)" = "$(losses $TMP/w2_s$stage.jsonl)" ]; then
        ok "2 ranks, stage $stage, fp16: bit for bit the 1-rank run (weights, master, Adam moments, losses)"
    else bad "2 ranks, stage $stage, fp16: bit for bit the 1-rank run" "$(cat $TMP/compare.txt)"; fi
done
run w2_s2_fp32 2 $(config 2 2 1 false)
if same_checkpoint $TMP/w1_s2/step_00000006 $TMP/w2_s2_fp32/step_00000006 --ignore-scaler; then ok "2 ranks, stage 2: fp16 loss scaling on and off give the same weights"
else bad "2 ranks, stage 2: fp16 loss scaling on and off give the same weights" "$(cat $TMP/compare.txt)"; fi

# --- 4 ranks and gradient accumulation: same within reduction-order rounding --------------
# 8 sequences per step as 1 x 2 x 4, 2 x 2 x 2, 4 x 1 x 2 (ranks x micro batch x steps).
# Sums of 4 or 8 fp32 addends in another order differ by a few ulps (1e-7 relative), and
# 6 steps compound that to about 1e-6 in losses, weights and moments (measured: at most
# 9e-7). Bound: 1e-5 for both, relative to the loss or to the tensor's largest value.
run g_w1_s0 1 $(config 0 2 4 false)
run g_w2_s1 2 $(config 1 2 2 true)
run g_w4_s2 4 $(config 2 1 2 true)
run g_w4_s0 4 $(config 0 1 2 false)
run g_w4_s1 4 $(config 1 1 2 false)
for name in g_w2_s1 g_w4_s2 g_w4_s0 g_w4_s1; do
    verdict=$(python3 - $TMP/g_w1_s0.jsonl $TMP/$name.jsonl <<'PY'
import json, sys
sys.path.insert(0, "tests")
from compare import max_rel_diff_each
a = [json.loads(l)["loss"] for l in open(sys.argv[1]) if '"train"' in l]
b = [json.loads(l)["loss"] for l in open(sys.argv[2]) if '"train"' in l]
worst = max_rel_diff_each(a, b)  # inf for a NaN or inf loss
print("ok" if len(a) == len(b) == 6 and worst <= 1e-5 else f"losses differ by {worst:.2e}: {a} vs {b}")
PY
)
    if [ "$verdict" = ok ] && same_checkpoint $TMP/g_w1_s0/step_00000006 $TMP/$name/step_00000006 --tolerance 1e-5 --ignore-scaler; then
        ok "$name: losses and weights within 1e-5 of 1 rank ($(sed 's/.*: //' $TMP/compare.txt))"
    else bad "$name: losses and weights within 1e-5 of 1 rank" "$verdict" "$(cat $TMP/compare.txt)"; fi
done

# --- memory per rank, from the trainer's own accounting -----------------------------------
mb() { grep "rank 0 model states" $TMP/$1.log | sed "s/.* $2 \([0-9.]*\) MB.*/\1/"; }
verdict=$(python3 - "$(mb g_w4_s0 gradients)" "$(mb g_w4_s2 gradients)" "$(mb g_w4_s0 moments)" "$(mb g_w4_s1 moments)" "$(mb g_w4_s2 moments)" "$(mb g_w4_s0 master)" "$(mb g_w4_s1 master)" <<'PY'
import sys
g0, g2, m0, m1, m2, w0, w1 = map(float, sys.argv[1:])
close = lambda a, b: abs(a - b) <= 0.1 + 0.001 * b  # values are printed to 0.1 MB
print("ok" if close(g2, g0 / 4) and close(m1, m0 / 4) and close(m2, m0 / 4) and close(w1, w0 / 4) else f"grads {g0} -> {g2}, moments {m0} -> {m1}, {m2}, master {w0} -> {w1}")
PY
)
if [ "$verdict" = ok ] && grep -q "plus buffers: 2 gradient buckets of 50000 elements" $TMP/g_w4_s2.log; then
    ok "4 ranks: stage 2 gradients and stage 1/2 master and moments are 1/4 of stage 0's, buffers stated"
else bad "4 ranks: stage 2 gradients and stage 1/2 master and moments are 1/4 of stage 0's, buffers stated" "$verdict"; fi
if grep -q '"bytes_sent"' $TMP/g_w4_s2.jsonl && grep -q "sent [0-9.]* MB" $TMP/g_w4_s2.log; then ok "bytes each rank sent are logged per step"; else bad "bytes each rank sent are logged per step"; fi

# --- save on 4 ranks, resume on 2 and on 1 -------------------------------------------------
run r_w4 4 $(config 2 1 2 true) --steps 3
for ranks in 2 1; do
    mbatch=$((4 / ranks))
    cfg=$(config 2 $mbatch 2 true)
    # resuming with nothing left to train saves the loaded state again, to compare it
    timeout 120 "${MPI[@]}" -np $ranks $BIN -c $cfg "${TINY[@]}" --steps 3 --resume --resume-from $TMP/r_w4 --checkpoint-dir $TMP/r_w$ranks.loaded > $TMP/r_w$ranks.loaded.log 2>&1
    if same_checkpoint $TMP/r_w4/step_00000003 $TMP/r_w$ranks.loaded/step_00000003; then
        ok "saved on 4 ranks, loaded on $ranks: weights, master, moments, scaler and counters identical"
    else bad "saved on 4 ranks, loaded on $ranks: identical state" "$(cat $TMP/compare.txt)" "$(tail -2 $TMP/r_w$ranks.loaded.log)"; fi
    # the next steps on $ranks ranks match an uninterrupted run on $ranks ranks
    timeout 120 "${MPI[@]}" -np $ranks $BIN -c $cfg "${TINY[@]}" --steps 6 --resume --checkpoint-dir $TMP/r_w$ranks.loaded --log $TMP/r_w$ranks.resumed.jsonl > $TMP/r_w$ranks.resumed.log 2>&1
    run u_w$ranks $ranks $cfg
    if same_checkpoint $TMP/u_w$ranks/step_00000006 $TMP/r_w$ranks.loaded/step_00000006 --tolerance 1e-5; then
        ok "resumed on $ranks ranks: steps 4-6 match an uninterrupted $ranks-rank run ($(sed 's/.*: //' $TMP/compare.txt))"
    else bad "resumed on $ranks ranks: steps 4-6 match an uninterrupted run" "$(cat $TMP/compare.txt)" "$(tail -2 $TMP/r_w$ranks.resumed.log)"; fi
done

[ "$ARCH" = gpt2 ] || { summary; exit; }

# --- the sample config on 8 ranks is refused, with what to change -------------------------
out=$(timeout 120 "${MPI[@]}" -np 8 $BIN -c configs/ds_config.json "${TINY[@]}" --steps 1 --checkpoint-dir "" 2>&1); rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qF "Micro batch size per gpu: 0 has to be greater than 0 (with 8 ranks and 4 accumulation steps, train_batch_size must be at least 32" <<<"$out"; then
    ok "sample config on 8 ranks refused with the batch-size error and a hint"
else bad "sample config on 8 ranks refused with the batch-size error and a hint" "exit $rc" "$(head -3 <<<"$out")"; fi

# --- a stuck rank and a killed rank end the run instead of hanging -------------------------
slow=(--layers 2 --heads 2 --dim 32 --seq-len 32 --val-every 0 --sample-tokens 0 --steps 100000 --checkpoint-dir "" --comm-timeout 5)
cfg=$(config 2 2 1 false)
"${MPI[@]}" -np 2 $BIN -c $cfg "${slow[@]}" > $TMP/stuck.log 2>&1 &
job=$!
sleep 4
victim=$(pgrep -f "train_gpt_cpu -c $cfg" | tail -1)
kill -STOP $victim 2>/dev/null
start=$(date +%s)
timeout 60 tail --pid=$job -f /dev/null
rc=$?; kill -CONT $victim 2>/dev/null; kill -9 $job 2>/dev/null
if [ $rc -eq 0 ] && grep -qE "error: rank [01]: collective '.*' did not complete within 5 s" $TMP/stuck.log; then
    ok "a stuck rank: the other ends with a timeout error naming the collective ($(( $(date +%s) - start )) s)"
else bad "a stuck rank: the other ends with a timeout error naming the collective" "wait rc $rc" "$(grep -m2 error $TMP/stuck.log)"; fi
"${MPI[@]}" -np 2 $BIN -c $cfg "${slow[@]}" > $TMP/killed.log 2>&1 &
job=$!
sleep 4
kill -9 $(pgrep -f "train_gpt_cpu -c $cfg" | tail -1) 2>/dev/null
timeout 60 tail --pid=$job -f /dev/null
rc=$?
wait $job 2>/dev/null; jobrc=$?
if [ $rc -eq 0 ] && [ $jobrc -ne 0 ]; then ok "a killed rank: the run ends (exit $jobrc), no hang"
else bad "a killed rank: the run ends, no hang" "wait rc $rc, job exit $jobrc"; pkill -9 -f "train_gpt_cpu -c $cfg"; fi

summary
