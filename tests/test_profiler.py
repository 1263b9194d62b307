"""The profiler on CPU (tiny shape, tiny grid; timings meaningless): structure, file format, resume."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")

from eesim.errors import EesimError  # noqa: E402
from eesim.model_spec import ModelSpec  # noqa: E402
from eesim.profile_data import COLUMNS, read_profile, spec_to_meta, write_profile  # noqa: E402
from eesim.profiler import GRIDS, ProfileGrid, Profiler, build_executor  # noqa: E402

SPEC = ModelSpec("tinyp", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, mlp_size=96, vocab_size=101,
                 exit_layers=(1, 2, 3), dtype="float32", max_context=256)


def make_profiler(path, spec=SPEC, grid=GRIDS["tiny"]):
    spec, ex = build_executor(spec, None, "cpu", torch.float32, grid, 0, backend="torch")
    return Profiler(spec, ex, grid, path, {"format": 1, "model": spec_to_meta(spec)}, progress=False)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "tiny.parquet"
    prof = make_profiler(path)
    prof.run()
    return path, prof


def test_every_grid_point_present(swept):
    path, prof = swept
    frame = read_profile(path).frame
    got = set(map(tuple, frame[["component", "layers", "batch", "context", "tokens", "checks"]].itertuples(
        index=False, name=None)))
    assert got == set(prof.points())
    assert set(frame["component"]) == {"schedule", "bookkeeping", "fixed", "decode", "check", "check_eager",
                                       "check_eager_one", "fill",
                                       "prefill", "mixed", "proj", "recompute", "leave", "leave_owing_proj",
                                       "leave_owing_recompute"}
    # decode: every exit layer and the last x every batch x context
    dec = frame[frame.component == "decode"]
    assert len(dec) == len(SPEC.all_exits) * 2 * 2
    assert (frame["p25_s"] <= frame["median_s"]).all() and (frame["median_s"] <= frame["p75_s"]).all()
    assert (frame["repeats"] >= 2).all()


def test_leave_points_leave_at_their_exit_owing_or_not(swept):
    """leave*: every exit layer x leave batch, each kind; every row leaves at the point's exit (nothing run past
    it), the owing kinds start owing K/V (the general path) and run none of it, ``leave`` owes nothing."""
    path, prof = swept
    frame = read_profile(path).frame
    for comp in ("leave", "leave_owing_proj", "leave_owing_recompute"):
        sub = frame[frame.component == comp]
        assert sorted(zip(sub.layers, sub.batch)) == sorted((e, b) for e in SPEC.exit_layers for b in (1, 2))
        assert (sub.checks == [SPEC.exit_layers.index(e) + 1 for e in sub.layers]).all()
        for row in sub.itertuples():
            work = prof.works[(comp, row.layers, row.batch, row.context, row.tokens, row.checks)]
            assert int(work.batch_reach[0]) == SPEC.exit_layers.index(row.layers)  # the segments run before the exit
            assert not work.recompute_rows.any() and not work.proj_rows[:, :].any() if comp != "leave" else True
            assert (int(work.carried[0]) > 0) == (comp != "leave")


def test_host_bound_points_pool_their_rounds(swept):
    """Points whose step waits on the host mid-pass are measured in grid.rounds rounds, one row each, their
    timings pooled; the others once."""
    path, prof = swept
    frame = read_profile(path).frame
    keys = frame[["component", "layers", "batch", "context", "tokens", "checks"]].itertuples(index=False, name=None)
    bound = np.array([prof.host_bound(k) for k in keys])
    grid = GRIDS["tiny"]
    assert not frame.duplicated(["component", "layers", "batch", "context", "tokens", "checks"]).any()
    assert bound.any() and (~bound).any()
    assert {"check", "proj", "recompute"} <= set(frame.component[bound])
    assert not frame[(frame.component == "decode") & (frame.layers == SPEC.num_layers)].index.isin(
        np.flatnonzero(bound)).any()
    assert (frame.repeats[bound] == grid.rounds * grid.repeats).all()
    assert (frame.repeats[~bound & frame.component.isin(["decode", "prefill", "fill"])] == grid.repeats).all()


def test_work_of_points(swept):
    _, prof = swept
    # a forced exit at exit index 1 (layer 2): two segments run, checks at exits 0 and 1, fill after
    w = prof.works[("decode", 2, 4, 64, 0, 0)]
    assert w.full_rows[0].tolist() == [4, 4, 0, 0]
    assert w.check_rows[0].tolist() == [4, 4, 0, 0]
    assert w.proj_rows[0].tolist() == [0, 0, 4, 4]
    w = prof.works[("prefill", 4, 0, 32, 48, 0)]
    assert w.full_rows[0].tolist() == [48] * 4
    # owed positions ride along in a step that checks every exit (nobody leaves), as under a rule that checks
    w = prof.works[("recompute", 3, 2, 32, 2, 3)]
    assert w.recompute_rows[0].tolist() == [0, 2, 2, 2]
    assert w.check_rows[0].tolist() == [2, 2, 2, 0]


def test_resume_skips_done_points(swept, tmp_path):
    path, _ = swept
    copy = tmp_path / "resume.parquet"
    prof = read_profile(path)
    # drop the decode points, then resume: only they are measured again
    frame = prof.frame[prof.frame.component != "decode"]
    write_profile(copy, frame, prof.meta)
    again = make_profiler(copy)
    measured = []
    real = again.measure
    again.measure = lambda point, setting: (measured.append(point), real(point, setting))[1]
    again.run()
    assert measured and all(p[0] == "decode" for p in measured)
    assert len(read_profile(copy).frame) == len(prof.frame)
    # a complete file: nothing to do
    third = make_profiler(copy)
    third.measure = lambda point, setting: pytest.fail(f"re-measured {point}")
    third.run()


def test_resume_refuses_other_shape(swept):
    path, _ = swept
    other = ModelSpec("other", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, mlp_size=96,
                      vocab_size=101, exit_layers=(2,), dtype="float32", max_context=256)
    with pytest.raises(EesimError, match="not 'other'|for shape"):
        make_profiler(path, spec=other)


def test_round_trip(swept, tmp_path):
    path, _ = swept
    prof = read_profile(path)
    out = tmp_path / "rt.parquet"
    write_profile(out, prof.frame, prof.meta)
    back = read_profile(out)
    pd.testing.assert_frame_equal(back.frame, prof.frame)
    assert back.meta == prof.meta
    assert back.model == SPEC
    assert list(back.frame.columns) == list(COLUMNS)


@pytest.mark.parametrize("breakage", ["no_meta", "bad_column", "negative", "not_parquet", "duplicate"])
def test_malformed_refused(swept, tmp_path, breakage):
    path, _ = swept
    prof = read_profile(path)
    bad = tmp_path / "bad.parquet"
    frame = prof.frame.copy()
    if breakage == "no_meta":
        frame.to_parquet(bad)
    elif breakage == "bad_column":
        write_profile(bad, frame.drop(columns=["p75_s"]).assign(p75_s="x"), prof.meta)
    elif breakage == "negative":
        frame.loc[0, "median_s"] = -1.0
        write_profile(bad, frame, prof.meta)
    elif breakage == "duplicate":
        write_profile(bad, pd.concat([frame, frame.iloc[:1]]), prof.meta)
    else:
        bad.write_text("not a parquet file")
    with pytest.raises(EesimError):
        read_profile(bad)


def test_check_points_time_their_own_path(monkeypatch):
    """`check` times the graphed decode path, `check_eager` the general path (copy_hidden would otherwise take
    the graphed one for a plan owing nothing), and the executor is left on its normal routing."""
    import eesim.gpu.executor as executor_module

    grid = GRIDS["tiny"]
    spec, ex = build_executor(SPEC, None, "cpu", torch.float32, grid, 0, backend="torch", cuda_graphs=True)
    prof = Profiler(spec, ex, grid, None, {"format": 1, "model": spec_to_meta(spec)}, progress=False)
    paths = []
    for name in ("run_decode", "run_general"):
        real = getattr(executor_module, name)
        monkeypatch.setattr(executor_module, name,
                            lambda *a, _real=real, _name=name: (paths.append(_name), _real(*a))[1])
    for comp in ("check", "check_eager"):
        paths.clear()
        prof.measure((comp, SPEC.num_layers, 2, grid.check_context, 0, SPEC.num_segments - 1), None)
        assert set(paths) == {"run_decode" if comp == "check" else "run_general"}
        assert ex.graphed_decode


@pytest.mark.parametrize("ctx,batch", [(16, 1), (16, 4), (64, 7), (512, 8), (3000, 5), (4096, 3), (3, 6)])
def test_decode_contexts_spread_with_the_grid_mean(tmp_path, ctx, batch):
    """Decode rows' contexts spread around the point's context (served batches mix them), every row within
    2 .. max_context, their sum exactly batch x context (the KV bytes the grid point stands for)."""
    from eesim.model_spec import MODEL_PRESETS

    prof = make_profiler(tmp_path / "p.parquet")
    prof.spec = MODEL_PRESETS["llama2-7b"]
    got = prof.contexts(ctx, batch)
    assert len(got) == batch and sum(got) == batch * ctx
    assert min(got) >= min(ctx, 2) and max(got) <= prof.spec.max_context
    assert got == sorted(got)
    if batch > 1 and 4 <= ctx <= prof.spec.max_context // 2:
        assert got[0] < ctx < got[-1]  # spread, not uniform
    prof.grid = replace(prof.grid, decode_spread=0.0)
    assert prof.contexts(ctx, batch) == [ctx] * batch


def test_graphed_owing_set_from_the_command_line_and_recorded():
    """By default the profiler measures the executor that serves owing steps graphed up to where their K/V rides;
    ``--no-graphed-owing`` the one that runs them on the general path; the grid, recorded in the profile's
    metadata, says which executor a profile priced."""
    import argparse

    from eesim.profiler import _add_arguments, grid_from_args

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    assert not grid_from_args(parser.parse_args(["--no-graphed-owing"])).graphed_owing
    assert grid_from_args(parser.parse_args([])).graphed_owing
    assert GRIDS["default"].to_meta()["graphed_owing"] is True
    assert ProfileGrid.from_meta(GRIDS["default"].to_meta()) == GRIDS["default"]
    assert ProfileGrid.from_meta({"batches": [1, 2]}).graphed_owing is False  # a profile from before the key
