"""Per-request, per-iteration and per-run metrics of a simulated (or executed) serving run.

Columns of ``SimResult.requests``: request_id, replica-independent timings in seconds (arrival,
first_scheduled, first_token, finish), queueing_delay (first scheduled - arrival), ttft (first token -
arrival), e2e (finish - arrival), tpot (time per output token after the first), itl_mean / itl_max,
prompt_len, output_len, mean_layers (layers run per generated token), early_exits, forced_exits,
agreement (share of tokens equal to the full model's), preemptions.

Columns of ``SimResult.iterations``: ITERATION_COLUMNS below.

``SimResult.summary`` (one row per run): throughput (output tokens/s, requests/s over the makespan),
TTFT / inter-token latency (ITL, pooled over all token gaps) / TPOT / e2e / queueing mean and
percentiles p50 p90 p99, preemptions, KV utilisation mean and peak, mean layers per token, early and
forced (involuntary) exit shares, quality (share of emitted tokens equal to the full model's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import pandas as pd

from eesim.model_spec import ModelSpec
from eesim.request import Sequence

ITERATION_COLUMNS = (
    "replica", "iteration", "start", "end", "batch_size", "prefill_tokens", "decode_rows", "early_exits",
    "forced_exits", "batch_reach", "proj_rows", "recompute_rows", "syncs", "preempted", "kv_utilisation",
    "owed_positions", "owed_carried")
PERCENTILES = (50, 90, 99)


class IterationLog:
    """Per-iteration records, appended once per executed plan (a plan may cover several steps).

    An entry keeps the plan's and the outcome's arrays as they are; the counts per step (tokens, decode
    rows, early and forced exits) are worked out in ``frame``, for every plan at once: a few numpy calls
    per plan, on arrays of a handful of rows, cost more than the rest of the log."""

    def __init__(self) -> None:
        self._entries: list[tuple] = []

    def record(self, replica: int, plan, outcome, start: float, step_ends: list[float], scheduler) -> None:
        """Log an executed plan (either executor) from its outcome and the scheduler's state after it."""
        owed = scheduler.ledger.total_owed() if scheduler.policy.keeps_hidden_state else 0
        self._entries.append((replica, plan.index, start, step_ends, plan.batch_size, plan.num_new, plan.can_exit,
                              outcome.exit_index, outcome.forced, outcome.work, len(plan.preempted),
                              list(scheduler.blocks_used), scheduler.allocator.num_blocks, owed))

    def frame(self) -> pd.DataFrame:
        if not self._entries:
            return pd.DataFrame(columns=list(ITERATION_COLUMNS))
        (replica, first, start, ends, batch, num_new, can_exit, exit_index, forced, works, preempted, used, blocks,
         owed) = zip(*self._entries)
        num_plans = len(ends)
        steps = np.fromiter((len(e) for e in ends), dtype=np.int64, count=num_plans)
        batch = np.array(batch, dtype=np.int64)
        total_steps = int(steps.sum())
        offset = np.arange(total_steps) - np.repeat(np.cumsum(steps) - steps, steps)  # step within its plan
        end = np.fromiter(chain.from_iterable(ends), dtype=np.float64, count=total_steps)  # (lists: no array each)
        begin = end.copy()
        begin[1:] = end[:-1]
        begin[offset == 0] = start  # the first step of a plan starts when the plan started

        # Per plan, over its rows: tokens computed and decode rows (integers: exact as bincount's float weights).
        plan_of_row = np.repeat(np.arange(num_plans), batch)
        decode_rows = np.concatenate(can_exit)
        tokens = np.bincount(plan_of_row, weights=np.concatenate(num_new), minlength=num_plans).astype(np.int64)
        decode = np.repeat(np.bincount(plan_of_row, weights=decode_rows, minlength=num_plans).astype(np.int64), steps)
        # Per step, over its rows: a plan's (T, B) cells flattened step by step; cell (t, b) is row b's.
        cells = steps * batch
        plan_of_cell = np.repeat(np.arange(num_plans), cells)
        row_of_cell = (np.arange(int(cells.sum())) - (np.cumsum(cells) - cells)[plan_of_cell]) % batch[plan_of_cell]
        step_of_cell = np.repeat(np.arange(total_steps), np.repeat(batch, steps))
        last_exit = works[0].full_rows.shape[1] - 1  # (every plan of a log is of one model)
        left_early = ((np.concatenate(exit_index, axis=None) < last_exit)  # (axis None: each flattened)
                      & decode_rows[(np.cumsum(batch) - batch)[plan_of_cell] + row_of_cell])
        early = np.bincount(step_of_cell, weights=left_early, minlength=total_steps).astype(np.int64)
        forced = np.bincount(step_of_cell, weights=np.concatenate(forced, axis=None),
                             minlength=total_steps).astype(np.int64)

        def per_step(name: str) -> np.ndarray:
            return np.concatenate([getattr(w, name) for w in works])

        return pd.DataFrame({
            "replica": np.repeat(replica, steps), "iteration": np.repeat(first, steps) + offset,
            "start": begin, "end": end, "batch_size": np.repeat(batch, steps),
            "prefill_tokens": np.repeat(tokens, steps) - decode, "decode_rows": decode,
            "early_exits": early, "forced_exits": forced,
            "batch_reach": per_step("batch_reach"), "proj_rows": per_step("proj_rows").sum(axis=1),
            "recompute_rows": per_step("recompute_rows").sum(axis=1), "syncs": per_step("syncs"),
            "preempted": np.where(offset == 0, np.repeat(preempted, steps), 0),
            "kv_utilisation": np.fromiter(chain.from_iterable(used), dtype=np.int64, count=total_steps)
            / np.repeat(blocks, steps),
            "owed_positions": np.repeat(owed, steps),  # owed when the iteration's update is done
            "owed_carried": per_step("carried").astype(np.int64),  # entries the step started owing, this batch's
        })


