"""Benchmark: where a forced-exit decode step's time goes, and what a switch between kinds of step costs.

Llama-2-7B shape (random bf16 weights, CUDA graphs), one exit at layer ``e`` (``ModelSpec.with_exits``),
every row forced out there under fill. For each batch and exit layer:
  full / exit     medians of back-to-back full-depth steps and exit steps (CUDA events around execute);
  stay            a step that checks the exit and lets nobody leave (the rest of the depth after the check);
  alternating     stay and exit steps interleaved one by one, as under all_confident when a batch leaves in
                  some iterations and not in others (the rule is switched between steps, no reconfiguration):
                  medians of each kind;
  byte speedup    full-depth bytes / exit-step bytes (layers run, heads, KV read, fill's projections):
                  what the step time would give if it tracked the bytes; ``measured`` = full / exit;
  host phases     medians of the host's timeline inside an exit step (perf_counter): launch of the
                  stretch, the confidence read (returns when the GPU has finished the stretch), the
                  decision up to the fill's launch (the GPU idles through it), the fill's launch, and
                  the rest (the token read at the end; under recompute, which projects nothing, all that
                  follows the decision).
``--policies`` runs the exit steps under other KV policies (copy_hidden, recompute) beside fill.
Prints a table; writes ``exit_step.csv`` to $OUT when set.

Usage (H100):  python benchmarks/exit_step.py [--batches 1,8,32] [--exits 8,16,24]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_decode import BLOCK, decode_plan, step_bytes, tiny_spec  # noqa: E402

from eesim.exit_trace import synthesize_exit_trace  # noqa: E402
from eesim.forced_exits import ExitAt  # noqa: E402
from eesim.gpu.executor import GPUExecutor  # noqa: E402
from eesim.gpu.weights import build_random_model  # noqa: E402
from eesim.model_spec import MODEL_PRESETS  # noqa: E402


class PhaseClock:
    """perf_counter stamps around the executor's exit-step calls (wrapped on the instance only)."""

    def __init__(self, ex: GPUExecutor) -> None:
        self.stamps: list[tuple[str, float]] = []
        self.wrapped: list[tuple[object, str]] = []
        self._wrap(ex, "_to_host", "_to_host")
        fills = getattr(ex, "_fill_graphs", None)  # the projection's launch (eager before fill_graphs)
        self._wrap(fills, "run", "fill") if fills is not None else self._wrap(ex, "project_kv", "fill")
        graphs = ex._segment_graphs
        run = graphs.run

        def timed_run(*a, **k):
            self.stamps.append(("stretch>", time.perf_counter()))
            out = run(*a, **k)
            self.stamps.append(("stretch<", time.perf_counter()))
            return out
        graphs.run = timed_run
        self.wrapped.append((graphs, "run"))

    def _wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)
        self.wrapped.append((obj, name))

        def timed(*a, **k):
            self.stamps.append((label + ">", time.perf_counter()))
            out = fn(*a, **k)
            self.stamps.append((label + "<", time.perf_counter()))
            return out
        setattr(obj, name, timed)

    def remove(self) -> None:
        for obj, name in self.wrapped:
            delattr(obj, name)  # the instance attribute: the method shows through again

    def phases(self, t0: float, t_end: float) -> dict[str, float]:
        s = dict(self.stamps)
        s.setdefault("fill>", s["_to_host<"])  # no projection (recompute): nothing launched after the decision
        s.setdefault("fill<", s["fill>"])
        out = dict(launch=s["stretch<"] - t0, wait_conf=s["_to_host<"] - s["stretch<"],
                   decide=s["fill>"] - s["_to_host<"], fill_launch=s["fill<"] - s["fill>"],
                   tokens=t_end - s["fill<"])
        self.stamps.clear()
        return out


