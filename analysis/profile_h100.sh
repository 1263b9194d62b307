#!/usr/bin/env bash
# Profile the H100 for the simulator's cost model, in one GPU command (< 600 s): the llama2-7b shape,
# the project's small model, the cost-model accuracy benchmark on llama2-7b, a short simulator-vs-
# executor spot check, then llama3-8b with the time left. Results go to $OUT (at most 8 files).
#   PYTHONUNBUFFERED=1 OUT=out bash analysis/profile_h100.sh
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-eesim-out/profiles}; mkdir -p "$OUT"; L=$OUT/log.txt; S=$SECONDS
stamp() { echo "== $* at $((SECONDS - S)) s" >> "$L"; }
nvidia-smi --query-gpu=name,driver_version --format=csv > "$L"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$L" 2>&1
timeout 250 python -m eesim.profiler --model llama2-7b --out "$OUT/llama2-7b.parquet" --time-limit 195 --quiet >> "$L" 2>&1
stamp "llama2-7b profiled"
timeout 50 python -m eesim.profiler --model traces/small --out "$OUT/small.parquet" --time-limit 30 --quiet >> "$L" 2>&1
stamp "small profiled"
timeout 170 python benchmarks/cost_model_accuracy.py --profile "$OUT/llama2-7b.parquet" --model llama2-7b \
    --iterations 1000 --heldout-time 45 >> "$L" 2>&1
stamp "accuracy measured"
timeout 60 python -m eesim.cli execute --model llama2-7b --workload poisson:rate=4,duration=8 --rule all_confident \
    --kv-policy fill --with-simulation --quiet --out /tmp/eesim-execute >> "$L" 2>&1
stamp "execute spot check"
R=$((585 - (SECONDS - S)))
if [ "$R" -gt 70 ]; then
    timeout "$R" python -m eesim.profiler --model llama3-8b --out "$OUT/llama3-8b.parquet" --time-limit $((R - 45)) \
        --quiet >> "$L" 2>&1
fi
stamp "llama3-8b profiled"
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
