#!/usr/bin/env bash
# BENCHMARKS.md §2 "Big models": the whole CLI on a random-weight OPT-1.3B, first run on the machine and warm, with
# site-packages byte-compiled as `pip install` leaves it (the lent image ships without .pyc; big_models.sh times
# the image as shipped). Needs a GPU machine and copies of ../shared in .local/.
source experiments/timings/record.sh whole_run_1.3b_compiled
source experiments/timings/whole_run_setup.sh
export TRITON_CACHE_DIR=/tmp/triton-fresh  # empty: the first run compiles the kernels, as on a fresh machine
for run in first warm; do
  echo "== opt-1.3b random, whole run, compiled, $run"
  /usr/bin/time -f "wall %e s" python3 opt_enhanced.py /tmp/opt-1.3b-random c4 --data_dir $D \
    --cache_dir /tmp/c13 --sparsity 0.5 --wbits 4 --results_json $OUT/opt13_compiled_$run.json
done
for i in 1 2; do /usr/bin/time -f "import opt_enhanced: wall %e s" python3 -c "import opt_enhanced"; done
