#!/usr/bin/env bash
# benchmarks/reference_exactness.md and benchmarks/mixed_cost.md: this checkout against another (OTHER, e.g.
# `git archive COMMIT | tar -x -C .local/other`) on one GPU machine, within one 10-minute device command.
# Both run the reference table and the headline command on opt-mini in one bench.py process each
# (perplexities to every digit; compress seconds per row), then, this checkout alone, bench.py --synthetic
# --stages at OPT-1.3B and OPT-6.7B shapes: uniform 50% + 4-bit against the headline's mixed 4.0 (the
# default full clip search; per layer, warm: --repeat 2).
# Usage: bash experiments/timings/same_numbers_and_mixed_cost.sh OTHER
OTHER=$(cd "$1" && pwd)
source experiments/timings/record.sh same_numbers_and_mixed_cost
cat configs/reference.txt > /tmp/rows.txt
echo "headline-quantile4|--sparsity 0.5 --wbits 4 --target_avg_bits 4.0 --bit_method quantile" >> /tmp/rows.txt
echo "budget4|--sparsity 0.5 --wbits 4 --target_avg_bits 4.0 --bit_method budget" >> /tmp/rows.txt
for code in this other; do
  dir=$PWD; [ $code = other ] && dir=$OTHER
  echo "== opt-mini, reference rows and the headline, $code checkout"
  (cd "$dir" && time timeout 170 python3 bench.py $M --configs /tmp/rows.txt --data_dir $D --cache_dir /tmp/c-$code \
     --json $OUT/rows_$code.json | tail -14)
done
python3 - "$OUT" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/rows_{c}.json")) for c in ("this", "other"))
same = [n for n in a if a[n]["perplexity"] == b[n]["perplexity"]]
print(f"identical perplexities (every digit): {len(same)} of {len(a)} rows;", "differ:", [n for n in a if n not in same])
for n in a:
    print(f"  {n}: this {a[n]['perplexity']} other {b[n]['perplexity']} compress s {a[n]['timings']['compress']:.2f}"
          f" / {b[n]['timings']['compress']:.2f}")
PY
U="--sparsity 0.5 --wbits 4"; Q="$U --target_avg_bits 4.0 --bit_method quantile"
for shape in "opt-1.3b 4" "opt-6.7b 2"; do
  set -- $shape
  for kind in uniform mixed; do
    flags=$U; [ $kind = mixed ] && flags=$Q; j=$OUT/syn_$1_$kind.json
    echo "== $1, $2 layers, this checkout: $flags"
    timeout 110 python3 bench.py --synthetic $1 --layers $2 --repeat 2 --stages --json $j -- $flags | head -30
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('compress s per run:', [round(x['compress_s'], 2) \
      for x in r['runs']], 'steady per layer:', [x['steady_layer_s'] and round(x['steady_layer_s'], 2) for x in r['runs']], \
      'stages of the last run:', {k: round(v, 2) for k, v in r['runs'][-1]['stage_s'].items()}, 'peak GPU GiB', \
      r['runs'][-1]['peak_gpu_gib'])" $j
  done
done
