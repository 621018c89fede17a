#!/usr/bin/env bash
# test_cli.sh: the CPU trainer as a user runs it: command-line and config errors,
# the sample ds_config.json, training that lowers the loss on WikiText, checkpoints,
# and resume bit for bit. Needs ./train_gpt_cpu and the prepared data (make data).
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_cli

# a tiny model on the real WikiText shards, so every run takes seconds
TINY=(--layers 2 --heads 2 --dim 32 --seq-len 32 --val-every 0 --sample-tokens 0)

# --- command line and config errors -------------------------------------------------
out=$($BIN --help); rc=$?
if [ $rc -eq 0 ] && grep -q -- "--deepspeed_config" <<<"$out" && grep -q -- "--resume" <<<"$out"; then ok "help"; else bad "help" "exit $rc"; fi
expect_error "unknown flag named"        "unknown option '--stepz'"                 $BIN --stepz 3
expect_error "bad integer names flag"    "--steps: expected an integer"             $BIN --steps abc
expect_error "negative value names flag" "--micro-batch: expected an integer in 1"  $BIN --micro-batch -2
expect_error "bad float names flag"      "--lr: expected a number >= 0, got 'fast'" $BIN --lr fast
expect_error "flag without value"        "--seed needs a value"                     $BIN --seed
expect_error "dim not multiple of heads" "--dim (65) must be a multiple of --heads (4)" $BIN --dim 65 --heads 4
expect_error "missing config file"       "cannot open '$TMP/none.json'"             $BIN -c $TMP/none.json
printf '{\n  "train_batch_size": 8,\n  "fp16": {"enabled": tru}\n}\n' > $TMP/malformed.json
expect_error "malformed config: line and column" "$TMP/malformed.json: malformed JSON: line 3, column 23" $BIN -c $TMP/malformed.json
printf '{"train_batch_size": 8, "zero_optimization": {"stage": "two"}}\n' > $TMP/wrongtype.json
expect_error "wrong type names the key"  "key 'zero_optimization.stage' must be an integer, got a string" $BIN -c $TMP/wrongtype.json
printf '{"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}\n' > $TMP/batch.json
expect_error "batch error says what to change" "10 != 4 * 2 * 1 (train_batch_size must be a multiple of 4 here, for example 12)" $BIN -c $TMP/batch.json
expect_error "missing data names pattern" "no data shards match '$TMP/nothing_*.bin'" $BIN --train-data "$TMP/nothing_*.bin"
expect_error "torchrun-style launch asks for mpirun" "WORLD_SIZE=2 asks for several ranks, but this trainer" env WORLD_SIZE=2 $BIN --steps 1
expect_error "resume without checkpoint" "--resume: no checkpoint in '$TMP/empty'" $BIN --resume --checkpoint-dir $TMP/empty

# --- the sample DeepSpeed config, unchanged ---------------------------------------------
SAMPLE=configs/ds_config.json
# the shipped copy must stay byte for byte the seed config, checked where ../shared exists
if [ -f ../shared/configs/ds_config.json ]; then
    if cmp -s $SAMPLE ../shared/configs/ds_config.json; then ok "$SAMPLE is the seed config unchanged"
    else bad "$SAMPLE is the seed config unchanged" "$(diff $SAMPLE ../shared/configs/ds_config.json | head -5)"; fi
fi
out=$($BIN -c $SAMPLE "${TINY[@]}" --steps 2 --checkpoint-dir "" 2>&1); rc=$?
if [ $rc -eq 0 ] && grep -qF "train_batch_size 16 = micro batch 4 x 4 accumulation steps x 1 ranks" <<<"$out" \
   && grep -qF "fp16: dynamic loss scale 2^16, window 1000, hysteresis 2, min 1" <<<"$out" \
   && grep -qF "zero_optimization.stage 2 with 1 rank" <<<"$out" && grep -q "step     2/2" <<<"$out"; then
    ok "sample ds_config.json: micro batch 4, 4 accumulation steps"
else bad "sample ds_config.json: micro batch 4, 4 accumulation steps" "exit $rc" "$(tail -5 <<<"$out")"; fi

# --- training lowers training and validation loss on WikiText -------------------------
out=$($BIN --layers 2 --heads 2 --dim 64 --seq-len 64 --micro-batch 8 --lr 3e-3 --steps 60 --val-every 20 --val-batches 8 \
      --sample-tokens 16 --checkpoint-dir "" --log $TMP/learn.jsonl 2>&1); rc=$?
