"""Re-score a fidelity matrix offline: simulate its configurations again with another cost model (CPU).

benchmarks/fidelity_matrix.py writes the measured summaries of every run (fidelity_runs.csv). When the
cost model changes, the measurements stay valid: this simulates the same workloads and configurations
again (same seed, requests and recorded generations) with ``--profile`` and prints and writes the
simulator's error per metric against the measured runs, as fidelity_matrix.py does; with ``--requests`` (the
matrix's fidelity_requests.parquet) also each request-level error's 95% band (eesim.validate.error_bands).

Usage:  PYTHONPATH=$PWD python benchmarks/fidelity_rescore.py --runs docs/data/fidelity_runs_2026-11-22.csv \
            --profile traces/profiles/llama2-7b.parquet --out fidelity_rescored.csv
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fidelity_matrix import matrix_config  # noqa: E402
from eesim.simulator import simulate  # noqa: E402
from eesim.validate import error_bands, error_table  # noqa: E402
from eesim.workload import load_workload  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="fidelity_runs.csv of a fidelity_matrix.py run")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals the matrix used")
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--requests", default="", help="fidelity_requests.parquet of the same matrix: the measured "
                    "requests, for each request-level error's 95%% band (eesim.validate.error_bands)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    requests = pd.read_parquet(args.requests) if args.requests else None

    runs = pd.read_csv(args.runs, dtype={"load": str})
    measured = runs[runs.run == "measured"]
    base = replace(matrix_config(args.model, args.num_blocks), cost_model=args.profile)  # priced per KV policy
    model = base.model
    rows = []
    for r in measured.itertuples(index=False):
        rule, kv = r.policy.split("+")
        workload, _ = load_workload(f"poisson:rate={r.rate:g},duration={args.duration:g}", seed=0).clip(model.max_context)
        if workload.num_requests != r.requests:
            raise SystemExit(f"{r.load} {r.policy}: {workload.num_requests} requests, the matrix had {r.requests}")
        sim = simulate(workload, replace(base, exit_rule=rule, kv_policy=kv))
        bands = None
        if requests is not None:
            mine = requests[(requests.load.astype(str) == r.load) & (requests.policy == r.policy)
                            & (requests.run == "measured")]
            if len(mine) != r.requests:
                raise SystemExit(f"{r.load} {r.policy}: {len(mine)} measured requests in {args.requests}, the "
                                 f"matrix had {r.requests} (another matrix, or another --duration?)")
            bands = error_bands(mine, sim.requests)
        rows.append(error_table(r._asdict(), sim.summary, bands).assign(load=f"{r.load} ({r.rate:g} req/s)",
                                                                         policy=r.policy))
    table = pd.concat(rows, ignore_index=True)[["load", "policy", "metric", "measured", "simulated", "error", "goal",
                                                 "met", "error_lo", "error_hi"]]
    goals = table.dropna(subset=["goal"])
    for (load, policy), g in goals.groupby(["load", "policy"], sort=False):
        print(f"{load:>16} {policy:<26} " + "  ".join(
            f"{x.metric.replace('inter-token latency', 'ITL')} {x.error:+.1%}"
            + (f" [{x.error_lo:+.0%}, {x.error_hi:+.0%}]" if x.error_lo == x.error_lo else "") for x in g.itertuples()))
    print(f"goals met: {int(goals.met.astype(bool).sum())} of {len(goals)}")
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
