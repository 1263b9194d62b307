"""The simulator against the hardware, on the same work: ``eesim validate``.

Serves a workload on the GPU executor in real time (requests arrive at their wall-clock times, as a
server would see them), after the decode graphs are captured up front and untimed real-time passes of
the same workload (until one captures no new graph) so that CUDA-graph captures and kernel compilation
stay out of the timed run; then simulates the same workload and configuration
(same requests, same recorded generations, same scheduler) and reports the simulator's error per
metric against the goals of the fidelity study.
"""

from __future__ import annotations

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


def error_table(measured, simulated) -> pd.DataFrame:
    """One row per metric: measured, simulated, relative error of the simulator, goal, met. Each side is a
    run's summary (a ``SimResult.summary``, or a row of a saved runs table)."""
    rows = []
    for label, (column, goal) in METRICS.items():
        m, s = float(measured[column]), float(simulated[column])
        error = s / m - 1 if m else float("nan")
        rows.append({"metric": label, "measured": m, "simulated": s, "error": error, "goal": goal,
                     "met": (abs(error) <= goal) if goal is not None else None})
    return pd.DataFrame(rows)


def prepare_graphs(workload: Workload, config: SimConfig, executor) -> int:
    """Capture the decode and prompt-chunk graphs ``workload`` can need under ``config``
    (``GPUExecutor.capture_graphs``)."""
    requests = workload.requests
    if not requests:
        return 0
    rows = min(config.scheduler.max_num_seqs, len(requests))
    longest = max(r.prompt_len + r.output_len for r in requests)
    chunk = min(config.scheduler.max_num_batched_tokens, sum(r.prompt_len for r in requests))
    return executor.capture_graphs(rows, min(longest, config.model.max_context), chunk)


def warm_up(workload: Workload, config: SimConfig, executor, warmups: int = 3) -> None:
    """What runs untimed before a timed pass: the graphs ``workload`` can need captured up front
    (``prepare_graphs``), then real-time passes, at most ``warmups``, until one captures no graph."""
    from eesim.gpu.serve import serve

    # graph captures and compilation happen here, so that the batches (and with them the prompt-chunk graphs'
    # shapes) are those the timed pass will see; a capture in the timed pass would stall it for a model pass
    prepare_graphs(workload, config, executor)
    for _ in range(warmups):  # until a pass meets no new shape (kernels compiled, graphs captured)
        if not serve(workload, config, executor, realtime=True).summary.get("graph_captures", 0):
            break


def validate(workload: Workload, config: SimConfig, executor, cost_model: CostModel | None = None,
             warmups: int = 3) -> tuple[pd.DataFrame, SimResult, SimResult]:
    """Measure ``workload`` on ``executor`` in real time and simulate it; returns (errors, measured,
    simulated). Before the timed pass, ``warm_up``."""
    from eesim.gpu.serve import serve
    from eesim.simulator import simulate

    warm_up(workload, config, executor, warmups)
    measured = serve(workload, config, executor, realtime=True)
    same_cache = replace(config, scheduler=replace(config.scheduler, num_blocks=executor.num_blocks))
    simulated = simulate(workload, same_cache, cost_model)
    return error_table(measured.summary, simulated.summary), measured, simulated
