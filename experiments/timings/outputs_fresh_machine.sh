#!/usr/bin/env bash
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
source experiments/timings/record.sh outputs_fresh_machine
export PYTHONPYCACHEPREFIX=/tmp/pyc
python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 4 --target_avg_bits 4 --bit_method budget --save /tmp/saved --export /tmp/packed --results_json $OUT/mixed_saved_h100.json --quiet
python3 opt_enhanced.py /tmp/saved c4 --data_dir $D --cache_dir /tmp/c1 --quiet
python3 opt_enhanced.py /tmp/packed c4 --data_dir $D --cache_dir /tmp/c1 --quiet  # the packed reload
python3 -c "import json; r=json.load(open('$OUT/mixed_saved_h100.json')); print(r['export']); print('effective bits', r['summary']['effective_bits'])"
du -b /tmp/packed/* /tmp/saved/model.safetensors
