#!/usr/bin/env bash
# One GPU command (< 600 s) that checks the executor on the H100 and profiles it for the simulator's cost
# model: the compiled kernels and both executor paths against the CPU references (benchmarks/
# gpu_check.py), the kernel benchmark, the llama2-7b profile, the cost-model accuracy benchmark against it,
# a short simulator-vs-executor spot check, then (with the time left) the small and llama3-8b shapes.
# Results go to $OUT.  PYTHONUNBUFFERED=1 OUT=out bash analysis/profile_h100.sh
# STEPS (default "check kernels 7b accuracy spot small 8b") picks the parts.
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-eesim-out/profiles}; mkdir -p "$OUT"; L=$OUT/log.txt; S=$SECONDS
STEPS=${STEPS:-check kernels 7b accuracy spot small 8b}
has() { [[ " $STEPS " == *" $1 "* ]]; }
stamp() { echo "== $* at $((SECONDS - S)) s" >> "$L"; }
left() { echo $((585 - (SECONDS - S))); }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$L"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$L" 2>&1
if has check; then timeout 120 python benchmarks/gpu_check.py >> "$L" 2>&1; stamp "gpu check (rc $?)"; fi
if has kernels; then timeout 90 python kernels/bench_kernels.py --quick >> "$L" 2>&1; stamp "kernels"; fi
if has 7b; then
    timeout 250 python -m eesim.profiler --model llama2-7b --out "$OUT/llama2-7b.parquet" --time-limit 195 --quiet >> "$L" 2>&1
    stamp "llama2-7b profiled"
fi
if has accuracy; then
    timeout 170 python benchmarks/cost_model_accuracy.py --profile "$OUT/llama2-7b.parquet" --model llama2-7b \
        --iterations 1000 --heldout-time 45 >> "$L" 2>&1
    stamp "accuracy measured"
fi
if has spot; then
    timeout 60 python -m eesim.cli execute --model llama2-7b --workload poisson:rate=4,duration=8 --rule all_confident \
        --kv-policy fill --with-simulation --quiet --out /tmp/eesim-execute >> "$L" 2>&1
    stamp "execute spot check"
fi
if has small && [ "$(left)" -gt 60 ]; then
    timeout 50 python -m eesim.profiler --model traces/small --out "$OUT/small.parquet" --time-limit 30 --quiet >> "$L" 2>&1
    stamp "small profiled"
fi
R=$(left)
if has 8b && [ "$R" -gt 70 ]; then
    timeout "$R" python -m eesim.profiler --model llama3-8b --out "$OUT/llama3-8b.parquet" --time-limit $((R - 45)) \
        --quiet >> "$L" 2>&1
    stamp "llama3-8b profiled"
fi
python - "$OUT" >> "$L" 2>&1 <<'PY'
import glob, sys
from eesim.profile_data import read_profile
for f in sorted(glob.glob(sys.argv[1] + "/*.parquet")):
    try:
        p = read_profile(f)
        print(f, len(p.frame), p.frame.groupby("component").size().to_dict())
    except Exception as err:  # heldout.parquet is not a profile
        print(f, "not a profile:", err)
PY
tail -c 11000 "$L"
