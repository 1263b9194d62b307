"""Why are steps that end at an exit served slower than the profile's points for them? (GPU diagnostic)

The fidelity runs (docs/fidelity.md, fourteenth measurement) served decode steps whose rows all leave at an exit
0.2-0.7 ms slower than the profile's own points for the same work, on every KV policy, while steps that run to full
depth matched. The profiler times a point by executing one plan several times back to back; a server runs a leave
step between steps of other kinds, sometimes after the GPU idled. This times the same leave step (every row out at
the first of the trace's exits, 8/16/24 of 32, Llama-2-7B shape, random weights, CUDA graphs) four ways, for fill and
recompute, and the full-depth step beside it:

- ``repeat``: back to back, as the profiler does;
- ``after_full``: each one right after a full-depth step of the same rows (as served, where most steps stay);
- ``after_idle``: each one after the GPU idled 2 ms (a server waiting for arrivals);
- ``full``: the full-depth step, back to back (the control: served full-depth steps matched their price).

Each line prints the median CUDA-event time (``outcome.elapsed``) and the wall time of ``execute``; a leave step
that is slower ``after_full`` or ``after_idle`` than ``repeat`` by about the served gap locates it.

    PYTHONPATH=$PWD python benchmarks/leave_gap.py [--batches 1,2,4] [--contexts 512,2048] [--repeats 15]
    PYTHONPATH=$PWD python benchmarks/leave_gap.py --tiny        # the small shape on CPU (checks the script)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_decode import decode_plan  # noqa: E402
from eesim.model_spec import MODEL_PRESETS  # noqa: E402
from eesim.policies import ExitRule  # noqa: E402
from eesim.profiler import ProfileGrid, build_executor  # noqa: E402


class LeaveOrStay(ExitRule):
    """Every row leaves at exit ``k`` while ``leave`` is set, else nobody leaves (every exit still checked): one
    executor configuration for both kinds of step, so that switching between them changes nothing else."""

    name = "leave_or_stay"

    def __init__(self, k: int) -> None:
        self.k, self.leave = int(k), True

    def decide(self, confident: np.ndarray, active: np.ndarray, exit_index: int) -> np.ndarray:
        return active.copy() if self.leave and exit_index == self.k else np.zeros_like(active)


def timed(ex, plan) -> tuple[float, float]:
    """(CUDA-event seconds, wall seconds) of one ``execute``."""
    t0 = time.perf_counter()
    out = ex.execute(plan)
    return float(out.elapsed[0]), time.perf_counter() - t0


def measure(ex, rule: LeaveOrStay, plan, mode: str, repeats: int) -> tuple[float, float]:
    """Median (event, wall) milliseconds of the leave step (or, for ``full``, the stay step) in ``mode``."""
    events, walls = [], []
    for i in range(repeats + 2):  # the first two: warm-up
        if mode == "after_full":
            rule.leave = False
            ex.execute(plan)
        elif mode == "after_idle":
            if ex.device.type == "cuda":
                torch.cuda.synchronize()
            time.sleep(0.002)
        rule.leave = mode != "full"
        e, w = timed(ex, plan)
        if i >= 2:
            events.append(e)
            walls.append(w)
    rule.leave = True
    return float(np.median(events)) * 1e3, float(np.median(walls)) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--policies", default="fill,recompute")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="the small shape on CPU, few repeats (checks the script)")
    args = ap.parse_args(argv)
    if args.tiny:
        spec, device, dtype = MODEL_PRESETS["small"], "cpu", torch.float32
        args.batches, args.contexts, args.repeats = "1,2", "64", 2
    else:
        spec, device, dtype = MODEL_PRESETS["llama2-7b"].with_exits((8, 16, 24)), "cuda", torch.bfloat16
    modes = ("repeat", "after_full", "after_idle", "full")
    _, ex = build_executor(spec, None, device, dtype, ProfileGrid(), 6.0, backend="torch" if args.tiny else None,
                           cuda_graphs=not args.tiny, max_positions=64 * 4096)
    rule = LeaveOrStay(0)
    print(f"{spec.name}, exits {list(spec.exit_layers)}, leave at {spec.exit_layers[0]}; "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; median ms: CUDA events / execute wall")
    print(f"{'policy':>10} {'batch':>5} {'ctx':>5}  " + "  ".join(f"{m:>17}" for m in modes))
    for policy in args.policies.split(","):
        ex.configure(spec, rule, policy, "max_prob", 0.9, "model", None)
        for b in (int(x) for x in args.batches.split(",")):
            for c in (int(x) for x in args.contexts.split(",")):
                _, plan = decode_plan(ex, b, c)
                cells = [measure(ex, rule, plan, m, args.repeats) for m in modes]
                print(f"{policy:>10} {b:>5} {c:>5}  " + "  ".join(f"{e:8.3f} / {w:6.3f}" for e, w in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
