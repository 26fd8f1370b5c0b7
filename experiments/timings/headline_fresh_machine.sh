#!/usr/bin/env bash
# Final measurements of this allocator and of the headline command on a fresh machine.
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
source experiments/timings/record.sh headline_fresh_machine
U="--sparsity 0.5 --wbits 4 --quiet"
B="--sparsity 0.5 --wbits 4 --target_avg_bits 4 --bit_method budget --quiet"
headline() { tag=$1; shift; echo "== $tag"; time python3 opt_enhanced.py $M c4 --data_dir $D "$@" --results_json $OUT/$tag.json; }
headline first --cache_dir /tmp/c0 $B  # fresh machine: Triton compiles its kernel
for pass in image compiled; do
  if [ $pass = compiled ]; then  # what pip install does: byte-compile site-packages (the image ships without .pyc)
    SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
    time python3 -m compileall -q -j 16 "$SP" > /dev/null 2>&1
  fi
  for i in 1 2; do time python3 -c "import opt_enhanced"; done
  headline ${pass}_uniform_cold --cache_dir /tmp/u$pass $U
  headline ${pass}_uniform_warm --cache_dir /tmp/u$pass $U
  headline ${pass}_mixed_cold --cache_dir /tmp/m$pass $B
  headline ${pass}_mixed_warm --cache_dir /tmp/m$pass $B
done
python3 bench.py $M --configs configs/seeds.txt --data_dir $D --cache_dir /tmp/c1 --json $OUT/seeds.json
