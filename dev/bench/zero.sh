#!/usr/bin/env bash
# ZeRO benchmark: for 1, 2 and 4 CPU ranks (MPI) and stages 0, 1 and 2, the same global
# batch, printing ms/step, tokens/s, model-state memory per rank and bytes each rank
# sends per step. On a 2-core machine, 4 ranks oversubscribe the cores: the point is the
# memory and communication columns; the time columns show what the cores allow.
#     bash dev/bench/zero.sh [layers dim seq_len global_batch steps]
set -eu
cd "$(dirname "$0")/../.."
L=${1:-4}; C=${2:-256}; T=${3:-64}; TB=${4:-8}; STEPS=${5:-6}
make --no-print-directory train_gpt_cpu data >/dev/null
TMP=$(mktemp -d)
cores=$(nproc)
printf "GPT-2 %d layers, %d channels, T %d, %d sequences per step, %d steps (mean of steps 2..%d), %d cores\n\n" $L $C $T $TB $STEPS $STEPS $cores
printf "%5s %5s %9s %10s %14s %14s %12s\n" ranks stage "ms/step" "tokens/s" "states MB/rank" "formula MB" "sent MB/step"
for ranks in 1 2 4; do
    threads=$(( cores / ranks > 0 ? cores / ranks : 1 ))
    for stage in 0 1 2; do
        cat > $TMP/cfg.json <<JSON
{"train_batch_size": $TB, "train_micro_batch_size_per_gpu": $((TB / ranks)),
 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
 "zero_optimization": {"stage": $stage, "reduce_bucket_size": 5e8, "overlap_comm": true}}
JSON
        OMP_NUM_THREADS=$threads mpirun --allow-run-as-root --oversubscribe -np $ranks ./train_gpt_cpu -c $TMP/cfg.json \
            --layers $L --heads 4 --dim $C --seq-len $T --steps $STEPS --val-every 0 --sample-tokens 0 --checkpoint-dir "" \
            --log $TMP/log.jsonl > $TMP/out.txt 2>&1
        states=$(grep "rank 0 model states" $TMP/out.txt | sed 's/.*= \([0-9.]*\) MB/\1/')
        formula=$(grep "formula for stage" $TMP/out.txt | sed 's/.*: \([0-9.]*\) MB/\1/')
        python3 - $TMP/log.jsonl $ranks $stage "$states" "$formula" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l][1:]
ms = sum(r["ms"] for r in rows) / len(rows)
tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
sent = sum(r.get("bytes_sent", 0) for r in rows) / len(rows) / 1e6
print(f"{sys.argv[2]:>5} {sys.argv[3]:>5} {ms:9.1f} {tps:10.0f} {float(sys.argv[4]):14.1f} {float(sys.argv[5]):14.1f} {sent:12.1f}")
PY
    done
done
rm -rf $TMP
