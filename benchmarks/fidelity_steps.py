"""Split a fidelity run's error by kind of step: measured and simulated iterations, matched one by one (CPU).

``benchmarks/fidelity_matrix.py`` writes every iteration of both runs of each pair (fidelity_iterations.parquet).
The two runs schedule the same iterations (same batch, exits, owed rows) for long stretches; where the i-th
iterations of the two agree on their work, their durations are compared, summed by kind of step: decode steps
that stay (nobody leaves, nothing owed), leave (rows exit, nothing owed), start owing K/V and run some of it or
none, and steps with a prompt chunk. Prints, per load and policy, ``count: measured / simulated ms (error)``.

Usage:  python benchmarks/fidelity_steps.py docs/data/fidelity_iterations_v8_light_2026-11-23.parquet
"""

from __future__ import annotations

import argparse

import pandas as pd

WORK = ["batch_size", "prefill_tokens", "decode_rows", "early_exits", "batch_reach", "proj_rows", "recompute_rows",
        "syncs", "owed_positions"]


def step_kinds(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """Masks of ``frame`` (the iterations of one run, in order) by kind of step."""
    decode = frame.prefill_tokens == 0
    # owing: the step started owing K/V (its batch's entries, ``owed_carried``, logs since the fourth session of
    # 2026-11-23); older logs have only ``owed_positions``, the ledger's debts after each step, so there the
    # previous step's (which also counts debts of sequences outside the batch)
    started = frame.owed_carried if "owed_carried" in frame else frame.owed_positions.shift(1, fill_value=0)
    owing = started > 0
    ran = (frame.proj_rows > 0) | (frame.recompute_rows > 0)
    return {"stay": decode & (frame.early_exits == 0) & ~owing, "leave": decode & (frame.early_exits > 0) & ~owing,
            "owing, runs owed": decode & owing & ran, "owing, runs none": decode & owing & ~ran,
            "prompt chunk": ~decode}


def compare(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (load, policy): the share of iterations matched, and per kind of step the matched
    iterations' count, measured and simulated total ms and the simulator's error."""
    rows = []
    for (load, policy), g in frame.groupby(["load", "policy"], sort=False):
        m = g[g.run == "measured"].sort_values("iteration").reset_index(drop=True)
        s = g[g.run == "simulated"].sort_values("iteration").reset_index(drop=True)
        n = min(len(m), len(s))
        m, s = m.iloc[:n], s.iloc[:n]
        work = WORK + [c for c in ("owed_carried",) if c in g]
        same = (m[work].to_numpy() == s[work].to_numpy()).all(axis=1)
        row = {"load": load, "policy": policy, "matched": f"{same.mean():.0%}"}
        dm, ds = (m.end - m.start) * 1e3, (s.end - s.start) * 1e3
        for kind, mask in step_kinds(m).items():
            mask = mask.to_numpy() & same
            if mask.any():
                a, b = dm[mask].sum(), ds[mask].sum()
                row[kind] = f"{mask.sum()}: {a:.0f} / {b:.0f} ({b / a - 1:+.1%})"
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("iterations", nargs="+", help="fidelity_iterations.parquet files")
    args = ap.parse_args(argv)
    for path in args.iterations:
        print(path)
        print(compare(pd.read_parquet(path)).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
