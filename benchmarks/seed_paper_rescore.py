"""Re-score the seed paper's experiment offline: the simulator's side again, with the cost model as it is now (CPU).

``benchmarks/seed_paper.py`` writes, per batch size and policy pair, the measured throughput on the GPU and the
simulator's prediction. When the cost model changes, the measurements stay valid: this simulates each cell again
(same closed batch, exits, threshold) with ``--cost-model`` and prints the measured and simulated speedups over full
depth, and how many cells the simulator lands within 0.1 of.

Usage:  python benchmarks/seed_paper_rescore.py docs/data/seed_paper_t0.9_final_2026-11-23.csv:0.9 \\
            docs/data/seed_paper_t0.7_final_2026-11-23.csv:0.7 docs/data/seed_paper_t0.5_final_2026-11-23.csv:0.5
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_paper import base_config, closed_batch  # noqa: E402

from eesim.simulator import simulate  # noqa: E402


def rescore(table: pd.DataFrame, threshold: str, cost_model: str, prompt: int = 512, output: int = 128) -> pd.DataFrame:
    """``table`` (one seed_paper.py run) with ``sim_tok_s`` and ``sim_speedup`` simulated again."""
    batches = sorted(int(b) for b in table["batch"].unique())
    base = replace(base_config(batches, prompt, output, threshold), cost_model=cost_model)
    sim = []
    for row in table.itertuples():
        rule, kv = row.policy.split(" + ")
        config = replace(base, exit_rule=rule, kv_policy=kv, scheduler=replace(base.scheduler, max_num_seqs=row.batch))
        sim.append(simulate(closed_batch(row.batch, prompt, output), config).summary["throughput_tok_s"])
    out = table.assign(sim_tok_s=sim)
    full = out[out.policy == "full + fill"].set_index("batch")
    out["speedup"] = out["tok_s"] / out["batch"].map(full["tok_s"])
    out["sim_speedup"] = out["sim_tok_s"] / out["batch"].map(full["sim_tok_s"])
    out["sim_error"] = out["sim_tok_s"] / out["tok_s"] - 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="CSV:THRESHOLD of a seed_paper.py run")
    ap.add_argument("--cost-model", default="auto", help="as for eesim simulate (default: the shipped profile)")
    ap.add_argument("--out", default="", help="write every cell to this CSV")
    args = ap.parse_args(argv)
    frames = []
    for spec in args.runs:
        path, threshold = spec.rsplit(":", 1)
        frames.append(rescore(pd.read_csv(path), threshold, args.cost_model).assign(threshold=threshold))
    table = pd.concat(frames, ignore_index=True)
    cells = table[table.policy != "full + fill"]
    within = (cells["sim_speedup"] - cells["speedup"]).abs() <= 0.1
    pd.set_option("display.width", 200)
    print(table[["threshold", "batch", "policy", "speedup", "sim_speedup", "sim_error"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"simulated speedup within 0.1 of the measured one in {int(within.sum())} of {len(cells)} cells")
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
