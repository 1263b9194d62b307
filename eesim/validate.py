"""The simulator against the hardware, on the same work: ``eesim validate``.

Serves a workload on the GPU executor in real time (requests arrive at their wall-clock times, as a
server would see them), after the decode graphs are captured up front and untimed real-time passes of
the same workload (until one captures no new graph) so that CUDA-graph captures and kernel compilation
stay out of the timed run; then simulates the same workload and configuration
(same requests, same recorded generations, same scheduler) and reports the simulator's error per
metric against the goals of the fidelity study, with the error's 95% band over the workload's requests
(``error_bands``) where the metric is a request-level one.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pandas as pd

from eesim.config import SimConfig
from eesim.cost_model import CostModel
from eesim.metrics import SimResult
from eesim.workload import Workload

# metric -> (summary column, goal on |relative error|); None: reported, no goal
METRICS = {
    "throughput (tok/s)": ("throughput_tok_s", 0.03),
    "TTFT p50": ("ttft_p50", 0.08),
    "TTFT p99": ("ttft_p99", None),
    "inter-token latency mean": ("itl_mean", 0.03),
    "inter-token latency p50": ("itl_p50", None),
    "inter-token latency p99": ("itl_p99", 0.08),
    "end-to-end latency mean": ("e2e_mean", None),
    "layers per token": ("mean_layers", None),
}


def error_table(measured, simulated, bands: dict[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """One row per metric: measured, simulated, relative error of the simulator, goal, met, and where
    ``bands`` has the metric (``error_bands``) the error's 95% band over the requests (``error_lo``,
    ``error_hi``; NaN otherwise). Each side is a run's summary (a ``SimResult.summary``, or a row of a saved
    runs table)."""
    rows = []
    bands = bands or {}
    for label, (column, goal) in METRICS.items():
        m, s = float(measured[column]), float(simulated[column])
        error = s / m - 1 if m else float("nan")
        lo, hi = bands.get(label, (float("nan"), float("nan")))
        rows.append({"metric": label, "measured": m, "simulated": s, "error": error, "goal": goal,
                     "met": (abs(error) <= goal) if goal is not None else None, "error_lo": lo, "error_hi": hi})
    return pd.DataFrame(rows)


def error_bands(measured: pd.DataFrame, simulated: pd.DataFrame, resamples: int = 2000,
                seed: int = 0) -> dict[str, tuple[float, float]]:
    """How much the simulator's error on the request-level metrics (TTFT p50 / p99, mean inter-token latency,
    mean end-to-end latency) depends on which requests the workload drew: a paired bootstrap over the
    requests (each resample takes the same requests from both runs, matched by ``request_id``), the 2.5th and
    97.5th percentiles of the relative error. A workload of 20 requests with a bimodal time to first token
    (a request arriving into a running batch or into an idle engine) has a band of tens of percent on its
    median: a miss inside its band is not evidence against the model."""
    import numpy as np

    if measured["request_id"].duplicated().any() or simulated["request_id"].duplicated().any():
        raise ValueError("error_bands: a run's requests repeat a request_id (pass one run's requests per side)")
    both = measured.merge(simulated, on="request_id", suffixes=("_m", "_s"))
    n = len(both)
    if n != len(measured) or n != len(simulated):
        raise ValueError(f"error_bands: the runs hold different requests ({len(measured)} measured, "
                         f"{len(simulated)} simulated, {n} in both)")
    if n < 2:
        return {}
    idx = np.random.default_rng(seed).integers(n, size=(resamples, n))

    def pooled_itl(side):  # the summary's mean over every gap: per-request means weighted by their gaps
        gaps = np.maximum(both[f"output_len_{side}"].to_numpy(np.float64) - 1, 0)
        total = np.nan_to_num(both[f"itl_mean_{side}"].to_numpy(np.float64)) * gaps
        return total[idx].sum(axis=1) / np.maximum(gaps[idx].sum(axis=1), 1)

    stats = {  # NaN-aware, as the run's summary drops NaN values (eesim.metrics)
        "TTFT p50": lambda side: np.nanmedian(both[f"ttft_{side}"].to_numpy(np.float64)[idx], axis=1),
        "TTFT p99": lambda side: np.nanpercentile(both[f"ttft_{side}"].to_numpy(np.float64)[idx], 99, axis=1),
        "inter-token latency mean": pooled_itl,
        "end-to-end latency mean": lambda side: np.nanmean(both[f"e2e_{side}"].to_numpy(np.float64)[idx], axis=1),
    }
    out = {}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples (no request with a gap): no band
        for label, stat in stats.items():
            m, s = stat("m"), stat("s")
            err = np.where(m > 0, s / np.where(m > 0, m, 1.0) - 1, np.nan)
            if np.isnan(err).all():
                continue
            lo, hi = np.nanpercentile(err, [2.5, 97.5])
            out[label] = (float(lo), float(hi))
    return out


def prepare_graphs(workload: Workload, config: SimConfig, executor, peak_rows: int | None = None) -> int:
    """Capture the decode and prompt-chunk graphs ``workload`` can need under ``config``
    (``GPUExecutor.capture_graphs``): for batches of up to twice ``peak_rows`` (the largest batch a
    simulation of the workload formed) where given, else up to the scheduler's limit. The margin covers a
    served run that batches differently; past it, the warm-up passes capture what is met."""
    requests = workload.requests
    if not requests:
        return 0
    rows = min(config.scheduler.max_num_seqs, len(requests))
    if peak_rows:
        rows = min(rows, 2 * int(peak_rows))
    longest = max(r.prompt_len + r.output_len for r in requests)
    chunk = min(config.scheduler.max_num_batched_tokens, sum(r.prompt_len for r in requests))
    return executor.capture_graphs(rows, min(longest, config.model.max_context), chunk)


def peak_batch(simulated: SimResult) -> int | None:
    """The largest batch a simulation of the workload formed (what ``prepare_graphs`` sizes its captures by)."""
    return int(simulated.iterations["batch_size"].max()) if len(simulated.iterations) else None


def warm_up(workload: Workload, config: SimConfig, executor, warmups: int = 3, peak_rows: int | None = None) -> None:
    """What runs untimed before a timed pass: the graphs ``workload`` can need captured up front
    (``prepare_graphs``), then real-time passes, at most ``warmups``, until one captures no graph."""
    from eesim.gpu.serve import serve

    # graph captures and compilation happen here, so that the batches (and with them the prompt-chunk graphs'
    # shapes) are those the timed pass will see; a capture in the timed pass would stall it for a model pass
    prepare_graphs(workload, config, executor, peak_rows)
    for _ in range(warmups):  # until a pass meets no new shape (kernels compiled, graphs captured)
        if not serve(workload, config, executor, realtime=True).summary.get("graph_captures", 0):
            break


def validate(workload: Workload, config: SimConfig, executor, cost_model: CostModel | None = None,
             warmups: int = 3) -> tuple[pd.DataFrame, SimResult, SimResult]:
    """Simulate ``workload`` and measure it on ``executor`` in real time; returns (errors, measured,
    simulated). Before the timed pass, ``warm_up`` (for batches up to twice the simulation's largest)."""
    from eesim.gpu.serve import serve
    from eesim.simulator import simulate

    same_cache = replace(config, scheduler=replace(config.scheduler, num_blocks=executor.num_blocks))
    simulated = simulate(workload, same_cache, cost_model)
    warm_up(workload, config, executor, warmups, peak_batch(simulated))
    measured = serve(workload, config, executor, realtime=True)
    bands = error_bands(measured.requests, simulated.requests)
    return error_table(measured.summary, simulated.summary, bands), measured, simulated
