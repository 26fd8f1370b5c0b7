# Sourced by the measurement scripts here: `source experiments/timings/record.sh NAME` from the repository root.
# Sets OUT (a new folder unless given), unbuffered Python and `time` in seconds, M and D (the copies of
# ../shared/models/opt-mini and ../shared/data in .local/), logs everything to $OUT/NAME.log, and names the GPU.
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 TIMEFORMAT="wall %R s"
M=$PWD/.local/opt-mini; D=$PWD/.local/data
exec > >(tee -a "$OUT/$1.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
