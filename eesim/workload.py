"""The request workload the simulator replays: synthetic generators and readers for request traces.

A workload is a tuple of :class:`~eesim.request.Request` sorted by arrival time, with ids 0..n-1 in
arrival order. Everything here is deterministic given a seed.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from eesim.errors import EesimError, require
from eesim.request import Request

# The bundled default workload that `eesim compare` replays.
DEFAULT_RATE = 2.5  # requests per second
DEFAULT_DURATION_S = 240.0

COLUMNS = ("request_id", "arrival_time", "prompt_len", "output_len")
# Trace formats, by header: (arrival, prompt, output) column names.
VIDUR_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")  # seconds from the start
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")  # absolute date-times
_MAX_LEN = 2**31 - 1  # larger "lengths" are corrupt data, and would overflow int64 arithmetic downstream


@dataclass(frozen=True)
class LogNormalLengths:
    """Token lengths ``round(exp(N(mu, sigma)))`` clipped to ``[low, high]``."""

    mu: float
    sigma: float
    low: int
    high: int

    def __post_init__(self) -> None:
        require(self.sigma >= 0, f"lognormal lengths: sigma must be >= 0, got {self.sigma}")
        require(1 <= self.low <= self.high, f"lognormal lengths: need 1 <= low <= high, got [{self.low}, {self.high}]")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        values = np.rint(rng.lognormal(self.mu, self.sigma, n))
        return np.clip(values, self.low, self.high).astype(np.int64)


# Log-mean and log-sd of the Azure LLM inference trace 2023, code service, one hour (8,819 requests;
# empirical prompt median 1,469 tokens, output median 13). The prompt distribution is left-skewed in
# log space, so the fitted lognormal's median exp(mu) (~1,100 prompt, ~16 output) is not the empirical one.
AZURE_CODE_PROMPT = LogNormalLengths(7.00, 1.36, 16, 8192)
AZURE_CODE_OUTPUT = LogNormalLengths(2.79, 0.85, 1, 2048)


@dataclass(frozen=True)
class Workload:
    requests: tuple[Request, ...]
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests", tuple(self.requests))
        last = -math.inf
        for i, r in enumerate(self.requests):
            # the scheduler indexes by id and assumes arrival order, so the invariant is checked once here
            require(r.request_id == i, f"workload {self.source}: request ids must be 0..n-1 in order; "
                                       f"request {i} has id {r.request_id}")
            require(r.arrival_time >= last, f"workload {self.source}: arrivals must be sorted (request {i})")
            last = r.arrival_time

    @property
    def duration(self) -> float:
        """Arrival time of the last request (0 for an empty workload)."""
        return self.requests[-1].arrival_time if self.requests else 0.0

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "request_id": np.array([r.request_id for r in self.requests], dtype=np.int64),
            "arrival_time": np.array([r.arrival_time for r in self.requests], dtype=np.float64),
            "prompt_len": np.array([r.prompt_len for r in self.requests], dtype=np.int64),
            "output_len": np.array([r.output_len for r in self.requests], dtype=np.int64),
        })

    @classmethod
    def from_frame(cls, df: pd.DataFrame, source: str) -> Workload:
        """Build from columns arrival_time, prompt_len, output_len.

        Rows are sorted stably by arrival; a request_id column, if present, is ignored and ids are
        reassigned in arrival order.
        """
        missing = [c for c in COLUMNS[1:] if c not in df.columns]
        require(not missing, f"workload {source}: missing columns {missing}")
        arrival = pd.to_numeric(df["arrival_time"], errors="coerce").to_numpy(dtype=np.float64)
        lengths = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in COLUMNS[2:]}
        require(bool(np.all(np.isfinite(arrival) & (arrival >= 0))),
                f"workload {source}: arrival times must be finite and >= 0")
        for c, v in lengths.items():
            require(bool(np.all(np.isfinite(v) & (v == np.floor(v)) & (v >= 1) & (v <= _MAX_LEN))),
                    f"workload {source}: {c} must be whole numbers >= 1")
        return cls._build(arrival, lengths["prompt_len"].astype(np.int64), lengths["output_len"].astype(np.int64),
                          source)

    @classmethod
    def _build(cls, arrival: np.ndarray, prompt: np.ndarray, output: np.ndarray, source: str) -> Workload:
        order = np.argsort(arrival, kind="stable")
        requests = tuple(Request(i, float(arrival[j]), int(prompt[j]), int(output[j])) for i, j in enumerate(order))
        return cls(requests, source)

    def clip(self, max_context: int) -> tuple[Workload, int]:
        """Cap lengths so every request fits ``max_context``; returns the new workload and how many changed.

        The prompt is shortened first (to at least 1 token) because output length drives the
        early-exit behaviour under study; only an output that alone fills the context is capped.
        """
        require(max_context >= 2, f"clip: max_context must be >= 2, got {max_context}")
        clipped, out = 0, []
        for r in self.requests:
            output = min(r.output_len, max_context - 1)
            prompt = min(r.prompt_len, max_context - output)
            if (prompt, output) != (r.prompt_len, r.output_len):
                clipped += 1
                tokens = r.prompt_tokens[:prompt] if r.prompt_tokens is not None else None
                r = replace(r, prompt_len=prompt, output_len=output, prompt_tokens=tokens)
            out.append(r)
        source = f"{self.source}, clipped to {max_context} tokens" if clipped else self.source
        return Workload(tuple(out), source), clipped

    def head(self, n: int) -> Workload:
        """The first ``n`` requests by arrival."""
        require(n >= 0, f"head: n must be >= 0, got {n}")
        return Workload(self.requests[:n], f"{self.source}, first {n}")

    def window(self, t0: float, t1: float) -> Workload:
        """Requests arriving in ``[t0, t1)``, arrival times unchanged, ids renumbered from 0."""
        require(t0 <= t1, f"window: need t0 <= t1, got [{t0}, {t1})")
        kept = [r for r in self.requests if t0 <= r.arrival_time < t1]
        return Workload(tuple(replace(r, request_id=i) for i, r in enumerate(kept)),
                        f"{self.source}, window [{t0:g}, {t1:g}) s")

    def scale_rate(self, factor: float) -> Workload:
        """Arrivals ``factor`` times as dense: every arrival time is divided by ``factor``."""
        require(factor > 0 and math.isfinite(factor), f"scale_rate: factor must be positive, got {factor}")
        return Workload(tuple(replace(r, arrival_time=r.arrival_time / factor) for r in self.requests),
                        f"{self.source}, rate x{factor:g}")


# ---- arrival processes -------------------------------------------------------------------------

def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times of a Poisson process; the first arrives after one inter-arrival gap."""
    require(rate > 0, f"poisson arrivals: rate must be > 0, got {rate}")
    return np.cumsum(rng.exponential(1.0 / rate, n))


