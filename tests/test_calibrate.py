"""Threshold calibration (Learn-then-Test): risk computation, p-values, fixed-sequence testing, the
calibrated-threshold file, validation and the command line."""

import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from eesim import calibrate as cal
from eesim.cli import main
from eesim.errors import EesimError
from eesim.exit_trace import synthesize_exit_trace
from eesim.policies import measure
from eesim.policies.all_confident import AllConfident
from eesim.policies.per_sequence import PerSequence


@pytest.fixture(scope="module")
def trace():
    return synthesize_exit_trace(8, (2, 4, 6, 8), 400, seed=3)


def cli(*argv) -> int:
    return main(list(argv))  # the real command line, with its subcommand wiring


def test_p_values():
    assert cal.binomial_p_value(3, 100, 0.05) == pytest.approx(binom.cdf(3, 100, 0.05))
    # no losses: both p-values are (1 - eps)^n
    assert cal.hb_p_value(0.0, 200, 0.05) == pytest.approx(0.95**200)
    assert cal.binomial_p_value(0, 200, 0.05) == pytest.approx(0.95**200)
    # HB is never below the exact binomial tail for 0/1 losses, and is 1 at or above epsilon
    for k in (0, 5, 10, 20):
        assert cal.hb_p_value(k / 400, 400, 0.05) >= cal.binomial_p_value(k, 400, 0.05) - 1e-12
    assert cal.hb_p_value(0.06, 400, 0.05) == 1.0
    assert cal.min_samples(0.05, 0.1) == math.ceil(math.log(0.1) / math.log(0.95))


@pytest.mark.parametrize("name", ["max_prob", "entropy", "cosine"])
def test_risk_matches_the_exit_rules(trace, name):
    m = measure(name)
    values, agrees = trace.values[name].astype(float), trace.agrees
    threshold = float(np.median(values[:, 1]))
    out = cal._outcome(values, agrees, threshold, m.higher_is_confident, "per_sequence")
    confident = m.confident(values[:, :-1], threshold)
    # per-token first confident exit is the per_sequence rule's decision for a batch of all tokens
    exit_index, _ = PerSequence().decide_all(confident[None], np.ones(len(values), bool))
    assert np.array_equal(out.exit_index, exit_index[0])
    assert np.array_equal(out.loss, ~agrees[np.arange(len(values)), exit_index[0]])
    # the all_confident bound covers every batch the batch rule could see
    bound = cal._outcome(values, agrees, threshold, m.higher_is_confident, "all_confident").loss
    assert (bound >= out.loss).all()
    rng = np.random.default_rng(0)
    for _ in range(50):
        rows = rng.choice(len(values), size=8, replace=False)
        idx, _ = AllConfident().decide_all(confident[rows][None], np.ones(8, bool))
        batch_loss = ~agrees[rows, idx[0]]
        assert (batch_loss <= bound[rows]).all()


@pytest.mark.parametrize("options", [{}, {"p_value": "hb"}, {"unit": "sequence", "p_value": "hb"},
                                     {"rule": "all_confident"}])
def test_fixed_sequence_testing(trace, options):
    table, curve = cal.calibrate_measures(trace, ["max_prob", "entropy"], 0.1, 0.1, **options)
    for row in table.itertuples():
        tested = curve[curve["measure"] == row.measure].sort_values("order")
        rejected = tested["p_value"] <= 0.1
        # every point before the stop is rejected; the stop (if any) is the first non-rejection
        assert rejected.iloc[:row.grid_rejected].all()
        assert len(tested) in (row.grid_rejected, row.grid_rejected + 1)
        if len(tested) > row.grid_rejected:
            assert not rejected.iloc[-1] and tested["p_value"].iloc[-1] == row.p_value_next
        assert row.certified
        assert row.threshold == tested["threshold"].iloc[row.grid_rejected - 1]
        assert row.cal_risk <= 0.1 and row.p_value <= 0.1
        # strict to lax: confidence thresholds fall, entropy thresholds rise
        assert tested["threshold"].is_monotonic_decreasing if row.measure == "max_prob" \
            else tested["threshold"].is_monotonic_increasing
        assert 2 <= row.mean_exit_layer <= 8 and 0 <= row.test_risk <= 1
    assert table["cal_tokens"].iloc[0] + table["test_tokens"].iloc[0] == trace.num_tokens


