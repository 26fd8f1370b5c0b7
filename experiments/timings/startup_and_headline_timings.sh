#!/usr/bin/env bash
# The headline timings on a fresh machine: interpreter start-up, then the headline command
# (50% + 4-bit, and 50% + mixed 4.0 budget) with a cold and a warm token cache.
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/.
source experiments/timings/record.sh startup_and_headline_timings
nproc
echo "== imports: twice plain, then twice with a byte-code cache in /tmp/pyc"
for i in 1 2; do time python3 -c "import opt_enhanced"; done
for i in 1 2; do time PYTHONPYCACHEPREFIX=/tmp/pyc python3 -c "import opt_enhanced"; done
time python3 -c "import torch"
python3 -X importtime -c "import opt_enhanced" 2> $OUT/importtime.txt
U="--sparsity 0.5 --wbits 4 --quiet"
B="--sparsity 0.5 --wbits 4 --target_avg_bits 4 --bit_method budget --quiet"
headline() { tag=$1; shift; echo "== $tag"; time python3 opt_enhanced.py $M c4 --data_dir $D "$@" --results_json $OUT/$tag.json; }
headline first --cache_dir /tmp/c0 $U  # fresh machine: Triton compiles its kernel
headline uniform_cold --cache_dir /tmp/c1 $U
headline uniform_warm --cache_dir /tmp/c1 $U
headline mixed_cold --cache_dir /tmp/c2 $B
headline mixed_warm --cache_dir /tmp/c2 $B
export PYTHONPYCACHEPREFIX=/tmp/pyc
headline uniform_cold_pyc --cache_dir /tmp/c3 $U
headline uniform_warm_pyc --cache_dir /tmp/c3 $U
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime):
    r = json.load(open(f))
    t = " ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
    print(f"{f.stem:18s} {' / '.join(f'{v:.2f}' for v in r['perplexity'].values())} | {t}")
PY
