"""Certified exit thresholds: Learn-then-Test calibration on recorded exit traces (CALM, Schuster et al.
2022; Angelopoulos et al. 2021).

For one confidence measure, a threshold ``lambda`` has a *risk*: the share of generated tokens whose
emitted prediction differs from the last layer's when tokens exit by the rule below. Calibration picks
the laxest threshold of a grid for which ``risk(lambda) <= epsilon`` holds with probability at least
``1 - delta`` over the draw of the calibration data:

1. The trace is split by sequence (seeded) into a calibration part and a held-out test part.
2. The grid is ordered from strict to lax (for ``entropy``, where lower is confident, ascending;
   otherwise descending) *before* any data is looked at.
3. Fixed-sequence testing: walking the grid in that order, test H0: ``risk(lambda) > epsilon`` with a
   valid p-value on the calibration part; reject while ``p <= delta``, stop at the first non-rejection.
   Every rejected threshold is certified jointly (the family-wise error is at most ``delta``); the
   laxest rejected one is reported. When the strictest grid point is not rejected, none is certified.
4. The certified threshold is then evaluated on the test part (risk, mean exit layer): an honest
   check, not part of the guarantee.

p-values. ``binomial``: the exact binomial tail ``P(Binom(n, epsilon) <= k)`` for ``k`` losses out of
``n`` 0/1 losses. ``hb``: Hoeffding-Bentkus, ``min(exp(-n h1(min(r, epsilon), epsilon)),
e * P(Binom(n, epsilon) <= ceil(n r)))``, valid for any loss in [0, 1].

Units (default ``sequence`` with ``hb``, the setting whose guarantee is exact). ``unit="token"`` treats the tokens of the calibration part as the n exchangeable samples; the
tokens of one generation are correlated, so this guarantee is only as good as that approximation
(optimistic when hard tokens cluster in hard sequences). ``unit="sequence"`` takes each sequence's
share of differing tokens as one loss in [0, 1] (sequences are exchangeable, so the guarantee is
exact) and certifies the mean over sequences of that share; it needs the ``hb`` p-value.

Exit rules. ``rule="per_sequence"``: each token stops at its own first confident exit (the
per_sequence exit rule, evaluated per token). A batch rule that lets a row exit only where that row is
confident (``all_confident``) exits each row at or after its first confident exit, so its tokens stop
no earlier; but a later exit is not always right where an earlier one was (in the project's recorded
trace 2.9% of tokens agree at some exit and disagree at a later one), so the per-sequence risk bounds
the batch rule only approximately. ``rule="all_confident"`` certifies a bound that holds exactly for
any batch composition: a token counts as a loss when *any* intermediate exit at which it is confident
disagrees with the last layer. Rules that force rows out while not confident (``quorum``) are outside
both guarantees. In the simulator the first token of a request (produced by prefill) never exits
early, so a simulated run's disagreement is at most the calibrated risk of the tokens it replays.

The output file maps measure -> certified threshold (null where none), plus a ``_calibration`` record;
``load_calibrated(path, measure)`` reads one threshold back, and ``resolve_threshold`` understands the
threshold spec ``calibrated:PATH`` (the measure comes from the run's ``--measure``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from eesim.errors import EesimError, require

if TYPE_CHECKING:  # numpy, pandas and pyarrow load on first use: registering the CLI stays light
    import numpy as np
    import pandas as pd
    from eesim.exit_trace import ExitTrace

P_VALUES = ("binomial", "hb")
UNITS = ("token", "sequence")
RULES = ("per_sequence", "all_confident")
DEFAULT_POINTS = 201
META_KEY = "_calibration"

RESULT_COLUMNS = {
    "measure": "confidence measure",
    "threshold": "certified threshold (laxest rejected grid point); NaN when none is certified",
    "certified": "whether a threshold was certified",
    "epsilon": "risk level", "delta": "error probability",
    "p_value_method": "binomial or hb", "unit": "token or sequence", "rule": "per_sequence or all_confident",
    "grid_points": "thresholds in the grid", "grid_rejected": "grid points rejected before the first non-rejection",
    "p_value": "p-value at the certified threshold (NaN when none)",
    "p_value_next": "p-value of the first non-rejected grid point (NaN when the whole grid was rejected)",
    "next_threshold": "that first non-rejected grid point (the next laxer one)",
    "cal_sequences": "sequences in the calibration part", "cal_tokens": "tokens in the calibration part",
    "cal_risk": "risk on the calibration part at the certified threshold",
    "test_sequences": "sequences in the test part", "test_tokens": "tokens in the test part",
    "test_risk": "share of test tokens differing from the last layer at the certified threshold",
    "test_risk_seq": "mean over test sequences of their share of differing tokens",
    "test_within_epsilon": "test risk (in the certified unit) <= epsilon (True when none is certified: full depth)",
    "mean_exit_layer": "mean exit layer of test tokens (trace layers; first confident exit)",
    "mean_exit_fraction": "the same as a fraction of the trace's depth",
    "early_exit_share": "share of test tokens leaving before the last layer",
}
CURVE_COLUMNS = ("measure", "order", "threshold", "cal_risk", "p_value", "rejected", "test_risk", "test_risk_seq",
                 "mean_exit_layer", "mean_exit_fraction", "early_exit_share")


# ---- p-values ---------------------------------------------------------------------------------------
def binomial_p_value(losses: int, n: int, epsilon: float) -> float:
    """P(Binom(n, epsilon) <= losses): valid for H0 risk > epsilon with n exchangeable 0/1 losses."""
    from scipy.stats import binom

    return float(binom.cdf(losses, n, epsilon))


def hb_p_value(risk: float, n: int, epsilon: float) -> float:
    """Hoeffding-Bentkus p-value for H0 risk > epsilon from the mean ``risk`` of n losses in [0, 1]."""
    from scipy.stats import binom

    a = min(risk, epsilon)

    def xlogy(x: float, y: float) -> float:
        return 0.0 if x == 0 else x * math.log(y)

    h1 = xlogy(a, a / epsilon) + xlogy(1 - a, (1 - a) / (1 - epsilon))
    hoeffding = math.exp(-n * h1)
    bentkus = math.e * float(binom.cdf(math.ceil(n * risk - 1e-9), n, epsilon))
    return min(1.0, hoeffding, bentkus)


def min_samples(epsilon: float, delta: float) -> int:
    """The fewest samples with which zero losses can reject H0 at level delta: (1 - epsilon)^n <= delta."""
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


# ---- risk of a threshold ----------------------------------------------------------------------------
def _column(trace: ExitTrace, name: str):
    import numpy as np
    from eesim.policies import measure

    m = measure(name)
    require(m.column != "agrees", f"measure {m.name!r} reads the agreement oracle and ignores its threshold: "
                                  "nothing to calibrate")
    return m, np.asarray(trace.values[m.column], dtype=np.float64)


@dataclass(frozen=True)
class _Outcome:
    loss: np.ndarray  # bool (tokens,)
    exit_index: np.ndarray  # int (tokens,): first confident exit, num_exits - 1 when none


def _outcome(values: np.ndarray, agrees: np.ndarray, threshold: float, higher: bool, rule: str) -> _Outcome:
    import numpy as np
    inner = values[:, :-1]
    confident = inner >= threshold if higher else inner <= threshold
    hit = confident.any(axis=1)
    exit_index = np.where(hit, confident.argmax(axis=1), values.shape[1] - 1)
    if rule == "per_sequence":
        loss = ~agrees[np.arange(len(exit_index)), exit_index]
    else:  # any confident intermediate exit that disagrees: a bound for rows that exit only where confident
        loss = (confident & ~agrees[:, :-1]).any(axis=1)
    return _Outcome(loss, exit_index)


def _split(trace: ExitTrace, calibration_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token row indices of the calibration and test parts (a seeded split by sequence)."""
    import numpy as np
    n = trace.num_sequences
    n_cal = int(round(calibration_share * n))
    require(2 <= n and 1 <= n_cal < n, f"calibration: the trace has {n} sequence(s); splitting it "
            f"{calibration_share:g}/{1 - calibration_share:g} by sequence leaves an empty part")
    order = np.random.default_rng(seed).permutation(n)
    offsets = trace.seq_offsets

    def rows(seqs: np.ndarray) -> np.ndarray:
        seqs = np.sort(seqs)
        return np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in seqs])

    return rows(order[:n_cal]), rows(order[n_cal:])


