"""Timelines in the Chrome trace / Perfetto JSON format (open in ui.perfetto.dev or chrome://tracing).

One process per simulated run (a policy pair), one thread per replica. Each iteration is a slice
whose arguments say what ran (batch, prefill tokens, exits, the deepest layer reached, fill and
recompute rows); inside it, child slices split its time by component as the cost model priced it
(each segment of layers between exits, the exit heads, syncs). Counters track KV-cache use and the
positions owed K/V by lazy KV policies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from eesim.atomic import write_atomic
from eesim.metrics import SimResult

US = 1e6


def _iteration_events(pid: int, result: SimResult, max_iterations: int) -> list[dict]:
    events = []
    iterations = result.iterations
    layers = result.labels.get("exit_layers")
    window = iterations[iterations["iteration"] < max_iterations]
    for row in window.itertuples(index=False):
        reach = layers[row.batch_reach] if layers else row.batch_reach
        kind = f"prefill {row.prefill_tokens} + " if row.prefill_tokens else ""
        events.append({
            "name": f"{kind}decode {row.decode_rows}", "ph": "X", "pid": pid, "tid": int(row.replica),
            "ts": row.start * US, "dur": (row.end - row.start) * US, "cat": "iteration",
            "args": {"iteration": int(row.iteration), "batch": int(row.batch_size),
                     "prefill_tokens": int(row.prefill_tokens), "decode_rows": int(row.decode_rows),
                     "early_exits": int(row.early_exits), "forced_exits": int(row.forced_exits),
                     "deepest_layer": int(reach), "kv_projection_rows": float(row.proj_rows),
                     "recompute_rows": float(row.recompute_rows), "exit_syncs": int(row.syncs)}})
        events.append({"name": "kv cache", "ph": "C", "pid": pid, "tid": int(row.replica), "ts": row.start * US,
                       "args": {"used %": round(100 * row.kv_utilisation, 2),
                                "owed positions": int(row.owed_positions)}})
    return events


def _component_events(pid: int, result: SimResult, max_iterations: int) -> list[dict]:
    """Child slices per component, from the work kept for the first iterations of each replica."""
    events = []
    cost = result.cost_model
    if cost is None:
        return events
    for replica, log in result.work_logs.items():
        for first_index, starts, ends, work in log:
            for t, (start, end) in enumerate(zip(starts, ends)):
                if first_index + t >= max_iterations:
                    break
                parts = cost.breakdown(work.step(t))
                total = sum(parts.values()) or 1.0
                scale = (end - start) / total  # fit the parts exactly inside the iteration's slice
                ts = start
                for name, seconds in parts.items():
                    if seconds <= 0:
                        continue
                    events.append({"name": name, "ph": "X", "pid": pid, "tid": replica, "ts": ts * US,
                                   "dur": seconds * scale * US, "cat": "component"})
                    ts += seconds * scale
    return events


def timeline_events(results: dict[str, SimResult], max_iterations: int = 2000) -> list[dict]:
    events: list[dict] = []
    for pid, (label, result) in enumerate(results.items()):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": label}})
        for replica in sorted(result.iterations["replica"].unique().tolist()):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": replica,
                           "args": {"name": f"replica {replica}"}})
        events += _iteration_events(pid, result, max_iterations)
        events += _component_events(pid, result, max_iterations)
    return events


def write_timeline(path: str | os.PathLike, results: dict[str, SimResult], max_iterations: int = 2000) -> Path:
    """Write the runs' first ``max_iterations`` iterations per replica as one Perfetto JSON file."""
    path = Path(path)
    payload = {"traceEvents": timeline_events(results, max_iterations), "displayTimeUnit": "ms"}
    write_atomic(path, json.dumps(payload).encode())
    return path
