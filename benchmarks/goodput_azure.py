"""Goodput on the Azure code hour: the highest request rate each policy serves within a latency objective.

For the llama2-7b preset on the simulated H100, with the project's recorded exit trace (max_prob >= 0.9,
as ``eesim compare``), for every exit rule x KV policy pair and 1, 2, 4, 8, 16 replicas
(least-outstanding router), it finds the highest arrival rate at which the objectives hold. The
workload is the Azure LLM inference trace 2023, code service (``../shared/data/azure_llm_2023_code.csv``),
its first ``--duration`` seconds, time-scaled: rate scale x divides every arrival time by x (same
requests, same prompt and output lengths, same order; prompts clipped to the model's 4,096-token
context). The rate reported is x times the window's own rate (requests / window seconds).

Objectives (options, seconds; 0 switches one off): p99 inter-token latency (pooled over all token gaps)
<= ``--itl-p99`` (0.05) and p99 time to first token <= ``--ttft-p99`` (2.0). Why both: with chunked
prefill the inter-token latency is set by the chunk budget, not by the load, so an ITL objective alone is
met either at no rate (2,048-token chunks: p99 >= 55 ms even at 1/20 of the trace's rate) or at every
rate, however long the queue (512-token chunks); the TTFT objective is what bounds the load.

Search, per policy and replica count (assumes the objectives' metrics grow with the rate): at 1 replica,
from ``--start-scale`` doubling or halving until the objectives' pass/fail flips, then geometric
bisection until hi/lo <= 1 + ``--tolerance``; at N replicas the same from N x (the 1-replica goodput
scale) with a first step of ``--step`` (1.25), since N replicas serve about N times the rate (the step
squares, up to 4x, while the outcome does not flip). The scale stops at ``--min-span``: above it the
window's arrivals would span less than that many seconds (default 60, 30 times the TTFT objective), and
a window squeezed that short is one burst, not a sustained rate; a search that passes there reports its
goodput as a lower bound (status "meets at span cap", ``>=`` in the tables). The simulator is
deterministic, so ``--cache`` reuses the simulations of an earlier run's ``_evals.csv`` made with the same
settings (its ``settings`` column) and runs only the new ones. Searches run on a
process pool (``--workers``); each simulation is one ``eesim.simulate`` of the whole window.

Cost models: ``profile`` (default) is ``ProfileCostModel`` on ``traces/profiles/llama2-7b.parquet`` (the
H100 profile of the GPU executor, 2026-11-22); ``analytical`` is the simulator's roofline default. The
profile was measured with exits every 4 layers (4, 8, ..., 28) and the recorded trace drives exits at 8,
16, 24, so the profile is first restricted to those exits (``eesim.profile_cost.restrict_exits``: decode points at the
kept depths with the checks the profiled passes made at the dropped exits taken back out, and the check
measurements rescaled to the kept number of checks, per-check cost unchanged).

    python benchmarks/goodput_azure.py                                   # the table in docs/goodput.md
    python benchmarks/goodput_azure.py --cost-model analytical --replicas 1,4,16 --out docs/data/goodput_azure_analytical_DATE
    python benchmarks/goodput_azure.py --policies full,per_sequence+fill --replicas 1,2 --duration 300

Writes ``<out>.csv`` (one row per policy and replica count), ``<out>_evals.csv`` (every simulation the
search ran, pass or fail) and ``<out>.png`` (goodput against replicas, one line per policy), atomically.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import math
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "data" / "azure_llm_2023_code.csv"
DEFAULT_PROFILE = ROOT / "traces" / "profiles" / "llama2-7b.parquet"
METRICS = ("itl_p50", "itl_p99", "ttft_p50", "ttft_p90", "ttft_p99", "throughput_tok_s", "quality", "mean_layers",
           "preemptions", "makespan_s")
OBJECTIVES = {"itl_p99": "ITL p99", "ttft_p99": "TTFT p99"}


def settings_key(opts: tuple) -> str:
    """A short stable key of the simulation settings (for reusing cached simulations)."""
    import hashlib

    return hashlib.sha256(repr(opts).encode()).hexdigest()[:12]


# ---- the profile, restricted to the exits the recorded trace uses --------------------------------------
# ---- one simulation (in a worker) ------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _setup(opts: tuple):
    import eesim
    from eesim.defaults import load_exit_trace
    from eesim.workload import read_request_trace

    o = dict(opts)
    trace, model, source = load_exit_trace("default", eesim.MODEL_PRESETS["llama2-7b"])
    full = read_request_trace(o["trace"])
    window = full.window(0.0, o["duration"]) if o["duration"] > 0 else full
    workload, clipped = window.clip(model.max_context)
    return trace, model, source, workload, clipped


def simulate_at(opts: tuple, rule: str, kv: str, replicas: int, scale: float) -> dict:
    """One simulation of the window at ``scale`` times its rate; the summary's metrics and the wall time."""
    import eesim
    from eesim.config import SimConfig
    from eesim.scheduler import SchedulerConfig
    from eesim.simulator import simulate

    o = dict(opts)
    trace, model, _, workload, _ = _setup(opts)
    # the cost model by name: eesim.cost_choice fits a profile once per file and gives each run its own counters
    config = SimConfig(model, eesim.HARDWARE_PRESETS["h100"], trace, rule, kv, measure=o["measure"],
                       threshold=o["threshold"], replicas=replicas, router=o["router"], seed=0, keep_work=0,
                       scheduler=SchedulerConfig(max_num_seqs=o["max_num_seqs"],
                                                 max_num_batched_tokens=o["max_batched_tokens"]),
                       cost_model="analytical" if o["cost_model"] == "analytical" else o["profile"])
    started = time.perf_counter()
    result = simulate(workload.scale_rate(scale), config)
    s = result.summary
    row = {k: float(s[k]) for k in METRICS}
    row["iterations"] = int(s["iterations"])
    row["extrapolated_steps"] = int(getattr(result.cost_model, "extrapolated_steps", 0))
    row["wall_s"] = time.perf_counter() - started
    return row


