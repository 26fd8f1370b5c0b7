#!/usr/bin/env bash
# Run from the repository root with copies of ../shared/models/opt-mini and ../shared/data in .local/
# Process overhead diagnosis, then scale: random-weight OPT shapes through the full compression path.
source experiments/timings/record.sh overhead_and_scale
echo "== imports"; time python3 -c "import torch"; time python3 -c "import torch; torch.cuda.init()"; time python3 -c "import transformers"; time python3 -c "import opt_enhanced"
python3 -X importtime -c "import opt_enhanced" 2> $OUT/importtime.txt
echo "== profile of a warm headline run"
python3 opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 4 --quiet > /dev/null
time python3 -m cProfile -o $OUT/headline.prof opt_enhanced.py $M c4 --data_dir $D --cache_dir /tmp/c1 --sparsity 0.5 --wbits 4 --quiet
python3 -c "import pstats; pstats.Stats('$OUT/headline.prof').sort_stats('cumulative').print_stats(25)" | tail -40
echo "== scale"
for s in opt-125m opt-1.3b opt-6.7b; do python3 bench.py --synthetic $s; done
python3 bench.py --synthetic opt-6.7b --layers 4 --offload
python3 bench.py --synthetic opt-175b --layers 1 --offload
python3 bench.py --synthetic opt-175b --layers 2 --offload
