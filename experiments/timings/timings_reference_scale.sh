#!/usr/bin/env bash
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
# Timings for the record: headline runs (fresh machine / cold token cache / warm), reference table, scale.
source experiments/timings/record.sh timings_reference_scale
export PYTHONPYCACHEPREFIX=/tmp/pyc
H="python3 opt_enhanced.py $M c4 --data_dir $D --sparsity 0.5 --wbits 4 --quiet"
echo "== first run on a fresh machine (bytecode, Triton kernels and tokens all cold)"; time $H --cache_dir /tmp/c0
echo "== cold token cache"; time $H --cache_dir /tmp/c1
echo "== warm"; time $H --cache_dir /tmp/c1
echo "== mixed 4.0 budget: cold token cache, then warm"
time $H --cache_dir /tmp/c2 --target_avg_bits 4 --bit_method budget; time $H --cache_dir /tmp/c2 --target_avg_bits 4 --bit_method budget
echo "== PyTorch loop"; time $H --cache_dir /tmp/c1 --no_fused
python3 bench.py $M --configs configs/reference.txt --data_dir $D --cache_dir /tmp/c1 --json $OUT/reference_c.json
python3 bench.py --synthetic opt-125m
python3 bench.py --synthetic opt-6.7b
python3 bench.py --synthetic opt-175b --layers 2 --offload
