#!/usr/bin/env bash
# Issue 3, session 4: --bit_scope model with the loss-weighted (Fisher) rounding error; run_comparison on opt-mini;
# the headline command. Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
source configs/record.sh final_g
python3 bench.py $M --configs configs/model_scope.txt --data_dir $D --cache_dir /tmp/c1 --json $OUT/model_scope.json
MODEL=$M DATA_DIR=$D OUT=$OUT/comparison bash run_comparison_test_fixed.sh
python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 4 --target_avg_bits 4.0 \
    --bit_method budget --bit_scope model --results_json $OUT/headline_model.json 2>&1 | tail -25