def gamma_arrivals(rate: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Bursty arrivals: gamma inter-arrival gaps with mean ``1/rate`` and coefficient of variation ``cv``."""
    require(rate > 0, f"gamma arrivals: rate must be > 0, got {rate}")
    require(cv > 0 and math.isfinite(cv), f"gamma arrivals: cv must be > 0, got {cv}")
    if cv == 1.0:
        # the exponential is the gamma with shape 1; delegating keeps cv=1 draw-for-draw equal to Poisson
        return poisson_arrivals(rate, n, rng)
    shape = 1.0 / cv**2
    return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), n))


def _arrivals_until(draw: Callable[[int], np.ndarray], rate: float, duration_s: float) -> np.ndarray:
    chunks, last = [], 0.0
    chunk = min(max(64, int(rate * duration_s * 1.1)), 1 << 20)
    while last < duration_s:
        times = draw(chunk) + last
        chunks.append(times)
        last = float(times[-1])
    times = np.concatenate(chunks)
    return times[times < duration_s]


def _describe_lengths(prompt: LogNormalLengths, output: LogNormalLengths) -> str:
    if (prompt, output) == (AZURE_CODE_PROMPT, AZURE_CODE_OUTPUT):
        return "lognormal lengths fitted to Azure code 2023"
    return (f"lognormal prompt(mu={prompt.mu:g}, sigma={prompt.sigma:g}), "
            f"output(mu={output.mu:g}, sigma={output.sigma:g})")


def synthetic_workload(rate: float, duration_s: float, arrival: str = "poisson", cv: float = 1.0,
                       prompt: LogNormalLengths = AZURE_CODE_PROMPT, output: LogNormalLengths = AZURE_CODE_OUTPUT,
                       seed: int = 0) -> Workload:
    """Requests arriving over ``[0, duration_s)`` with lognormal prompt and output lengths."""
    require(rate > 0 and math.isfinite(rate), f"synthetic workload: rate must be > 0, got {rate}")
    require(duration_s > 0 and math.isfinite(duration_s),
            f"synthetic workload: duration must be > 0, got {duration_s}")
    require(arrival in ("poisson", "gamma"), f"synthetic workload: arrival must be 'poisson' or 'gamma', got {arrival!r}")
    require(arrival == "gamma" or cv == 1.0, f"synthetic workload: cv={cv} applies only to gamma arrivals")
    # Separate streams: the lengths of the k-th request do not depend on the arrival process or rate,
    # so runs that differ only in load see the same requests (common random numbers).
    arrival_rng, prompt_rng, output_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    if arrival == "poisson":
        times = _arrivals_until(lambda n: poisson_arrivals(rate, n, arrival_rng), rate, duration_s)
        what = f"poisson rate={rate:g}/s"
    else:
        times = _arrivals_until(lambda n: gamma_arrivals(rate, cv, n, arrival_rng), rate, duration_s)
        what = f"gamma cv={cv:g} rate={rate:g}/s"
    n = len(times)
    source = f"{what} for {duration_s:g} s, {_describe_lengths(prompt, output)}, seed={seed}"
    return Workload._build(times, prompt.sample(n, prompt_rng), output.sample(n, output_rng), source)


def default_workload(seed: int = 0) -> Workload:
    """The workload `eesim compare` uses unless told otherwise."""
    return synthetic_workload(DEFAULT_RATE, DEFAULT_DURATION_S, seed=seed)


# ---- trace files -------------------------------------------------------------------------------

def _numbers(raw: pd.Series, column: str, path: str) -> np.ndarray:
    """Parse one column, raising at the first missing or non-numeric cell with its line number."""
    stripped = raw.str.strip()
    values = pd.to_numeric(stripped, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        i = bad[0]
        text = stripped.iloc[i]
        what = "missing value" if text == "" else f"{text!r} is not a number"
        raise EesimError(f"{path}:{raw.index[i] + 2}: column {column}: {what}")
    return values


def _lengths(raw: pd.Series, column: str, path: str, kind: str) -> np.ndarray:
    values = _numbers(raw, column, path)
    for check, what in ((values == np.floor(values), "is not a whole number"),
                        (values >= 1, f"is not a valid {kind} length (must be >= 1)"),
                        (values <= _MAX_LEN, f"is too large for a {kind} length")):
        bad = np.flatnonzero(~check)
        if len(bad):
            i = bad[0]
            raise EesimError(f"{path}:{raw.index[i] + 2}: column {column}: {raw.iloc[i].strip()} {what}")
    return values.astype(np.int64)


def _timestamps(raw: pd.Series, column: str, path: str) -> np.ndarray:
    stripped = raw.str.strip()
    try:
        # ISO8601 accepts the Azure trace's 7 fractional digits; utc=True tolerates mixed offsets
        times = pd.to_datetime(stripped, format="ISO8601", errors="coerce", utc=True)
    except (ValueError, TypeError, OverflowError) as e:
        raise EesimError(f"{path}: column {column}: cannot parse date-times ({e})") from None
    bad = np.flatnonzero(times.isna().to_numpy())
    if len(bad):
        i = bad[0]
        text = stripped.iloc[i]
        what = "missing value" if text == "" else f"{text!r} is not a date-time"
        raise EesimError(f"{path}:{raw.index[i] + 2}: column {column}: {what}")
    return ((times - times.min()).dt.total_seconds()).to_numpy(dtype=np.float64)


def read_request_trace(path: str | Path) -> Workload:
    """Read a CSV trace in the Vidur form (``arrived_at,num_prefill_tokens,num_decode_tokens``, seconds)
    or the Azure original (``TIMESTAMP,ContextTokens,GeneratedTokens``, date-times made relative to the
    first request). Extra columns are ignored, blank lines skipped, and arrivals sorted stably.
    """
    where = str(path)
    p = Path(path)
    require(p.exists(), f"{where}: no such file")
    try:
        with warnings.catch_warnings():
            # pandas only warns, and drops data, when the first row is longer than the header
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # everything as text, so that bad cells can be reported verbatim with their line numbers
            df = pd.read_csv(p, dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False,
                             encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise EesimError(f"{where}: empty file") from None
    except pd.errors.ParserWarning:
        raise EesimError(f"{where}: malformed CSV: a row has more fields than the header") from None
    except pd.errors.ParserError as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise EesimError(f"{where}: malformed CSV: {detail}") from None
    except UnicodeDecodeError:
        raise EesimError(f"{where}: not a text (UTF-8) CSV file") from None
    except OSError as e:
        raise EesimError(f"{where}: cannot read: {e.strerror or e}") from None
    df.columns = [str(c).strip() for c in df.columns]
    if set(VIDUR_COLUMNS) <= set(df.columns):
        columns, relative = VIDUR_COLUMNS, True
    elif set(AZURE_COLUMNS) <= set(df.columns):
        columns, relative = AZURE_COLUMNS, False
    else:
        raise EesimError(f"{where}: unrecognised header {list(df.columns)}; expected columns "
                         f"{','.join(VIDUR_COLUMNS)} (seconds) or {','.join(AZURE_COLUMNS)} (date-times)")
    # blank lines read as all-empty rows; dropping them keeps the index equal to (line number - 2)
    df = df.loc[~(df.apply(lambda col: col.str.strip() == "")).all(axis=1), list(columns)]
    require(len(df) > 0, f"{where}: no requests (header only)")
    arrival_col, prompt_col, output_col = columns
    if relative:
        arrival = _numbers(df[arrival_col], arrival_col, where)
        negative = np.flatnonzero(arrival < 0)
        if len(negative):
            i = negative[0]
            raise EesimError(f"{where}:{df.index[i] + 2}: column {arrival_col}: "
                             f"negative arrival time {df[arrival_col].iloc[i].strip()}")
    else:
        arrival = _timestamps(df[arrival_col], arrival_col, where)
    prompt = _lengths(df[prompt_col], prompt_col, where, "prompt")
    output = _lengths(df[output_col], output_col, where, "output")
    return Workload._build(arrival, prompt, output, where)


# ---- the CLI's workload argument ---------------------------------------------------------------

_GENERATOR_KEYS = {"poisson": ("rate", "duration"), "gamma": ("rate", "duration", "cv")}
_REQUIRED_KEYS = ("rate", "duration")


def load_workload(spec: str, seed: int = 0) -> Workload:
    """Resolve the CLI's workload argument: ``default``, a CSV path, or a generator such as
    ``poisson:rate=3,duration=600`` or ``gamma:rate=3,duration=600,cv=2``.
    """
    spec = spec.strip()
    if spec == "default":
        return default_workload(seed)
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_-]*)(?::(.*))?", spec)
    if Path(spec).exists() or match is None or (match.group(2) is None and match.group(1) not in _GENERATOR_KEYS):
        return read_request_trace(spec)
    name, body = match.group(1), match.group(2) or ""
    require(name in _GENERATOR_KEYS, f"workload {spec!r}: unknown generator {name!r}; "
                                     f"expected a CSV path, 'default', or one of {sorted(_GENERATOR_KEYS)}")
    params: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        require(eq == "=" and key != "", f"workload {spec!r}: expected key=value, got {item!r}")
        require(key in _GENERATOR_KEYS[name], f"workload {spec!r}: unknown key {key!r} for {name}; "
                                              f"expected {', '.join(_GENERATOR_KEYS[name])}")
        require(key not in params, f"workload {spec!r}: key {key!r} given twice")
        try:
            params[key] = float(value)
        except ValueError:
            raise EesimError(f"workload {spec!r}: {key} must be a number, got {value!r}") from None
        require(math.isfinite(params[key]) and params[key] > 0, f"workload {spec!r}: {key} must be > 0, got {value!r}")
    missing = [k for k in _REQUIRED_KEYS if k not in params]
    require(not missing, f"workload {spec!r}: missing {', '.join(missing)} (e.g. {name}:rate=3,duration=600)")
    return synthetic_workload(params["rate"], params["duration"], arrival=name, cv=params.get("cv", 1.0), seed=seed)
