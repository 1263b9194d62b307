"""Benchmark: replay the Azure LLM code-service hour on the Llama-2-7B preset (all_confident + fill).

Prints wall time, simulated requests and simulated tokens per wall second. Goal: the hour in under
3 s on the 2-core development machine. Usage:

    python benchmarks/simulator_speed.py [--trace ../shared/data/azure_llm_2023_code.csv] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from eesim.exit_trace import default_synthetic_trace
from eesim.hardware import HARDWARE_PRESETS
from eesim.model_spec import MODEL_PRESETS
from eesim.simulator import SimConfig, simulate
from eesim.workload import read_request_trace

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_code.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", default="all_confident/fill",
                        help="comma-separated rule/kv pairs, e.g. full/fill,all_confident/fill")
    args = parser.parse_args()

    model = MODEL_PRESETS["llama2-7b"]
    workload, clipped = read_request_trace(args.trace).clip(model.max_context)
    trace = default_synthetic_trace(model.num_layers, model.all_exits)
    table = Table(title=f"Simulated Azure code hour ({workload.num_requests} requests, {clipped} clipped to "
                        f"{model.max_context} tokens), llama2-7b on h100 — {platform.processor() or platform.machine()}")
    for col in ("policy", "wall s (best)", "wall s (median)", "iterations", "sim req/wall s", "sim tok/wall s",
                "sim s/wall s"):
        table.add_column(col, justify="right")
    for pair in args.policies.split(","):
        rule, kv = pair.split("/")
        config = SimConfig(model, HARDWARE_PRESETS["h100"], trace, rule, kv)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = simulate(workload, config)
            times.append(time.perf_counter() - t0)
        best, median = min(times), sorted(times)[len(times) // 2]
        s = result.summary
        table.add_row(pair, f"{best:.2f}", f"{median:.2f}", f"{s.iterations:,}",
                      f"{s.requests / best:,.0f}", f"{s.output_tokens / best:,.0f}", f"{s.makespan_s / best:,.0f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
