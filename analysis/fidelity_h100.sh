#!/usr/bin/env bash
# The fidelity study in one GPU command (< 600 s): profile llama2-7b on this machine (unless $PROFILE), then run the
# simulator-vs-executor matrix (benchmarks/fidelity_matrix.py: every exit rule x KV policy at the loads
# in $LOADS) against that profile; then, with the time left, the GPU correctness check of the executor's
# eager KV policies (unless CHECK=0). Results go to $OUT.   OUT=out LOADS=light:3,heavy:8 bash analysis/fidelity_h100.sh
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-eesim-out/fidelity}; mkdir -p "$OUT"; L=$OUT/log.txt; S=$SECONDS
LOADS=${LOADS:-light:3,heavy:8}; DURATION=${DURATION:-10}; WARMUP=${WARMUP:-0}; PROFILE_TIME=${PROFILE_TIME:-115}
OWING=""; [ "${GRAPHED_OWING:-1}" = 0 ] && OWING=--no-graphed-owing  # GRAPHED_OWING=0: GPUExecutor.graphed_owing off, profiled so too
left() { echo $((${BUDGET:-585} - (SECONDS - S))); }  # BUDGET: seconds this script may take
nvidia-smi --query-gpu=name,driver_version --format=csv > "$L"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$L" 2>&1
# PROFILE: a profile of this machine to use as it is (default: measure one now, for at most $PROFILE_TIME s (the
# sweep is resumable: a rerun with the same $OUT completes it), at the preset's exits;
# the matrix prices the recorded trace's exits 8/16/24 through profile_cost.restrict_exits)
PROFILE=${PROFILE:-}
if [ -z "$PROFILE" ]; then
    PROFILE=$OUT/llama2-7b.parquet
    timeout $((PROFILE_TIME + 40)) python -m eesim.profiler --model llama2-7b --out "$PROFILE" --time-limit "$PROFILE_TIME" \
        --quiet $OWING >> "$L" 2>&1
    echo "== profiled at $((SECONDS - S)) s" >> "$L"
fi
R=$(left)
timeout "$R" python benchmarks/fidelity_matrix.py --profile "$PROFILE" --loads "$LOADS" \
    --duration "$DURATION" --warmup "$WARMUP" --time-limit $((R - 60)) --out "$OUT" $OWING >> "$L" 2>&1
echo "== matrix at $((SECONDS - S)) s" >> "$L"
R=$(left)
if [ "${CHECK:-1}" != 0 ] && [ "$R" -gt 40 ]; then  # CHECK=0: no correctness check after the matrix
    timeout "$R" python benchmarks/gpu_check.py --policies copy_hidden,recompute >> "$L" 2>&1
    echo "== gpu check (rc $?) at $((SECONDS - S)) s" >> "$L"
fi
tail -c 11000 "$L"
