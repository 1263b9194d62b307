"""Run every exit rule x KV policy on one workload and put the results side by side.

``full`` never exits, so its KV policy is irrelevant: it runs once, as the baseline the speedups
are measured against. Every run sees the same requests and the same recorded generations.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import pandas as pd
from rich.progress import Progress

from eesim.metrics import SimResult
from eesim.policies import EXIT_RULES, KV_POLICIES, exit_rule
from eesim.simulator import SimConfig, simulate
from eesim.atomic import write_atomic
from eesim.workload import Workload

TABLE_COLUMNS = {
    "policy": "policy", "throughput_tok_s": "tok/s", "speedup": "speedup", "itl_speedup": "ITL speedup",
    "itl_mean": "ITL mean ms",
    "itl_p99": "ITL p99 ms", "ttft_p50": "TTFT p50 ms", "ttft_p99": "TTFT p99 ms", "mean_layers": "layers/token",
    "quality": "quality", "forced_share": "forced", "preemptions": "preempt",
}


def policy_pairs(rules: Iterable[str] | None = None, kv_policies: Iterable[str] | None = None) -> list[tuple[str, str]]:
    rules = list(rules) if rules else sorted(EXIT_RULES, key=lambda r: (r != "full", r))
    kv_policies = list(kv_policies) if kv_policies else sorted(KV_POLICIES)
    pairs = []
    for rule in rules:
        if not exit_rule(rule).checks_confidence:
            # never exits: one run stands for every KV policy
            pairs.append((rule, "fill" if "fill" in kv_policies else kv_policies[0]))
        else:
            pairs.extend((rule, kv) for kv in kv_policies)
    return pairs


def compare(workload: Workload, base: SimConfig, pairs: list[tuple[str, str]] | None = None,
            progress: bool = True) -> tuple[pd.DataFrame, dict[str, SimResult]]:
    """Simulate each (exit rule, KV policy) pair; returns the summary table and each run's result."""
    pairs = pairs or policy_pairs()
    results: dict[str, SimResult] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("simulating", total=len(pairs))
        for rule, kv in pairs:
            label = rule if not exit_rule(rule).checks_confidence else f"{rule} + {kv}"
            bar.update(task, description=f"simulating {label}")
            results[label] = simulate(workload, replace(base, exit_rule=rule, kv_policy=kv))
            bar.advance(task)
    summary = pd.DataFrame([r.summary for r in results.values()])
    summary.insert(0, "policy", list(results))
    baseline = summary[summary["exit_rule"] == "full"]
    has_baseline = len(baseline) > 0
    # throughput speedup, and inter-token latency speedup (what early exit buys below saturation)
    summary["speedup"] = summary["throughput_tok_s"] / baseline["throughput_tok_s"].iloc[0] if has_baseline else float("nan")
    summary["itl_speedup"] = baseline["itl_mean"].iloc[0] / summary["itl_mean"] if has_baseline else float("nan")
    return summary, results


def format_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The columns a reader compares, in readable units (milliseconds, 3 significant digits)."""
    table = summary[list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS).copy()
    for col in ("ITL mean ms", "ITL p99 ms", "TTFT p50 ms", "TTFT p99 ms"):
        table[col] = table[col] * 1e3
    return table


def plot_comparison(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Throughput against p99 inter-token latency and against quality, and mean inter-token latency
    against quality: one labelled point per policy pair."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), constrained_layout=True)
    panels = (("itl_p99", 1e3, "p99 inter-token latency (ms)", "throughput_tok_s", 1, "throughput (output tokens/s)"),
              ("quality", 1, "quality: share of tokens equal to the full model's", "throughput_tok_s", 1,
               "throughput (output tokens/s)"),
              ("quality", 1, "quality: share of tokens equal to the full model's", "itl_mean", 1e3,
               "mean inter-token latency (ms)"))
    markers = dict(zip(sorted(summary["exit_rule"].unique()), "osD^vP*X"))
    for ax, (xcol, xscale, xlabel, ycol, yscale, ylabel) in zip(axes, panels):
        for row in summary.itertuples(index=False):
            x, y = getattr(row, xcol) * xscale, getattr(row, ycol) * yscale
            ax.scatter(x, y, marker=markers.get(row.exit_rule, "o"), s=50)
            ax.annotate(row.policy, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.grid(alpha=0.3)
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(Path(path), buffer.getvalue())
