#!/usr/bin/env bash
# BENCHMARKS.md §2 "Big models": the whole CLI on a random-weight OPT-1.3B over two GPUs of one host (`--gpus 2`,
# first run on the machine and warm; then `torchrun` started directly, and one GPU, both warm), with site-packages
# byte-compiled as `pip install` leaves it. Needs the nvidia-h200-x2 machine and copies of ../shared in .local/.
source experiments/timings/record.sh whole_run_1.3b_two_gpus
source experiments/timings/whole_run_setup.sh
export TRITON_CACHE_DIR=/tmp/triton-fresh  # empty: the first run compiles the kernels, as on a fresh machine
FLAGS="c4 --data_dir $D --cache_dir /tmp/c13 --sparsity 0.5 --wbits 4"
for run in first warm; do
  echo "== opt-1.3b random, whole run, --gpus 2, $run"
  /usr/bin/time -f "wall %e s" python3 opt_enhanced.py /tmp/opt-1.3b-random $FLAGS --gpus 2 \
    --results_json $OUT/opt13_gpus2_$run.json
done
echo "== opt-1.3b random, whole run, torchrun --nproc_per_node 2, warm"
/usr/bin/time -f "wall %e s" torchrun --standalone --nproc_per_node 2 opt_enhanced.py /tmp/opt-1.3b-random $FLAGS \
  --results_json $OUT/opt13_torchrun_warm.json
echo "== opt-1.3b random, whole run, one GPU, warm"
CUDA_VISIBLE_DEVICES=0 /usr/bin/time -f "wall %e s" python3 opt_enhanced.py /tmp/opt-1.3b-random $FLAGS \
  --results_json $OUT/opt13_gpus1_warm.json
/usr/bin/time -f "import opt_enhanced: wall %e s" python3 -c "import opt_enhanced"
/usr/bin/time -f "import torch.distributed.run: wall %e s" python3 -c "import torch.distributed.run"