def _seq_starts(trace: ExitTrace, rows: np.ndarray) -> np.ndarray:
    """Start positions, within ``rows``, of each sequence's tokens (rows are whole sequences in order)."""
    import numpy as np
    seq_of_row = np.searchsorted(trace.seq_offsets, rows, side="right") - 1
    return np.flatnonzero(np.r_[True, seq_of_row[1:] != seq_of_row[:-1]])


def _risks(loss: np.ndarray, starts: np.ndarray) -> tuple[float, float]:
    """(token share, mean over sequences of the per-sequence share)."""
    import numpy as np
    lengths = np.diff(np.r_[starts, len(loss)])
    per_seq = np.add.reduceat(loss.astype(np.float64), starts) / lengths
    return float(loss.mean()), float(per_seq.mean())


# ---- grids ------------------------------------------------------------------------------------------
def default_grid(measure_name: str, points: int = DEFAULT_POINTS) -> np.ndarray:
    """A data-independent grid over the measure's domain, strict to lax (entropy: 0 .. 10.5 nats,
    beyond ln 32000)."""
    import numpy as np
    from eesim.policies import measure

    m = measure(measure_name)
    low = m.low if math.isfinite(m.low) else 0.0
    high = m.high if math.isfinite(m.high) else 10.5
    grid = np.linspace(low, high, points)
    return grid[::-1] if m.higher_is_confident else grid


