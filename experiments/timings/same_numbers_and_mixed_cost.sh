#!/usr/bin/env bash
# benchmarks/reference_exactness.md and benchmarks/mixed_cost.md: this checkout against another (OTHER, e.g.
# `git archive COMMIT | tar -x -C .local/other`) on one machine. Both run the reference table and the headline
# command on opt-mini in one bench.py process each (perplexities to every digit; compress seconds per row), then,
# this checkout alone, bench.py --synthetic --stages at OPT-1.3B and OPT-6.7B shapes: uniform 50% + 4-bit against
# the headline's mixed 4.0 with the GPU's full clip search and with --clip_search fast (per layer, warm: --repeat 2). Usage: bash experiments/timings/same_numbers_and_mixed_cost.sh OTHER
OTHER=$(cd "$1" && pwd)
source experiments/timings/record.sh same_numbers_and_mixed_cost
cat configs/reference.txt > /tmp/rows.txt
echo "headline-quantile4|--sparsity 0.5 --wbits 4 --target_avg_bits 4.0 --bit_method quantile" >> /tmp/rows.txt
echo "budget4|--sparsity 0.5 --wbits 4 --target_avg_bits 4.0 --bit_method budget" >> /tmp/rows.txt
for code in this other; do
  dir=$PWD; [ $code = other ] && dir=$OTHER
  echo "== opt-mini, reference rows and the headline, $code checkout"
  (cd "$dir" && timeout 200 python3 bench.py $M --configs /tmp/rows.txt --data_dir $D --cache_dir /tmp/c-$code \
     --json $OUT/rows_$code.json | tail -16)
done
python3 - "$OUT" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/rows_{c}.json")) for c in ("this", "other"))
same = [n for n in a if a[n]["perplexity"] == b[n]["perplexity"]]
print(f"identical perplexities (every digit): {len(same)} of {len(a)} rows;", "differ:", [n for n in a if n not in same])
print("compress s (this / other):", {n: (round(a[n]["timings"]["compress"], 2), round(b[n]["timings"]["compress"], 2)) for n in a})
PY
U="--sparsity 0.5 --wbits 4"; Q="$U --target_avg_bits 4.0 --bit_method quantile"
for shape in "opt-1.3b 4" "opt-6.7b 2"; do
  set -- $shape
  for flags in "$U" "$Q" "$Q --clip_search fast"; do
    echo "== $1, $2 layers, this checkout: $flags"
    timeout 120 python3 bench.py --synthetic $1 --layers $2 --repeat 2 --stages --json $OUT/syn.json -- $flags | head -40
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('compress s per run:', [round(x['compress_s'], 2) \
      for x in r['runs']], 'steady per layer:', [x['steady_layer_s'] and round(x['steady_layer_s'], 2) for x in r['runs']])" \
      $OUT/syn.json
  done
done
