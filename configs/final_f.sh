#!/usr/bin/env bash
# Metric ablation of the budget allocator over three seeds, and run_comparison_test_fixed.sh on opt-mini.
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
M=$PWD/.local/opt-mini; D=$PWD/.local/data
exec > >(tee $OUT/final_f.log) 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 bench.py $M --configs configs/ablation_seeds.txt --data_dir $D --cache_dir /tmp/c1 --json $OUT/ablation.json
MODEL=$M DATA_DIR=$D OUT=$OUT/comparison bash run_comparison_test_fixed.sh
