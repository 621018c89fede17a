#!/usr/bin/env bash
# Scaling benchmark: one config on 1 rank and on N ranks, printed as the table users make of
# one GPU against N GPUs with DeepSpeed: seconds per step, speed-up over 1 rank, tokens/s,
# utilisation and peak memory per rank (measured by each rank, next to the ZeRO formula for
# the stage and rank count), and the bytes each rank sends per step.
#
#     bash dev/bench/scaling.sh [options] [-- TRAINER ARGS...]
#
#   --trainer BIN   the trainer (default ./train_gpt: what `make train` built, the GPU
#                   trainer where there is a GPU; ./train_gpt_cpu for CPU ranks)
#   --ranks N       the ranks of the second run (default 2)
#   -c, --config F  the DeepSpeed config (default configs/ds_config.json: ZeRO-2, fp16, 16
#                   sequences per step; on a GPU its fp16 needs `make train PRECISION=FP16`)
#   --steps S       steps per run (default 6); the first is warm-up and not counted
#   --mpirun CMD    the launcher of the N ranks (default "mpirun --allow-run-as-root
#                   --oversubscribe", Open MPI's; MPICH: "mpiexec"); -np N is appended
#   -h, --help      this text
# TRAINER ARGS come after the defaults, so they override them: a tiny GPT-2 (--layers 2
# --heads 2 --dim 64 --seq-len 64) on the default data (`make data`), no validation, no
# checkpoints, no sample.
#
# Each rank gets OMP_NUM_THREADS threads, by default the cores divided by N, in both runs,
# so that a rank is the same unit of hardware in each. Columns:
#   s/step     mean wall time of the steps after the first (the trainer's log), 4 digits
#   speed-up   1 rank's s/step over this row's
#   tokens/s   the step's tokens (train_batch_size x sequence length) over s/step
#   util       each rank's own measurement (the trainer's end-of-run report), the range over
#              the ranks; CPU ranks: CPU time (user + system) over wall time divided by the
#              OpenMP threads, 100% = every thread busy (threads spinning for work or
#              polling in a collective count as busy); GPUs: NVML's utilisation, the mean of
#              a sample per step (n/a without NVML)
#   peak/rank  the largest over the ranks of each rank's peak: CPU ranks: peak RSS
#              (everything the process holds: model states, activations, data pages, MPI);
#              GPUs: device memory in use (cudaMemGetInfo after each step, the whole GPU's)
#   formula    DeepSpeed's model-state memory per rank for the stage and rank count (the
#              trainer's "formula for stage" line: weights of the working precision, fp32
#              gradients, master weights and Adam moments)
#   sent/step  bytes rank 0 sent in the step's collectives (reset every step), mean
set -u
cd "$(dirname "$0")/../.."

trainer=./train_gpt ranks=2 config=configs/ds_config.json steps=6
mpirun_cmd="mpirun --allow-run-as-root --oversubscribe"
usage() { sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "scaling.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --trainer) trainer=${2:-}; shift 2 || die "--trainer needs a binary" ;;
        --ranks) ranks=${2:-}; shift 2 || die "--ranks needs a number" ;;
        -c | --config) config=${2:-}; shift 2 || die "$1 needs a file" ;;
        --steps) steps=${2:-}; shift 2 || die "--steps needs a number" ;;
        --mpirun) mpirun_cmd=${2:-}; shift 2 || die "--mpirun needs a command" ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (trainer flags go after --; see --help)" ;;
    esac
done
[[ $ranks =~ ^[0-9]+$ ]] && [ "$ranks" -ge 2 ] || die "--ranks must be a whole number of at least 2, not '$ranks'"
[[ $steps =~ ^[0-9]+$ ]] && [ "$steps" -ge 2 ] || die "--steps must be at least 2 (the first is warm-up), not '$steps'"
[ -x "$trainer" ] || die "no trainer '$trainer': build it with \`make train\` (or make train_gpt_cpu), or name it with --trainer"
[ -f "$config" ] || die "no config file '$config' (--config)"
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) # nproc alone would count OpenMP's threads
gpus=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
threads=${OMP_NUM_THREADS:-$((cores / ranks > 0 ? cores / ranks : 1))}
TMP=$(mktemp -d -t scaling.XXXXXX) || exit 1
trap 'rm -rf "$TMP"' EXIT
ARGS=(-c "$config" --layers 2 --heads 2 --dim 64 --seq-len 64 --steps "$steps" --val-every 0 --val-data "" --sample-tokens 0
      --checkpoint-dir "" "$@")

