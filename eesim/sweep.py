"""Parameter sweeps and max-goodput search: many ``simulate()`` runs over a grid of settings.

A sweep config is a small TOML or JSON file with two sections, each keyed by setting names (the CLI's
options, with underscores)::

    [base]                      # fixed settings of every cell
    workload = "poisson:rate=2,duration=60"
    exit_trace = "default"
    measure = "max_prob"

    [grid]                      # one list per swept setting: the cells are their cartesian product
    policy = ["full", "all_confident + fill", "per_sequence + copy_hidden"]
    threshold = [0.5, 0.7, 0.9]
    rate_scale = [1, 2, 4]
    replicas = [1]
    max_num_seqs = [64, 256]

Settings (``SETTINGS``): model, hardware, memory_gb, workload, rate_scale (multiplies the workload's
arrival rate, as --rate-scale), rate (requests/s of a poisson/gamma generator workload, replacing its
rate; the duration stays), max_requests, exit_trace, policy ("rule" or "rule + kv_policy"), measure,
threshold (a number, decay:..., or calibrated:PATH), max_num_seqs, max_batched_tokens, block_size,
num_blocks, replicas, router, seed, cost_model (auto, analytical, profile or a profile parquet path: see
eesim.cost_choice). A rule that never exits (``full``) ignores measure, threshold and KV policy: it runs
once per combination of the other settings.

Each cell is one ``simulate()``; its row holds the cell's settings, a stable ``cell`` key (a hash of
the settings), the run's summary (``SimResult.summary``: throughput, TTFT/ITL/TPOT/e2e percentiles,
quality, mean_layers, ...), ``cost_model_label`` (the cost model that priced it, as the summary's
``cost_model`` names it), ``threshold_value`` and ``elapsed_s``. The results file (parquet) is
rewritten atomically after every finished cell, so an interrupted sweep leaves a consistent file, and
a rerun skips the cells already in it (rows of cells not in the current grid are kept).

``max_goodput`` searches, per cell of the grid without its rate settings, the largest rate scale
whose run meets latency objectives (e.g. TTFT p90 <= 1 s and inter-token p99 <= 0.1 s), by doubling
then geometric bisection; it assumes the objectives' metrics grow with load.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import time
import types
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from eesim.errors import EesimError, require

if TYPE_CHECKING:  # numpy, pandas and pyarrow load on first use: registering the CLI stays light
    import pandas as pd

# name -> (kind, default). Kinds: str, number_or_str, float (> 0), nonneg_float, int (>= 1), nonneg_int, any_int.
SETTINGS: dict[str, tuple[str, Any]] = {
    "model": ("str", "llama2-7b"), "hardware": ("str", "h100"), "memory_gb": ("nonneg_float", 0.0),
    "workload": ("str", "default"), "rate_scale": ("float", 1.0), "rate": ("float", None),
    "max_requests": ("nonneg_int", 0), "exit_trace": ("str", "default"),
    "policy": ("str", "all_confident + fill"), "measure": ("str", "max_prob"), "threshold": ("number_or_str", 0.9),
    "max_num_seqs": ("int", 256), "max_batched_tokens": ("int", 2048), "block_size": ("int", 16),
    "num_blocks": ("nonneg_int", 0), "replicas": ("int", 1), "router": ("str", "round_robin"),
    "seed": ("any_int", 0), "cost_model": ("str", "auto"),
}
SECTIONS = ("base", "grid")
RATE_SETTINGS = ("rate_scale", "rate")
SUMMARY_LABELS = ("kv_policy", "measure", "threshold", "replicas", "router", "seed", "model", "hardware")
GOODPUT_COLUMNS = {
    "policy": "exit rule + KV policy", "status": "ok | fails at lowest scale | meets at highest scale",
    "max_rate_scale": "largest rate scale found to meet the objectives (NaN when even the lowest fails)",
    "max_rate_req_s": "the workload's arrival rate at that scale (requests/s, all replicas)",
    "max_rate_per_replica": "the same per replica",
    "throughput_tok_s": "output tokens/s at that scale", "ttft_p90": "s", "itl_p99": "s", "quality": "",
    "mean_layers": "", "evaluations": "simulations run by the search",
    "cost_model_label": "the cost model that priced the runs (the summary's cost_model)",
}


# ---- config -----------------------------------------------------------------------------------------
def _check_value(name: str, value: Any, where: str) -> Any:
    kind = SETTINGS[name][0]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = (is_int or isinstance(value, float)) and not isinstance(value, bool)
    if kind == "str":
        require(isinstance(value, str) and value.strip() != "", f"{where}: {name} must be a non-empty string, got {value!r}")
        return value.strip()
    if kind == "number_or_str":
        require((is_num and math.isfinite(value)) or (isinstance(value, str) and value.strip() != ""),
                f"{where}: {name} must be a number or a string such as 'decay:0.9' or 'calibrated:PATH', got {value!r}")
        return float(value) if is_num else value.strip()
    if kind in ("float", "nonneg_float"):
        ok = is_num and math.isfinite(value) and (value > 0 if kind == "float" else value >= 0)
        require(ok, f"{where}: {name} must be a {'positive' if kind == 'float' else 'non-negative'} number, got {value!r}")
        return float(value)
    require(is_int, f"{where}: {name} must be an integer, got {value!r}")
    require(kind == "any_int" or value >= (1 if kind == "int" else 0),
            f"{where}: {name} must be {'>= 1' if kind == 'int' else '>= 0'}, got {value!r}")
    return int(value)


def _split_policy(policy: str, where: str) -> tuple[str, str | None]:
    rule, plus, kv = policy.partition("+")
    rule, kv = rule.strip(), kv.strip()
    require(rule != "" and (not plus or kv != ""), f"{where}: policy {policy!r} must be 'rule' or 'rule + kv_policy'")
    return rule, (kv or None)


def canonical_cell(settings: dict, where: str = "sweep cell") -> dict:
    """Full settings of one cell (defaults filled in, types normalised, policy split into rule and KV
    policy; measure, threshold and KV policy cleared for a rule that never exits)."""
    from eesim.policies import exit_rule

    unknown = sorted(set(settings) - set(SETTINGS) - {"rule", "kv_policy"})
    require(not unknown, f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    cell = {name: (default if settings.get(name) is None else _check_value(name, settings[name], where))
            for name, (_, default) in SETTINGS.items()}
    rule, kv = _split_policy(cell["policy"], where)
    if exit_rule(rule).checks_confidence:
        kv = kv or "fill"
        cell["policy"] = f"{rule} + {kv}"
    else:
        kv, cell["policy"], cell["measure"], cell["threshold"] = "fill", rule, None, None
    cell["rule"], cell["kv_policy"] = rule, kv
    threshold = cell["threshold"]
    if isinstance(threshold, str):
        try:
            number = float(threshold)
            threshold = number if math.isfinite(number) else threshold
        except ValueError:
            pass
    if isinstance(threshold, float):
        cell["threshold"] = repr(threshold)  # one column type (text); 0.9, "0.9" and "0.90" are the same cell
    return cell


def cell_key(cell: dict) -> str:
    """A stable key: the first 16 hex digits of the SHA-256 of the cell's settings as sorted JSON."""
    text = json.dumps({k: cell[k] for k in sorted(cell)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_sweep_config(path) -> dict:
    """Read a TOML (.toml) or JSON (.json) sweep config; raises EesimError naming the problem."""
    p = Path(path)
    where = f"sweep config {path}"
    require(p.is_file(), f"{where}: no such file")
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(p.read_text())
        elif p.suffix == ".json":
            data = json.loads(p.read_text())
        else:
            raise EesimError(f"{where}: expected a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        if isinstance(exc, EesimError):
            raise
        raise EesimError(f"{where}: not valid {p.suffix[1:].upper()} ({str(exc).splitlines()[0]})") from None
    return validate_config(data, where)


def validate_config(data: Any, where: str = "sweep config") -> dict:
    """Check a config mapping (sections, keys, value types); returns it normalised."""
    require(isinstance(data, dict), f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = sorted(set(data) - set(SECTIONS))
    require(not unknown, f"{where}: unknown key(s) {', '.join(map(str, unknown))}; expected sections {', '.join(SECTIONS)}")
    base, grid = data.get("base", {}), data.get("grid", {})
    for name, section in (("base", base), ("grid", grid)):
        require(isinstance(section, dict), f"{where}: [{name}] must be a table of settings")
        bad = sorted(set(section) - set(SETTINGS))
        require(not bad, f"{where}: unknown setting(s) {', '.join(bad)} in [{name}]; known: {', '.join(SETTINGS)}")
    both = sorted(set(base) & set(grid))
    require(not both, f"{where}: {', '.join(both)} in both [base] and [grid]")
    out_base = {}
    for key, value in base.items():
        require(not isinstance(value, (list, dict)), f"{where}: [base] {key} must be one value (lists go under [grid])")
        out_base[key] = _check_value(key, value, f"{where}: [base]")
    out_grid = {}
    for key, values in grid.items():
        require(isinstance(values, list), f"{where}: [grid] {key} must be a list of values")
        require(len(values) > 0, f"{where}: [grid] {key} is an empty list")
        out_grid[key] = [_check_value(key, v, f"{where}: [grid] {key}[{i}]") for i, v in enumerate(values)]
    require(not ("rate" in base and "rate" in out_grid), f"{where}: rate given twice")
    return {"base": out_base, "grid": out_grid}


def expand(config: dict, where: str = "sweep config", drop: Iterable[str] = ()) -> list[dict]:
    """The grid's cells in grid order (the last key varies fastest), duplicates removed."""
    config = validate_config(config, where)
    grid = {k: v for k, v in config["grid"].items() if k not in drop}
    base = {k: v for k, v in config["base"].items() if k not in drop}
    cells, seen = [], set()
    for combo in itertools.product(*grid.values()):
        cell = canonical_cell({**base, **dict(zip(grid, combo))}, where)
        key = cell_key(cell)
        if key not in seen:
            seen.add(key)
            cells.append(cell | {"cell": key})
    return cells


# ---- building and running one cell ------------------------------------------------------------------
@lru_cache(maxsize=8)
def _trace(spec: str, model_name: str):
    from eesim.defaults import load_exit_trace
    from eesim.model_spec import model_preset

    return load_exit_trace(spec, model_preset(model_name))


@lru_cache(maxsize=16)
def _workload(spec: str, seed: int):
    from eesim.workload import load_workload

    return load_workload(spec, seed=seed)


def _with_rate(spec: str, rate: float) -> str:
    from eesim.workload import DEFAULT_DURATION_S

    spec = spec.strip()
    if spec == "default":
        spec = f"poisson:rate=1,duration={DEFAULT_DURATION_S:g}"
    match = re.fullmatch(r"(poisson|gamma):(.*)", spec)
    require(match is not None, f"rate={rate:g} needs a generator workload (poisson:... or gamma:...), got {spec!r}; "
                               "use rate_scale for a request trace")
    items = [i for i in match.group(2).split(",") if i.strip() and i.partition("=")[0].strip() != "rate"]
    return f"{match.group(1)}:{','.join([f'rate={rate:g}', *items])}"


def build_run(cell: dict, keep_work: int = 0):
    """(SimConfig, Workload, notes) for one cell's settings (as from ``canonical_cell``)."""
    from eesim.calibrate import resolve_threshold
    from eesim.hardware import hardware_preset
    from eesim.policies import exit_rule, kv_policy, measure
    from eesim.scheduler import SchedulerConfig
    from eesim.config import SimConfig

    c = cell if "rule" in cell else canonical_cell(cell)
    rule, kv = exit_rule(c["rule"]), kv_policy(c["kv_policy"])
    conf_measure = measure(c["measure"] or SETTINGS["measure"][1])
    threshold = resolve_threshold(c["threshold"] if c["threshold"] is not None else SETTINGS["threshold"][1],
                                  conf_measure)
    trace, model, source = _trace(c["exit_trace"], c["model"])
    hardware = hardware_preset(c["hardware"])
    if c["memory_gb"]:
        hardware = replace(hardware, memory_bytes=c["memory_gb"] * 1e9)
    hardware.kv_blocks(model, c["block_size"])  # refuse a model that does not fit
    spec = _with_rate(c["workload"], c["rate"]) if c["rate"] is not None else c["workload"]
    workload = _workload(spec, c["seed"])
    if c["rate_scale"] != 1.0:
        workload = workload.scale_rate(c["rate_scale"])
    if c["max_requests"]:
        workload = workload.head(c["max_requests"])
    require(workload.num_requests > 0, f"workload {spec!r} has no requests")
    workload, clipped = workload.clip(model.max_context)
    scheduler = SchedulerConfig(c["max_num_seqs"], c["max_batched_tokens"], c["block_size"], c["num_blocks"])
    config = SimConfig(model, hardware, trace, exit_rule=rule, kv_policy=kv, measure=conf_measure, threshold=threshold,
                       scheduler=scheduler, replicas=c["replicas"], router=c["router"], seed=c["seed"],
                       keep_work=keep_work, cost_model=c["cost_model"])
    from eesim.cost_choice import resolve_cost_model

    resolve_cost_model(config)  # refuse a bad cost model up front (the fit is kept for the runs)
    notes = [f"exit trace: {source}"] + ([f"{clipped} requests clipped to {model.max_context} tokens"] if clipped else [])
    return config, workload, notes


def run_cell(cell: dict) -> dict:
    """Simulate one cell; returns its results row."""
    from eesim.simulator import simulate

    started = time.perf_counter()
    config, workload, _ = build_run(cell)
    result = simulate(workload, config)
    row = dict(cell)
    row["threshold_value"] = config.threshold.value if config.exit_rule.checks_confidence else float("nan")
    row["cost_model_label"] = result.summary["cost_model"]
    for key, value in result.summary.items():
        if key not in row and key not in SUMMARY_LABELS:
            row[key] = value
    row["elapsed_s"] = time.perf_counter() - started
    return row


# ---- executing many tasks ---------------------------------------------------------------------------
def _map(fn: Callable[[dict], dict], items: list[dict], workers: int, ray_address: str | None,
         on_result: Callable[[dict], None]) -> None:
    """Run ``fn`` on every item: in this process (workers == 1), a local process pool, or Ray."""
    if not items:
        return
    if ray_address:
        _map_ray(fn, items, ray_address, on_result)
        return
    if workers == 1 or len(items) == 1:
        for item in items:
            on_result(fn(item))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn: a fresh interpreter per worker (forking a process with arrow threads can deadlock)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = {pool.submit(fn, item) for item in items}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_result(future.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _map_ray(fn, items, ray_address: str, on_result) -> None:
    try:
        import ray
    except ImportError:
        raise EesimError("--ray-address needs Ray: pip install ray") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=ray_address)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise EesimError(f"cannot connect to Ray at {ray_address!r}: {str(exc).splitlines()[0]}") from None
    remote = ray.remote(num_cpus=1)(fn)
    refs = [remote.remote(item) for item in items]
    try:
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            on_result(ray.get(done[0]))
    finally:
        for ref in refs:
            ray.cancel(ref)
        if started_here:
            ray.shutdown()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# ---- results file -----------------------------------------------------------------------------------
class ResultStore:
    """Rows keyed by cell; the parquet file (if any) is rewritten atomically after each ``add``."""

    def __init__(self, path) -> None:
        import pandas as pd
        self.path = Path(path) if path else None
        self.rows: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                frame = pd.read_parquet(self.path)
            except Exception as exc:  # noqa: BLE001  (pyarrow raises several types)
                raise EesimError(f"sweep results {self.path}: not a readable parquet file ({type(exc).__name__})") from None
            require("cell" in frame.columns, f"sweep results {self.path}: no 'cell' column; not an eesim sweep file")
            self.rows = {row["cell"]: row for row in frame.to_dict("records")}

    def add(self, row: dict) -> None:
        self.rows[row["cell"]] = row
        if self.path is not None:
            from eesim.atomic import write_atomic

            buffer = io.BytesIO()
            self.frame().to_parquet(buffer, index=False)
            write_atomic(self.path, buffer.getvalue())

    def frame(self) -> pd.DataFrame:
        import pandas as pd
        return pd.DataFrame(list(self.rows.values()))


def _add_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """speedup / itl_speedup against the ``full`` run with the same non-policy settings (NaN without one)."""
    import numpy as np
    frame = frame.copy()
    frame["speedup"] = frame["itl_speedup"] = np.nan
    if frame.empty or "rule" not in frame:
        return frame
    keys = [k for k in SETTINGS if k not in ("policy", "measure", "threshold") and k in frame.columns]
    full = frame[frame["rule"] == "full"]
    if full.empty:
        return frame
    def as_text(df: pd.DataFrame) -> pd.DataFrame:  # None and NaN alike, one type per key: exact matching
        return df.astype(object).where(df.notna(), None).astype(str)

    base = as_text(full[keys]).assign(_tp=full["throughput_tok_s"].to_numpy(), _itl=full["itl_mean"].to_numpy())
    merged = as_text(frame[keys]).merge(base.drop_duplicates(keys), on=keys, how="left")
    frame["speedup"] = frame["throughput_tok_s"].to_numpy() / merged["_tp"].to_numpy(dtype=float)
    frame["itl_speedup"] = merged["_itl"].to_numpy(dtype=float) / frame["itl_mean"].to_numpy()
    return frame


def _as_config(config, cost_model: str | None = None) -> tuple[dict, str]:
    if isinstance(config, (str, os.PathLike)):
        data, where = load_sweep_config(config), f"sweep config {config}"
    else:
        data, where = validate_config(config), "sweep config"
    if cost_model is not None:  # one cost model for every cell, in place of the config's
        require("cost_model" not in data["grid"],
                f"{where}: cost_model is swept in [grid]; give it there or as --cost-model, not both")
        data = {"base": {**data["base"], "cost_model": _check_value("cost_model", cost_model, "--cost-model")},
                "grid": data["grid"]}
    return data, where


def _progress(total: int, initial: int, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not progress, desc=desc, unit="run", leave=False)


def sweep(config, out=None, *, workers: int | None = None, ray_address: str | None = None, resume: bool = True,
          progress: bool = True, cost_model: str | None = None) -> pd.DataFrame:
    """Run every cell of ``config`` (a path to TOML/JSON, or a dict with ``base`` and ``grid``).

    Returns one row per cell of this grid, in grid order: the cell's settings, ``cell`` (its key),
    ``threshold_value``, the run summary's columns (see eesim.metrics), ``elapsed_s``, and ``speedup``
    / ``itl_speedup`` against the ``full`` cell with the same other settings (NaN without one).
    ``out``: a parquet file kept up to date after each cell; with ``resume``, cells already in it are
    not rerun. ``workers``: local processes (default: all cores; 1 runs in this process);
    ``ray_address``: run each cell as a Ray task instead (``auto``, ``ray://host:10001``, ...).
    ``cost_model``: the cost model of every cell, in place of the config's (see eesim.cost_choice).
    """
    data, where = _as_config(config, cost_model)
    cells = expand(data, where)
    workers = default_workers() if workers in (None, 0) else workers
    require(workers >= 1, f"workers must be >= 1, got {workers}")
    for cell in cells:  # refuse bad settings (names, thresholds, workloads) before simulating anything
        build_run(cell)
    store = ResultStore(out)
    if out is not None and not resume:
        store.rows = {}
    todo = [c for c in cells if c["cell"] not in store.rows]
    with _progress(len(cells), len(cells) - len(todo), progress, "sweep") as bar:
        def done(row: dict) -> None:
            store.add(row)
            bar.update(1)

        _map(run_cell, todo, workers, ray_address, done)
    frame = store.frame()
    frame = _add_speedups(frame)
    order = {c["cell"]: i for i, c in enumerate(cells)}
    frame = frame[frame["cell"].isin(order)]
    return frame.sort_values("cell", key=lambda s: s.map(order), ignore_index=True)


# ---- max goodput ------------------------------------------------------------------------------------
def meets(summary, objectives: dict[str, float]) -> bool:
    return all(float(summary[k]) <= v for k, v in objectives.items())


def _goodput_task(task: dict) -> dict:
    from eesim.simulator import simulate

    cell, objectives = task["cell"], task["objectives"]
    low, high, tolerance, max_evals, max_doublings = (task[k] for k in ("low", "high", "tolerance", "max_evaluations",
                                                                          "max_doublings"))
    evaluations = []

    def run(scale: float):
        config, workload, _ = build_run(cell | {"rate_scale": scale})
        s = simulate(workload, config).summary
        rate = workload.num_requests / workload.duration if workload.duration > 0 else float("nan")
        evaluations.append(scale)
        return s, rate

    best = None
    s, rate = run(low)
    if not meets(s, objectives):
        status = "fails at lowest scale"
    else:
        best, lo, hi, status = (low, s, rate), low, high, "ok"
        s, rate = run(hi)
        doublings = 0
        while meets(s, objectives):
            best, lo = (hi, s, rate), hi
            if doublings >= max_doublings or len(evaluations) >= max_evals:
                status = "meets at highest scale"
                break
            hi, doublings = hi * 2, doublings + 1
            s, rate = run(hi)
        if status == "ok":
            while hi / lo > 1 + tolerance and len(evaluations) < max_evals:
                mid = math.sqrt(lo * hi)
                s, rate = run(mid)
                if meets(s, objectives):
                    best, lo = (mid, s, rate), mid
                else:
                    hi = mid
    row = {k: cell[k] for k in cell}
    row["status"] = status
    row["evaluations"] = len(evaluations)
    if best is None:
        row |= {"max_rate_scale": float("nan"), "max_rate_req_s": float("nan"), "max_rate_per_replica": float("nan")}
        for k in ("throughput_tok_s", "ttft_p90", "itl_p99", "quality", "mean_layers"):
            row[k] = float("nan")
    else:
        scale, s, rate = best
        row |= {"max_rate_scale": scale, "max_rate_req_s": rate, "max_rate_per_replica": rate / cell["replicas"]}
        for k in ("throughput_tok_s", "ttft_p90", "itl_p99", "quality", "mean_layers"):
            row[k] = float(s[k])
    row["cost_model_label"] = s["cost_model"]  # every run of the search has the same cost model
    row["objectives"] = json.dumps(objectives, sort_keys=True)
    return row


def max_goodput(config, ttft_p90: float | None = None, itl_p99: float | None = None, *,
                objectives: dict[str, float] | None = None, low: float = 0.25, high: float = 2.0,
                tolerance: float = 0.05, max_evaluations: int = 16, max_doublings: int = 6,
                workers: int | None = None, ray_address: str | None = None, progress: bool = True,
                cost_model: str | None = None) -> pd.DataFrame:
    """The highest rate scale per cell (the grid without rate_scale) meeting the latency objectives.

    Objectives: ``ttft_p90`` and ``itl_p99`` in seconds, plus any ``objectives`` {summary column: max}.
    The search runs at ``low``, then ``high`` doubling (at most ``max_doublings`` times) while it
    passes, then bisects geometrically until hi/lo <= 1 + tolerance. Columns: the cell's settings and
    ``GOODPUT_COLUMNS`` (status, max_rate_scale, max_rate_req_s, ...) measured at the scale found.
    ``cost_model``: the cost model of every cell, in place of the config's (see eesim.cost_choice).
    """
    import pandas as pd
    from eesim.metrics import PERCENTILES

    data, where = _as_config(config, cost_model)
    goals = dict(objectives or {})
    if ttft_p90 is not None:
        goals["ttft_p90"] = ttft_p90
    if itl_p99 is not None:
        goals["itl_p99"] = itl_p99
    require(goals, "max_goodput: give at least one objective (ttft_p90, itl_p99, or objectives={metric: max})")
    metrics = {f"{m}_{s}" for m in ("ttft", "itl", "tpot", "e2e", "queueing") for s in ("mean", *(f"p{p}" for p in PERCENTILES))}
    for key, value in goals.items():
        require(key in metrics, f"max_goodput: unknown objective {key!r}; choose from {', '.join(sorted(metrics))}")
        require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                f"max_goodput: objective {key} must be a positive number of seconds, got {value!r}")
    require(0 < low < high and math.isfinite(high), f"max_goodput: need 0 < low < high, got low={low}, high={high}")
    require(tolerance > 0, f"max_goodput: tolerance must be > 0, got {tolerance}")
    require(max_evaluations >= 2, f"max_goodput: max_evaluations must be >= 2, got {max_evaluations}")
    cells = expand(data, where, drop=RATE_SETTINGS[:1])
    for cell in cells:
        build_run(cell)
    workers = default_workers() if workers in (None, 0) else workers
    tasks = [{"cell": c, "objectives": goals, "low": low, "high": high, "tolerance": tolerance,
              "max_evaluations": max_evaluations, "max_doublings": max_doublings} for c in cells]
    rows: dict[str, dict] = {}
    with _progress(len(tasks), 0, progress, "goodput") as bar:
        def done(row: dict) -> None:
            rows[row["cell"]] = row
            bar.update(1)

        _map(_goodput_task, tasks, workers, ray_address, done)
    frame = pd.DataFrame([rows[c["cell"]] for c in cells])
    return frame.drop(columns=["rate_scale"])


# ---- command line -----------------------------------------------------------------------------------
def _print_frame(frame: pd.DataFrame, columns: dict[str, str], title: str, limit: int = 60) -> None:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    cols = [c for c in columns if c in frame.columns]
    for c in cols:
        numeric = pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
        table.add_column(columns[c], justify="right" if numeric else "left")
    for row in frame.head(limit).itertuples(index=False):
        cells = []
        for c in cols:
            v = getattr(row, c)
            if isinstance(v, float):
                cells.append("-" if math.isnan(v) else f"{v * 1e3:,.1f}" if c.startswith(("ttft", "itl")) else f"{v:,.3g}")
            else:
                cells.append("-" if v is None else str(v))
        table.add_row(*cells)
    console = Console(width=220)
    console.print(table)
    if len(frame) > limit:
        console.print(f"... {len(frame) - limit} more rows")


SWEEP_TABLE = {"policy": "policy", "threshold": "threshold", "rate_scale": "rate x", "rate": "rate/s",
               "replicas": "replicas", "max_num_seqs": "max seqs", "max_batched_tokens": "max tokens",
               "throughput_tok_s": "tok/s", "speedup": "speedup", "ttft_p90": "TTFT p90 ms", "itl_p99": "ITL p99 ms",
               "quality": "quality", "mean_layers": "layers/token", "cost_model": "cost model"}
GOODPUT_TABLE = {"policy": "policy", "threshold": "threshold", "replicas": "replicas", "max_num_seqs": "max seqs",
                 "cost_model": "cost model",
                 "status": "status", "max_rate_scale": "rate x", "max_rate_req_s": "req/s",
                 "throughput_tok_s": "tok/s", "ttft_p90": "TTFT p90 ms", "itl_p99": "ITL p99 ms", "quality": "quality"}


def _varying(frame: pd.DataFrame, table: dict[str, str]) -> dict[str, str]:
    """Drop setting columns that are the same in every row (metrics stay)."""
    return {k: v for k, v in table.items()
            if k not in SETTINGS or (k in frame and frame[k].astype(str).nunique() > 1) or k == "policy"}


def _costs(frame: pd.DataFrame) -> str:
    """The cost models that priced the rows, for a table's title."""
    labels = frame["cost_model_label"].dropna().astype(str) if "cost_model_label" in frame else []
    return f"; cost model {', '.join(dict.fromkeys(labels))}" if len(labels) else ""


def cmd_sweep(args: argparse.Namespace) -> int:
    require(args.workers >= 0, f"--workers must be >= 0, got {args.workers}")
    started = time.perf_counter()
    frame = sweep(args.config, args.out, workers=args.workers or None, ray_address=args.ray_address or None,
                  resume=not args.no_resume, progress=not args.quiet, cost_model=args.cost_model)
    _print_frame(frame, _varying(frame, SWEEP_TABLE),
                 f"eesim sweep — {args.config} ({len(frame)} cells{_costs(frame)})")
    print(f"wrote {args.out} ({len(frame)} cells, {time.perf_counter() - started:.1f} s)")
    return 0


def cmd_goodput(args: argparse.Namespace) -> int:
    require(args.ttft_p90 is not None or args.itl_p99 is not None, "eesim goodput: give --ttft-p90 and/or --itl-p99")
    frame = max_goodput(args.config, args.ttft_p90, args.itl_p99, low=args.low, high=args.high,
                        tolerance=args.tolerance, workers=args.workers or None,
                        ray_address=args.ray_address or None, progress=not args.quiet, cost_model=args.cost_model)
    goals = " and ".join(f"{k} <= {v * 1e3:g} ms" for k, v in (("TTFT p90", args.ttft_p90), ("ITL p99", args.itl_p99))
                         if v is not None)
    _print_frame(frame, _varying(frame, GOODPUT_TABLE),
                 f"eesim goodput — {args.config}: highest rate with {goals}{_costs(frame)}")
    if args.out:
        from eesim.atomic import write_atomic

        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        write_atomic(Path(args.out), buffer.getvalue())
        print(f"wrote {args.out}")
    return 0


def add_cli(subparsers) -> None:
    """Register ``eesim sweep`` and ``eesim goodput`` on the CLI's subparsers."""
    for name, help_text in (("sweep", "run a grid of simulations from a TOML/JSON config (resumable)"),
                            ("goodput", "highest request rate per policy that meets latency objectives")):
        p = subparsers.add_parser(name, help=help_text)
        p.add_argument("config", help="sweep config (.toml or .json) with [base] and [grid] sections")
        p.add_argument("--workers", type=int, default=0, help="local worker processes (0: all cores, 1: in-process)")
        p.add_argument("--ray-address", default="", help="run cells as Ray tasks on this cluster (e.g. auto)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--cost-model", default=None,
                       help="cost model of every cell, in place of the config's cost_model (default: the config's, "
                            "else auto): auto, analytical, profile, or a profile parquet path")
        if name == "sweep":
            p.add_argument("--out", default="eesim-out/sweep.parquet", help="results table (parquet), resumable")
            p.add_argument("--no-resume", action="store_true", help="rerun every cell, replacing the results file")
            p.set_defaults(func=cmd_sweep)
        else:
            p.add_argument("--ttft-p90", type=float, default=None, help="objective: TTFT p90 at most this (seconds)")
            p.add_argument("--itl-p99", type=float, default=None,
                           help="objective: inter-token latency p99 at most this (seconds)")
            p.add_argument("--low", type=float, default=0.25, help="lowest rate scale tried")
            p.add_argument("--high", type=float, default=2.0, help="first upper rate scale (doubled while it passes)")
            p.add_argument("--tolerance", type=float, default=0.05, help="stop when hi/lo <= 1 + tolerance")
            p.add_argument("--out", default="", help="also write the table to this parquet file")
            p.set_defaults(func=cmd_goodput)


class _CallableModule(types.ModuleType):
    """``eesim.sweep`` is this module once imported; calling it runs ``sweep``."""

    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
