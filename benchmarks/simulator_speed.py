"""Benchmark: replay the Azure LLM code-service hour on the Llama-2-7B preset (all_confident + fill).

Prints wall time, simulated requests and simulated tokens per wall second. Goal: the hour in under
3 s on the 2-core development machine, with either cost model (the profile-backed one within ~10% of
the analytical one). Usage:

    python benchmarks/simulator_speed.py [--trace ../shared/data/azure_llm_2023_code.csv] [--repeats 3]
        [--cost-model analytical,profile] [--write-profile PATH]

``--cost-model``: one or more (comma-separated) of the simulator's values (``auto``, ``analytical``,
``profile``: the bundled H100 profile of llama2-7b, or a profile parquet path; see eesim/cost_choice.py),
``profile:PATH`` (the same as PATH) or ``profile:synthetic``, which builds (once, in a temporary folder) a
profile of the llama2-7b shape on the profiler's default grid whose timings come from the analytical model
at each grid point, so that the benchmark exercises the same code paths as a measured profile without a
GPU; ``--write-profile PATH`` writes that synthetic profile to PATH and exits. Each cost model is built
before the timed runs (a profile's one-off fit is printed apart), as the simulator keeps it for every run
of a process.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from eesim.cost_model import AnalyticalCostModel
from eesim.exit_trace import default_synthetic_trace
from eesim.hardware import HARDWARE_PRESETS
from eesim.model_spec import MODEL_PRESETS
from eesim.plan import IterationWork
from eesim.simulator import SimConfig, simulate
from eesim.workload import read_request_trace

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure_llm_2023_code.csv"


def _work(S, full, attn, kv, proj=None, rec=None, chk=None, logit=None, reach=None) -> IterationWork:
    row = lambda v: np.asarray(v, dtype=np.float64).reshape(1, S) if v is not None else np.zeros((1, S))
    chk_a = row(chk)
    return IterationWork(row(full), row(attn), row(kv), row(proj), row(rec), chk_a, row(logit),
                         (chk_a > 0).sum(axis=1), np.array([S - 1 if reach is None else reach]), np.zeros(1))


def synthetic_profile_frame(model, hardware, grid=None) -> tuple[pd.DataFrame, dict]:
    """A profile of ``model``'s shape on the profiler's grid, each point timed by the analytical model."""
    from eesim.profile_data import spec_to_meta
    from eesim.profiler import GRIDS

    g = grid or GRIDS["default"]
    ana = AnalyticalCostModel(model, hardware)
    L, S = model.num_layers, model.num_segments
    exits = list(model.all_exits)
    bounds = np.asarray(model.segment_bounds)
    rows = []

    def add(comp, layers=0, batch=0, context=0, tokens=0, checks=0, t=0.0):
        rows.append({"component": comp, "layers": layers, "batch": batch, "context": context, "tokens": tokens,
                     "checks": checks, "median_s": float(t), "p25_s": float(t) * 0.98, "p75_s": float(t) * 1.02,
                     "repeats": g.repeats})

    def decode(b, c, k, checks=True):
        """b rows of context c all leaving at exit index k (checked at every exit they pass)."""
        ran = np.arange(S) <= k
        full = b * ran
        chk = full.copy() if checks else np.zeros(S)
        chk[-1] = 0
        proj = b * ~ran
        logit = chk.copy()
        logit[k] = b
        return _work(S, full, full * c, full * c, proj=proj, chk=chk, logit=logit, reach=k)

    fill = lambda b, layers: layers * max(model.kv_proj_weight_bytes_per_layer / ana.bandwidth,
                                          b * 2.0 * model.kv_proj_params_per_layer / ana.flop_rate) + 5e-6
    for b in g.batches:
        add("schedule", 0, b, t=10e-6 + 0.3e-6 * b)
    add("fixed", L, 1, 16, t=ana.fixed)
    for e in exits:
        k = exits.index(e)
        for b in g.batches:
            for c in g.contexts:
                add("decode", e, b, c, t=ana.iteration_time(decode(b, c, k))[0] + (fill(b, L - e) if e < L else 0))
    for b in g.batches:
        w = decode(b, g.check_context, S - 1)
        w.check_rows[0, :-1] = b
        w.syncs[:] = S - 1
        t = ana.iteration_time(w)[0]
        add("check", L, b, g.check_context, 0, S - 1, t=t)
        full = ana.iteration_time(decode(b, g.check_context, S - 1, checks=False))[0]
        add("check_eager", L, b, g.check_context, 0, S - 1, t=full + 1.5 * (t - full))
    for e in model.exit_layers:
        for b in g.batches:
            add("fill", L - e, b, t=fill(b, L - e))
    for n in g.chunks:
        for p in g.prefill_contexts:
            if p + n <= model.max_context:
                full = np.full(S, float(n))
                attn = np.full(S, n * p + n * (n + 1) / 2)
                kv = np.full(S, (p + n) * -(-n // 128))
                logit = np.zeros(S)
                logit[-1] = 1
                add("prefill", L, 0, p, n, t=ana.iteration_time(_work(S, full, attn, kv, logit=logit))[0])
    mc = g.mixed_context
    for checks in (0, S - 1):
        for d in g.mixed_batches:
            for n in g.mixed_chunks:
                full = np.full(S, float(n + d))
                attn = np.full(S, n * (n + 1) / 2 + d * mc)
                kv = np.full(S, n * -(-n // 128) + d * mc)
                chk = np.full(S, float(d) if checks else 0.0)
                chk[-1] = 0
                logit = chk.copy()
                logit[-1] = d + 1
                add("mixed", L, d, mc, n, checks, t=ana.iteration_time(_work(S, full, attn, kv, chk=chk, logit=logit))[0])
    ob, oc = g.owed_batch, g.owed_context
    depths = sorted({model.exit_layers[0], model.exit_layers[len(model.exit_layers) // 2], model.exit_layers[-1]})
    for comp in ("proj", "recompute"):
        for dpt in depths:
            for m in g.owed_rows:
                after = bounds[1:] > dpt
                full = np.full(S, float(ob))
                kv = full * oc
                attn = kv.copy()
                proj = rec = None
                if comp == "proj":
                    proj = m * after
                else:
                    rec = m * after
                    full = full + rec
                    attn = attn + rec * (oc - 1)
                    kv = kv + rec * (oc - 1)
                logit = np.zeros(S)
                logit[-1] = ob
                add(comp, L - dpt, ob, oc, m, t=ana.iteration_time(_work(S, full, attn, kv, proj, rec, logit=logit))[0])
    meta = {"format": 1, "model": spec_to_meta(model), "gpu": f"synthetic ({hardware.name} analytical)",
            "grid": g.to_meta(), "check_context": g.check_context, "mixed_context": g.mixed_context,
            "owed_batch": g.owed_batch, "owed_context": g.owed_context}
    return pd.DataFrame(rows), meta


def write_synthetic_profile(path, model, hardware) -> Path:
    from eesim.profile_data import write_profile

    frame, meta = synthetic_profile_frame(model, hardware)
    write_profile(path, frame, meta)
    return Path(path)


_SYNTHETIC: list[Path] = []


def make_cost_model(spec: str, config):
    """The cost model ``spec`` names for ``config`` (as the simulator resolves SimConfig.cost_model)."""
    from dataclasses import replace

    from eesim.cost_choice import resolve_cost_model

    kind, _, where = spec.partition(":")
    if kind == "profile" and where:
        if where == "synthetic":
            if not _SYNTHETIC:
                _SYNTHETIC.append(write_synthetic_profile(Path(tempfile.mkdtemp()) / "llama2-7b.parquet",
                                                          config.model, config.hardware))
            where = str(_SYNTHETIC[0])
        spec = where
    return resolve_cost_model(replace(config, cost_model=spec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", default="all_confident/fill",
                        help="comma-separated rule/kv pairs, e.g. full/fill,all_confident/fill")
    parser.add_argument("--cost-model", default="analytical",
                        help="comma-separated: auto, analytical, profile, a profile parquet of the llama2-7b shape, "
                             "profile:PATH or profile:synthetic")
    parser.add_argument("--write-profile", default="", help="write the synthetic llama2-7b profile here and exit")
    args = parser.parse_args()

    model = MODEL_PRESETS["llama2-7b"]
    hardware = HARDWARE_PRESETS["h100"]
    if args.write_profile:
        print(f"wrote {write_synthetic_profile(args.write_profile, model, hardware)}")
        return
    workload, clipped = read_request_trace(args.trace).clip(model.max_context)
    trace = default_synthetic_trace(model.num_layers, model.all_exits)
    table = Table(title=f"Simulated Azure code hour ({workload.num_requests} requests, {clipped} clipped to "
                        f"{model.max_context} tokens), llama2-7b on h100 — "
                        f"{platform.processor() or platform.machine()}")
    for col in ("cost model", "policy", "wall s (best)", "wall s (median)", "iterations", "sim req/wall s",
                "sim tok/wall s", "sim s/wall s", "extrapolated steps", "fit s"):
        table.add_column(col, justify="right")
    for spec in args.cost_model.split(","):
        for pair in args.policies.split(","):
            rule, kv = pair.split("/")
            config = SimConfig(model, hardware, trace, rule, kv)
            t0 = time.perf_counter()
            cost = make_cost_model(spec, config)
            fit = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                if hasattr(cost, "reset_counters"):
                    cost.reset_counters()
                t0 = time.perf_counter()
                result = simulate(workload, config, cost)
                times.append(time.perf_counter() - t0)
            best, median = min(times), sorted(times)[len(times) // 2]
            s = result.summary
            table.add_row(s.cost_model, pair, f"{best:.2f}", f"{median:.2f}", f"{s.iterations:,}",
                          f"{s.requests / best:,.0f}", f"{s.output_tokens / best:,.0f}", f"{s.makespan_s / best:,.0f}",
                          f"{cost.extrapolated_steps:,}" if hasattr(cost, "extrapolated_steps") else "-",
                          f"{fit:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