# run RANKS: trains, output in $TMP/rRANKS.log, JSON log in $TMP/rRANKS.jsonl
run() {
    local launch=()
    [ "$1" -eq 1 ] || read -ra launch <<< "$mpirun_cmd -np $1"
    if ! OMP_NUM_THREADS=$threads "${launch[@]}" "$trainer" "${ARGS[@]}" --log "$TMP/r$1.jsonl" > "$TMP/r$1.log" 2>&1; then
        echo "scaling.sh: the $1-rank run failed: ${launch[*]} $trainer ${ARGS[*]}" >&2
        tail -n 15 "$TMP/r$1.log" >&2
        exit 1
    fi
}
run 1
run "$ranks"

python3 - "$TMP" "$ranks" "$trainer" "$config" "$steps" "$threads" "$cores" "$gpus" <<'PY'
import json, re, sys
tmp, n, trainer, config, steps, threads, cores, gpus = sys.argv[1:]

def load(ranks):
    text = open(f"{tmp}/r{ranks}.log").read()
    rows = [json.loads(l) for l in open(f"{tmp}/r{ranks}.jsonl")]
    train = [r for r in rows if r["type"] == "train"][1:]  # the first step is warm-up
    per_rank = [r for r in rows if r["type"] == "rank"]
    if len(per_rank) != ranks:
        sys.exit(f"scaling.sh: the {ranks}-rank run reported {len(per_rank)} rank(s) (no end-of-run report: is {trainer} up to date?)")
    s = sum(r["ms"] for r in train) / len(train) / 1e3
    tokens = round(train[0]["tokens_per_s"] * train[0]["ms"] / 1e3)  # per step, the same every step
    return {"ranks": ranks, "s": s, "tokens_per_s": tokens / s,
            "sent": sum(r.get("bytes_sent", 0) for r in train) / len(train), "per_rank": per_rank, "text": text,
            "formula_mb": float(re.search(r"formula for stage \d+: ([0-9.]+) MB", text).group(1))}

runs = [load(1), load(int(n))]
first = runs[0]
said = lambda pattern: re.search(pattern, first["text"], re.M).group(1)  # what the 1-rank run printed at start
name, batch, model = said(r"^dstrain (.*), 1 rank"), said(r"^  batch: (.*)"), said(r"^model: (.*)")
batch_n = re.search(r"^  batch: .* = (.*)", runs[1]["text"], re.M).group(1)
T, stage = said(r"^sequence length: (\d+)"), said(r"^ZeRO stage (\d+)")
device = first["per_rank"][0]["measured"] == "device"
hardware = f"ranks on {gpus} GPU(s)" if device else f"{threads} OpenMP thread(s) per rank on {cores} core(s)"
print(f"dstrain {name} ({trainer}), {config}, ZeRO stage {stage}")
print(f"  {model}; sequence length {T}")
print(f"  {batch} = {batch_n}")
print(f"  {steps} steps per run, means of steps 2-{steps}; {hardware}\n")

util_head = "GPU util (NVML)" if device else "util (CPU/wall/threads)"
mem_head = "peak GPU mem/rank" if device else "peak RSS/rank"
print(f"{'ranks':>5} {'s/step':>9} {'speed-up':>8} {'tokens/s':>10} {util_head:>23} {mem_head:>17} {'ZeRO formula':>12} {'sent/step':>10}")

def util(per_rank):
    u = [r["utilisation"] for r in per_rank]
    if any(x is None for x in u): return "n/a"
    lo, hi = round(100 * min(u)), round(100 * max(u))
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"

for r in runs:
    peak = max(x["peak_memory_gb"] for x in r["per_rank"])
    print(f"{r['ranks']:>5} {r['s']:>7.4g} s {first['s'] / r['s']:>7.2f}x {r['tokens_per_s']:>10.0f} {util(r['per_rank']):>23} "
          f"{peak:>14.3f} GB {r['formula_mb'] / 1e3:>9.3f} GB {r['sent'] / 1e6:>7.1f} MB")
PY
