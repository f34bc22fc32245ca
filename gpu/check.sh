#!/usr/bin/env bash
# The prepared device check (docs/gpu.md): on the GPU machine, in one run of at most 8 minutes,
# from the bundle `make gpu-bundle` writes (or from the repository, for the dry run):
#   1. numerics: the tiny Qwen2 / Llama / Qwen3 fixtures' logits against transformers' (f32, bf16);
#   2. a whole tiny-task iteration on the device, twice in two stores: gradients, loss, log-prob
#      mismatch, row counts, and whether the two runs wrote the same bytes (f32, then bf16 sampling);
#   3. timings of sampling (batch 1, 16, 64; 256 new tokens), scoring (64 x 1024) and a train
#      step (16 x 1024, AdamW) on random weights in
#      SmolLM2-135M's and Qwen2.5-1.5B's shapes, ours and PyTorch + transformers' in the same run,
#      with the ratio table.
# Everything lands in OUT as at most five files: results.jsonl (one JSON line per check and
# workload), peers.jsonl, summary.json, summary.md and check.log.
#
#   gpu/check.sh OUT                                   # on the GPU machine, in the bundle
#   DEVICE=cpu BIN=target/release SHAPES=tiny-qwen2 REPS=1 gpu/check.sh OUT   # dry run here
set -uo pipefail
out=${1:?usage: gpu/check.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
device=${DEVICE:-cuda:0}
bin=${BIN:-$root/bin}
shapes=${SHAPES:-smollm2-shape qwen2.5-1.5b-shape}
reps=${REPS:-3}
# The workloads' sizes (issue 17's targets): tokens per sampled sequence, scoring and train-step
# batches (rows x tokens), and the train step's rows per forward/backward on our side.
new_tokens=${NEW_TOKENS:-256}
score_shape=${SCORE_SHAPE:-64x1024}
train_shape=${TRAIN_SHAPE:-16x1024}
train_micro=${TRAIN_MICRO:-4}
step_timeout=${STEP_TIMEOUT:-150}
# Past this many seconds no further step starts (its line says so): the run must end inside the
# GPU machine's 10-minute command limit with its files written.
budget=${BUDGET_S:-450}
stores=${STORES:-/tmp/l2t-check-stores}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/check.log
results=$out/results.jsonl
: > "$results"
: > "$log"
started=$(date +%s)
note() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$log" >&2; }

# Compressed binaries (the bundle) are unpacked once, next to themselves.
for packed in "$bin"/*.xz; do
  [[ -e $packed ]] || continue
  [[ -x ${packed%.xz} ]] || python3 -c "import lzma, shutil, sys, os
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], 'wb') as dst: shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2], 0o755)" "$packed" "${packed%.xz}"
done
if [[ $device == cuda* ]]; then
  # The CUDA 13 libraries the binary links come with the machine's PyTorch (its venv's
  # nvidia/cu13/lib); libcuda.so.1 with the driver.
  lib=$(python3 -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'lib'))" 2>>"$log")
  export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$log" 2>&1
fi
note "device $device, binaries $bin, shapes: $shapes"

# One step: its JSON lines go to results.jsonl, its stderr to the log, its status to a line.
step() {
  local name=$1; shift
  local t0=$(date +%s)
  if (( t0 - started > budget )); then
    echo "{\"step\": \"$name\", \"rc\": \"skipped: past the ${budget}s budget\", \"seconds\": 0}" >>"$results"
    note "$name: skipped (past the ${budget}s budget)"
    return
  fi
  note "$name"
  timeout "$step_timeout" "$@" >>"$results" 2>>"$log"
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >>"$results"
  [[ $rc == 0 ]] || note "$name: exit status $rc"
}
bench=("$bin/bench" --device "$device" --config "$root/pipeline.toml" --artifacts "$stores"
  --new-tokens "$new_tokens" --score-shape "$score_shape" --train-shape "$train_shape")

rm -rf "$stores"
for dtype in f32 bf16; do
  step "fixtures-$dtype" "${bench[@]}" --workload check-fixtures --dtype "$dtype" --fixtures "$root/tests/fixtures/tiny_hf"
done
for dtype in f32 bf16; do
  step "iteration-$dtype" "${bench[@]}" --workload check-iteration --dtype "$dtype"
done
for shape in $shapes; do
  for dtype in f32 bf16; do
    for w in generate-b1-fixed generate-b16-fixed generate-b64-fixed score; do
      step "ours-$shape-$w-$dtype" "${bench[@]}" --workload "$shape-$w" --dtype "$dtype" --reps "$reps"
    done
  done
  step "ours-$shape-train-step" "${bench[@]}" --workload "$shape-train-step" --reps "$reps" --micro-batch "$train_micro"
done

# The peers: PyTorch + transformers on the same device, the same workloads.
peers=$out/peers.jsonl
: > "$peers"
torch_device=${device%%:*}
if python3 -c "import torch, transformers" 2>>"$log"; then
  for shape in $shapes; do
    left=$(( budget + 90 - ($(date +%s) - started) ))
    (( left > 30 )) || { note "peers $shape: skipped (out of time)"; continue; }
    note "peers: $shape"
    timeout "$left" python3 "$here/peers_torch.py" --device "$torch_device" --shape "$shape" --reps "$reps" \
      --new-tokens "$new_tokens" --score-shape "$score_shape" --train-shape "$train_shape" \
      >>"$peers" 2>>"$log" || note "peers $shape: exit status $?"
  done
else
  note "peers skipped: torch and transformers are not importable here"
fi
python3 "$here/summarize.py" "$results" "$peers" "$out/summary.json" > "$out/summary.md" 2>>"$log"
note "done in $(( $(date +%s) - started ))s"
cat "$out/summary.md"
# Failed checks fail the run (timings that did not run are in the summary).
! grep -qE '"pass": ?false' "$results" && ! grep -qE '"step": "(fixtures|iteration)-[a-z0-9]+", "rc": [1-9]' "$results"
