"""The analysis API: sweeps, certified thresholds, max-goodput search, and small helpers for notebooks.

    eesim.sweep(config, out=None, workers=None, ray_address=None)  -> DataFrame, one row per cell
    eesim.calibrate(trace="default", measures=None, epsilon=0.05, delta=0.1, ...)  -> one row per measure
    eesim.max_goodput(config, ttft_p90=None, itl_p99=None, ...)  -> one row per policy (grid cell)

Columns: ``eesim.sweep.sweep`` (a cell's settings, ``cell``, the run summary of eesim.metrics,
``cost_model_label``, ``threshold_value``, ``elapsed_s``, ``speedup``, ``itl_speedup``); ``eesim.calibrate.RESULT_COLUMNS``
(and ``CURVE_COLUMNS`` for ``calibration_curve``); ``eesim.sweep.GOODPUT_COLUMNS`` after the cell's settings.

``setup(**settings)`` builds the (SimConfig, Workload) of one set of sweep settings (see
``eesim.sweep.SETTINGS``), for ``eesim.simulate`` / ``eesim.compare``; ``pareto_front`` marks the
non-dominated rows of a table; ``kv_cost`` turns runs' iteration tables into the memory and compute
each KV policy costs over time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from eesim.calibrate import calibrate, calibration_curve, load_calibrated, resolve_threshold
from eesim.sweep import build_run, max_goodput, sweep

__all__ = ["sweep", "calibrate", "calibration_curve", "max_goodput", "load_calibrated", "resolve_threshold",
           "setup", "describe", "pareto_front", "kv_cost", "latency_cdf"]


def setup(keep_work: int = 2000, **settings):
    """(SimConfig, Workload) for the given settings (names as in a sweep config; defaults elsewhere)."""
    config, workload, _ = build_run(settings, keep_work=keep_work)
    return config, workload


def describe(config, workload) -> str:
    """A one-line label: model, hardware, workload, measure and threshold, replicas, cost model."""
    from eesim.cost_choice import describe_cost_model

    measure = getattr(config.measure, "name", config.measure)
    return (f"{config.model.name} on {config.hardware.name}; {workload.num_requests} requests ({workload.source}); "
            f"{measure} >= {config.threshold}; {config.replicas} replica(s); simulated, cost model "
            f"{describe_cost_model(config)}")


def pareto_front(frame: pd.DataFrame, x: str = "throughput_tok_s", y: str = "quality",
                 maximize: tuple[bool, bool] = (True, True)) -> pd.Series:
    """True for rows no other row beats on both ``x`` and ``y`` (higher is better unless told)."""
    a = frame[x].to_numpy(dtype=float) * (1 if maximize[0] else -1)
    b = frame[y].to_numpy(dtype=float) * (1 if maximize[1] else -1)
    better_eq = (a[None, :] >= a[:, None]) & (b[None, :] >= b[:, None])
    strictly = (a[None, :] > a[:, None]) | (b[None, :] > b[:, None])
    dominated = (better_eq & strictly).any(axis=1)
    return pd.Series(~dominated & np.isfinite(a) & np.isfinite(b), index=frame.index, name="pareto")


def kv_cost(results: dict, bin_s: float = 1.0) -> pd.DataFrame:
    """Per policy and time bin (``time`` = bin start, s): owed positions (peak over the bin, summed over
    replicas), the hidden-state buffer they hold (bytes: owed x hidden_size x dtype bytes, only for policies
    that keep the exit hidden state), K/V projection and recompute rows (row x segment units summed over
    the bin's iterations) and their matrix FLOPs (projection: 2 x K/V projection parameters per layer;
    recompute: 2 x all parameters per layer; attention left out), and the KV cache use (mean)."""
    from eesim.policies import kv_policy as get_policy

    frames = []
    for label, result in results.items():
        model = result.cost_model.model if result.cost_model is not None else None
        it = result.iterations
        if it.empty:
            continue
        keeps = get_policy(result.labels["kv_policy"]).keeps_hidden_state
        layers = float(np.mean(model.segment_layers)) if model else float("nan")
        t = (it["start"] // bin_s) * bin_s
        per_replica = it.assign(time=t).groupby(["time", "replica"]).agg(
            owed_positions=("owed_positions", "max"), proj_rows=("proj_rows", "sum"),
            recompute_rows=("recompute_rows", "sum"), kv_utilisation=("kv_utilisation", "mean"))
        g = per_replica.groupby("time").agg(owed_positions=("owed_positions", "sum"), proj_rows=("proj_rows", "sum"),
                                           recompute_rows=("recompute_rows", "sum"),
                                           kv_utilisation=("kv_utilisation", "mean")).reset_index()
        hidden_bytes = model.hidden_size * model.dtype_bytes if model else float("nan")
        g["buffer_bytes"] = g["owed_positions"] * hidden_bytes if keeps else 0.0
        g["proj_flops"] = g["proj_rows"] * layers * 2.0 * (model.kv_proj_params_per_layer if model else np.nan)
        g["recompute_flops"] = g["recompute_rows"] * layers * 2.0 * (model.params_per_layer if model else np.nan)
        g.insert(0, "policy", label)
        frames.append(g)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def latency_cdf(results: dict, column: str = "ttft") -> pd.DataFrame:
    """Empirical CDF of a per-request column (ttft, tpot, e2e, queueing_delay, itl_mean), per policy."""
    frames = []
    for label, result in results.items():
        values = np.sort(result.requests[column].dropna().to_numpy(dtype=float))
        frames.append(pd.DataFrame({"policy": label, column: values,
                                    "cdf": np.arange(1, len(values) + 1) / max(len(values), 1)}))
    return pd.concat(frames, ignore_index=True)
