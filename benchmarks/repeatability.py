"""How well does the machine repeat one profile point between sweeps? (GPU diagnostic)

The cost-model accuracy benchmark's noise floor (cost_model_accuracy.py, part (c)) found the profile's own grid
points measured again two minutes later differing by a median 2.9% and a 95th percentile of 11.7% (H100,
2026-11-23), the partial-depth decode points (steps that wait on the host at each exit check) in blocks of
consecutive points 10-18% slower, full-depth points within 3%. This measures a few points the way the profiler
does (``Profiler.measure``: configure, warm-up, repeats, median), round after round, cycling through the points so
that each measurement reconfigures the executor as a sweep does, and prints each point's spread over the rounds.
``--pin CPU`` first pins the process to one CPU (``os.sched_setaffinity``): does host jitter drive the spread?

    PYTHONPATH=$PWD python benchmarks/repeatability.py [--rounds 8] [--pin 3]
    PYTHONPATH=$PWD python benchmarks/repeatability.py --tiny        # the small shape on CPU (checks the script)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.model_spec import MODEL_PRESETS  # noqa: E402
from eesim.profiler import ProfileGrid, Profiler, build_executor  # noqa: E402

# (component, layers, batch, context, tokens, checks): full depth (one graph) and exits that wait on the host
POINTS = [("decode", 32, 4, 512, 0, 0), ("decode", 32, 16, 512, 0, 0), ("decode", 12, 12, 256, 0, 0),
          ("decode", 16, 4, 128, 0, 0), ("decode", 24, 16, 512, 0, 0), ("check", 32, 8, 512, 0, 7)]
TINY = [("decode", 8, 4, 64, 0, 0), ("decode", 4, 4, 64, 0, 0), ("check", 8, 2, 32, 0, 3)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--pin", type=int, default=-1, help="pin the process to this CPU first (-1: no pinning)")
    ap.add_argument("--time-limit", type=float, default=150.0, help="stop starting rounds after this many seconds")
    ap.add_argument("--tiny", action="store_true", help="the small shape on CPU, two rounds (checks the script)")
    args = ap.parse_args(argv)
    if args.pin >= 0:
        os.sched_setaffinity(0, {args.pin})
    if args.tiny:
        spec, device, dtype, points = MODEL_PRESETS["small"], "cpu", torch.float32, TINY
        grid, args.rounds = ProfileGrid(warmup=1, repeats=2, check_context=32), 2
    else:
        spec, device, dtype, points = MODEL_PRESETS["llama2-7b"], "cuda", torch.bfloat16, POINTS
        grid = ProfileGrid()
    spec, ex = build_executor(spec, None, device, dtype, grid, 6.0, backend="torch" if args.tiny else None,
                              cuda_graphs=not args.tiny, max_positions=64 * 1024)
    prof = Profiler(spec, ex, grid, None, {}, progress=False)
    medians: dict[tuple, list[float]] = {p: [] for p in points}
    setting, started = None, time.perf_counter()
    for r in range(args.rounds):
        if time.perf_counter() - started > args.time_limit:
            break
        for point in points:
            setting = prof.measure(point, setting)
            medians[point].append(float(np.median(prof._times[point][-grid.repeats:])) * 1e3)
    cpus = sorted(os.sched_getaffinity(0))
    print(f"{spec.name}; {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; CPUs {cpus[:4]}"
          f"{'...' if len(cpus) > 4 else ''} ({len(cpus)}); {len(next(iter(medians.values())))} rounds; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"{'point':>34}  {'median ms':>9}  {'min':>7}  {'max':>7}  {'max/min':>7}  rounds (ms)")
    for point, m in medians.items():
        a = np.array(m)
        print(f"{str(point[:4]):>34}  {np.median(a):9.3f}  {a.min():7.3f}  {a.max():7.3f}  {a.max() / a.min():7.3f}  "
              + " ".join(f"{x:.2f}" for x in a), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
