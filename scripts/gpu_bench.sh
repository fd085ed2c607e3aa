#!/usr/bin/env bash
# The whole GPU measurement of docs/performance.md in one command, results under $OUT (default /tmp/gpu-results):
#   scripts/gpu_bench.sh            # all parts, in priority order, within BUDGET_S seconds (default 560)
#   scripts/gpu_bench.sh rollout    # or one part: rollout | train | e2e | fleet (one device call each)
# Four files come back: all.log (every command's output, under a header), results.jsonl (one line per
# command: {"name", "result": its --json line}), e2e_stages.json (seconds per `autocode train` stage) and
# summary.txt (versions, GPU, and what ran, was skipped for lack of time, or failed). A command that would
# start with less than its minimum time left is skipped, and each is killed at the budget's end, so the
# whole run ends inside a 10-minute device call (the times each command needs are not yet measured).
#
# Needs: python3 with torch (CUDA), transformers, accelerate, peft, typer, rich, sympy, tokenizers, and
# math-verify (grading). Packages missing on the machine can travel as wheels in .whl/ (see
# docs/performance.md, "Running it"); they are installed to /tmp/site here when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-560}"
START=$(date +%s)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export AUTOCODE4MATH_CACHE="${AUTOCODE4MATH_CACHE:-/tmp/autocode4math-cache}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
SUMMARY="$OUT/summary.txt"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >"$SUMMARY" 2>&1

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run NAME MIN_SECONDS CMD...: run CMD with the time left as its limit, unless less than MIN_SECONDS is left.
run() {
  local name=$1 need=$2; shift 2
  local t; t=$(left)
  if ((t < need)); then echo "SKIPPED $name (${t}s left, needs ${need}s)" >>"$SUMMARY"; return; fi
  local s; s=$(date +%s)
  local log="$OUT/.$name.log"
  timeout "$t" "$@" >"$log" 2>&1
  local rc=$?
  { echo "===== $name (rc=$rc): $*"; cat "$log"; } >>"$OUT/all.log"
  grep '^{' "$log" | tail -n 1 | "$PY" -c \
    "import json, sys; print(json.dumps({'name': sys.argv[1], 'result': json.load(sys.stdin)}))" "$name" \
    >>"$OUT/results.jsonl" 2>/dev/null
  rm -f "$log"
  echo "$( ((rc == 0)) && echo OK || echo "FAILED rc=$rc") $name $(($(date +%s) - s))s: $*" >>"$SUMMARY"
}

AUTOCODE=("$PY" -m autocode4math.cli)

