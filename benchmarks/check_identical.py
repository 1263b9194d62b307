"""Check that a change to the simulator's hot path leaves its results unchanged.

Runs ``simulate()`` for every exit rule x KV policy (plus a few variants: a tight cache that preempts,
step-by-step runs, two replicas, a decaying threshold, a hidden-state measure) on a synthetic
workload, and compares the request, iteration and work-log frames and the summary with a reference
taken before the change: counts exactly, times with rtol 1e-12. Usage:

    python benchmarks/check_identical.py --save     # on the code before the change: write the reference
    python benchmarks/check_identical.py            # after it: compare (exit status 1 on a difference)

The reference lives outside the repository (default /tmp/eesim_identical).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from eesim.exit_trace import synthesize_exit_trace
from eesim.hardware import HARDWARE_PRESETS
from eesim.model_spec import MODEL_PRESETS
from eesim.scheduler import SchedulerConfig
from eesim.simulator import SimConfig, simulate
from eesim.workload import synthetic_workload

RULES = ("full", "all_confident", "per_sequence", "quorum:q=0.6")
KV_POLICIES = ("fill", "copy_hidden", "recompute")
RTOL = 1e-12


def cases() -> dict[str, dict]:
    out = {f"{rule}/{kv}": dict(exit_rule=rule, kv_policy=kv) for rule in RULES for kv in KV_POLICIES}
    tight = SchedulerConfig(num_blocks=700, block_size=16)
    for kv in KV_POLICIES:
        out[f"all_confident/{kv}/tight"] = dict(exit_rule="all_confident", kv_policy=kv, scheduler=tight)
        out[f"quorum/{kv}/tight"] = dict(exit_rule="quorum", kv_policy=kv, scheduler=tight)
    out["all_confident/fill/step"] = dict(exit_rule="all_confident", kv_policy="fill", max_run_steps=1)
    out["per_sequence/fill/replicas2"] = dict(exit_rule="per_sequence", kv_policy="fill", replicas=2,
                                              router="least_outstanding")
    out["all_confident/fill/replicas2"] = dict(exit_rule="all_confident", kv_policy="copy_hidden", replicas=2)
    out["per_sequence/copy_hidden/decay_entropy"] = dict(exit_rule="per_sequence", kv_policy="copy_hidden",
                                                         measure="entropy", threshold="decay:1.5")
    out["all_confident/fill/decay"] = dict(exit_rule="all_confident", kv_policy="fill", threshold="decay:0.8")
    out["quorum/recompute/cosine"] = dict(exit_rule="quorum", kv_policy="recompute", measure="cosine",
                                          threshold=0.5)
    out["all_confident/fill/small_budget"] = dict(
        exit_rule="all_confident", kv_policy="fill", scheduler=SchedulerConfig(max_num_batched_tokens=256,
                                                                              max_num_seqs=8))
    return out


def work_frame(work_logs: dict) -> pd.DataFrame:
    """One row per step of every kept work record: every IterationWork field, per segment."""
    rows = []
    for replica, log in sorted(work_logs.items()):
        for index, starts, ends, work in log:
            for t in range(len(ends)):
                row = {"replica": replica, "iteration": index + t, "start": starts[t], "end": ends[t]}
                for name in type(work).__slots__:
                    value = np.asarray(getattr(work, name)[t])
                    for s, v in enumerate(np.atleast_1d(value).tolist()):
                        row[f"{name}[{s}]"] = v
                rows.append(row)
    return pd.DataFrame(rows)


def run_all() -> dict[str, dict]:
    model = MODEL_PRESETS["llama2-7b"]
    trace = synthesize_exit_trace(model.num_layers, model.all_exits, 300, seed=1)
    workload = synthetic_workload(rate=8.0, duration_s=40, seed=3).clip(model.max_context)[0]
    results = {}
    for name, kw in cases().items():
        result = simulate(workload, SimConfig(model, HARDWARE_PRESETS["h100"], trace, **kw))
        results[name] = {"requests": result.requests, "iterations": result.iterations,
                         "work": work_frame(result.work_logs), "summary": result.summary}
        print(f"{name:40s} {len(result.requests):5d} requests {len(result.iterations):7d} iterations "
              f"{int(result.summary['preemptions']):4d} preemptions", flush=True)
    return results


def compare_frames(name: str, ref: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    problems = []
    if list(ref.columns) != list(new.columns) or len(ref) != len(new):
        return [f"{name}: columns/length differ ({list(ref.columns)} x {len(ref)} vs {list(new.columns)} x {len(new)})"]
    for col in ref.columns:
        a, b = ref[col].to_numpy(), new[col].to_numpy()
        if a.dtype != b.dtype:
            problems.append(f"{name}.{col}: dtype {a.dtype} vs {b.dtype}")
        elif a.dtype.kind == "f":
            if not np.allclose(a, b, rtol=RTOL, atol=0.0, equal_nan=True):
                bad = int(np.argmax(~np.isclose(a, b, rtol=RTOL, atol=0.0, equal_nan=True)))
                problems.append(f"{name}.{col}: row {bad}: {a[bad]!r} vs {b[bad]!r}")
        elif not np.array_equal(a, b):
            bad = int(np.argmax(a != b))
            problems.append(f"{name}.{col}: row {bad}: {a[bad]!r} vs {b[bad]!r}")
    return problems


def compare_summary(name: str, ref: pd.Series, new: pd.Series) -> list[str]:
    if list(ref.index) != list(new.index):
        return [f"{name}.summary: keys differ"]
    problems = []
    for key in ref.index:
        a, b = ref[key], new[key]
        if isinstance(a, float) or isinstance(b, float):
            if not np.isclose(a, b, rtol=RTOL, atol=0.0, equal_nan=True):
                problems.append(f"{name}.summary.{key}: {a!r} vs {b!r}")
        elif a != b:
            problems.append(f"{name}.summary.{key}: {a!r} vs {b!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="write the reference instead of comparing")
    parser.add_argument("--reference", default="/tmp/eesim_identical")
    args = parser.parse_args()
    ref_dir = Path(args.reference)
    results = run_all()
    if args.save:
        ref_dir.mkdir(parents=True, exist_ok=True)
        summaries = {}
        for i, (name, frames) in enumerate(results.items()):
            for kind in ("requests", "iterations", "work"):
                frames[kind].to_parquet(ref_dir / f"{i:02d}_{kind}.parquet")
            summaries[name] = frames["summary"]
        (ref_dir / "summaries.pkl").write_bytes(pickle.dumps(summaries))
        print(f"reference for {len(results)} configurations written to {ref_dir}")
        return 0
    summaries = pickle.loads((ref_dir / "summaries.pkl").read_bytes())
    problems = []
    for i, (name, frames) in enumerate(results.items()):
        for kind in ("requests", "iterations", "work"):
            ref = pd.read_parquet(ref_dir / f"{i:02d}_{kind}.parquet")
            problems += compare_frames(f"{name}.{kind}", ref, frames[kind])
        problems += compare_summary(name, summaries[name], frames["summary"])
    for line in problems[:50]:
        print("DIFFERENT:", line)
    print(f"{len(results)} configurations: " + ("IDENTICAL" if not problems else f"{len(problems)} differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
