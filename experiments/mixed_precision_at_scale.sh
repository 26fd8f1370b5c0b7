#!/usr/bin/env bash
# What mixed precision costs at the published OPT shapes (random weights, 128 x 2048
# random calibration tokens), next to 50% + uniform 4-bit on the same machine. Needs no data.
# Usage: bash experiments/mixed_precision_at_scale.sh [part1|part2|part3|part4]
source experiments/record.sh mixed_precision_at_scale
U="--sparsity 0.5 --wbits 4"
B="$U --target_avg_bits 4 --bit_method budget"
Q="$U --target_avg_bits 4 --bit_method quantile"
S="$B --bit_scope model"
shape() { echo "== $*"; timeout 580 python3 bench.py --synthetic "$@" || echo "exit $?"; }
case ${1:-part1} in
part1)
    shape opt-125m -- $B
    shape opt-6.7b -- $U
    shape opt-6.7b -- $B
    shape opt-6.7b -- $Q
    shape opt-175b --layers 2 --offload -- $B ;;
part2)
    shape opt-125m -- $B  # a fresh machine compiles the mixed-bits kernel here: not a timing
    shape opt-125m -- $U
    shape opt-125m -- $B
    shape opt-1.3b -- $U
    shape opt-1.3b -- $B
    shape opt-1.3b -- $S
    shape opt-6.7b -- $U
    shape opt-6.7b -- $S ;;
part3)  # after output_sensitivity went layer by layer (part2's opt-6.7b model scope ran out of memory)
    shape opt-1.3b -- $S
    shape opt-6.7b -- $S ;;
part4)
    shape opt-125m -- $B  # compiles the kernel on a fresh machine: not a timing
    shape opt-13b -- $U
    shape opt-13b -- $S ;;
esac