@dataclass
class SimResult:
    requests: pd.DataFrame
    iterations: pd.DataFrame
    summary: pd.Series
    labels: dict
    work_logs: dict = field(default_factory=dict, repr=False)
    cost_model: object = field(default=None, repr=False)


def _flat(sequences: list[Sequence], name: str, lengths: np.ndarray, dtype) -> np.ndarray:
    """Every sequence's per-token list ``name``, concatenated in sequence order."""
    return np.fromiter(chain.from_iterable(getattr(seq, name) for seq in sequences), dtype=dtype,
                       count=int(lengths.sum()))


def _per_seq(ufunc: np.ufunc, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``ufunc`` reduced over each sequence's run of ``values`` (NaN for a sequence with none)."""
    out = np.full(len(lengths), np.nan)
    some = lengths > 0
    if some.any():
        out[some] = ufunc.reduceat(values, (np.cumsum(lengths) - lengths)[some])
    return out


def _request_frame(sequences: list[Sequence]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Per-request columns, the pooled inter-token gaps, and every token's exit layer and agreement
    (flat, in sequence order). Vectorised over all tokens at once: a per-sequence loop of small numpy
    calls cost a tenth of a second per 10k requests."""
    num = len(sequences)
    n = np.fromiter((len(seq.token_times) for seq in sequences), dtype=np.int64, count=num)
    times = _flat(sequences, "token_times", n, np.float64)
    exit_layers = _flat(sequences, "exit_layers", n, np.float64)
    agrees = _flat(sequences, "agrees", n, bool)
    forced = _flat(sequences, "forced", n, np.int64)
    # gaps between consecutive tokens of one sequence, in sequence order
    owner = np.repeat(np.arange(num), n)
    same = owner[1:] == owner[:-1]
    pooled = np.diff(times)[same]
    num_gaps = np.maximum(n - 1, 0)
    first = _per_seq(np.minimum, times, n)  # token times ascend within a sequence
    last = _per_seq(np.maximum, times, n)
    reqs = [seq.request for seq in sequences]
    frame = pd.DataFrame({
        "request_id": np.fromiter((r.request_id for r in reqs), dtype=np.int64, count=num),
        "arrival": np.fromiter((r.arrival_time for r in reqs), dtype=np.float64, count=num),
        "first_scheduled": np.fromiter((seq.first_scheduled_time for seq in sequences), dtype=np.float64, count=num),
        "first_token": first, "finish": last,
        "prompt_len": np.fromiter((r.prompt_len for r in reqs), dtype=np.int64, count=num),
        "output_len": n,
        "mean_layers": _per_seq(np.add, exit_layers, n) / n,
        "forced_exits": np.bincount(owner, weights=forced, minlength=num).astype(np.int64),
        "agreement": _per_seq(np.add, agrees.astype(np.float64), n) / n,
        "preemptions": np.fromiter((seq.num_preemptions for seq in sequences), dtype=np.int64, count=num),
        "itl_mean": _per_seq(np.add, pooled, num_gaps) / num_gaps,
        "itl_max": _per_seq(np.maximum, pooled, num_gaps),
    })
    frame["queueing_delay"] = frame["first_scheduled"] - frame["arrival"]
    frame["ttft"] = frame["first_token"] - frame["arrival"]
    frame["e2e"] = frame["finish"] - frame["arrival"]
    frame["tpot"] = (frame["finish"] - frame["first_token"]) / (frame["output_len"] - 1).where(frame["output_len"] > 1)
    return frame, pooled, exit_layers, agrees


def _describe(prefix: str, values: np.ndarray, out: dict) -> None:
    values = values[~np.isnan(values)]
    out[f"{prefix}_mean"] = float(values.mean()) if len(values) else np.nan
    for p in PERCENTILES:
        out[f"{prefix}_p{p}"] = float(np.percentile(values, p)) if len(values) else np.nan


def build_result(sequences: list[Sequence], iterations: pd.DataFrame, model: ModelSpec, labels: dict,
                 work_logs: dict | None = None, cost_model: object = None) -> SimResult:
    requests, itl, exit_layers, agrees = _request_frame(sequences)
    iterations = iterations.sort_values(["start", "replica"], kind="stable", ignore_index=True)
    tokens = len(exit_layers)
    makespan = float(requests["finish"].max() - requests["arrival"].min()) if len(requests) else 0.0
    busy = float((iterations["end"] - iterations["start"]).sum()) if len(iterations) else 0.0
    out: dict = {k: v for k, v in labels.items() if k != "exit_layers"}
    out.update({
        "requests": len(requests), "output_tokens": tokens, "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan if makespan > 0 else np.nan,
        "throughput_req_s": len(requests) / makespan if makespan > 0 else np.nan,
        "iterations": len(iterations), "busy_share": busy / (makespan * labels.get("replicas", 1)) if makespan else np.nan,
    })
    _describe("ttft", requests["ttft"].to_numpy(), out)
    _describe("itl", itl, out)
    _describe("tpot", requests["tpot"].to_numpy(dtype=float), out)
    _describe("e2e", requests["e2e"].to_numpy(), out)
    _describe("queueing", requests["queueing_delay"].to_numpy(), out)
    out["preemptions"] = int(requests["preemptions"].sum())
    out["kv_util_mean"] = float(iterations["kv_utilisation"].mean()) if len(iterations) else np.nan
    out["kv_util_peak"] = float(iterations["kv_utilisation"].max()) if len(iterations) else np.nan
    out["mean_layers"] = float(exit_layers.mean()) if tokens else np.nan
    out["layers_share"] = out["mean_layers"] / model.num_layers
    out["early_exit_share"] = float((exit_layers < model.num_layers).mean()) if tokens else np.nan
    out["forced_exits"] = int(requests["forced_exits"].sum())
    out["forced_share"] = out["forced_exits"] / tokens if tokens else np.nan
    out["quality"] = float(agrees.mean()) if tokens else np.nan
    return SimResult(requests, iterations, pd.Series(out), labels, work_logs or {}, cost_model)
