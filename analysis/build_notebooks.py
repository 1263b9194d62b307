"""Write the analysis notebooks (outputs empty) from the cell sources below.

    python analysis/build_notebooks.py      # rewrites analysis/*.ipynb

Each notebook starts with a ``parameters`` cell (papermill's tag): small settings that CI overrides
(tests/test_notebooks.py runs them headless with nbclient). The code calls eesim's API (eesim/api.py).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import matplotlib.pyplot as plt
import pandas as pd

import eesim
from eesim import api
pd.set_option("display.width", 200)"""

NOTEBOOKS = {
    "policy_comparison.ipynb": [
        ("md", "# Policy comparison\n\nEvery exit rule x KV policy on one workload: throughput, latency "
               "percentiles, quality (share of tokens equal to the full model's), layers per token, and latency "
               "CDFs. Simulated, priced by the cost model SimConfig.cost_model picks (auto: the bundled profile of a "
               "profiled shape on its GPU, else the analytical model); the title of each figure names it, the "
               "hardware, model and workload."),
        ("params", """\
MODEL = "llama2-7b"
HARDWARE = "h100"
EXIT_TRACE = "default"      # the project's recorded trace (synthetic when absent), or a parquet path
RATE = 2.5                  # requests/s (poisson)
DURATION = 240              # seconds of arrivals
MEASURE = "max_prob"
THRESHOLD = 0.9             # or "calibrated:eesim-out/calibrated.json"
RULES = None                # e.g. ["full", "all_confident", "per_sequence"]; None: all registered
KV_POLICIES = None          # None: all registered
SEED = 0"""),
        ("code", SETUP),
        ("code", """\
from eesim.comparison import format_table, policy_pairs

config, workload = api.setup(model=MODEL, hardware=HARDWARE, exit_trace=EXIT_TRACE, measure=MEASURE,
                             threshold=THRESHOLD, workload=f"poisson:rate={RATE},duration={DURATION}", seed=SEED)
summary, results = eesim.compare(workload, config, policy_pairs(RULES, KV_POLICIES), progress=False)
title = api.describe(config, workload)
print(title)
format_table(summary).round(3)"""),
        ("code", """\
fig, axes = plt.subplots(1, 4, figsize=(18, 4.5), constrained_layout=True)
s = summary.set_index("policy")
s["throughput_tok_s"].plot.barh(ax=axes[0], title="throughput (output tok/s)")
(s[["ttft_p50", "ttft_p90", "ttft_p99"]] * 1e3).plot.barh(ax=axes[1], title="TTFT percentiles (ms)")
(s[["itl_p50", "itl_p90", "itl_p99"]] * 1e3).plot.barh(ax=axes[2], title="inter-token latency percentiles (ms)")
s[["quality", "layers_share"]].plot.barh(ax=axes[3], title="quality and layers/token (share of depth)")
for ax in axes[1:]:
    ax.set_yticklabels([])
fig.suptitle(title, fontsize=9)
plt.show()"""),
        ("code", """\
fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), constrained_layout=True)
for ax, column in zip(axes, ("ttft", "tpot")):
    cdf = api.latency_cdf(results, column)
    for policy, group in cdf.groupby("policy", sort=False):
        ax.step(group[column] * 1e3, group["cdf"], where="post", label=policy)
    ax.set_xscale("log")
    ax.set_xlabel(f"{column.upper()} (ms)")
    ax.set_ylabel("share of requests")
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=7)
fig.suptitle("latency CDF — " + title, fontsize=9)
plt.show()"""),
    ],
    "pareto.ipynb": [
        ("md", "# Quality vs throughput over thresholds\n\nA sweep over confidence thresholds for each "
               "early-exit policy (eesim.sweep), at a load high enough for early exit to show in throughput. "
               "Each point is one (policy, threshold) run; the line joins the Pareto front (no other run has both "
               "more throughput and more quality). The dashed line is the full-depth baseline."),
        ("params", """\
MODEL = "llama2-7b"
HARDWARE = "h100"
EXIT_TRACE = "default"
WORKLOAD = "poisson:rate=2.5,duration=120"
RATE_SCALE = 8              # multiply the arrival rate: near saturation, throughput tracks per-token cost
POLICIES = ["full", "all_confident + fill", "per_sequence + copy_hidden", "quorum:q=0.75 + fill"]
THRESHOLDS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
MEASURE = "max_prob"
WORKERS = 0                 # 0: all cores
OUT = None                  # a parquet path to keep (and resume) the sweep's results"""),
        ("code", SETUP),
        ("code", """\
grid = {"base": {"model": MODEL, "hardware": HARDWARE, "exit_trace": EXIT_TRACE, "workload": WORKLOAD,
                 "rate_scale": RATE_SCALE, "measure": MEASURE},
        "grid": {"policy": POLICIES, "threshold": THRESHOLDS}}
table = api.sweep(grid, OUT, workers=WORKERS, progress=False)
title = api.describe(*api.setup(**grid["base"]))
table["pareto"] = api.pareto_front(table, "throughput_tok_s", "quality")
table[["policy", "threshold", "throughput_tok_s", "speedup", "itl_speedup", "quality", "mean_layers", "pareto"]].round(3)"""),
        ("code", """\
fig, axes = plt.subplots(1, 2, figsize=(14, 5), constrained_layout=True)
early = table[table["rule"] != "full"]
for ax, x, label in ((axes[0], "throughput_tok_s", "throughput (output tok/s)"),
                     (axes[1], "itl_speedup", "inter-token latency speedup over full depth")):
    front = early[api.pareto_front(early, x, "quality")].sort_values(x)
    for policy, group in early.groupby("policy", sort=False):
        ax.scatter(group[x], group["quality"], label=policy, s=30)
        for row in group.itertuples():
            ax.annotate(row.threshold, (getattr(row, x), row.quality), fontsize=6, alpha=0.7)
    ax.plot(front[x], front["quality"], "k-", lw=1, alpha=0.6, label="Pareto front")
    full = table[table["rule"] == "full"]
    if len(full):
        ax.axvline(full[x].iloc[0], color="grey", ls="--", lw=1, label="full depth")
    ax.set_xlabel(label)
    ax.set_ylabel("quality (share of tokens equal to the full model's)")
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.suptitle(f"{MEASURE} thresholds — {title}", fontsize=9)
plt.show()"""),
    ],
    "kv_cost.ipynb": [
        ("md", "# What each KV policy costs over time\n\nOne early-exit rule with each KV policy. Memory: "
               "positions owed K/V that wait with their exit hidden state (copy_hidden, recompute) and the "
               "bytes of that buffer. Compute: rows whose skipped layers' K/V is projected (fill, copy_hidden) or "
               "recomputed in full (recompute), from the per-iteration table, in rows x segments and matrix FLOPs."),
        ("params", """\
MODEL = "llama2-7b"
HARDWARE = "h100"
EXIT_TRACE = "default"
WORKLOAD = "poisson:rate=2.5,duration=120"
RATE_SCALE = 4
RULE = "per_sequence"
KV_POLICIES = ["fill", "copy_hidden", "recompute"]
MEASURE = "max_prob"
THRESHOLD = 0.8
BIN_S = 1.0                 # seconds per time bin"""),
        ("code", SETUP),
        ("code", """\
config, workload = api.setup(model=MODEL, hardware=HARDWARE, exit_trace=EXIT_TRACE, workload=WORKLOAD,
                             rate_scale=RATE_SCALE, measure=MEASURE, threshold=THRESHOLD)
summary, results = eesim.compare(workload, config, [(RULE, kv) for kv in KV_POLICIES], progress=False)
cost = api.kv_cost(results, BIN_S)
title = api.describe(config, workload)
totals = cost.groupby("policy", sort=False).agg(peak_owed=("owed_positions", "max"),
                                                peak_buffer_MB=("buffer_bytes", lambda b: b.max() / 1e6),
                                                proj_rows=("proj_rows", "sum"), recompute_rows=("recompute_rows", "sum"),
                                                extra_TFLOP=("proj_flops", lambda f: f.sum() / 1e12))
totals["extra_TFLOP"] += cost.groupby("policy", sort=False)["recompute_flops"].sum() / 1e12
totals.join(summary.set_index("policy")[["throughput_tok_s", "itl_p99", "quality"]]).round(3)"""),
        ("code", """\
fig, axes = plt.subplots(2, 2, figsize=(14, 8), sharex=True, constrained_layout=True)
panels = [("owed_positions", "positions owed K/V (peak per bin)", 1),
          ("buffer_bytes", "hidden-state buffer (MB)", 1e-6),
          ("proj_rows", "K/V projection rows x segments per bin", 1),
          ("recompute_rows", "recompute rows x segments per bin", 1)]
for ax, (column, label, scale) in zip(axes.ravel(), panels):
    for policy, group in cost.groupby("policy", sort=False):
        ax.plot(group["time"], group[column] * scale, label=policy, lw=1)
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3)
for ax in axes[1]:
    ax.set_xlabel("simulated time (s)")
axes[0, 0].legend(fontsize=8)
fig.suptitle(title, fontsize=9)
plt.show()"""),
    ],
}


def build(name: str, cells) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in cells:
        if kind == "md":
            nb.cells.append(new_markdown_cell(source))
        elif kind == "params":
            nb.cells.append(new_code_cell(source, metadata={"tags": ["parameters"]}))
        else:
            nb.cells.append(new_code_cell(source))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem.replace('_', '-')}-{i}"  # stable ids: rebuilding changes nothing
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
