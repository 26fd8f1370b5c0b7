#!/usr/bin/env bash
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
source experiments/timings/record.sh outputs_fresh_machine
export PYTHONPYCACHEPREFIX=/tmp/pyc
python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 4 --target_avg_bits 4 --bit_method budget --save /tmp/saved --export /tmp/packed --results_json $OUT/mixed_saved_h100.json --quiet
python3 opt_enhanced.py /tmp/saved c4 --data_dir $D --cache_dir /tmp/c1 --quiet
python3 - <<'PY'
import torch, datautils, opt_enhanced as oe, json
from export import load_compressed
m = load_compressed("/tmp/packed").cuda().eval()
tok = datautils.get_tokenizer("/tmp/packed")
print("packed reload:", {d: round(oe.perplexity(m, datautils.get_eval_ids(d, tok, 2048, ".local/data", "/tmp/c1"), 2048, torch.device("cuda"), 8), 3) for d in oe.EVAL_DATASETS})
r = json.load(open("/tmp/packed/compression.json"))
PY
python3 -c "import json; r=json.load(open('$OUT/mixed_saved_h100.json')); print(r['export']); print('effective bits', r['summary']['effective_bits'])"
du -b /tmp/packed/* /tmp/saved/model.safetensors
