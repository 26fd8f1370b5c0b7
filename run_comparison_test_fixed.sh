#!/usr/bin/env bash
# Uniform quantization vs activation-aware mixed precision at the same average bits, one table.
#
#   MODEL=../shared/models/opt-mini DATA_DIR=../shared/data bash run_comparison_test_fixed.sh
#
# Environment: MODEL (default facebook/opt-125m), CALIB (calibration set, default c4), DATA_DIR
# (offline data; default: the hub), SPARSITY (default 0.5), EXTRA (more opt_enhanced.py flags for
# every run), OUT (where the JSON goes; default a temporary directory), ONLY (comma-separated run names: those
# runs alone; default all nine).
# Bits are shown three ways: nominal (code bits over all weights), stored (code bits per stored weight, what
# --target_avg_bits sets) and effective (everything the packed form holds: codes, ranges, mask, bit map).
# Fails if a run reports no quantized channel or a mixed run's stored average is off its target by > 0.02.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-facebook/opt-125m}
CALIB=${CALIB:-c4}
SPARSITY=${SPARSITY:-0.5}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
common="--sparsity $SPARSITY ${EXTRA:-}"
cat > "$OUT/configs.txt" <<CONFIGS
uniform-4bit|$common --wbits 4
quantile-4.0|$common --wbits 4 --target_avg_bits 4.0 --bit_method quantile
budget-4.0|$common --wbits 4 --target_avg_bits 4.0 --bit_method budget
budget-4.0-layer|$common --wbits 4 --target_avg_bits 4.0 --bit_method budget --bit_scope layer
budget-4.0-linear|$common --wbits 4 --target_avg_bits 4.0 --bit_method budget --bit_granularity linear
quantile-3.5|$common --wbits 4 --target_avg_bits 3.5 --bit_method quantile
budget-3.5|$common --wbits 4 --target_avg_bits 3.5 --bit_method budget
uniform-3bit|$common --wbits 3
budget-3.0|$common --wbits 3 --target_avg_bits 3.0 --bit_method budget
CONFIGS
if [ -n "${ONLY:-}" ]; then
  grep -E "^($(echo "$ONLY" | sed 's/,/|/g'))\|" "$OUT/configs.txt" > "$OUT/only.txt" && mv "$OUT/only.txt" "$OUT/configs.txt"
fi
data=()
if [ -n "${DATA_DIR:-}" ]; then data=(--data_dir "$DATA_DIR"); fi
python3 bench.py "$MODEL" --dataset "$CALIB" --configs "$OUT/configs.txt" "${data[@]}" --json "$OUT/results.json"
python3 - "$OUT/results.json" <<'CHECK'
import json, sys
bad = []
for name, res in json.load(open(sys.argv[1])).items():
    cfg, summary = res["config"], res["summary"]
    if summary is None or summary["channels"] == 0:
        bad.append(f"{name}: no quantized channel")
    elif cfg["target_avg_bits"] is not None and abs(summary["stored_bits"] - cfg["target_avg_bits"]) > 0.02:
        bad.append(f"{name}: stored average {summary['stored_bits']:.3f} bits, target {cfg['target_avg_bits']}")
print("\n".join(bad) if bad else f"all {len(json.load(open(sys.argv[1])))} runs quantized, mixed runs' stored "
      "averages within 0.02 of their targets")
sys.exit(1 if bad else 0)
CHECK