def _passes(row: dict, objectives: dict[str, float]) -> bool:
    return all(row[k] <= v for k, v in objectives.items())


def search(task: dict) -> dict:
    """The highest scale meeting the objectives for one policy and replica count (runs in a worker)."""
    opts, rule, kv, n = task["opts"], task["rule"], task["kv"], task["replicas"]
    objectives, tol, max_evals = task["objectives"], task["tolerance"], task["max_evals"]
    start, step, cap = task["start"], task["step"], task["max_scale"]
    cached = task.get("cached", [])
    evals: list[dict] = []

    def run(scale: float) -> bool:
        hit = next((c for c in cached if math.isclose(c["scale"], scale, rel_tol=1e-9)), None)
        row = dict(hit) if hit is not None else simulate_at(opts, rule, kv, n, scale)
        row.pop("scale", None)
        row.pop("pass", None)
        row["cached"] = hit is not None
        ok = _passes(row, objectives)
        evals.append({"scale": scale, "pass": ok, **row})
        return ok

    lo = hi = None  # highest passing, lowest failing scale
    x = min(start, cap)
    capped = False
    if run(x):
        lo = x
        while len(evals) < max_evals:
            if x >= cap:
                capped = True
                break
            x = min(x * step, cap)
            if run(x):
                lo = x
                step = min(step * step, 4.0)  # still passing: take longer steps
            else:
                hi = x
                break
    else:
        hi = x
        for _ in range(task["max_down"]):
            if len(evals) >= max_evals:
                break
            x /= step
            if run(x):
                lo = x
                break
            hi = x
            step = min(step * step, 4.0)
    while lo is not None and hi is not None and hi / lo > 1 + tol and len(evals) < max_evals:
        mid = math.sqrt(lo * hi)
        if run(mid):
            lo = mid
        else:
            hi = mid
    if lo is None:
        status = "fails at lowest scale"
    elif capped:
        status = "meets at span cap"
    elif hi is None:
        status = "meets at highest scale"
    elif hi / lo > 1 + tol:
        status = "stopped (evaluation cap)"
    else:
        status = "ok"
    best = next((e for e in evals if e["scale"] == lo), None) if lo is not None else None
    worst = next((e for e in evals if e["scale"] == hi), None) if hi is not None else None
    binding = ",".join(OBJECTIVES.get(k, k) for k, v in objectives.items() if worst is not None and worst[k] > v)
    out = {"policy": task["label"], "rule": rule, "kv_policy": kv, "replicas": n, "status": status,
           "goodput_scale": lo if lo is not None else float("nan"), "lower_bound": status.startswith("meets"),
           "fail_scale": hi if hi is not None else float("nan"), "binding": binding or "-",
           "evaluations": len(evals), "simulated": sum(not e["cached"] for e in evals),
           "search_wall_s": sum(e["wall_s"] for e in evals if not e["cached"])}
    for k in METRICS + ("extrapolated_steps", "iterations"):
        out[k] = best[k] if best is not None else float("nan")
    return {"row": out, "evals": [{"policy": task["label"], "replicas": n, **e} for e in evals]}