verdict=$(python3 - $TMP/learn.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r["loss"] for r in rows if r["type"] == "train"]
val = [r["val_loss"] for r in rows if r["type"] == "val"]
fields = all({"step", "loss", "lr", "grad_norm", "ms", "tokens_per_s"} <= r.keys() for r in rows if r["type"] == "train")
first, last = sum(train[:5]) / 5, sum(train[-5:]) / 5
print("ok" if fields and len(val) == 3 and last < first - 2.0 and val[2] < val[0] else f"train {first:.3f} -> {last:.3f}, val {val}, fields {fields}")
PY
)
if [ $rc -eq 0 ] && [ "$verdict" = ok ] && grep -q "^sample (16 tokens" <<<"$out"; then ok "training lowers train and val loss, prints a sample"
else bad "training lowers train and val loss, prints a sample" "exit $rc: $verdict" "$(tail -5 <<<"$out")"; fi

# --- checkpoints and resume bit for bit -----------------------------------------------
cat > $TMP/resume.json <<'JSON'
{
  "train_micro_batch_size_per_gpu": 2,
  "gradient_accumulation_steps": 2,
  "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}},
  "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 3, "total_num_steps": 8}},
  "gradient_clipping": 0.5
}
JSON
$BIN -c $TMP/resume.json "${TINY[@]}" --steps 6 --save-every 3 --checkpoint-dir $TMP/straight --log $TMP/straight.jsonl >/dev/null 2>&1
$BIN -c $TMP/resume.json "${TINY[@]}" --steps 3 --checkpoint-dir $TMP/resumed --log $TMP/resumed.jsonl >/dev/null 2>&1
out=$($BIN -c $TMP/resume.json "${TINY[@]}" --steps 6 --resume --checkpoint-dir $TMP/resumed --log $TMP/resumed.jsonl 2>&1); rc=$?
same=1
for f in model.bin optim_rank0000_of_0001.bin state.bin; do
    cmp -s $TMP/straight/step_00000006/$f $TMP/resumed/step_00000006/$f || same=0
done
losses_straight=$(grep '"train"' $TMP/straight.jsonl | sed 's/.*"loss": \([^,]*\),.*/\1/' | tail -3)
losses_resumed=$(grep '"train"' $TMP/resumed.jsonl | sed 's/.*"loss": \([^,]*\),.*/\1/' | tail -3)
if [ $rc -eq 0 ] && [ $same -eq 1 ] && [ "$losses_straight" = "$losses_resumed" ] && grep -q "resumed from $TMP/resumed/step_00000003" <<<"$out"; then
    ok "resume continues bit for bit (weights, Adam moments, state, losses)"
else bad "resume continues bit for bit (weights, Adam moments, state, losses)" "exit $rc, files identical: $same" "straight: $losses_straight" "resumed: $losses_resumed"; fi
if [ "$(cat $TMP/straight/latest)" = "step_00000006" ] && [ -d $TMP/straight/step_00000003 ] && ! ls $TMP/straight | grep -q tmp; then
    ok "latest names the newest complete checkpoint, no temporary folders left"
else bad "latest names the newest complete checkpoint, no temporary folders left" "$(ls $TMP/straight)"; fi

# a damaged checkpoint is refused by name, and nothing saved before is touched
cp -r $TMP/straight $TMP/damaged
truncate -s -100 $TMP/damaged/step_00000006/optim_rank0000_of_0001.bin
expect_error "truncated checkpoint refused" "optim_rank0000_of_0001.bin': size does not match its header" \
    $BIN -c $TMP/resume.json "${TINY[@]}" --steps 9 --resume --checkpoint-dir $TMP/damaged
echo "step_00000042" > $TMP/damaged/latest
expect_error "latest naming a missing folder refused" "names '$TMP/damaged/step_00000042', which does not exist" \
    $BIN -c $TMP/resume.json "${TINY[@]}" --steps 9 --resume --checkpoint-dir $TMP/damaged
if cmp -s $TMP/straight/step_00000003/model.bin $TMP/damaged/step_00000003/model.bin; then ok "earlier checkpoint untouched"; else bad "earlier checkpoint untouched"; fi
expect_error "resume on other data refused" "resuming would not continue the same run" \
    $BIN -c $TMP/resume.json "${TINY[@]}" --steps 9 --resume --checkpoint-dir $TMP/straight --train-data 'data/wikitext/wikitext_val_*.bin'

# fine-tuning from a model file: weights load, the model size comes from the file
out=$($BIN "${TINY[@]}" --layers 7 --steps 1 --init-from $TMP/straight/step_00000006/model.bin --checkpoint-dir "" 2>&1); rc=$?
if [ $rc -eq 0 ] && grep -q "model: GPT-2, 2 layers, 2 heads, 32 channels, 32 positions" <<<"$out" && grep -q "weights: from" <<<"$out"; then ok "init-from takes the model size from the file"
else bad "init-from takes the model size from the file" "exit $rc" "$(tail -3 <<<"$out")"; fi

