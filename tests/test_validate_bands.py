"""eesim.validate.error_bands: the simulator's error on request-level metrics under a paired bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eesim.validate import error_bands, error_table


def requests_frame(ttft, e2e, itl, out_len, ids=None):
    n = len(ttft)
    return pd.DataFrame({"request_id": np.arange(n) if ids is None else ids, "ttft": ttft, "e2e": e2e,
                         "itl_mean": itl, "output_len": out_len})


def test_a_uniform_scaling_has_a_band_of_one_point():
    """A simulator off by +5% on every request is off by +5% in every resample: the band is that point."""
    rng = np.random.default_rng(1)
    n = 30
    m = requests_frame(rng.uniform(0.02, 0.3, n), rng.uniform(0.1, 2, n), rng.uniform(0.005, 0.01, n),
                       rng.integers(2, 60, n))
    s = m.assign(ttft=m.ttft * 1.05, e2e=m.e2e * 1.05, itl_mean=m.itl_mean * 1.05)
    bands = error_bands(m, s.sample(frac=1.0, random_state=3))  # matched by request_id, not by row order
    for label in ("TTFT p50", "TTFT p99", "inter-token latency mean", "end-to-end latency mean"):
        assert bands[label] == pytest.approx((0.05, 0.05), abs=1e-9), label


def test_a_bimodal_median_over_few_requests_has_a_wide_band():
    """20 requests, half arriving into an idle engine (TTFT ~40 ms), half into a running batch (~80 ms): a
    simulator right on each mode but slightly off on the split has a wide band on the median, which holds the
    error of the run itself."""
    rng = np.random.default_rng(2)
    n = 20
    fast = rng.permutation(np.r_[np.ones(n // 2 + 1), np.zeros(n - n // 2 - 1)]).astype(bool)
    m_ttft = np.where(fast, rng.normal(0.040, 0.002, n), rng.normal(0.080, 0.004, n))
    s_ttft = m_ttft.copy()
    flip = np.flatnonzero(fast)[:2]
    s_ttft[flip] = 0.080  # two requests land in the other mode in the simulation
    m = requests_frame(m_ttft, m_ttft + 1, np.full(n, 0.007), np.full(n, 20))
    s = requests_frame(s_ttft, s_ttft + 1, np.full(n, 0.007), np.full(n, 20))
    lo, hi = error_bands(m, s)["TTFT p50"]
    point = np.median(s_ttft) / np.median(m_ttft) - 1
    assert lo <= point <= hi and hi - lo > 0.2
    # the per-token metric of the same runs agrees exactly: a band of zero width at zero
    assert error_bands(m, s)["inter-token latency mean"] == pytest.approx((0.0, 0.0), abs=1e-12)


def test_error_table_carries_the_bands_where_given():
    summary = pd.Series({"throughput_tok_s": 100.0, "ttft_p50": 0.05, "ttft_p99": 0.2, "itl_mean": 0.007,
                         "itl_p50": 0.006, "itl_p99": 0.03, "e2e_mean": 1.0, "mean_layers": 30.0})
    table = error_table(summary, summary * 1.01, {"TTFT p50": (-0.1, 0.2)}).set_index("metric")
    assert table.loc["TTFT p50", ["error_lo", "error_hi"]].tolist() == [-0.1, 0.2]
    assert table.loc["throughput (tok/s)", ["error_lo", "error_hi"]].isna().all()
    assert table["error"].to_numpy() == pytest.approx(0.01)
    assert error_bands(requests_frame([0.1], [1.0], [0.01], [5]), requests_frame([0.1], [1.0], [0.01], [5])) == {}


def test_bands_refuse_runs_that_do_not_pair_up():
    m = requests_frame([0.1, 0.2, 0.3], [1.0, 1.1, 1.2], [0.01] * 3, [5] * 3)
    with pytest.raises(ValueError, match="different requests"):
        error_bands(m, m.iloc[:2])
    with pytest.raises(ValueError, match="repeat a request_id"):
        error_bands(pd.concat([m, m]), pd.concat([m, m]))


def test_bands_skip_what_no_resample_defines():
    """Requests of one token have no inter-token gap: no ITL band (no warning), the others as usual."""
    m = requests_frame([0.1, 0.2, 0.3], [1.0, 1.1, 1.2], [np.nan] * 3, [1] * 3)
    bands = error_bands(m, m.assign(ttft=m.ttft * 1.1))
    assert "inter-token latency mean" not in bands
    assert bands["TTFT p50"] == pytest.approx((0.1, 0.1))


def test_graphs_prepared_for_twice_the_simulated_peak_batch():
    """``prepare_graphs`` captures for batches up to twice the largest one the simulation formed (so far fewer
    graphs than the scheduler's limit of 256 would need), the longest context and the chunk budget."""
    from eesim.config import SimConfig
    from eesim.defaults import load_exit_trace
    from eesim.hardware import hardware_preset
    from eesim.model_spec import model_preset
    from eesim.scheduler import SchedulerConfig
    from eesim.validate import prepare_graphs
    from eesim.workload import load_workload

    class Recorder:
        def capture_graphs(self, max_rows, max_context, max_chunk_tokens):
            self.args = (max_rows, max_context, max_chunk_tokens)
            return 0

    trace, model, _ = load_exit_trace("synthetic", model_preset("llama2-7b"))
    config = SimConfig(model, hardware_preset("h100"), trace, scheduler=SchedulerConfig(256, 2048, 16))
    workload = load_workload("poisson:rate=8,duration=8", seed=0).clip(model.max_context)[0]
    longest = max(r.prompt_len + r.output_len for r in workload.requests)
    ex = Recorder()
    prepare_graphs(workload, config, ex, peak_rows=7)
    assert ex.args == (14, min(longest, model.max_context), 2048)
    prepare_graphs(workload, config, ex)  # no simulation at hand: the scheduler's limit (or the request count)
    assert ex.args[0] == min(256, workload.num_requests)
