#!/usr/bin/env bash
# benchmarks/mixed_cost.md, "GPU": what a mixed run costs against a uniform one on one GPU machine, with the GPU's
# clip search (full) and with the CPU's (once: the plan's factors kept for the solve), and whether once keeps the
# quality of BENCHMARKS.md section 3 there. From the repository root, with .local/ copies of ../shared.
#   stages  bench.py --synthetic --stages: OPT-1.3B (4 layers), OPT-6.7B (2) warm (--repeat 2), OPT-175B width (2
#           layers): uniform 50% + 4-bit, the headline's quantile 4.0 with full and with once (about 6 minutes);
#   bar     the bar rows at 50% sparsity, 4.0 and 3.0 stored bits, budget and quantile, full against once, seeds 0-2,
#           validation texts only (configs/ablations/clip_search.txt, bar-* rows; about 6 minutes).
#   sens    the loss-sensitivity pass on the first 32 of the 128 windows, with once: budget and quantile at 4.0,
#           against uniform and once on all windows, seeds 0-2 (about 5 minutes).
# STEPS picks them (default: stages,bar); each fits one 10-minute device command.
source experiments/timings/record.sh mixed_cost_on_gpu
STEPS=${STEPS:-stages,bar}
U="--sparsity 0.5 --wbits 4"; Q="$U --target_avg_bits 4.0 --bit_method quantile"
if [[ ",$STEPS," == *,stages,* ]]; then
  for shape in "opt-1.3b 4 2" "opt-6.7b 2 2" "opt-175b 2 1"; do
    set -- $shape
    for kind in uniform full once; do
      case $kind in uniform) flags=$U ;; full) flags="$Q --clip_search full" ;; once) flags="$Q --clip_search once" ;; esac
      j=$OUT/stages_$1_$kind.json
      echo "== $1, $2 layers: $flags"
      timeout 200 python3 bench.py --synthetic $1 --layers $2 --repeat $3 --stages --json $j -- $flags | grep "before the first"
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); r=r['runs'][-1] if r.get('runs') else r; \
print('compress s', round(r['compress_s'], 2), 'per layer', [round(x, 2) for x in r.get('per_layer_wall_s', [])], \
'stages', {k: round(v, 2) for k, v in r.get('stage_s', {}).items()}, 'peak GPU GiB', round(r['peak_gpu_gib'], 1))" $j
    done
  done
fi
sweep() {  # sweep NAME RUNS: those rows of configs/ablations/clip_search.txt, seeds 0-2, validation texts
  time timeout 560 python3 experiments/mixed_precision_sweep.py run configs/ablations/clip_search.txt $OUT/$1.json \
    --seeds 0,1,2 --model $M --data_dir $D --cache_dir /tmp/c-bar --texts wt2-valid,ptb-valid,c4-heldout --only $2 \
    | tail -3
  python3 experiments/mixed_precision_sweep.py table $OUT/$1.json
  python3 experiments/mixed_precision_sweep.py score $OUT/$1.json --validation ptb-valid,c4-heldout
}
if [[ ",$STEPS," == *,bar,* ]]; then
  echo "== the bar rows, full against once, seeds 0-2"
  sweep bar bar-s50-uniform4,bar-s50-uniform3,bar-s50-budget4-full,bar-s50-budget4-once,bar-s50-quantile4-full,bar-s50-quantile4-once,bar-s50-budget3-full,bar-s50-budget3-once,bar-s50-quantile3-full,bar-s50-quantile3-once
fi
if [[ ",$STEPS," == *,sens,* ]]; then
  echo "== the sensitivity pass on 32 windows, seeds 0-2"
  sweep sens bar-s50-uniform4,bar-s50-budget4-once,bar-s50-budget4-once-sens32,bar-s50-quantile4-once,bar-s50-quantile4-once-sens32
fi
