#!/usr/bin/env bash
# BENCHMARKS.md §2 "Big models": the whole CLI on a random-weight OPT-1.3B with this checkout and with another
# one (a directory, e.g. `git archive COMMIT | tar -x -C .local/old`), taking turns on one machine, so that
# machine-to-machine spread does not enter the comparison: for each, a first run (its own empty Triton cache and
# token cache; the OS page cache is warmed for both first) and two warm runs. Each run's last line is its JSON
# (perplexities and timings; this checkout's `timings.startup` is the process's time before the run).
# Usage: bash experiments/whole_run_1.3b_same_machine.sh OTHER_CHECKOUT. Needs a GPU machine and .local/ copies.
OTHER=$(cd "$1" && pwd)
source experiments/timings/record.sh whole_run_1.3b_same_machine
source experiments/timings/whole_run_setup.sh
python3 -c "import torch, transformers, triton; torch.zeros(1).cuda()"  # page cache: the libraries are read for both
for run in first warm warm; do
  for code in this other; do
    dir=$PWD; [ $code = other ] && dir=$OTHER
    echo "== opt-1.3b random, whole run, $code checkout, $run"
    (cd "$dir" && TRITON_CACHE_DIR=/tmp/triton-$code /usr/bin/time -f "wall %e s" python3 opt_enhanced.py \
      /tmp/opt-1.3b-random c4 --data_dir $D --cache_dir /tmp/c13-$code --sparsity 0.5 --wbits 4 --quiet)
  done
done
