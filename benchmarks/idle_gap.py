"""Diagnostic: does a decode step run slower when the host or the GPU pauses between steps? (GPU)

The profiler times each point's steps back to back; a served engine pauses between steps (its scheduling and
bookkeeping, ~0.05-0.3 ms) and, at a light load, sleeps between requests. In the eighth fidelity measurement
(docs/fidelity.md) the light load's plain decode steps ran ~4% slower than the profile priced them while the
heavy load's, on the same machine with the same profile, matched. This times one batch-1 full-depth decode step
(llama2-7b shape, replay, CUDA graphs; CUDA-event ``elapsed`` as the profiler reads it, and the host's wall
time of ``execute``) back to back, then with a pause of P ms before every step, the host either sleeping
(``time.sleep``, as ``serve`` waits for a request) or spinning (the CPU stays busy, only the GPU idles).

Usage:  PYTHONPATH=$PWD python benchmarks/idle_gap.py [--pauses 0,0.1,1,5,20,100] [--repeats 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_decode import BLOCK, decode_plan, tiny_spec  # noqa: E402

from eesim.exit_trace import synthesize_exit_trace  # noqa: E402
from eesim.gpu.executor import GPUExecutor  # noqa: E402
from eesim.gpu.weights import build_random_model  # noqa: E402
from eesim.model_spec import MODEL_PRESETS  # noqa: E402


def pause(seconds: float, how: str) -> None:
    if seconds <= 0:
        return
    if how == "sleep":
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pauses", default="0,0.1,1,5,20,100", help="ms before every step (comma list)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the pauses (drift shows between them)")
    ap.add_argument("--tiny", action="store_true", help="a small shape on the CPU (checks the script, times nothing)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("idle_gap: needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    spec = tiny_spec() if args.tiny else MODEL_PRESETS["llama2-7b"]
    ctx = min(args.context, spec.max_context - 1)
    model = build_random_model(spec, dev, dtype, seed=0)
    trace = synthesize_exit_trace(spec.num_layers, spec.all_exits, 16, seed=0)
    ex = GPUExecutor(model, spec, "full", "fill", "max_prob", 0.9, mode="replay", trace=trace, device=dev,
                     dtype=dtype, num_blocks=args.batch * (ctx // BLOCK + 2) + 2, block_size=BLOCK, cuda_graphs=True)
    _, plan = decode_plan(ex, args.batch, ctx)
    for _ in range(5):
        ex.execute(plan)
    print(f"{torch.cuda.get_device_name() if not args.tiny else 'CPU'}; {spec.name} {dtype}, batch {args.batch}, "
          f"context {ctx}, full depth; medians of {args.repeats} steps")
    print(f"{'round':>5} {'pause ms':>9} {'host':>6} {'elapsed ms':>11} {'wall ms':>8} {'first ms':>9}")
    for r in range(args.rounds):
        for p in (float(x) for x in args.pauses.split(",")):
            for how in (("sleep", "spin") if p > 0 else ("none",)):
                el, wall = [], []
                for _ in range(args.repeats):
                    pause(p / 1e3, how)
                    t0 = time.perf_counter()
                    out = ex.execute(plan)
                    wall.append(time.perf_counter() - t0)
                    el.append(float(out.elapsed[0]))
                print(f"{r:>5} {p:>9g} {how:>6} {np.median(el) * 1e3:>11.3f} {np.median(wall) * 1e3:>8.3f} "
                      f"{el[0] * 1e3:>9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
