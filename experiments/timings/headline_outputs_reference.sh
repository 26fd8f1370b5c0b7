#!/usr/bin/env bash
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
# The reference table, the headline runs, --save and --export reloaded, and determinism, on opt-mini.
source experiments/timings/record.sh headline_outputs_reference
nvidia-smi --query-gpu=driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
echo "== GPU tests"; python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py test_enhanced.py -k "fused or kernel or gpu" 2>&1 | tail -4
echo "== headline 50%+4bit, cold then warm token cache (fresh process each)"
for run in cold warm; do echo "-- $run"; time python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 4 --quiet; done
echo "== headline 50%+mixed 4.0 budget, cold then warm"
for run in cold warm; do echo "-- $run"; time python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c2 --sparsity 0.5 --wbits 4 --target_avg_bits 4 --bit_method budget --quiet; done
echo "== same, PyTorch column loop"; time python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 4 --quiet --no_fused
echo "== save + export of 50%+mixed 4.0 budget"
python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 4 --target_avg_bits 4 --bit_method budget --save /tmp/saved --export /tmp/packed --results_json $OUT/mixed_saved.json --plot $OUT/bits.png | tail -18
echo "== reload the --save checkpoint"; python3 opt_enhanced.py /tmp/saved c4 --data_dir $D --cache_dir /tmp/c1 --quiet
echo "== reload the --export packed form"
python3 opt_enhanced.py /tmp/packed c4 --data_dir $D --cache_dir /tmp/c1 --quiet  # the packed reload
du -b /tmp/packed/* /tmp/saved/model.safetensors
echo "== same command twice: bit-identical?"
for i in 1 2; do python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 3 --target_avg_bits 3 --bit_method budget --quiet --results_json /tmp/det$i.json >/dev/null; done
python3 -c "import json; a,b=(json.load(open(f'/tmp/det{i}.json')) for i in (1,2)); print('identical perplexities:', a['perplexity']==b['perplexity'], a['perplexity'])"
echo "== tables"
python3 bench.py $M --configs configs/reference.txt --data_dir $D --cache_dir /tmp/c1 --json $OUT/reference.json