def parse_grid(text: str) -> np.ndarray:
    """``a,b,c`` (values) or ``start:stop:num`` (num evenly spaced values, both ends included)."""
    import numpy as np
    text = text.strip()
    try:
        if ":" in text:
            start, stop, num = text.split(":")
            require(int(num) >= 1, f"grid {text!r}: num must be >= 1")
            return np.linspace(float(start), float(stop), int(num))
        return np.array([float(v) for v in text.split(",") if v.strip()], dtype=np.float64)
    except ValueError:
        raise EesimError(f"bad grid {text!r}: give comma-separated numbers or start:stop:num") from None


def _ordered_grid(grid, measure) -> np.ndarray:
    import numpy as np
    grid = np.unique(np.asarray(grid, dtype=np.float64).ravel())  # sorted ascending, deduplicated
    require(len(grid) > 0, f"calibration: the threshold grid for measure {measure.name!r} is empty")
    for value in grid:
        measure.check_threshold(float(value))
    return grid[::-1] if measure.higher_is_confident else grid  # strict to lax


# ---- calibration ------------------------------------------------------------------------------------
def _validate(epsilon: float, delta: float, p_value: str, unit: str, rule: str, calibration_share: float) -> None:
    for name, value in (("epsilon", epsilon), ("delta", delta), ("calibration_share", calibration_share)):
        require(isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1,
                f"calibration: {name} must lie in (0, 1), got {value!r}")
    require(p_value in P_VALUES, f"calibration: unknown p-value {p_value!r}; choose one of {', '.join(P_VALUES)}")
    require(unit in UNITS, f"calibration: unknown unit {unit!r}; choose one of {', '.join(UNITS)}")
    require(rule in RULES, f"calibration: unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    require(not (unit == "sequence" and p_value == "binomial"),
            "calibration: unit 'sequence' has losses in [0, 1], not 0/1; the binomial p-value does not apply "
            "(use p_value='hb')")


def _load_trace(trace) -> ExitTrace:
    from eesim.exit_trace import ExitTrace
    if isinstance(trace, ExitTrace):
        return trace
    from eesim.defaults import load_exit_trace
    from eesim.model_spec import model_preset

    return load_exit_trace(str(trace), model_preset("llama2-7b"))[0]