# --- --epochs: the number of steps follows from the data and the batch -------------------
# a shard of the first 10,000 WikiText tokens: (10000 - 1) // 32 = 312 sequences of 32 (+1),
# 39 steps of 8 per epoch (the loader drops an epoch's tail shorter than a batch)
python3 - $TMP/small.bin <<'PY'
import struct, sys
with open("data/wikitext/wikitext_train_000000.bin", "rb") as f:
    header = list(struct.unpack("<256i", f.read(1024)))
    tokens = f.read(2 * 10000)
header[2] = 10000
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<256i", *header) + tokens)
PY
out=$($BIN "${TINY[@]}" --micro-batch 8 --epochs 2 --train-data $TMP/small.bin --checkpoint-dir "" --log $TMP/epochs.jsonl 2>&1); rc=$?
last=$(grep '"train"' $TMP/epochs.jsonl | tail -1 | sed 's/.*"step": \([0-9]*\).*/\1/')
if [ $rc -eq 0 ] && grep -qF "epochs: 2 x 39 steps = 78 steps" <<<"$out" && [ "$last" = 78 ]; then ok "--epochs 2 trains 2 x 39 steps"
else bad "--epochs 2 trains 2 x 39 steps" "exit $rc, last logged step $last" "$(grep -m1 -e epochs -e error <<<"$out")"; fi
expect_error "--epochs with --steps refused" "--epochs and --steps both given" $BIN --epochs 1 --steps 5
expect_error "--epochs on too little data" "312 sequences of 32+1 tokens, fewer than one batch of 400 sequences" \
    $BIN "${TINY[@]}" --epochs 1 --micro-batch 8 --grad-accum 50 --train-data $TMP/small.bin --checkpoint-dir ""
expect_error "--seq-len beyond the model's positions" "--seq-len 64 exceeds the model's 32 positions" \
    $BIN "${TINY[@]}" --seq-len 64 --steps 1 --init-from $TMP/straight/step_00000006/model.bin --checkpoint-dir ""

# --- fp16 loss scaling through the trainer, with injected overflows (DSTRAIN_INJECT_INF) ---
out=$(DSTRAIN_INJECT_INF=2,3,6 $BIN -c $SAMPLE "${TINY[@]}" --steps 8 --save-every 4 --checkpoint-dir $TMP/fp16 --log $TMP/fp16.jsonl 2>&1); rc=$?
if [ $rc -eq 0 ] \
   && grep -qF "OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 65536, but hysteresis is 2. Reducing hysteresis to 1" <<<"$out" \
   && grep -qF "OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 65536, reducing to 32768" <<<"$out" \
   && grep -qF "OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 32768, reducing to 16384" <<<"$out"; then
    ok "DeepSpeed-style overflow lines"
else bad "DeepSpeed-style overflow lines" "exit $rc" "$(grep -i overflow <<<"$out")"; fi
trace=$(python3 - $TMP/fp16.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
print(" ".join(f'{r["step"]}:{r["loss_scale"]:g}:{r["skipped"]}:{int(r["overflow"])}:{"-" if r["grad_norm"] is None else "n"}' for r in rows))
PY
)
want="1:65536:0:0:n 2:65536:1:1:- 3:65536:2:1:- 4:32768:2:0:n 5:32768:2:0:n 6:32768:3:1:- 7:16384:3:0:n 8:16384:3:0:n"
if [ "$trace" = "$want" ]; then ok "skipped steps are exactly the injected ones; JSON log has loss_scale, skipped, overflow"
else bad "skipped steps are exactly the injected ones; JSON log has loss_scale, skipped, overflow" "got:  $trace" "want: $want"; fi
# resume from the checkpoint at step 4 (between overflows): same scale trajectory, same files
DSTRAIN_INJECT_INF=2,3,6 $BIN -c $SAMPLE "${TINY[@]}" --steps 4 --checkpoint-dir $TMP/fp16r --log $TMP/fp16r.jsonl >/dev/null 2>&1
out=$(DSTRAIN_INJECT_INF=2,3,6 $BIN -c $SAMPLE "${TINY[@]}" --steps 8 --resume --checkpoint-dir $TMP/fp16r --log $TMP/fp16r.jsonl 2>&1); rc=$?
same=1
for f in model.bin optim_rank0000_of_0001.bin state.bin; do cmp -s $TMP/fp16/step_00000008/$f $TMP/fp16r/step_00000008/$f || same=0; done
if [ $rc -eq 0 ] && [ $same -eq 1 ] && cmp -s <(grep train $TMP/fp16.jsonl | sed 's/"ms".*"data_wait_ms": [0-9.]*,//') <(grep train $TMP/fp16r.jsonl | sed 's/"ms".*"data_wait_ms": [0-9.]*,//') \
   && grep -qF "loss scale 32768" <<<"$out"; then
    ok "resume between overflows continues the same scale trajectory"
