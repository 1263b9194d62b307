"""Re-score the cost-model accuracy benchmark's measurements offline, with the cost model as it is now.

``benchmarks/cost_model_accuracy.py`` saves every measured point's work (``*_work.npz``) beside its table
(``*.csv``: ``measured_ms``), so a changed model can be priced against the same measurements without a
GPU. Prints the errors by kind (whole iterations) and by component (held-out grid points), as the benchmark
does.

Usage:  python benchmarks/cost_model_rescore.py --profile traces/profiles/llama2-7b.parquet \\
            --iterations docs/data/cost_model_iterations_run5_2026-11-22.csv docs/data/cost_model_iterations_work_run5.npz \\
            --heldout docs/data/cost_model_heldout_run5_2026-11-22.csv docs/data/cost_model_heldout_work_run5.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cost_model_accuracy import load_works, stats  # noqa: E402

from eesim.model_spec import MODEL_PRESETS  # noqa: E402
from eesim.profile_cost import ProfileCostModel  # noqa: E402
from eesim.profile_data import read_profile  # noqa: E402


def report(name: str, table: pd.DataFrame, works, cost: ProfileCostModel, by: str) -> None:
    predicted = cost.iteration_time(works) * 1e3
    error = predicted / table["measured_ms"].to_numpy() - 1
    groups = [("all", np.ones(len(error), dtype=bool))] + [
        (str(k), (table[by] == k).to_numpy()) for k in sorted(table[by].unique())]
    for label, mask in groups:
        print(f"{name} {label}: {stats(error[mask])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True)
    ap.add_argument("--model", default="", help="preset (default: the profile's shape name)")
    ap.add_argument("--iterations", nargs=2, metavar=("CSV", "NPZ"))
    ap.add_argument("--heldout", nargs=2, metavar=("CSV", "NPZ"))
    ap.add_argument("--no-leave-time", action="store_true",
                    help="price a pass that ends at an exit without the leave term (ProfileCostModel.leave_time)")
    args = ap.parse_args(argv)
    profile = read_profile(args.profile)
    spec = MODEL_PRESETS[args.model or profile.model.name]
    cost = ProfileCostModel(profile, spec, kv_policy="fill", include_schedule=False)
    print(f"leave term: {0.0 if cost.leave_time is None else cost.leave_time * 1e3:.3f} ms"
          + (", set to 0" if args.no_leave_time else ""))
    if args.no_leave_time:
        cost.leave_time = None
    if args.iterations:
        report("iterations", pd.read_csv(args.iterations[0]), load_works(args.iterations[1]), cost, "kind")
    if args.heldout:
        report("held-out", pd.read_csv(args.heldout[0]), load_works(args.heldout[1]), cost, "component")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
