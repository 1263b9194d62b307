#!/usr/bin/env bash
# Train the project's `small` early-exit model and record its exit traces, in one GPU command (< 600 s).
#
#   PYTHONUNBUFFERED=1 bash analysis/train_and_record.sh        # from the repository root, on a GPU machine
#
# Writes traces/small/ (checkpoint, tokenizer, card.json), traces/exit_trace.parquet and
# traces/kv_policies.{csv,md}; when $OUT is set (the device tool's output folder) also copies them there,
# flat, with the log (log.txt). Steps: (a) train ~330 s, (b) record the exit trace on held-out files,
# (c) the KV-policy quality table on a few dozen held-out prompts, each copied out as soon as it exists.
set -euo pipefail

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-}"
CKPT=traces/small
TRACE=traces/exit_trace.parquet
KV=traces/kv_policies.csv
MAX_TRACE_BYTES=15000000
mkdir -p traces
LOG=/dev/null
if [[ -n "$OUT" ]]; then
    mkdir -p "$OUT"
    LOG="$OUT/log.txt"
fi

stamp() { echo "=== [$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }
copy_out() { if [[ -n "$OUT" ]]; then cp "$@" "$OUT/"; fi; }

main() {
stamp "start on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

# (a) training: batch 32 x 1024 tokens (the train.py docstring's setting); the run stops itself at 330 s.
TRAIN_CMD=(python -m eesim.model.train --out "$CKPT" --preset small --steps 20000 --batch 32 --seq-len 1024
           --max-corpus-mb 64 --time-budget-s 330 --save-dtype bfloat16 --log-every 250 --eval-every 1000)
stamp "train: ${TRAIN_CMD[*]}"
"${TRAIN_CMD[@]}"
chmod a+r "$CKPT"/*  # safetensors' temp file leaves model.safetensors 0600
ls -l "$CKPT"
copy_out "$CKPT/model.safetensors" "$CKPT/eesim_model.json" "$CKPT/tokenizer.json" "$CKPT/card.json"

# (b) exit trace: ~2,000 held-out prompts of 16..512 tokens, greedy continuations of 8..256 tokens,
# 96 sequences per lock-step batch (21 batches, so 21 drawn length pairs). Fewer prompts if over 15 MB.
for PROMPTS in 2016 1536 1024; do
    REC_CMD=(python -m eesim.model.record --checkpoint "$CKPT" --out "$TRACE" --num-prompts "$PROMPTS" --batch 96
             --prompt-min 16 --prompt-max 512 --cont-min 8 --cont-max 256 --max-files 400 --seed 0)
    stamp "record: ${REC_CMD[*]}"
    timeout 200 "${REC_CMD[@]}"
    SIZE=$(stat -c %s "$TRACE")
    stamp "trace size ${SIZE} bytes"
    if (( SIZE <= MAX_TRACE_BYTES )); then break; fi
    echo "trace over ${MAX_TRACE_BYTES} bytes; recording fewer prompts"
done
(( SIZE <= MAX_TRACE_BYTES )) || { echo "trace still too large"; exit 1; }
python - "$TRACE" <<'EOF' || echo "WARNING: read_exit_trace rejected the trace"
import sys
from eesim.exit_trace import read_exit_trace
t = read_exit_trace(sys.argv[1])
print(t.summary())
print(t.agreement_by_exit().to_string(index=False))
EOF
copy_out "$TRACE"

# (c) KV-policy quality table: 32 held-out prompts (16..512 tokens), 32-token continuations, each policy at
# max_prob >= 0.5 / 0.7 / 0.9, one sequence at a time. Bounded by what is left of the 600 s command.
LEFT=$(( 580 - SECONDS ))
if (( LEFT < 45 )); then
    stamp "skipping the KV-policy table: only ${LEFT}s left"
else
    KV_CMD=(python -m eesim.model.record --checkpoint "$CKPT" --no-trace --policies-out "$KV" --policy-prompts 32
            --policy-cont 32 --thresholds 0.5,0.7,0.9 --seed 0)
    stamp "kv policies (limit ${LEFT}s): ${KV_CMD[*]}"
    if timeout "$LEFT" "${KV_CMD[@]}"; then
        copy_out "$KV" "${KV%.csv}.md"
    else
        stamp "KV-policy table did not finish"
    fi
fi
stamp "done"
}

main 2>&1 | tee "$LOG"
