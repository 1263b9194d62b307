"""Workload generation, trace reading and the CLI's workload argument."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eesim.errors import EesimError
from eesim.request import Request
from eesim.workload import (
    AZURE_CODE_OUTPUT,
    AZURE_CODE_PROMPT,
    DEFAULT_DURATION_S,
    DEFAULT_RATE,
    LogNormalLengths,
    Workload,
    default_workload,
    gamma_arrivals,
    load_workload,
    poisson_arrivals,
    read_request_trace,
    synthetic_workload,
)

AZURE_TRACE = Path(__file__).resolve().parents[2] / "shared/data/azure_llm_2023_code.csv"
VIDUR_HEADER = "arrived_at,num_prefill_tokens,num_decode_tokens\n"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def frame(w: Workload) -> list[tuple]:
    return [(r.request_id, r.arrival_time, r.prompt_len, r.output_len) for r in w.requests]


# ---- trace formats -----------------------------------------------------------------------------

def test_reads_vidur_form_ignoring_extra_columns(tmp_path):
    path = write(tmp_path, "extra,arrived_at,num_prefill_tokens,num_decode_tokens\n"
                           "x,0.0,4808,10\ny,0.052,3180,8\nz,1.5,12,1\n")
    w = read_request_trace(path)
    assert frame(w) == [(0, 0.0, 4808, 10), (1, 0.052, 3180, 8), (2, 1.5, 12, 1)]
    assert w.source == str(path)
    assert w.num_requests == 3 and w.duration == 1.5


def test_reads_azure_original_with_seven_fractional_digits(tmp_path):
    path = write(tmp_path, AZURE_HEADER +
                 "2023-11-16 18:15:46.6805900,4808,10\n"
                 "2023-11-16 18:15:46.7325984,3180,8\n"
                 "2023-11-16 18:15:48.1805900,100,3\n")
    w = read_request_trace(path)
    assert [r.prompt_len for r in w.requests] == [4808, 3180, 100]
    assert [r.output_len for r in w.requests] == [10, 8, 3]
    assert np.allclose([r.arrival_time for r in w.requests], [0.0, 0.0520084, 1.5], atol=1e-6)


def test_unsorted_arrivals_are_sorted_stably_and_renumbered(tmp_path):
    path = write(tmp_path, VIDUR_HEADER + "2.0,10,1\n1.0,20,2\n1.0,30,3\n0.5,40,4\n")
    w = read_request_trace(path)
    assert frame(w) == [(0, 0.5, 40, 4), (1, 1.0, 20, 2), (2, 1.0, 30, 3), (3, 2.0, 10, 1)]


def test_azure_times_are_relative_to_the_earliest_request(tmp_path):
    path = write(tmp_path, AZURE_HEADER + "2023-11-16 18:15:50.0000000,1,1\n2023-11-16 18:15:46.5000000,2,2\n")
    assert frame(read_request_trace(path)) == [(0, 0.0, 2, 2), (1, 3.5, 1, 1)]


def test_blank_lines_are_skipped_and_line_numbers_stay_right(tmp_path):
    path = write(tmp_path, VIDUR_HEADER + "0,1,1\n\n1,2,2\n2,abc,3\n")
    with pytest.raises(EesimError, match=r":5: column num_prefill_tokens: 'abc' is not a number"):
        read_request_trace(path)


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    (VIDUR_HEADER, "no requests"),
    ("a,b,c\n1,2,3\n", "arrived_at,num_prefill_tokens,num_decode_tokens.*TIMESTAMP,ContextTokens,GeneratedTokens"),
    (VIDUR_HEADER + "0,10,5\n1,10,abc\n", r":3: column num_decode_tokens: 'abc' is not a number"),
    (VIDUR_HEADER + "zero,10,5\n", r":2: column arrived_at: 'zero' is not a number"),
    (VIDUR_HEADER + "0,10,5\n1,,5\n", r":3: column num_prefill_tokens: missing value"),
    (VIDUR_HEADER + "0,10,5\n1,10\n", r":3: column num_decode_tokens: missing value"),
    (VIDUR_HEADER + "0,10,5\n-1,10,5\n", r":3: column arrived_at: negative arrival time -1"),
    (VIDUR_HEADER + "0,0,5\n", r":2: column num_prefill_tokens: 0 is not a valid prompt length"),
    (VIDUR_HEADER + "0,10,0\n", r":2: column num_decode_tokens: 0 is not a valid output length"),
    (VIDUR_HEADER + "0,10.5,5\n", r":2: column num_prefill_tokens: 10.5 is not a whole number"),
    (VIDUR_HEADER + "0,10,5,7\n", "malformed CSV"),
    (VIDUR_HEADER + "inf,10,5\n", r":2: column arrived_at: 'inf' is not a number"),
    (AZURE_HEADER + "2023-11-16 18:15:46.6805900,10,5\nyesterday,10,5\n",
     r":3: column TIMESTAMP: 'yesterday' is not a date-time"),
    (AZURE_HEADER + "2023-11-16 18:15:46.6805900,10,-2\n", r":2: column GeneratedTokens: -2 is not a valid output"),
])
def test_bad_trace_gives_one_line_error_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(EesimError, match=message) as info:
        read_request_trace(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(EesimError, match="no such file") as info:
        read_request_trace(path)
    assert str(path) in str(info.value)


def test_whole_number_floats_are_accepted(tmp_path):
    path = write(tmp_path, VIDUR_HEADER + "0,10.0,5\n")
    assert frame(read_request_trace(path)) == [(0, 0.0, 10, 5)]


@pytest.mark.skipif(not AZURE_TRACE.exists(), reason="shared Azure code trace not present")
def test_azure_code_trace_statistics():
    w = read_request_trace(AZURE_TRACE)
    df = w.to_frame()
    assert w.num_requests == 8819
    assert df.prompt_len.median() == 1469
    assert df.output_len.median() == 13
    # the module constants are the log-moments of this trace
    assert np.log(df.prompt_len).mean() == pytest.approx(AZURE_CODE_PROMPT.mu, abs=0.01)
    assert np.log(df.prompt_len).std() == pytest.approx(AZURE_CODE_PROMPT.sigma, abs=0.01)
    assert np.log(df.output_len).mean() == pytest.approx(AZURE_CODE_OUTPUT.mu, abs=0.01)
    assert np.log(df.output_len).std() == pytest.approx(AZURE_CODE_OUTPUT.sigma, abs=0.01)


# ---- generators --------------------------------------------------------------------------------

def test_same_seed_same_workload_and_different_seed_differs():
    a, b = synthetic_workload(3.0, 100.0, seed=7), synthetic_workload(3.0, 100.0, seed=7)
    pd.testing.assert_frame_equal(a.to_frame(), b.to_frame())
    assert a == b
    assert not a.to_frame().equals(synthetic_workload(3.0, 100.0, seed=8).to_frame())
    g1 = synthetic_workload(3.0, 100.0, arrival="gamma", cv=3.0, seed=1)
    g2 = synthetic_workload(3.0, 100.0, arrival="gamma", cv=3.0, seed=1)
    pd.testing.assert_frame_equal(g1.to_frame(), g2.to_frame())


def test_arrival_functions_are_deterministic_given_the_generator():
    assert np.array_equal(poisson_arrivals(2.0, 100, np.random.default_rng(3)),
                          poisson_arrivals(2.0, 100, np.random.default_rng(3)))
    assert np.array_equal(gamma_arrivals(2.0, 1.0, 100, np.random.default_rng(3)),
                          poisson_arrivals(2.0, 100, np.random.default_rng(3)))


def _cv(times: np.ndarray) -> float:
    gaps = np.diff(np.concatenate([[0.0], times]))
    return float(gaps.std() / gaps.mean())


def test_gamma_is_burstier_than_poisson_at_the_same_rate():
    n, rate = 50_000, 4.0
    poisson = poisson_arrivals(rate, n, np.random.default_rng(0))
    gamma = gamma_arrivals(rate, 3.0, n, np.random.default_rng(0))
    assert _cv(poisson) == pytest.approx(1.0, abs=0.05)
    assert _cv(gamma) == pytest.approx(3.0, rel=0.1)
    assert n / poisson[-1] == pytest.approx(rate, rel=0.03)
    assert n / gamma[-1] == pytest.approx(rate, rel=0.05)


def test_synthetic_workload_spans_the_duration_at_the_rate():
    w = synthetic_workload(5.0, 2000.0, arrival="gamma", cv=2.0, seed=0)
    times = np.array([r.arrival_time for r in w.requests])
    assert times.max() < 2000.0 and np.all(np.diff(times) >= 0)
    assert w.num_requests / 2000.0 == pytest.approx(5.0, rel=0.1)
    assert [r.request_id for r in w.requests] == list(range(w.num_requests))
    assert "gamma" in w.source and "cv=2" in w.source


def test_lengths_are_clipped_integers():
    lengths = LogNormalLengths(5.0, 3.0, 4, 300).sample(10_000, np.random.default_rng(0))
    assert lengths.dtype.kind == "i"
    assert lengths.min() == 4 and lengths.max() == 300
    with pytest.raises(EesimError):
        LogNormalLengths(1.0, 1.0, 0, 10)


def test_default_workload():
    w = default_workload()
    assert w.num_requests / DEFAULT_DURATION_S == pytest.approx(DEFAULT_RATE, rel=0.15)
    assert w.duration < DEFAULT_DURATION_S
    assert "Azure code" in w.source
    assert w == default_workload(seed=0) and w != default_workload(seed=1)


def test_lengths_do_not_depend_on_the_rate():
    slow, fast = synthetic_workload(1.0, 100.0, seed=4), synthetic_workload(2.0, 100.0, seed=4)
    k = min(slow.num_requests, fast.num_requests)
    assert [r.prompt_len for r in slow.requests[:k]] == [r.prompt_len for r in fast.requests[:k]]


# ---- transformations ---------------------------------------------------------------------------

def _workload(rows: list[tuple[float, int, int]]) -> Workload:
    return Workload(tuple(Request(i, t, p, o) for i, (t, p, o) in enumerate(rows)), "test")


def test_clip_respects_max_context():
    w = _workload([(0.0, 100, 10), (1.0, 5000, 10), (2.0, 10, 9000), (3.0, 4086, 10)])
    clipped, count = w.clip(4096)
    assert count == 2
    assert all(r.prompt_len + r.output_len <= 4096 and r.prompt_len >= 1 for r in clipped.requests)
    assert [(r.prompt_len, r.output_len) for r in clipped.requests] == [(100, 10), (4086, 10), (1, 4095), (4086, 10)]
    assert w.clip(10_000) == (w, 0)


def test_clip_truncates_prompt_tokens():
    w = Workload((Request(0, 0.0, 6, 4, prompt_tokens=(1, 2, 3, 4, 5, 6)),), "test")
    (r,) = w.clip(8)[0].requests
    assert r.prompt_len == 4 and r.prompt_tokens == (1, 2, 3, 4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e6, allow_nan=False), st.integers(1, 100_000), st.integers(1, 100_000)),
                max_size=30),
       st.integers(2, 5000))
def test_clip_property(rows, max_context):
    w = Workload.from_frame(pd.DataFrame(rows, columns=["arrival_time", "prompt_len", "output_len"]), "h")
    clipped, count = w.clip(max_context)
    assert count == sum(r.prompt_len + r.output_len > max_context for r in w.requests)
    assert all(1 <= r.prompt_len and 1 <= r.output_len and r.prompt_len + r.output_len <= max_context
               for r in clipped.requests)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e7, allow_nan=False), st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
                max_size=40))
def test_frame_round_trip(rows):
    w = Workload.from_frame(pd.DataFrame(rows, columns=["arrival_time", "prompt_len", "output_len"]), "h")
    df = w.to_frame()
    assert list(df.columns) == ["request_id", "arrival_time", "prompt_len", "output_len"]
    assert Workload.from_frame(df, "h") == w
    assert sorted(frame(w), key=lambda r: r[1]) == frame(w)


def test_from_frame_rejects_bad_values():
    with pytest.raises(EesimError, match="prompt_len"):
        Workload.from_frame(pd.DataFrame({"arrival_time": [0.0], "prompt_len": [0], "output_len": [1]}), "x")
    with pytest.raises(EesimError, match="missing columns"):
        Workload.from_frame(pd.DataFrame({"arrival_time": [0.0]}), "x")


def test_workload_checks_its_invariant():
    with pytest.raises(EesimError):
        Workload((Request(1, 0.0, 1, 1),), "x")
    with pytest.raises(EesimError):
        Workload((Request(0, 1.0, 1, 1), Request(1, 0.0, 1, 1)), "x")


def test_head_window_scale_rate():
    w = _workload([(0.0, 1, 1), (1.0, 2, 2), (2.0, 3, 3), (3.0, 4, 4)])
    assert frame(w.head(2)) == [(0, 0.0, 1, 1), (1, 1.0, 2, 2)]
    assert frame(w.window(1.0, 3.0)) == [(0, 1.0, 2, 2), (1, 2.0, 3, 3)]
    assert frame(w.scale_rate(2.0)) == [(0, 0.0, 1, 1), (1, 0.5, 2, 2), (2, 1.0, 3, 3), (3, 1.5, 4, 4)]
    assert w.scale_rate(2.0).duration == 1.5
    with pytest.raises(EesimError):
        w.scale_rate(0)


# ---- the CLI's workload argument ---------------------------------------------------------------

def test_load_workload_forms(tmp_path):
    assert load_workload("default") == default_workload()
    assert load_workload("default", seed=3) == default_workload(seed=3)
    assert load_workload("poisson:rate=3,duration=60", seed=2) == synthetic_workload(3.0, 60.0, seed=2)
    assert load_workload("gamma:rate=3, duration=60, cv=2") == synthetic_workload(3.0, 60.0, "gamma", 2.0)
    path = write(tmp_path, VIDUR_HEADER + "0,10,5\n")
    assert frame(load_workload(str(path))) == [(0, 0.0, 10, 5)]


@pytest.mark.parametrize("spec, message", [
    ("uniform:rate=3,duration=60", "unknown generator 'uniform'"),
    ("poisson:rate=3,duration=60,cv=2", "unknown key 'cv'"),
    ("poisson:rate=abc,duration=60", "rate must be a number, got 'abc'"),
    ("poisson:rate=-1,duration=60", "rate must be > 0"),
    ("poisson:rate=3", "missing duration"),
    ("poisson", "missing rate, duration"),
    ("gamma:rate=3,duration", "expected key=value"),
    ("poisson:rate=3,rate=4,duration=1", "given twice"),
    ("no/such/trace.csv", "no/such/trace.csv: no such file"),
])
def test_load_workload_errors(spec, message):
    with pytest.raises(EesimError, match=message):
        load_workload(spec)
