"""benchmarks/fidelity_steps.py: measured and simulated iterations matched one by one, summed by kind of step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

_spec = importlib.util.spec_from_file_location(
    "fidelity_steps", Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity_steps.py")
fidelity_steps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity_steps)


def _iterations(run, durations, exits, owed, chunk_at=None):
    rows, t = [], 0.0
    for i, (d, e, o) in enumerate(zip(durations, exits, owed)):
        rows.append(dict(load="light", policy="p+kv", run=run, iteration=i, start=t, end=t + d, batch_size=1,
                         prefill_tokens=64 if i == chunk_at else 0, decode_rows=1, early_exits=e, batch_reach=2,
                         proj_rows=0, recompute_rows=0, syncs=1, owed_positions=o))
        t += d
    return rows


def test_matched_steps_summed_by_kind():
    meas = _iterations("measured", [0.010, 0.010, 0.004, 0.005, 0.020], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], chunk_at=4)
    sim = _iterations("simulated", [0.009, 0.009, 0.004, 0.004, 0.022], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], chunk_at=4)
    sim[1]["syncs"] = 3  # a step whose work differs is not compared
    out = fidelity_steps.compare(pd.DataFrame(meas + sim)).iloc[0]
    assert out["matched"] == "80%"
    assert out["stay"] == "1: 10 / 9 (-10.0%)"
    assert out["leave"] == "1: 4 / 4 (+0.0%)"
    assert out["owing, runs none"] == "1: 5 / 4 (-20.0%)"
    assert out["prompt chunk"] == "1: 20 / 22 (+10.0%)"
