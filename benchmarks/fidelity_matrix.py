"""Benchmark: the simulator against the GPU executor, for every exit rule x KV policy at two loads (GPU).

What ``eesim validate`` does for one configuration, over the whole matrix in one process (the 7B
executor is built once and reconfigured; its weights and cache stay): for each load and each policy
pair, serve the workload in real time on the executor (after validate's warm-up: the decode graphs
captured up front, then untimed passes until one captures nothing), simulate the same workload with
the profile-backed cost model (``--profile``, measured on the same machine; priced for each pair's KV
policy), and record
the simulator's error per metric. Replay mode at the llama2-7b shape, exits from the project's recorded
trace (max_prob >= 0.9), the code-service workload (Azure-code-fitted lengths), Poisson arrivals.

Writes fidelity_matrix.csv (one row per load x policy x metric; the request-level errors with their 95%
band over the requests, ``error_lo`` / ``error_hi``), fidelity_runs.csv (both runs' summaries),
fidelity_iterations.parquet and fidelity_requests.parquet (every iteration and every request of both runs)
to --out, and prints the errors with the worst case per metric. Stops starting new runs after --time-limit
seconds (what ran is kept).

Usage:  PYTHONPATH=$PWD python benchmarks/fidelity_matrix.py --profile traces/profiles/llama2-7b.parquet
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eesim.config import SimConfig  # noqa: E402
from eesim.defaults import load_exit_trace  # noqa: E402
from eesim.hardware import hardware_preset  # noqa: E402
from eesim.model_spec import model_preset  # noqa: E402
from eesim.policies import measure  # noqa: E402
from eesim.policies.thresholds import parse_threshold  # noqa: E402
from eesim.profile_data import read_profile  # noqa: E402
from eesim.profiler import ProfileGrid  # noqa: E402
from eesim.scheduler import SchedulerConfig  # noqa: E402
from eesim.validate import validate  # noqa: E402
from eesim.workload import Workload, load_workload  # noqa: E402

PAIRS = [("full", "fill")] + [(r, k) for r in ("all_confident", "per_sequence", "quorum")
                              for k in ("fill", "copy_hidden", "recompute")]


def matrix_config(model_name: str, num_blocks: int) -> SimConfig:
    """The configuration every run of the matrix shares (rule and KV policy aside): the recorded exit trace,
    max_prob >= 0.9, the H100, at most 256 sequences and 2,048 tokens per iteration."""
    trace, model, _ = load_exit_trace("default", model_preset(model_name))
    meas = measure("max_prob")
    return SimConfig(model, hardware_preset("h100"), trace, measure=meas, threshold=parse_threshold("0.9", meas),
                     scheduler=SchedulerConfig(256, 2048, 16, num_blocks), seed=0)


def matrix_workload(rate: float, duration: float, model) -> Workload:
    """The matrix's workload at ``rate`` requests/s for ``duration`` s of arrivals (Poisson, code-service lengths,
    seed 0), clipped to the model's context."""
    return load_workload(f"poisson:rate={rate},duration={duration}", seed=0).clip(model.max_context)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="profile of this machine (eesim profile)")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--loads", default="light:3,heavy:8", help="name:rate pairs (requests/s)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per run")
    ap.add_argument("--pairs", default="", help="rule+kv,... (default: all ten)")
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--time-limit", type=float, default=540.0)
    ap.add_argument("--warmup", type=int, default=0,
                    help="before the matrix, also serve every load untimed (on top of each run's own warm-up): "
                         "1 with full and all_confident + fill, 2 also with per_sequence + copy_hidden / recompute")
    ap.add_argument("--no-graphed-owing", action="store_true",
                    help="decode steps owing K/V on the general path from their first layer (GPUExecutor.graphed_owing "
                         "off); profile with the same setting (python -m eesim.profiler --no-graphed-owing)")
    ap.add_argument("--out", default="eesim-out/fidelity")
    args = ap.parse_args(argv)

    from eesim.gpu.serve import build_executor

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = [tuple(p.split("+")) for p in args.pairs.split(",")] if args.pairs else PAIRS
    loads = [(name, float(rate)) for name, rate in (x.split(":") for x in args.loads.split(","))]
    base = matrix_config(args.model, args.num_blocks)
    model, trace, meas = base.model, base.trace, base.measure
    base = replace(base, cost_model=args.profile)  # priced per KV policy (eesim.cost_choice fits it once)
    executor = build_executor(replace(base, exit_rule=pairs[0][0], kv_policy=pairs[0][1]), "replay", args.num_blocks)
    executor.graphed_owing = not args.no_graphed_owing
    profiled = ProfileGrid.from_meta(read_profile(args.profile).meta.get("grid", {})).graphed_owing
    if profiled != executor.graphed_owing:
        print(f"note: the profile was measured with graphed_owing={profiled}, the executor serves with "
              f"{executor.graphed_owing}: steps owing K/V are priced for the other path", flush=True)
    rows, runs, logs, reqs = [], [], [], []
    if args.warmup:  # capture the CUDA graphs of every load's batch shapes once, before any timed run
        from eesim.gpu.serve import serve

        warm = [("full", "fill"), ("all_confident", "fill"), ("per_sequence", "copy_hidden"),
                ("per_sequence", "recompute")]
        for _, rate in loads:
            workload = matrix_workload(rate, args.duration, model)
            for rule, kv in warm[: 2 if args.warmup == 1 else len(warm)]:
                executor.configure(model, rule, kv, meas, base.threshold, "replay", trace)
                serve(workload, replace(base, exit_rule=rule, kv_policy=kv), executor, realtime=True)
        print(f"warm-up: {time.perf_counter() - started:.1f} s", flush=True)
    for load, rate in loads:
        workload = matrix_workload(rate, args.duration, model)
        for rule, kv in pairs:
            if time.perf_counter() - started > args.time_limit:
                print(f"time limit: skipped {load} {rule}+{kv}")
                continue
            config = replace(base, exit_rule=rule, kv_policy=kv)
            executor.configure(model, rule, kv, meas, config.threshold, "replay", trace)
            t0 = time.perf_counter()
            errors, measured, simulated = validate(workload, config, executor)
            errors.insert(0, "policy", f"{rule}+{kv}")
            errors.insert(0, "load", f"{load} ({rate:g} req/s)")
            rows.append(errors)
            logs += [r.iterations.assign(load=load, policy=f"{rule}+{kv}", run=label)
                     for label, r in (("measured", measured), ("simulated", simulated))]
            reqs += [r.requests.assign(load=load, policy=f"{rule}+{kv}", run=label)
                     for label, r in (("measured", measured), ("simulated", simulated))]
            for label, result in (("measured", measured), ("simulated", simulated)):
                runs.append({"load": load, "rate": rate, "policy": f"{rule}+{kv}", "run": label,
                             "requests": workload.num_requests, **result.summary.to_dict()})
            worst = errors.dropna(subset=["goal"]).assign(a=lambda f: f.error.abs()).sort_values("a").iloc[-1]
            print(f"{load:>6} {rule:>14}+{kv:<12} {time.perf_counter() - t0:5.1f} s  " + "  ".join(
                f"{r.metric.replace('inter-token latency', 'ITL')} {r.error:+.1%}"
                + (f" [{r.error_lo:+.0%}, {r.error_hi:+.0%}]" if r.error_lo == r.error_lo else "")
                for r in errors.itertuples() if r.goal == r.goal) + f"  (worst {worst.metric}; {measured.labels.get('graph_captures', 0)} graph "
                f"captures while timed)", flush=True)
            pd.concat(rows).to_csv(out / "fidelity_matrix.csv", index=False)
            pd.DataFrame(runs).to_csv(out / "fidelity_runs.csv", index=False)
            pd.concat(logs).to_parquet(out / "fidelity_iterations.parquet", index=False)
            # every request of both runs: error bands can be recomputed offline (fidelity_rescore.py --requests)
            pd.concat(reqs).to_parquet(out / "fidelity_requests.parquet", index=False)
    if rows:
        table = pd.concat(rows)
        table["abs"] = table.error.abs()
        worst = table.sort_values("abs").groupby("metric", sort=False).tail(1)
        print("\nworst error per metric:")
        for r in worst.itertuples():
            print(f"  {r.metric:<28} {r.error:+.1%} ({r.load}, {r.policy})"
                  + (f"  goal ±{r.goal:.0%}" if r.goal == r.goal else ""))
        met = table.dropna(subset=["goal"])
        print(f"goals met: {int(met.met.sum())} of {len(met)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