def median_steps(ex, plan, n: int) -> float:
    return float(np.median([ex.execute(plan).elapsed[0] for _ in range(n)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--exits", default="8,16,24")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--policies", default="fill", help="KV policies of the exit steps (comma list)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="a small shape on the CPU (checks the script, times nothing)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("exit_step: needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2
    import pandas as pd

    dev = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    spec = tiny_spec() if args.tiny else MODEL_PRESETS["llama2-7b"]
    L, ctx = spec.num_layers, args.context
    batches = [int(b) for b in args.batches.split(",")]
    model = build_random_model(spec, dev, dtype, seed=0)
    num_blocks = max(batches) * (ctx // BLOCK + 2) + 2
    trace = synthesize_exit_trace(L, spec.all_exits, 64, seed=0)
    ex = GPUExecutor(model, spec, "full", "fill", "max_prob", 0.9, mode="replay", trace=trace, device=dev,
                     dtype=dtype, num_blocks=num_blocks, block_size=BLOCK, cuda_graphs=True)
    with torch.no_grad():
        ex.k_cache.normal_(0, 1)
        ex.v_cache.normal_(0, 1)
    rows = []
    print(f"{torch.cuda.get_device_name() if not args.tiny else 'CPU'}; {spec.name} {dtype}, context {ctx}, medians of {args.repeats}")
    for policy, e in ((p, int(x)) for p in args.policies.split(",") for x in args.exits.split(",")):
        spec_e = spec.with_exits((e,))
        trace_e = synthesize_exit_trace(L, spec_e.all_exits, 16, seed=0)
        for batch in batches:
            full = ("full", policy, "max_prob", 0.9, "replay", trace_e)
            exit_ = (ExitAt(0), policy, "max_prob", 0.9, "replay", trace_e)
            ex.configure(spec_e, *full)
            _, plan = decode_plan(ex, batch, ctx)
            for _ in range(3):
                ex.execute(plan)
            t_full = median_steps(ex, plan, args.repeats)
            ex.configure(spec_e, *exit_)
            for _ in range(3):
                out = ex.execute(plan)
            assert (out.exit_index == 0).all()
            t_exit = median_steps(ex, plan, args.repeats)
            rule = ex.rule  # the ExitAt instance: k = 1 (the final exit) makes a step that checks and stays
            rule.k = 1
            t_stay = median_steps(ex, plan, args.repeats)
            alt_stay, alt_leave = [], []
            for _ in range(args.repeats):
                rule.k = 1
                alt_stay.append(ex.execute(plan).elapsed[0])
                rule.k = 0
                alt_leave.append(ex.execute(plan).elapsed[0])
            clock = PhaseClock(ex)
            phases = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ex.execute(plan)
                phases.append(clock.phases(t0, time.perf_counter()))
            clock.remove()
            ph = {k: float(np.median([p[k] for p in phases])) * 1e6 for k in phases[0]}
            b_full = step_bytes(spec, batch, ctx, L)
            b_exit = step_bytes(spec, batch, ctx, e, fill_layers=L - e)
            row = dict(policy=policy, batch=batch, exit_layer=e, full_ms=t_full * 1e3, exit_ms=t_exit * 1e3, stay_ms=t_stay * 1e3,
                       alt_stay_ms=float(np.median(alt_stay)) * 1e3, alt_exit_ms=float(np.median(alt_leave)) * 1e3,
                       exit_floor_ms=b_exit / 2.98e12 * 1e3, byte_speedup=b_full / b_exit,
                       measured_speedup=t_full / t_exit, **{f"host_{k}_us": v for k, v in ph.items()})
            rows.append(row)
            print(f"{policy} exit {e:2d} B={batch:<3d} full {t_full * 1e3:6.3f}  exit {t_exit * 1e3:6.3f} ms "
                  f"(floor {row['exit_floor_ms']:.3f}); stay {t_stay * 1e3:6.3f}; alternating stay {row['alt_stay_ms']:6.3f} exit "
                  f"{row['alt_exit_ms']:6.3f}; speedup {row['measured_speedup']:.3f} vs bytes {row['byte_speedup']:.3f}"
                  f" | host us: " + " ".join(f"{k} {v:.0f}" for k, v in ph.items()), flush=True)
    frame = pd.DataFrame(rows)
    if os.environ.get("OUT"):
        frame.to_csv(Path(os.environ["OUT"]) / "exit_step.csv", index=False)
    print(frame.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
