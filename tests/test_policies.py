"""Exit-rule semantics, the closed forms against the exit-by-exit rule, the registry and thresholds."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from eesim.errors import EesimError
from eesim.policies import EXIT_RULES, KV_POLICIES, MEASURES, exit_rule, kv_policy, measure, parse_spec
from eesim.policies.base import ExitRule
from eesim.policies.thresholds import Threshold, parse_threshold


@st.composite
def batches(draw):
    steps, rows, checks = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 7))
    confident = draw(arrays(bool, (steps, rows, checks)))
    eligible = draw(arrays(bool, (rows,)))
    return confident, eligible


@settings(max_examples=300, deadline=None)
@given(batches(), st.sampled_from(sorted(EXIT_RULES)))
def test_closed_forms_equal_exit_by_exit_decisions(batch, name):
    confident, eligible = batch
    rule = exit_rule(name)
    fast = rule.decide_all(confident, eligible)
    slow = ExitRule.decide_all(rule, confident, eligible)
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_array_equal(fast[1], slow[1])


@settings(max_examples=200, deadline=None)
@given(batches())
def test_all_confident_stops_at_first_exit_where_all_are_confident(batch):
    confident, eligible = batch
    exit_index, forced = exit_rule("all_confident").decide_all(confident, eligible)
    checks = confident.shape[2]
    for t in range(confident.shape[0]):
        assert (exit_index[t, ~eligible] == checks).all()
        all_conf = confident[t][eligible].all(axis=0) if eligible.any() else np.zeros(checks, bool)
        expected = int(np.argmax(all_conf)) if all_conf.any() else checks
        assert (exit_index[t, eligible] == expected).all()
        if expected < checks:  # never before all are confident
            assert confident[t, eligible, expected].all()
    assert not forced.any()


@settings(max_examples=200, deadline=None)
@given(batches())
def test_per_sequence_stops_each_row_at_its_own_first_confident_exit(batch):
    confident, eligible = batch
    exit_index, forced = exit_rule("per_sequence").decide_all(confident, eligible)
    checks = confident.shape[2]
    for t in range(confident.shape[0]):
        for b in range(confident.shape[1]):
            hits = np.flatnonzero(confident[t, b])
            expected = int(hits[0]) if eligible[b] and len(hits) else checks
            assert exit_index[t, b] == expected
    assert not forced.any()


@settings(max_examples=100, deadline=None)
@given(batches())
def test_full_never_exits(batch):
    confident, eligible = batch
    exit_index, forced = exit_rule("full").decide_all(confident, eligible)
    assert (exit_index == confident.shape[2]).all() and not forced.any()


@settings(max_examples=200, deadline=None)
@given(batches(), st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_quorum_stops_when_q_are_confident_and_counts_the_forced(batch, q):
    confident, eligible = batch
    exit_index, forced = exit_rule(f"quorum:q={q}").decide_all(confident, eligible)
    checks = confident.shape[2]
    n = int(eligible.sum())
    for t in range(confident.shape[0]):
        shares = confident[t][eligible].sum(axis=0) if n else np.zeros(checks)
        stop = shares >= q * n if n else np.zeros(checks, bool)
        expected = int(np.argmax(stop)) if stop.any() else checks
        assert (exit_index[t, eligible] == expected).all()
        if expected < checks:
            np.testing.assert_array_equal(forced[t], eligible & ~confident[t, :, expected])
        else:
            assert not forced[t].any()


def test_quorum_with_q_one_equals_all_confident():
    rng = np.random.default_rng(0)
    confident = rng.random((4, 6, 5)) < 0.8
    eligible = np.ones(6, bool)
    a = exit_rule("quorum:q=1").decide_all(confident, eligible)
    b = exit_rule("all_confident").decide_all(confident, eligible)
    np.testing.assert_array_equal(a[0], b[0])


def test_registry_has_the_built_ins():
    assert {"full", "all_confident", "per_sequence", "quorum"} <= set(EXIT_RULES)
    assert {"fill", "copy_hidden", "recompute"} <= set(KV_POLICIES)
    assert {"max_prob", "margin", "entropy", "cosine", "classifier", "oracle"} <= set(MEASURES)
    assert kv_policy("fill").settle == "iteration_end" and kv_policy("fill").work == "kv_projection"
    assert kv_policy("copy_hidden").settle == "batch_pass"
    assert kv_policy("recompute").work == "full_layers" and kv_policy("recompute").settle == "own_pass"


@pytest.mark.parametrize("bad, message", [
    ("nope", "unknown exit rule 'nope'"), ("quorum:q=2", "q must be in (0, 1]"),
    ("quorum:x=1", "bad parameters"), ("quorum:q", "expected key=value"),
    ("no_such_module.Rule", "cannot import module"), ("eesim.errors.Nothing", "has no 'Nothing'"),
    ("eesim.errors.EesimError", "is not an"),
])
def test_bad_exit_rules_are_refused(bad, message):
    with pytest.raises(EesimError, match=message.replace("(", r"\(").replace(")", r"\)")):
        exit_rule(bad)


def test_bad_kv_policy_and_measure_are_refused():
    with pytest.raises(EesimError, match="unknown KV policy 'lazy'"):
        kv_policy("lazy")
    with pytest.raises(EesimError, match="unknown confidence measure"):
        measure("vibes")


def test_spec_parsing():
    assert parse_spec("quorum:q=0.5,name=x") == ("quorum", {"q": 0.5, "name": "x"})
    assert parse_spec("full") == ("full", {})


@pytest.mark.parametrize("text, name", [("1.5", "max_prob"), ("-0.1", "margin"), ("-1", "entropy"),
                                        ("2", "cosine"), ("abc", "max_prob"), ("decay:x", "max_prob"),
                                        ("nan", "max_prob")])
def test_thresholds_outside_their_domain_are_refused(text, name):
    with pytest.raises(EesimError):
        parse_threshold(text, measure(name))


def test_decaying_threshold_follows_calm():
    m = measure("max_prob")
    threshold = parse_threshold("decay:0.9,tau=4,horizon=100", m)
    t = np.array([0, 50, 100])
    expected = 0.9 * 0.9 + 0.1 * 0.9 * np.exp(-4 * t / 100)
    np.testing.assert_allclose(threshold.at(t, m), expected)
    assert threshold.at(np.array([0]), m)[0] == pytest.approx(0.9)
    entropy = measure("entropy")
    relaxed = Threshold(2.0, decay=True).at(np.array([0, 1000]), entropy)
    assert relaxed[0] == pytest.approx(2.0) and relaxed[1] > relaxed[0]  # lower-is-confident relaxes upward


def test_measure_direction():
    values = np.array([0.1, 0.5, 0.9])
    np.testing.assert_array_equal(measure("max_prob").confident(values, 0.5), [False, True, True])
    np.testing.assert_array_equal(measure("entropy").confident(values, 0.5), [True, True, False])
