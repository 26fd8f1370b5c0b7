#!/usr/bin/env bash
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
# (and, for the comparison with the previous allocator, the previous commit's *.py in .local/old).
source configs/record.sh session3
echo "== mixed precision, new allocator"
python3 bench.py $M --configs configs/seeds.txt --data_dir $D --cache_dir /tmp/c1 --json $OUT/seeds.json
if [ -d .local/old ]; then echo "== previous allocator"; (cd .local/old && python3 bench.py $M --configs ../old_seeds.txt --data_dir $D --cache_dir /tmp/c1 --json $OUT/old_seeds.json); fi
echo "== byte-code: flags, then compile site-packages as pip install does, then time imports"
python3 -c "import sys; print('dont_write_bytecode', sys.flags.dont_write_bytecode)"; env | grep -i '^python' || true
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
time python3 -m compileall -q -j 16 "$SP" > /dev/null 2>&1
for i in 1 2; do time python3 -c "import opt_enhanced"; done
U="--sparsity 0.5 --wbits 4 --quiet"
B="--sparsity 0.5 --wbits 4 --target_avg_bits 4 --bit_method budget --quiet"
headline() { tag=$1; shift; echo "== $tag"; time python3 opt_enhanced.py $M c4 --data_dir $D "$@" --results_json $OUT/$tag.json; }
headline uniform_cold --cache_dir /tmp/c5 $U
headline uniform_warm --cache_dir /tmp/c5 $U
headline mixed_cold --cache_dir /tmp/c6 $B
headline mixed_warm --cache_dir /tmp/c6 $B
