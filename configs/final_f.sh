#!/usr/bin/env bash
# Metric ablation of the budget allocator over three seeds, and run_comparison_test_fixed.sh on opt-mini.
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
source configs/record.sh final_f
python3 bench.py $M --configs configs/ablation_seeds.txt --data_dir $D --cache_dir /tmp/c1 --json $OUT/ablation.json
MODEL=$M DATA_DIR=$D OUT=$OUT/comparison bash run_comparison_test_fixed.sh