else bad "resume between overflows continues the same scale trajectory" "exit $rc, files identical $same" "$(grep -E 'resumed|OVERFLOW' <<<"$out")"; fi
# an overflow at the minimum scale ends the run with DeepSpeed's message and a hint
printf '{"train_batch_size": 2, "fp16": {"enabled": true, "initial_scale_power": 0, "hysteresis": 1}}\n' > $TMP/minscale.json
expect_error "overflow at the minimum scale is fatal, with a hint" "Current loss scale already at minimum - cannot decrease scale anymore. Exiting run." \
    env DSTRAIN_INJECT_INF=1 $BIN -c $TMP/minscale.json "${TINY[@]}" --steps 2 --checkpoint-dir ""
expect_error "bad fault spec names the variable" "DSTRAIN_INJECT_INF: no parameter tensor named 'nope'" \
    env DSTRAIN_INJECT_INF=2@nope $BIN "${TINY[@]}" --steps 2 --checkpoint-dir ""

# --- what the console and the log show ----------------------------------------------------
# steps_per_print 5 (DeepSpeed's cadence): a console line at the first step, every 5th and the
# last, each with the mean loss of the steps since the line before; the log has every step,
# with its epoch and tokens. wall_clock_breakdown: each step's phases measured in the log,
# their means on the console.
printf '{"train_micro_batch_size_per_gpu": 2, "steps_per_print": 5, "wall_clock_breakdown": true}\n' > $TMP/print.json
out=$($BIN -c $TMP/print.json "${TINY[@]}" --steps 12 --checkpoint-dir "" --log $TMP/print.jsonl 2>&1); rc=$?
echo "$out" > $TMP/print.out
verdict=$(python3 - $TMP/print.jsonl $TMP/print.out <<'PY'
import json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
out = open(sys.argv[2]).read()
console = re.findall(r"^step +(\d+)/12 \| epoch [\d.]+ \| loss ([\d.]+)", out, re.M)
problems = []
if [r["step"] for r in rows] != list(range(1, 13)):
    problems.append("the log does not have steps 1 to 12")
elif [int(s) for s, _ in console] != [1, 5, 10, 12]:
    problems.append(f"console lines at steps {[s for s, _ in console]}, not 1 5 10 12")
else:
    for (s, printed), steps in zip(console, ([1], [2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12])):
        mean = sum(rows[i - 1]["loss"] for i in steps) / len(steps)
        if abs(float(printed) - mean) > 2e-6 * mean:
            problems.append(f"step {s}: printed loss {printed}, the mean of steps {steps} is {mean:.6f}")
    for r in rows:
        phases = [r[k] for k in ("forward_ms", "backward_ms", "reduce_ms", "optimizer_ms", "data_wait_ms")]
        if r["tokens"] != 64 * r["step"] or abs(r["epoch"] - r["step"] * rows[0]["epoch"]) > 1e-5:
            problems.append(f"step {r['step']}: tokens {r['tokens']}, epoch {r['epoch']}")
        if min(phases) < 0 or phases[0] <= 0 or phases[1] <= 0 or not 0.5 * r["ms"] <= sum(phases) <= r["ms"]:
            problems.append(f"step {r['step']}: phases {phases} ms of a {r['ms']} ms step")
    if len(re.findall(r"^time \(ms per step\) \| forward: [\d.]+ \| backward: [\d.]+ \| reduce: [\d.]+ \| optimizer: [\d.]+ \| data: [\d.]+ \| other: ", out, re.M)) != 4:
        problems.append("not 4 console lines of phase times")
print("; ".join(problems[:3]) or "ok")
PY
)
if [ $rc -eq 0 ] && [ "$verdict" = ok ]; then ok "steps_per_print: the console's cadence, mean losses; wall_clock_breakdown: measured phases"
else bad "steps_per_print: the console's cadence, mean losses; wall_clock_breakdown: measured phases" "exit $rc: $verdict"; fi
# without the keys: a console line every step, no phase times
out=$($BIN "${TINY[@]}" --micro-batch 2 --steps 3 --checkpoint-dir "" --log $TMP/plain.jsonl 2>&1); rc=$?
if [ $rc -eq 0 ] && [ "$(grep -cE '^step +[123]/3 \| epoch' <<<"$out")" = 3 ] && ! grep -q "time (ms" <<<"$out" && ! grep -q forward_ms $TMP/plain.jsonl; then
    ok "without steps_per_print a console line every step, without wall_clock_breakdown no phase times"
else bad "without steps_per_print a console line every step, without wall_clock_breakdown no phase times" "exit $rc" "$(grep -E '^step' <<<"$out")"; fi

summary