def test_split_is_seeded_and_by_sequence(trace):
    a = cal.calibrate(trace, "max_prob", 0.1, 0.1, seed=1)
    b = cal.calibrate(trace, "max_prob", 0.1, 0.1, seed=1)
    c = cal.calibrate(trace, "max_prob", 0.1, 0.1, seed=2)
    assert a.equals(b)
    assert a["cal_tokens"].iloc[0] != c["cal_tokens"].iloc[0]
    assert a["cal_sequences"].iloc[0] + a["test_sequences"].iloc[0] == trace.num_sequences


def test_nothing_certified_when_even_the_strictest_fails(trace):
    table = cal.calibrate(trace, "max_prob", 0.001, 0.1, grid=[0.5, 0.3], unit="token", p_value="binomial")
    row = table.iloc[0]
    assert not row.certified and math.isnan(row.threshold) and row.grid_rejected == 0


def test_calibrated_file_round_trip(trace, tmp_path):
    table = cal.calibrate(trace, ["max_prob", "cosine"], 0.1, 0.1)
    table.loc[1, "certified"] = False
    path = cal.write_calibrated(tmp_path / "cal.json", table)
    data = json.loads(path.read_text())
    assert data["max_prob"] == table["threshold"].iloc[0] and data["cosine"] is None
    assert data["_calibration"]["epsilon"] == 0.1
    assert cal.load_calibrated(path, "max_prob") == table["threshold"].iloc[0]
    threshold = cal.resolve_threshold(f"calibrated:{path}", "max_prob")
    assert threshold.value == table["threshold"].iloc[0] and not threshold.decay
    assert cal.resolve_threshold("decay:0.9", "max_prob").decay
    with pytest.raises(EesimError, match="no threshold was certified for measure 'cosine'"):
        cal.load_calibrated(path, "cosine")
    with pytest.raises(EesimError, match="no threshold for measure 'entropy'; it holds cosine, max_prob"):
        cal.load_calibrated(path, "entropy")
    with pytest.raises(EesimError, match="no such file"):
        cal.load_calibrated(tmp_path / "missing.json", "max_prob")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(EesimError, match="not valid JSON"):
        cal.load_calibrated(tmp_path / "bad.json", "max_prob")


@pytest.mark.parametrize("kwargs, message", [
    ({"epsilon": 0}, "epsilon must lie in \\(0, 1\\)"),
    ({"epsilon": 1.5}, "epsilon must lie in \\(0, 1\\)"),
    ({"delta": 1.0}, "delta must lie in \\(0, 1\\)"),
    ({"delta": float("nan")}, "delta must lie in \\(0, 1\\)"),
    ({"measures": ["vibes"]}, "unknown confidence measure 'vibes'"),
    ({"measures": ["oracle"]}, "nothing to calibrate"),
    ({"measures": []}, "no measures given"),
    ({"grid": []}, "grid for measure 'max_prob' is empty"),
    ({"grid": [0.5, 1.5]}, "outside the domain"),
    ({"grid": "0.9:0.1"}, "bad grid"),
    ({"epsilon": 0.0001}, "too few sequences"),
    ({"epsilon": 0.0001, "unit": "token", "p_value": "binomial"}, "too few tokens"),
    ({"unit": "sequence", "p_value": "binomial"}, "binomial p-value does not apply"),
    ({"unit": "paragraph"}, "unknown unit"),
    ({"p_value": "bonferroni"}, "unknown p-value"),
    ({"calibration_share": 1.0}, "calibration_share must lie in \\(0, 1\\)"),
])
def test_bad_input(trace, kwargs, message):
    args = {"measures": ["max_prob"], "epsilon": 0.1, "delta": 0.1} | kwargs
    with pytest.raises(EesimError, match=message):
        cal.calibrate(trace, **args)


def test_too_few_sequences_for_a_split():
    one = synthesize_exit_trace(8, (2, 4, 6, 8), 1, seed=0)
    with pytest.raises(EesimError, match="leaves an empty part"):
        cal.calibrate(one, "max_prob", 0.5, 0.5)


def test_cli(trace, tmp_path, capsys):
    path = trace.write(tmp_path / "trace.parquet")
    out = tmp_path / "cal.json"
    assert cli("calibrate", "--exit-trace", str(path), "--epsilon", "0.1", "--measures", "max_prob,entropy",
               "--p-value", "hb", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "max_prob" in printed and "entropy" in printed and f"calibrated:{out}" in printed
    assert set(json.loads(out.read_text())) == {"max_prob", "entropy", "_calibration"}
    assert cli("calibrate", "--exit-trace", str(path), "--epsilon", "2", "--out", str(tmp_path / "x.json")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epsilon must lie in (0, 1)" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_module_is_callable(trace):
    import eesim.calibrate

    assert eesim.calibrate(trace, "max_prob", 0.1, 0.1)["certified"].iloc[0]
