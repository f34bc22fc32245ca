#!/usr/bin/env bash
# Runs the peer benchmarks (PyTorch + transformers, TRL; shared/bench/peers) and ours on the same
# workloads in one invocation, alternating peer and ours for each round, and prints the ratio
# table (ours / PyTorch, medians over the rounds). `make bench-peers` runs it.
#
# Needs: PEERS_PY, a Python with the peers' packages (shared/bench/requirements-peers.lock.txt);
#        PEERS_DIR, the peers' scripts (default ../shared/bench/peers);
#        SMOLLM2_DIR, SmolLM2 as a Hugging Face f32 directory (default: this repo's import of the
#        GGUF, artifacts/runs/smollm2/bootstrap, written by `make iterate PROFILE=smollm2`).
# Env: ROUNDS (default 3), SKIP_TRL=1, OUT (JSONL of every line, default artifacts/bench/vs-peers-<UTC>.jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PEERS_PY:?set PEERS_PY to a python with torch, transformers and trl}"
PEERS="$(cd "${PEERS_DIR:-../shared/bench/peers}" && pwd)"
export SMOLLM2_DIR="$(cd "${SMOLLM2_DIR:-artifacts/runs/smollm2/bootstrap}" && pwd)"
ROUNDS="${ROUNDS:-3}"
OUT="${OUT:-artifacts/bench/vs-peers-$(date -u +%Y%m%dT%H%M%SZ).jsonl}"
mkdir -p "$(dirname "$OUT")"; : > "$OUT"
export BENCH_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONWARNINGS=ignore
BENCH=target/release/bench

peer() {  # peer NAME SCRIPT ARGS...
  local name=$1; shift
  local line; line="$(cd "$PEERS" && "$PY" "$@" 2>/dev/null | grep '^{' | tail -1)" || true
  [ -n "$line" ] && echo "{\"side\":\"pytorch\",\"name\":\"$name\",\"result\":$line}" >> "$OUT" || echo "peer $name failed" >&2
}
ours() {  # ours NAME WORKLOAD [REPS]
  local line; line="$($BENCH --workload "$2" --reps "${3:-1}" 2>/dev/null | grep '^{' | tail -1)" || true
  [ -n "$line" ] && echo "{\"side\":\"ours\",\"name\":\"$1\",\"result\":$line}" >> "$OUT" || echo "ours $1 failed" >&2
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  for m in smollm2 tiny-qwen2; do
    # Passes of a second or less: the median of 3 on each side (one pass is at the host's mercy).
    quick=$([ $m = tiny-qwen2 ] && echo 3 || echo 1)
    for b in 16 1; do
      peer "$m generate b$b fixed" bench_generate.py --model $m --batch $b --mode fixed --reps $quick
      ours "$m generate b$b fixed" "$m-generate-b$b-fixed" $quick
    done
    peer "$m score" bench_score.py --model $m --reps $quick
    ours "$m score" "$m-score" $quick
    peer "$m train step" bench_train.py --model $m --reps 1
    ours "$m train step" "$m-train-step"
  done
  peer "smollm2 generate b16 eos" bench_generate.py --model smollm2 --batch 16 --mode eos --reps 1
  ours "smollm2 generate b16 eos" smollm2-generate-b16-eos
  if [ "${SKIP_TRL:-0}" != 1 ]; then
    peer "grpo step" bench_trl_grpo.py --steps 2
    ours "grpo step" smollm2-l2t-iteration
    ours "grpo step: ours as outcome GRPO" smollm2-outcome-iteration
  fi
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def figure(side, r):
    """(value, unit, higher_is_better)"""
    if 'median_tok_per_s' in r and 'median_s_per_step' not in r:
        return r['median_tok_per_s'], 'tok/s', True
    if 'median_s_per_step' in r:
        return r['median_s_per_step'], 's/step', False
    if 's_per_iteration' in r:
        return r['s_per_iteration'], 's/step', False
    return None, '', True
by = {}
for row in rows:
    r = row['result']
    if row['name'].startswith('grpo step') and row['side'] == 'ours' and r.get('iteration') != 1:
        continue
    v, unit, hib = figure(row['side'], r)
    if v is None:
        continue
    e = by.setdefault(row['name'], {'unit': unit, 'hib': hib, 'pytorch': [], 'ours': [], 'rss': {'pytorch': [], 'ours': []}})
    e[row['side']].append(v)
    e['rss'][row['side']].append(r.get('peak_rss_mb', 0))
print('| workload | PyTorch | ours | ratio ours/PyTorch | peak RSS PyTorch / ours (MB) |')
print('|---|---|---|---|---|')
# Our outcome-GRPO iteration is measured against the same TRL step.
for name, e in by.items():
    if name.startswith('grpo step: ') and 'grpo step' in by:
        e['pytorch'], e['rss']['pytorch'] = by['grpo step']['pytorch'], by['grpo step']['rss']['pytorch']
for name, e in by.items():
    if not e['pytorch'] or not e['ours']:
        continue
    p, o = statistics.median(e['pytorch']), statistics.median(e['ours'])
    ratio = o / p
    rp, ro = statistics.median(e['rss']['pytorch']), statistics.median(e['rss']['ours'])
    speed = f"{ratio:.2f}x ({'faster' if (ratio > 1) == e['hib'] else 'slower'})"
    print(f"| {name} | {p:,.3g} {e['unit']} | {o:,.3g} {e['unit']} | {speed} | {rp:,.0f} / {ro:,.0f} |")
overheads = [row['result']['l2t_overhead'] for row in rows
             if row['name'] == 'grpo step' and row['side'] == 'ours' and row['result'].get('iteration') == 1]
if overheads:
    print(f"\nL2T overhead (fisher-reward time / sample time, iteration 1, median): {statistics.median(overheads):.2f}")
PY
echo "lines: $OUT" >&2