tokenizer() {  # once (cached), so its training is not inside a timed command's limit
  run tokenizer 60 env TOKENIZERS_PARALLELISM=true "$PY" -c \
    "from autocode4math.perf import bench_tokenizer; print(len(bench_tokenizer()))"
}
rollout_05b_b64() {
  run rollout_05b_b64 150 "${AUTOCODE[@]}" bench rollout --arch qwen2.5-0.5b --batch 64 --prompt-tokens 128 \
    --max-new-tokens 512 --static-cache --code-rounds 2 --repeats 2 --json
}
rollout_05b_b256() {
  run rollout_05b_b256 120 "${AUTOCODE[@]}" bench rollout --arch qwen2.5-0.5b --batch 256 --prompt-tokens 128 \
    --max-new-tokens 512 --static-cache --repeats 2 --json
}
rollout_15b_b64() {
  run rollout_15b_b64 120 "${AUTOCODE[@]}" bench rollout --arch qwen2.5-1.5b --batch 64 --prompt-tokens 128 \
    --max-new-tokens 512 --static-cache --repeats 2 --json
}
train_05b() {
  run train_05b 60 "${AUTOCODE[@]}" bench train --arch qwen2.5-0.5b --seq-len 2048 --micro-batch-size 4 --json
}
train_15b() {
  run train_15b 60 "${AUTOCODE[@]}" bench train --arch qwen2.5-1.5b --seq-len 2048 --micro-batch-size 4 --json
}
train_15b_ckpt() {
  run train_15b_ckpt 60 "${AUTOCODE[@]}" bench train --arch qwen2.5-1.5b --seq-len 2048 --micro-batch-size 8 \
    --gradient-checkpointing --json
}
train_7b_lora() {
  run train_7b_lora 90 "${AUTOCODE[@]}" bench train --arch qwen2.5-7b --seq-len 2048 --micro-batch-size 2 \
    --gradient-checkpointing --lora-r 16 --steps 4 --json
}
e2e() {
  local run_dir="$AUTOCODE4MATH_CACHE/e2e-run" model="$AUTOCODE4MATH_CACHE/qwen2.5-0.5b-random"
  rm -rf "$run_dir"
  [ -f "$model/config.json" ] || run e2e_checkpoint 60 "$PY" -c \
    "from autocode4math.perf import save_random_checkpoint as s; print(s('qwen2.5-0.5b', '$model'))"
  local started; started=$("$PY" -c "import time; print(time.time())")
  run e2e_train 180 "${AUTOCODE[@]}" train --model "$model" --queries toy --out "$run_dir" --iterations 1 \
    --set queries_limit=64 --set estep.k=4 --set estep.batch_size=128 --set estep.rollout.max_new_tokens=256 \
    --set eval.limit=64 --set eval.batch_size=128 --set eval.max_new_tokens=256 --set mstep.micro_batch_size=8
  "$PY" -c "import json, sys; from autocode4math.bench import train_stage_seconds as t
print(json.dumps(t(sys.argv[1], float(sys.argv[2]))))" "$run_dir" "$started" >"$OUT/e2e_stages.json" 2>&1
}

fleet() {  # docs/scaling.md: two iterations with the M-step under accelerate launch (single_gpu), seconds per stage
  local run_dir="$AUTOCODE4MATH_CACHE/fleet-run" model="$AUTOCODE4MATH_CACHE/qwen2.5-0.5b-random"
  rm -rf "$run_dir"
  [ -f "$model/config.json" ] || run fleet_checkpoint 60 "$PY" -c \
    "from autocode4math.perf import save_random_checkpoint as s; print(s('qwen2.5-0.5b', '$model'))"
  local started; started=$("$PY" -c "import time; print(time.time())")
  run fleet_train 240 "${AUTOCODE[@]}" train --model "$model" --queries toy --out "$run_dir" --iterations 2 \
    --workers 1 --launch single_gpu --set queries_limit=64 --set estep.k=4 --set estep.batch_size=128 \
    --set estep.rollout.max_new_tokens=256 --set eval.limit=64 --set eval.batch_size=128 \
    --set eval.max_new_tokens=256 --set mstep.micro_batch_size=8
  "$PY" -c "import json, sys; from autocode4math.bench import train_stage_seconds as t
print(json.dumps(t(sys.argv[1], float(sys.argv[2]))))" "$run_dir" "$started" >"$OUT/fleet_stages.json" 2>&1
}

# "all" runs the figures the issue's targets hang on first; what does not fit is skipped (summary.txt
# says so) and the three parts, one device call each, cover everything.
case "${1:-all}" in
  rollout) tokenizer; rollout_05b_b64; rollout_05b_b256; rollout_15b_b64 ;;
  train) train_05b; train_15b; train_15b_ckpt; train_7b_lora ;;
  e2e) tokenizer; e2e ;;
  fleet) fleet ;;
  all) tokenizer; rollout_05b_b64; train_05b; train_15b; e2e; rollout_15b_b64; rollout_05b_b256; train_15b_ckpt
    train_7b_lora ;;
  *) echo "usage: $0 [all|rollout|train|e2e|fleet]" >&2; exit 2 ;;
esac
echo "total $(($(date +%s) - START))s" >>"$SUMMARY"
cat "$SUMMARY"
