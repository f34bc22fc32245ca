"""Summarizes a device check (gpu/check.sh): the checks' verdicts and the ratio table of our
timings against the PyTorch peers' from the same run.

  python3 gpu/summarize.py results.jsonl peers.jsonl summary.json > summary.md
"""
import json, sys


def lines(path):
    try:
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip().startswith('{')]
    except FileNotFoundError:
        return []


results_path, peers_path, summary_path = sys.argv[1:4]
results, peers = lines(results_path), lines(peers_path)
fixtures = [r for r in results if r.get('check') == 'fixture-logits']
iterations = [r for r in results if r.get('check') == 'iteration']
steps = [r for r in results if 'step' in r]
ours = {(r['workload'], r.get('dtype', 'f32')): r for r in results if 'workload' in r and 'median_tok_per_s' in r}
theirs = {(r['workload'], r['dtype']): r for r in peers if 'median_tok_per_s' in r}
table = []
for key in sorted(set(ours) | set(theirs)):
    a, b = ours.get(key, {}).get('median_tok_per_s'), theirs.get(key, {}).get('median_tok_per_s')
    table.append(dict(workload=key[0], dtype=key[1], ours_tok_per_s=a, peer_tok_per_s=b,
                      ratio=round(a / b, 3) if a and b else None, peer_peak_gpu_mb=theirs.get(key, {}).get('peak_gpu_mb')))
summary = dict(fixtures=fixtures, iterations=iterations, steps=steps, ratios=table,
               failed_steps=[s['step'] for s in steps if s['rc'] != 0])
with open(summary_path, 'w') as f:
    json.dump(summary, f, indent=1)

print('## Numerics: fixture logits against transformers\n')
print('| family | dtype | max abs error | tolerance | pass |\n|---|---|---|---|---|')
for r in fixtures:
    print(f"| {r['family']} | {r.get('dtype')} | {r['max_abs_error']:.2e} | {r['tolerance']:.0e} | {r['pass']} |")
print('\n## Tiny-task iteration on the device, twice\n')
for r in iterations:
    print(f"- {r.get('dtype')}: checks {'pass' if r['pass'] else 'FAIL: ' + '; '.join(r['problems'])}; "
          f"byte-identical across the two runs: {r['byte_identical']}"
          + (f" (differing from: {', '.join(r['stages_differing'])})" if r['stages_differing'] else ''))
print('\n## Timings: ours against PyTorch + transformers, same device, same run\n')
print('ratio = our tokens/s over the peer\'s (above 1: ours is faster)\n')
print('| workload | dtype | ours tok/s | PyTorch tok/s | ratio |\n|---|---|---|---|---|')
fmt = lambda x: '-' if x is None else f'{x:,.1f}'
for r in table:
    print(f"| {r['workload']} | {r['dtype']} | {fmt(r['ours_tok_per_s'])} | {fmt(r['peer_tok_per_s'])} | "
          f"{'-' if r['ratio'] is None else r['ratio']} |")
if summary['failed_steps']:
    print(f"\nsteps that failed or timed out: {', '.join(summary['failed_steps'])} (check.log)")
