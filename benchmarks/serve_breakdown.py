"""Diagnostic: where a served iteration's wall time goes, phase by phase, next to what the cost model prices (GPU).

The fidelity matrix compares whole iterations; when a kind of iteration comes out slower than priced,
this says in which phase of the serving loop the difference sits. It serves one policy pair of the
fidelity matrix (same configuration, workload and warm-up as ``validate``) with the loop's phases timed
on the host clock: ``Scheduler.schedule``, ``GPUExecutor.execute`` (wall, and its own CUDA-event
``elapsed``), ``Scheduler.update`` and the iteration log's ``record``. Each iteration's work is priced by
the profile's cost model, component by component (``ProfileCostModel.breakdown``). Writes one row per
iteration to ``--out`` (parquet) and prints the means by kind of iteration (fidelity_steps.py's kinds: stay, leave,
owing and running owed rows or none, prompt chunk) and host syncs.

Usage:  PYTHONPATH=$PWD python benchmarks/serve_breakdown.py --profile P --pair all_confident+fill --rate 3
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_matrix import matrix_config, matrix_workload  # noqa: E402
from fidelity_steps import step_kinds  # noqa: E402

from eesim.cost_choice import resolve_cost_model  # noqa: E402
from eesim.metrics import IterationLog  # noqa: E402
from eesim.scheduler import Scheduler  # noqa: E402


def timed_phases(records: list[dict]):
    """Wrap the serving loop's phases (class attributes: the loop builds its own scheduler and log) so that
    each call appends its host seconds to the current record; returns a function that undoes it."""
    saved = {}

    def wrap(owner, name, key, on_result=None):
        real = getattr(owner, name)
        saved[(owner, name)] = real

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            seconds = time.perf_counter() - t0
            if name == "schedule":
                records.append({})
            if records:
                records[-1][key] = seconds
                if on_result is not None:
                    on_result(records[-1], out)
            return out
        setattr(owner, name, timed)

    return wrap, saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="profile of this machine (eesim profile)")
    ap.add_argument("--pair", default="all_confident+fill", help="rule+kv")
    ap.add_argument("--rate", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--num-blocks", type=int, default=2048)
    ap.add_argument("--no-graphed-owing", action="store_true",
                    help="GPUExecutor.graphed_owing off (profile with the same)")
    ap.add_argument("--out", default="eesim-out/serve_breakdown.parquet")
    args = ap.parse_args(argv)

    from eesim.gpu.serve import build_executor, serve
    from eesim.validate import warm_up

    rule, kv = args.pair.split("+")
    config = replace(matrix_config("llama2-7b", args.num_blocks), exit_rule=rule, kv_policy=kv,
                     cost_model=args.profile)
    workload = matrix_workload(args.rate, args.duration, config.model)
    executor = build_executor(config, "replay", args.num_blocks)
    executor.graphed_owing = not args.no_graphed_owing
    warm_up(workload, config, executor)  # as validate does

    records: list[dict] = []
    wrap, saved = timed_phases(records)
    works = []

    def on_execute(rec, outcome):
        rec["elapsed"] = float(outcome.elapsed[0])
        works.append(outcome.work)

    wrap(Scheduler, "schedule", "schedule")
    wrap(type(executor), "execute", "execute", on_execute)
    wrap(Scheduler, "update", "update")
    wrap(IterationLog, "record", "record")
    try:
        measured = serve(workload, config, executor, realtime=True)
    finally:
        for (owner, name), real in saved.items():
            setattr(owner, name, real)

    cost = resolve_cost_model(config)
    frame = measured.iterations.reset_index(drop=True)
    phases = pd.DataFrame(records[: len(frame)])
    priced = pd.DataFrame([cost.breakdown(w) for w in works[: len(frame)]]).fillna(0.0).add_prefix("priced_")
    frame = pd.concat([frame, phases, priced], axis=1)
    frame["wall"] = frame["end"] - frame["start"]
    frame["priced"] = priced.sum(axis=1)
    frame["host_outside_execute"] = frame["wall"] - frame["execute"]
    frame["execute_after_events"] = frame["execute"] - frame["elapsed"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(args.out, index=False)

    frame["kind"] = ""
    for kind, mask in step_kinds(frame).items():  # the kinds fidelity_steps.py splits the error by
        frame.loc[mask.to_numpy(), "kind"] = kind
    cols = ["wall", "priced", "elapsed", "execute_after_events", "schedule", "update", "record",
            "host_outside_execute"] + [c for c in priced.columns if priced[c].any()]
    table = frame.groupby(["kind", "syncs"])[cols].mean().mul(1e3).round(3)
    table.insert(0, "n", frame.groupby(["kind", "syncs"]).size())
    pd.set_option("display.width", 250)
    print(f"{args.pair} at {args.rate:g} req/s, {len(frame)} iterations; means in ms "
          f"(cost model: {cost.label})")
    print(table.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
