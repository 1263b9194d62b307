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
    meas = _iterations("measured", [0.010, 0.010, 0.004, 0.005, 0.003, 0.020], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0],
                       chunk_at=5)
    sim = _iterations("simulated", [0.009, 0.009, 0.004, 0.004, 0.002, 0.022], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0],
                      chunk_at=5)
    sim[1]["syncs"] = 3  # a step whose work differs is not compared
    out = fidelity_steps.compare(pd.DataFrame(meas + sim)).iloc[0]
    assert out["matched"] == "83%"
    assert out["stay"] == "1: 10 / 9 (-10.0%)"
    assert out["leave"] == "2: 9 / 8 (-11.1%)"  # (no owed_carried: a step owes what the one before left owed)
    assert out["owing, runs none"] == "1: 3 / 2 (-33.3%)"
    assert out["prompt chunk"] == "1: 20 / 22 (+10.0%)"


def test_owing_means_starting_to_owe_where_the_log_says_so():
    """With ``owed_carried`` (what the step started owing) a step whose rows leave for the first time is a leave,
    though K/V is owed after it (``owed_positions``); the next one, starting owing, is owing."""
    rows = []
    for run in ("measured", "simulated"):
        its = _iterations(run, [0.004, 0.005], [1, 1], [1, 2])
        for it, carried in zip(its, [0, 1]):
            it["owed_carried"] = carried
        rows += its
    out = fidelity_steps.compare(pd.DataFrame(rows)).iloc[0]
    assert out["leave"] == "1: 4 / 4 (+0.0%)" and out["owing, runs none"] == "1: 5 / 5 (+0.0%)"


def test_rescore_with_the_measured_requests_adds_error_bands(tmp_path):
    """fidelity_rescore.py --requests: the request-level errors get their bands (here the 'measured' requests are
    the simulation's own, so every band is the single point 0)."""
    import sys
    from dataclasses import replace

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from fidelity_matrix import matrix_config  # noqa: E402

    from eesim.simulator import simulate
    from eesim.workload import load_workload

    spec = importlib.util.spec_from_file_location("fidelity_rescore", root / "benchmarks" / "fidelity_rescore.py")
    rescore = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rescore)
    runs = pd.read_csv(root / "docs" / "data" / "fidelity_runs_v8_light_2026-11-23.csv")
    runs = runs[(runs.policy == "full+fill")].head(2)  # measured and simulated rows of one pair
    runs.to_csv(tmp_path / "runs.csv", index=False)
    profile = root / "docs" / "data" / "fidelity_v8_profile_2026-11-23.parquet"
    base = replace(matrix_config("llama2-7b", 2048), cost_model=str(profile), exit_rule="full", kv_policy="fill")
    workload, _ = load_workload("poisson:rate=3,duration=8", seed=0).clip(base.model.max_context)
    own = simulate(workload, base).requests.assign(load="light", policy="full+fill", run="measured")
    own.to_parquet(tmp_path / "requests.parquet")
    assert rescore.main(["--runs", str(tmp_path / "runs.csv"), "--profile", str(profile), "--requests",
                         str(tmp_path / "requests.parquet"), "--out", str(tmp_path / "out.csv")]) == 0
    table = pd.read_csv(tmp_path / "out.csv").set_index("metric")
    assert table.loc["TTFT p50", ["error_lo", "error_hi"]].tolist() == [0.0, 0.0]
    assert table.loc["throughput (tok/s)", ["error_lo", "error_hi"]].isna().all()


def test_seed_paper_rescore_simulates_every_cell_again():
    """benchmarks/seed_paper_rescore.py: each cell of a seed_paper.py run simulated again with the shipped cost
    model; the measured speedups are the run's own, full depth is 1 on both sides, every prediction positive."""
    import numpy as np

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("seed_paper_rescore", root / "benchmarks" / "seed_paper_rescore.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = pd.read_csv(root / "docs" / "data" / "seed_paper_t0.9_final_2026-11-23.csv")
    run = run[run.batch <= 4].reset_index(drop=True)
    out = mod.rescore(run.drop(columns=["sim_tok_s", "sim_speedup", "sim_error"]), "0.9", "auto")
    assert len(out) == len(run) and (out.sim_tok_s > 0).all()
    np.testing.assert_allclose(out.speedup, run.speedup, rtol=1e-12)
    full = out[out.policy == "full + fill"]
    assert (full.sim_speedup == 1.0).all() and (full.speedup == 1.0).all()
    early = out[out.policy != "full + fill"]
    assert (early.sim_speedup != 1.0).any()  # the exits do change the simulated time


def test_leave_gap_runs_on_the_cpu(capsys):
    """benchmarks/leave_gap.py --tiny: every mode of every leave step timed (the GPU diagnostic's own check)."""
    import pytest

    pytest.importorskip("torch")
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("leave_gap", root / "benchmarks" / "leave_gap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--policies", "recompute"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("recompute")]
    assert len(rows) == 2  # batches 1 and 2
    for row in rows:
        events = [float(v) for v in row[3::3]]  # event ms of repeat, after_full, after_idle, full
        assert len(events) == 4 and all(v > 0 for v in events)
        assert events[3] > max(events[:3])  # a pass to full depth takes longer than one that ends at the first exit