# ---- driver ----------------------------------------------------------------------------------------------
def _pairs(spec: str) -> list[tuple[str, str, str]]:
    from eesim.policies import exit_rule

    from eesim.comparison import policy_pairs

    if not spec:
        pairs = policy_pairs()
    else:
        pairs = []
        for item in spec.split(","):
            rule, _, kv = (s.strip() for s in item.replace("/", "+").partition("+"))
            pairs.append((rule, kv or "fill"))
    out = []
    for rule, kv in pairs:
        never = not exit_rule(rule).checks_confidence
        out.append((rule if never else f"{rule} + {kv}", rule, "fill" if never else kv))
    return out


def _markdown(frame: pd.DataFrame, columns: dict[str, str], formats: dict[str, str]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in frame.itertuples(index=False):
        cells = []
        for c in columns:
            v = getattr(row, c)
            if isinstance(v, (float, np.floating)):
                cells.append("-" if not np.isfinite(v) else format(v, formats.get(c, ".3g")))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bounded(v: float, bound: str, fmt: str) -> str:
    if not np.isfinite(v):
        return "-"
    return {"=": "", ">=": ">= ", "<=": "<= ", "?": "? "}[bound] + format(v, fmt)


def _display(frame: pd.DataFrame) -> pd.DataFrame:
    """The result table with text cells: goodput marked >= where it is a lower bound, speedups likewise."""
    lb = frame["lower_bound"].map(lambda b: ">=" if b else "=")
    return frame.assign(
        goodput=[_bounded(v, b, ".2f") for v, b in zip(frame["goodput_req_s"], lb)],
        per_replica=[_bounded(v, b, ".2f") for v, b in zip(frame["goodput_req_s_per_replica"], lb)],
        speedup=[_bounded(v, b, ".2f") for v, b in zip(frame["speedup_vs_full"], frame["speedup_bound"])],
        itl_p99_ms=frame["itl_p99"] * 1e3, ttft_p99_s=frame["ttft_p99"])


def pivot_table(frame: pd.DataFrame, order: list[str]) -> str:
    """Markdown: one row per policy, one column per replica count, goodput (and x full) in each cell."""
    d = _display(frame)
    ns = sorted(frame["replicas"].unique())
    lines = ["| policy | " + " | ".join(f"{n} replica{'s' if n > 1 else ''}" for n in ns) + " |",
             "|---|" + "---|" * len(ns)]
    for label in order:
        cells = []
        for n in ns:
            r = d[(d["policy"] == label) & (d["replicas"] == n)]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            sp = f" ({r['speedup']}x)" if r["rule"] != "full" and r["speedup"] != "-" else ""
            cells.append(r["goodput"] + sp)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(frame: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eesim.atomic import write_atomic

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), constrained_layout=True)
    styles = {"fill": "-", "copy_hidden": "--", "recompute": ":"}
    markers = {"full": "o", "all_confident": "s", "per_sequence": "D", "quorum": "^"}
    for policy, g in frame.groupby("policy", sort=False):
        g = g.sort_values("replicas")
        full = g["rule"].iloc[0] == "full"
        style = {"linestyle": "-" if full else styles.get(g["kv_policy"].iloc[0], "-"),
                 "marker": markers.get(g["rule"].iloc[0], "o"), "label": policy,
                 "linewidth": 2.5 if full else 1.3, "color": "black" if full else None}
        line = axes[0].plot(g["replicas"], g["goodput_req_s"], **style)[0]
        axes[1].plot(g["replicas"], g["goodput_req_s"] / g["replicas"], **style)
        lb = g[g["lower_bound"]]
        for ax, y in ((axes[0], lb["goodput_req_s"]), (axes[1], lb["goodput_req_s"] / lb["replicas"])):
            ax.scatter(lb["replicas"], y, marker=r"$\uparrow$", s=320, color=line.get_color(), zorder=5)
    axes[0].set_ylabel("goodput (requests/s, all replicas)")
    axes[1].set_ylabel("goodput per replica (requests/s)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(frame["replicas"].unique()))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("replicas (H100s)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_ylim(bottom=0)
    axes[0].legend(fontsize=7, ncol=2, loc="lower right")
    if frame["lower_bound"].any():
        title += "\n(arrow: the search reached the span cap, the goodput is at least this)"
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    today = dt.date.today().isoformat()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="the Azure code request trace (CSV)")
    p.add_argument("--duration", type=float, default=600.0,
                   help="simulate the first S seconds of the trace (0: all of it); default 600")
    p.add_argument("--cost-model", choices=("profile", "analytical"), default="profile")
    p.add_argument("--profile", default=str(DEFAULT_PROFILE), help="the H100 profile for --cost-model profile")
    p.add_argument("--policies", default="", help="comma-separated rule+kv pairs, e.g. full,per_sequence+fill "
                                                  "(default: every pair, as eesim compare)")
    p.add_argument("--replicas", default="1,2,4,8,16", help="comma-separated replica counts")
    p.add_argument("--itl-p99", type=float, default=0.05, help="objective: p99 inter-token latency <= this (s; 0: off)")
    p.add_argument("--ttft-p99", type=float, default=2.0, help="objective: p99 time to first token <= this (s; 0: off)")
    p.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per iteration (prefill chunk budget)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--router", default="least_outstanding", help="least_outstanding or round_robin")
    p.add_argument("--measure", default="max_prob")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--tolerance", type=float, default=0.05, help="bisect until hi/lo <= 1 + this")
    p.add_argument("--start-scale", type=float, default=0.5, help="first rate scale tried at the fewest replicas")
    p.add_argument("--step", type=float, default=1.25, help="bracketing step around N x the 1-replica goodput")
    p.add_argument("--max-evals", type=int, default=12, help="simulations per search at most")
    p.add_argument("--min-span", type=float, default=60.0,
                   help="highest scale: the window's arrivals span at least this many seconds (0: no cap)")
    p.add_argument("--cache", default="", help="an _evals.csv of an earlier run: its simulations with the same "
                                               "settings are reused instead of rerun (the simulator is deterministic)")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--out", default=f"docs/data/goodput_azure_{today}", help="output prefix (.csv, _evals.csv, .png)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    from eesim.atomic import write_atomic

    objectives = {k: v for k, v in (("itl_p99", args.itl_p99), ("ttft_p99", args.ttft_p99)) if v > 0}
    if not objectives:
        raise SystemExit("give at least one objective (--itl-p99, --ttft-p99)")
    replicas = sorted({int(r) for r in args.replicas.split(",") if r.strip()})
    if not replicas or replicas[0] < 1:
        raise SystemExit(f"--replicas: positive integers, got {args.replicas!r}")
    pairs = _pairs(args.policies)
    opts = tuple(sorted({"trace": str(args.trace), "duration": args.duration, "cost_model": args.cost_model,
                         "profile": str(args.profile), "measure": args.measure, "threshold": args.threshold,
                         "router": args.router, "max_num_seqs": args.max_num_seqs,
                         "max_batched_tokens": args.max_batched_tokens}.items()))
    _, model, trace_source, workload, clipped = _setup(opts)
    window = args.duration if args.duration > 0 else workload.duration
    base_rate = workload.num_requests / window
    mean_out = float(np.mean([r.output_len for r in workload.requests]))
    mean_prompt = float(np.mean([r.prompt_len for r in workload.requests]))
    goals = " and ".join(f"{OBJECTIVES[k]} <= {v * 1e3:g} ms" for k, v in objectives.items())
    cost_desc = "analytical (roofline) cost model" if args.cost_model == "analytical" else \
        f"profile cost model ({Path(args.profile).name}, restricted to exits {list(model.exit_layers)})"
    print(f"Azure code trace, first {window:g} s: {workload.num_requests} requests ({base_rate:.3f} req/s, mean prompt "
          f"{mean_prompt:.0f} / output {mean_out:.1f} tokens, {clipped} clipped to {model.max_context}); llama2-7b on "
          f"simulated h100, {cost_desc}; exit trace {trace_source}, exits {list(model.exit_layers)}; "
          f"{args.measure} >= {args.threshold}; {args.router} router; {args.max_batched_tokens}-token chunks; "
          f"objectives {goals}; {len(pairs)} policies x replicas {replicas}; {args.workers} workers", flush=True)

    common = {"opts": opts, "objectives": objectives, "tolerance": args.tolerance, "max_evals": args.max_evals}
    # a window squeezed into less than --min-span seconds is one burst, not a sustained rate: scales stop there
    max_scale = window / args.min_span if args.min_span > 0 else math.inf
    settings = settings_key(opts)
    cache: dict[tuple[str, int], list[dict]] = {}
    if args.cache:
        old = pd.read_csv(args.cache)
        old = old[old["settings"].astype(str) == settings] if "settings" in old else old.iloc[:0]
        for (label, n), g in old.groupby(["policy", "replicas"]):
            cache[(label, int(n))] = g.drop(columns=["policy", "replicas", "settings", "rate_req_s", "cached"],
                                            errors="ignore").to_dict("records")
        print(f"cache {args.cache}: {len(old)} simulations with these settings ({settings})", flush=True)
    first = replicas[0]
    started = time.perf_counter()
    rows, evals = [], []
    base_scale: dict[str, tuple[float, float]] = {}  # policy -> (goodput scale at `first`, lowest scale tried)

    def task_for(label, rule, kv, n):
        task = _task_for(label, rule, kv, n)
        task["max_scale"] = max_scale
        task["cached"] = cache.get((label, n), [])
        return task

    def _task_for(label, rule, kv, n):
        if n == first:
            return {**common, "label": label, "rule": rule, "kv": kv, "replicas": n,
                    "start": args.start_scale * n / first, "step": 2.0, "max_down": 5}
        s1, lowest = base_scale[label]
        if np.isfinite(s1):
            return {**common, "label": label, "rule": rule, "kv": kv, "replicas": n,
                    "start": s1 * n / first, "step": args.step, "max_down": 8}
        # never met at the fewest replicas: one try at the lowest rate per replica tried there
        return {**common, "label": label, "rule": rule, "kv": kv, "replicas": n,
                "start": lowest * n / first, "step": 2.0, "max_down": 0, "max_evals": 1}

    def finish(result):
        row = result["row"]
        rows.append(row)
        evals.extend(result["evals"])
        print(f"  [{time.perf_counter() - started:6.0f} s] {row['policy']:<28} x{row['replicas']:<3} "
              f"{row['status']:<22} scale {row['goodput_scale']:.3g} ({row['goodput_scale'] * base_rate:.3g} req/s), "
              f"fails at {row['fail_scale']:.3g} on {row['binding']}; {row['evaluations']} runs "
              f"({row['simulated']} simulated), "
              f"{row['search_wall_s']:.0f} s", flush=True)
        if row["replicas"] == first:
            tried = [e["scale"] for e in result["evals"]]
            base_scale[row["policy"]] = (row["goodput_scale"], min(tried))
            return [task_for(row["policy"], row["rule"], row["kv_policy"], n) for n in replicas if n != first]
        return []

    tasks = [task_for(label, rule, kv, first) for label, rule, kv in pairs]
    if args.workers <= 1:
        while tasks:
            tasks.extend(finish(search(tasks.pop(0))))
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            pending = {pool.submit(search, t) for t in tasks}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    for t in finish(fut.result()):
                        pending.add(pool.submit(search, t))
    wall = time.perf_counter() - started

    order = {label: i for i, (label, _, _) in enumerate(pairs)}
    frame = pd.DataFrame(rows)
    frame = frame.sort_values(["policy", "replicas"], key=lambda s: s.map(order) if s.name == "policy" else s,
                              ignore_index=True)
    frame.insert(5, "goodput_req_s", frame["goodput_scale"] * base_rate)
    frame.insert(6, "goodput_req_s_per_replica", frame["goodput_req_s"] / frame["replicas"])
    full = frame[frame["rule"] == "full"].set_index("replicas")["goodput_req_s"]
    frame.insert(7, "speedup_vs_full", frame["goodput_req_s"] / frame["replicas"].map(full).astype(float))
    full_lb = frame[frame["rule"] == "full"].set_index("replicas")["lower_bound"]
    # "=": both exact; ">=": this policy's goodput is a lower bound; "<=": full's is; "?": both are
    frame.insert(8, "speedup_bound", [("?" if lb and flb else ">=" if lb else "<=" if flb else "=")
                                      for lb, flb in zip(frame["lower_bound"], frame["replicas"].map(full_lb))])
    frame.insert(9, "span_s", window / frame["goodput_scale"])
    for k, v in (("cost_model", args.cost_model), ("duration_s", window), ("min_span_s", args.min_span), ("window_requests", workload.num_requests),
                 ("window_rate_req_s", base_rate), ("max_batched_tokens", args.max_batched_tokens),
                 ("router", args.router), ("threshold", args.threshold), ("measure", args.measure),
                 ("objectives", goals)):
        frame[k] = v
    ev = pd.DataFrame(evals)
    ev.insert(3, "rate_req_s", ev["scale"] * base_rate)
    ev["settings"] = settings

    out = Path(args.out)
    write_atomic(out.with_name(out.name + ".csv"), frame.to_csv(index=False).encode())
    write_atomic(out.with_name(out.name + "_evals.csv"), ev.to_csv(index=False).encode())
    title = (f"Goodput ({goals}) on the Azure code trace, first {window:g} s time-scaled; llama2-7b on simulated H100s, "
             f"{cost_desc}; {args.router} router; {args.max_batched_tokens}-token chunks; max_prob >= {args.threshold}")
    if not args.no_plot:
        _plot(frame, out.with_name(out.name + ".png"), title)

    print()
    fresh = ev[~ev["cached"]]
    print(f"{title}; {len(ev)} simulations ({len(fresh)} run now, {len(ev) - len(fresh)} from the cache), {wall:.0f} s "
          f"wall on {args.workers} workers (median {fresh['wall_s'].median() if len(fresh) else float('nan'):.2f} s per "
          f"simulation); scales capped at {max_scale:.3g} (arrivals spanning >= {args.min_span:g} s)")
    print()
    print(_markdown(_display(frame), {
        "policy": "policy", "replicas": "replicas", "goodput": "goodput req/s", "per_replica": "per replica",
        "throughput_tok_s": "tok/s", "speedup": "vs full", "itl_p99_ms": "ITL p99 ms", "ttft_p99_s": "TTFT p99 s",
        "quality": "quality", "binding": "fails next on", "status": "status"},
        {"throughput_tok_s": ".0f", "itl_p99_ms": ".1f", "ttft_p99_s": ".2f", "quality": ".3f"}))
    print()
    print("goodput, requests/s (x full at the same replica count; >= : the search reached the span cap):")
    print(pivot_table(frame, [label for label, _, _ in pairs]))
    print()
    print(f"wrote {out}.csv, {out}_evals.csv" + ("" if args.no_plot else f", {out}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
