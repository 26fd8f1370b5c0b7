#!/usr/bin/env bash
# BENCHMARKS.md §2 "Big models": OPT-175B-width layers offloaded on one and two GPUs (per-layer wall times and
# the mover's timeline; in line; streamed), and the whole CLI on a random-weight OPT-1.3B, first run on the machine and warm.
# Needs a machine with two GPUs (the lent nvidia-h200-x2) and copies of ../shared in .local/.
source experiments/timings/record.sh big_models
python3 experiments/timings/random_opt.py opt-1.3b /tmp/opt-1.3b-random --tokenizer $M --tokenizer $D/opt-tokenizer
export TRITON_CACHE_DIR=/tmp/triton-fresh  # empty: the first run compiles the kernels, as on a fresh machine
for run in first warm; do
  echo "== opt-1.3b random, whole run, $run"
  CUDA_VISIBLE_DEVICES=0 /usr/bin/time -f "wall %e s" python3 opt_enhanced.py /tmp/opt-1.3b-random c4 --data_dir $D \
    --cache_dir /tmp/c13 --sparsity 0.5 --wbits 4 --results_json $OUT/opt13_$run.json
done
/usr/bin/time -f "import opt_enhanced: wall %e s" python3 -c "import opt_enhanced"
CUDA_VISIBLE_DEVICES=0 python3 tests/test_kernels.py --row-tiles
CUDA_VISIBLE_DEVICES=0 python3 bench.py --synthetic opt-175b --layers 4 --offload --json $OUT/o175_1gpu.json
CUDA_VISIBLE_DEVICES=0 python3 bench.py --synthetic opt-175b --layers 4 --offload --no-overlap --json $OUT/o175_inline.json
CUDA_VISIBLE_DEVICES=0 python3 bench.py --synthetic opt-175b --layers 4 --stream --json $OUT/s175_1gpu.json
torchrun --standalone --nproc_per_node 2 bench.py --synthetic opt-175b --layers 4 --offload --json $OUT/o175_2gpu.json