def calibrate_measures(trace, measures=None, epsilon: float = 0.05, delta: float = 0.1, *, grid=None,
                       p_value: str = "hb", unit: str = "sequence", rule: str = "per_sequence",
                       calibration_share: float = 0.5, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Calibrate each measure; returns (one row per measure: RESULT_COLUMNS, one row per tested grid
    point and measure: CURVE_COLUMNS). See the module docstring; ``grid`` is a sequence of values, a
    ``parse_grid`` string, or a dict measure -> either (default: ``default_grid``)."""
    import numpy as np
    import pandas as pd
    from eesim.exit_trace import MEASURE_COLUMNS

    _validate(epsilon, delta, p_value, unit, rule, calibration_share)
    trace = _load_trace(trace)
    measures = list(MEASURE_COLUMNS) if measures is None else [measures] if isinstance(measures, str) else list(measures)
    require(len(measures) > 0, "calibration: no measures given")
    columns = {name: _column(trace, name) for name in measures}  # unknown measures fail before any work

    def grid_for(name: str, m) -> np.ndarray:
        g = grid.get(name) if isinstance(grid, dict) else grid
        if g is None:
            g = default_grid(name)
        elif isinstance(g, str):
            g = parse_grid(g)
        return _ordered_grid(g, m)

    grids = {name: grid_for(name, m) for name, (m, _) in columns.items()}
    cal_rows, test_rows = _split(trace, calibration_share, seed)
    cal_starts, test_starts = _seq_starts(trace, cal_rows), _seq_starts(trace, test_rows)
    n = len(cal_rows) if unit == "token" else len(cal_starts)
    need = min_samples(epsilon, delta)
    require(n >= need, f"calibration: too few {unit}s: the calibration part has {n}, and certifying "
            f"epsilon={epsilon:g} at delta={delta:g} needs at least {need} (record more, or loosen epsilon/delta)")
    layers = np.asarray(trace.exit_layers, dtype=np.float64)
    agrees = trace.agrees

    summary, curve = [], []
    for name, (m, values) in columns.items():
        cal_values, test_values = values[cal_rows], values[test_rows]
        cal_agrees, test_agrees = agrees[cal_rows], agrees[test_rows]
        certified, rejected, next_point = None, 0, None
        for order, threshold in enumerate(grids[name]):
            cal = _outcome(cal_values, cal_agrees, threshold, m.higher_is_confident, rule)
            token_risk, seq_risk = _risks(cal.loss, cal_starts)
            if unit == "token":
                p = (binomial_p_value(int(cal.loss.sum()), n, epsilon) if p_value == "binomial"
                     else hb_p_value(token_risk, n, epsilon))
            else:
                p = hb_p_value(seq_risk, n, epsilon)
            test = _outcome(test_values, test_agrees, threshold, m.higher_is_confident, rule)
            t_risk, t_seq = _risks(test.loss, test_starts)
            point = {"measure": name, "order": order, "threshold": float(threshold),
                     "cal_risk": token_risk if unit == "token" else seq_risk, "p_value": p, "rejected": p <= delta,
                     "test_risk": t_risk, "test_risk_seq": t_seq,
                     "mean_exit_layer": float(layers[test.exit_index].mean()),
                     "mean_exit_fraction": float(layers[test.exit_index].mean() / trace.num_layers),
                     "early_exit_share": float((test.exit_index < trace.num_exits - 1).mean())}
            curve.append(point)
            if p > delta:
                next_point = point
                break
            certified, rejected = point, rejected + 1
        c = certified or {}
        nan = float("nan")
        test_risk_unit = c.get("test_risk" if unit == "token" else "test_risk_seq", nan)
        summary.append({
            "measure": name, "threshold": c.get("threshold", nan), "certified": certified is not None,
            "epsilon": epsilon, "delta": delta, "p_value_method": p_value, "unit": unit, "rule": rule,
            "grid_points": len(grids[name]), "grid_rejected": rejected, "p_value": c.get("p_value", nan),
            "p_value_next": next_point["p_value"] if next_point else nan,
            "next_threshold": next_point["threshold"] if next_point else nan,
            "cal_sequences": len(cal_starts), "cal_tokens": len(cal_rows), "cal_risk": c.get("cal_risk", nan),
            "test_sequences": len(test_starts), "test_tokens": len(test_rows),
            "test_risk": c.get("test_risk", nan), "test_risk_seq": c.get("test_risk_seq", nan),
            "test_within_epsilon": bool(test_risk_unit <= epsilon) if certified else True,
            "mean_exit_layer": c.get("mean_exit_layer", nan), "mean_exit_fraction": c.get("mean_exit_fraction", nan),
            "early_exit_share": c.get("early_exit_share", nan)})
    return pd.DataFrame(summary, columns=list(RESULT_COLUMNS)), pd.DataFrame(curve, columns=list(CURVE_COLUMNS))


def calibrate(trace="default", measures=None, epsilon: float = 0.05, delta: float = 0.1, **options) -> pd.DataFrame:
    """Certified thresholds, one row per measure (columns: ``RESULT_COLUMNS``). ``trace``: an ExitTrace,
    a parquet path, ``default`` or ``synthetic``. Options: grid, p_value ('binomial' | 'hb'), unit
    ('token' | 'sequence'), rule ('per_sequence' | 'all_confident'), calibration_share, seed."""
    return calibrate_measures(trace, measures, epsilon, delta, **options)[0]


def calibration_curve(trace="default", measures=None, epsilon: float = 0.05, delta: float = 0.1,
                      **options) -> pd.DataFrame:
    """The tested grid points, strict to lax, one row each (columns: ``CURVE_COLUMNS``)."""
    return calibrate_measures(trace, measures, epsilon, delta, **options)[1]


# ---- the calibrated-threshold file ------------------------------------------------------------------
def write_calibrated(path, table: pd.DataFrame, extra: dict | None = None) -> Path:
    """Write ``{measure: threshold or null, ..., "_calibration": {...}}`` atomically."""
    from eesim.atomic import write_atomic

    path = Path(path)
    data: dict = {row.measure: (float(row.threshold) if row.certified else None) for row in table.itertuples()}
    first = table.iloc[0] if len(table) else {}
    data[META_KEY] = {k: (first[k].item() if hasattr(first[k], "item") else first[k])
                      for k in ("epsilon", "delta", "p_value_method", "unit", "rule", "cal_sequences", "cal_tokens")
                      if k in first} | (extra or {})
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
    return path


def load_calibrated(path, measure: str) -> float:
    """The certified threshold of ``measure`` in a file written by ``eesim calibrate``."""
    where = f"calibrated thresholds {path}"
    p = Path(path)
    require(p.is_file(), f"{where}: no such file")
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        raise EesimError(f"{where}: not valid JSON") from None
    require(isinstance(data, dict), f"{where}: expected a JSON object mapping measure -> threshold")
    known = sorted(k for k in data if k != META_KEY)
    require(measure in data and measure != META_KEY,
            f"{where}: no threshold for measure {measure!r}; it holds {', '.join(known) or 'none'}")
    value = data[measure]
    meta = data.get(META_KEY) or {}
    require(value is not None, f"{where}: no threshold was certified for measure {measure!r} "
            f"(epsilon={meta.get('epsilon')}, delta={meta.get('delta')})")
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            f"{where}: threshold for {measure!r} must be a number, got {value!r}")
    return float(value)


def resolve_threshold(spec, measure):
    """``parse_threshold`` plus ``calibrated:PATH`` (the certified threshold of ``measure`` in PATH)."""
    from eesim.policies import measure as get_measure
    from eesim.policies.thresholds import Threshold, parse_threshold

    m = get_measure(measure)
    if isinstance(spec, str) and spec.strip().startswith("calibrated:"):
        threshold = Threshold(load_calibrated(spec.strip()[len("calibrated:"):], m.name))
        m.check_threshold(threshold.value)
        return threshold
    return parse_threshold(spec, m)


# ---- command line -----------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    from eesim.defaults import load_exit_trace
    from eesim.exit_trace import MEASURE_COLUMNS
    from eesim.model_spec import model_preset

    measures = [m.strip() for m in args.measures.split(",") if m.strip()] if args.measures else list(MEASURE_COLUMNS)
    grid = parse_grid(args.grid) if args.grid else None
    _validate(args.epsilon, args.delta, args.p_value, args.unit, args.rule, args.calibration_share)
    trace, _, source = load_exit_trace(args.exit_trace, model_preset(args.model))
    table, _ = calibrate_measures(trace, measures, args.epsilon, args.delta, grid=grid, p_value=args.p_value,
                                  unit=args.unit, rule=args.rule, calibration_share=args.calibration_share,
                                  seed=args.seed)
    out = write_calibrated(args.out, table, {"trace": source, "seed": args.seed,
                                             "calibration_share": args.calibration_share})
    _print(table, f"eesim calibrate — {source}: risk <= {args.epsilon:g} with probability >= {1 - args.delta:g} "
                  f"({args.p_value} p-value, {args.unit} unit, {args.rule} exits)")
    print(f"wrote {out}; use it with --measure M --threshold calibrated:{out}")
    return 0


def _print(table: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("measure", "threshold", "p-value", "next p", "cal risk", "test risk", "test risk/seq",
                "mean exit layer", "early exits", "grid tested"):
        t.add_column(col, justify="left" if col == "measure" else "right")
    for r in table.itertuples():
        t.add_row(r.measure, f"{r.threshold:.4g}" if r.certified else "none",
                  f"{r.p_value:.3g}" if r.certified else "-", "-" if math.isnan(r.p_value_next) else f"{r.p_value_next:.3g}",
                  f"{r.cal_risk:.4f}" if r.certified else "-", f"{r.test_risk:.4f}" if r.certified else "-",
                  f"{r.test_risk_seq:.4f}" if r.certified else "-",
                  f"{r.mean_exit_layer:.2f}" if r.certified else "-", f"{r.early_exit_share:.3f}" if r.certified else "-",
                  f"{r.grid_rejected + (0 if math.isnan(r.p_value_next) else 1)}/{r.grid_points}")
    Console(width=200).print(t)


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``eesim calibrate`` on the CLI's subparsers."""
    p = subparsers.add_parser("calibrate", help="certify exit thresholds on a recorded trace (Learn-then-Test)")
    p.add_argument("--exit-trace", default="default",
                   help="'default' (the project's recorded trace, else synthetic), 'synthetic', or a parquet path")
    p.add_argument("--model", default="llama2-7b", help="model preset for a synthetic trace's shape")
    p.add_argument("--measures", default="", help="comma-separated measures (default: all but oracle)")
    p.add_argument("--epsilon", type=float, default=0.05, help="tolerated share of tokens differing from the full model")
    p.add_argument("--delta", type=float, default=0.1, help="allowed probability that the guarantee fails")
    p.add_argument("--p-value", default="hb", choices=P_VALUES, help="Hoeffding-Bentkus or binomial tail")
    p.add_argument("--unit", default="sequence", choices=UNITS,
                   help="exchangeable unit: sequence (exact; the default) or token (approximate: the tokens of one "
                        "generation are correlated; with --p-value binomial)")
    p.add_argument("--rule", default="per_sequence", choices=RULES,
                   help="per_sequence: first confident exit; all_confident: a bound valid for any batch")
    p.add_argument("--grid", default="", help="thresholds: a,b,c or start:stop:num (default: the measure's domain, "
                                              f"{DEFAULT_POINTS} points)")
    p.add_argument("--calibration-share", type=float, default=0.5, help="share of sequences used to calibrate")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration/test split")
    p.add_argument("--out", default="eesim-out/calibrated.json", help="JSON file: measure -> threshold")
    p.set_defaults(func=cmd_calibrate)
    return p


class _CallableModule(types.ModuleType):
    """``eesim.calibrate`` is this module once imported; calling it runs ``calibrate``."""

    def __call__(self, *args, **kwargs):
        return calibrate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
