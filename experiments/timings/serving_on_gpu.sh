#!/usr/bin/env bash
# BENCHMARKS.md §6 (Serving): the mixed-width Linears run at their bit-widths. One GPU machine, from the repository
# root, with .local/ copies of ../shared (opt-mini, data) and gemlite's wheel in .local/whl (gemlite is on the
# package index as an sdist only: `pip wheel --no-deps gemlite==0.6.0.post2 -w .local/whl`).
#   1. the kernels against the dequantized weights, compiled (tests/test_serving_kernel.py on the GPU);
#   2. opt-mini: a mixed 3.0 run (50% sparse) exported, the export evaluated through the kernels, and greedy
#      generation of 32 tokens from the export against the run's own fp16 (fake-quantized) model;
#   3. python -m serving.benchmark: per Linear at OPT-6.7B and OPT-1.3B shapes (decode batch 1, 8, 32, prefill
#      2048) and a CUDA-graph decode step, against fp16 (cuBLAS), gemlite A16W4 and torch's int4 matmul
#      (MODELS, DEADLINE in seconds and BENCH_ARGS, more of its flags, narrow it to fit a shorter lease).
# SKIP names steps to leave out: tests (1), mini (2), e.g. SKIP=tests,mini.
source experiments/timings/record.sh serving_on_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .local/whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || echo "gemlite: not installed"
export SERVING_AUTOTUNE_CACHE=$OUT/autotune.json
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
if [[ ",${SKIP:-}," != *,tests,* ]]; then
  echo "== GPU kernel tests"
  time timeout 200 python3 -m pytest -q -n 14 -p no:cacheprovider tests/test_serving_kernel.py 2>&1 | tail -8
fi
if [[ ",${SKIP:-}," != *,mini,* ]]; then
echo "== opt-mini: mixed 3.0, 50%, exported; the export evaluated and generating"
C="--data_dir $D --cache_dir /tmp/c1 --quiet"
export SERVING_AUTOTUNE=0  # correctness here: default launch configurations, no tuning
time timeout 150 python3 opt_enhanced.py $M c4 $C --sparsity 0.5 --wbits 3 --target_avg_bits 3.0 --export /tmp/mixed3 \
  --save /tmp/mixed3-fp16 --results_json $OUT/mixed3_run.json | tail -1
time timeout 150 python3 opt_enhanced.py /tmp/mixed3 c4 $C --results_json $OUT/mixed3_export_eval.json | tail -1
P="The history of the city begins in"
python3 generate.py /tmp/mixed3 --prompt "$P" --max_new_tokens 32 --json > $OUT/generate_export.json
python3 generate.py /tmp/mixed3-fp16 --prompt "$P" --max_new_tokens 32 --json > $OUT/generate_fp16.json
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
run, again = (json.load(open(f"{out}/{n}.json"))["perplexity"] for n in ("mixed3_run", "mixed3_export_eval"))
print("perplexity (run / export through the kernels / relative):",
      {d: (round(run[d], 3), round(again[d], 3), f"{again[d] / run[d] - 1:+.5f}") for d in run})
a, b = (json.load(open(f"{out}/generate_{n}.json")) for n in ("export", "fp16"))
print("greedy 32 tokens equal:", a["tokens"] == b["tokens"], "| export:", repr(a["text"][:80]))
PY
fi
echo "== serving benchmark"
export SERVING_AUTOTUNE=1
DEADLINE=${DEADLINE:-300}
timeout $((DEADLINE + 200)) python3 -m serving.benchmark --out $OUT --models ${MODELS:-opt-6.7b,opt-1.3b} --deadline $DEADLINE $BENCH_ARGS > $OUT/bench_stdout.txt 2>&1
echo "benchmark rc=$?"
cat $OUT/serving_table.txt 2>/dev/null || tail -30 $OUT/bench_stdout.txt
