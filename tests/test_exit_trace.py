"""Exit traces: the file contract (round trip, every rejection), the synthetic generator, the queries."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eesim.errors import EesimError
from eesim.exit_trace import (MEASURE_COLUMNS, ExitTrace, SyntheticExitParams, default_synthetic_trace,
                              read_exit_trace, synthesize_exit_trace, trace_metadata)


@pytest.fixture(scope="module")
def large() -> ExitTrace:
    return default_synthetic_trace()


def small_trace(seed: int = 0) -> ExitTrace:
    return synthesize_exit_trace(8, (2, 4, 6, 8), num_sequences=5, seed=seed)


def hand_trace(agrees, output_lens, argmax=None) -> ExitTrace:
    """A trace on 4 layers with exits (1, 2, 4) from a hand-written agreement table."""
    agrees = np.asarray(agrees, dtype=bool)
    shape = agrees.shape
    values = {m: np.full(shape, 0.5, dtype=np.float32) for m in MEASURE_COLUMNS}
    argmax = np.full(shape, -1) if argmax is None else np.asarray(argmax)
    meta = trace_metadata(4, (1, 2, 4), "recorded", "hand", {"note": "test"})
    return ExitTrace(meta, values, agrees, argmax, np.r_[0, np.cumsum(output_lens)],
                     np.full(len(output_lens), 10), np.arange(len(output_lens)) + 100)


def write_raw(df: pd.DataFrame, meta, path, raw_meta: bytes | None = None) -> None:
    """Write a frame as parquet without any validation, to build malformed files."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if raw_meta is None and meta is not None:
        raw_meta = json.dumps(meta).encode()
    table = table.replace_schema_metadata({b"eesim": raw_meta} if raw_meta is not None else {})
    pq.write_table(table, path)


def assert_same(a: ExitTrace, b: ExitTrace) -> None:
    assert a.metadata == b.metadata and a.num_layers == b.num_layers and a.exit_layers == b.exit_layers
    for m in MEASURE_COLUMNS:
        assert a.values[m].dtype == b.values[m].dtype and np.array_equal(a.values[m], b.values[m])
    for name in ("agrees", "argmax", "seq_offsets", "prompt_lens", "seq_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


# ---- file round trip ---------------------------------------------------------------------------------
def test_write_read_round_trip(tmp_path):
    trace = small_trace()
    path = trace.write(tmp_path / "sub" / "t.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.parquet"]  # no temp file left behind
    assert_same(read_exit_trace(path), trace)
    assert_same(ExitTrace.from_frame(trace.to_frame(), trace.metadata), trace)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = small_trace(seed=1).write(tmp_path / "t.parquet")

    def broken_write(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("eesim.exit_trace.pq.write_table", broken_write)
    with pytest.raises(OSError):
        small_trace(seed=2).write(path)
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]
    monkeypatch.undo()
    assert_same(read_exit_trace(path), small_trace(seed=1))


def test_round_trip_of_recorded_trace_with_argmax(tmp_path):
    trace = hand_trace([[0, 1, 1], [0, 0, 1], [1, 0, 1]], [2, 1], argmax=[[5, 7, 7], [1, 2, 3], [9, 4, 9]])
    assert_same(read_exit_trace(trace.write(tmp_path / "t.parquet")), trace)


def test_reader_accepts_shuffled_rows_and_wider_types(tmp_path):
    trace = small_trace()
    df = trace.to_frame().sample(frac=1.0, random_state=1)
    df = df.astype({"seq_id": "int64", "token_index": "int64", "max_prob": "float64"})
    write_raw(df, trace.metadata, tmp_path / "t.parquet")
    assert_same(read_exit_trace(tmp_path / "t.parquet"), trace)


def test_trace_arrays_are_read_only():
    trace = small_trace()
    with pytest.raises(ValueError):
        trace.agrees[0, 0] = False
    with pytest.raises(TypeError):
        trace.values["max_prob"] = None


# ---- malformed files ---------------------------------------------------------------------------------
def _set(df, column, row, value):
    df = df.copy()
    df[column] = df[column].astype(object if isinstance(value, str) else df[column].dtype)
    df.loc[row, column] = value
    return df


def _gap(df):
    df = df.copy()
    df.loc[(df.seq_id == 0) & (df.token_index >= 1), "token_index"] += 1
    return df


MALFORMED = {
    "missing columns": (lambda df, m: (df.drop(columns=["entropy", "cosine"]), m), "entropy, cosine"),
    "float where int": (lambda df, m: (df.astype({"seq_id": "float64"}), m), "seq_id must be integer"),
    "string measure": (lambda df, m: (df.astype({"max_prob": str}), m), "max_prob must be float"),
    "int agrees": (lambda df, m: (df.astype({"agrees": "int8"}), m), "agrees must be bool"),
    "NaN": (lambda df, m: (_set(df, "entropy", 3, np.nan), m), "entropy has 1 null/NaN"),
    "null int": (lambda df, m: (_set(df, "seq_id", 0, None), m), "seq_id has 1 null/NaN"),
    "max_prob > 1": (lambda df, m: (_set(df, "max_prob", 5, 1.5), m), "max_prob value 1.5 at row 5"),
    "entropy < 0": (lambda df, m: (_set(df, "entropy", 7, -0.1), m), "column entropy value"),
    "entropy inf": (lambda df, m: (_set(df, "entropy", 7, np.inf), m), "column entropy value inf"),
    "cosine > 1": (lambda df, m: (_set(df, "cosine", 2, 1.01), m), "column cosine value"),
    "margin > max_prob": (lambda df, m: (_set(_set(df, "max_prob", 4, 0.3), "margin", 4, 0.4), m),
                          "margin exceeds max_prob at row 4"),
    "prompt_len 0": (lambda df, m: (_set(df, "prompt_len", 0, 0), m), "column prompt_len value 0"),
    "argmax < -1": (lambda df, m: (_set(df, "argmax", 0, -2), m), "column argmax value -2"),
    "exit not in metadata": (lambda df, m: (_set(df, "exit_layer", 1, 3), m), "row 1 has exit_layer 3"),
    "exits differ between tokens": (lambda df, m: (df.drop(index=df.index[df.exit_layer == 4][:3]), m),
                                    "lacks exit(s) [4]"),
    "token missing an exit": (lambda df, m: (df.drop(index=6), m), "token_index 1 lacks exit(s) [6]"),
    "duplicate row": (lambda df, m: (pd.concat([df, df.iloc[[9]]]), m), "are both seq_id"),
    "token_index gap": (lambda df, m: (_gap(df), m), "expected 1, found 2"),
    "token_index from 1": (lambda df, m: (df.assign(token_index=df.token_index + 1), m), "expected 0, found 1"),
    "prompt_len varies": (lambda df, m: (_set(df, "prompt_len", 5, 7777), m), "has more than one prompt_len"),
    "agrees False at last exit": (lambda df, m: (_set(df, "agrees", 3, False), m), "agrees is False at the last exit"),
    "metadata exit missing from rows": (lambda df, m: (df, {**m, "exit_layers": [2, 3, 4, 6, 8]}),
                                        "no row has exit(s) [3]"),
    "metadata num_layers wrong": (lambda df, m: (df, {**m, "num_layers": 16}), "ending at num_layers=16"),
    "metadata lacks keys": (lambda df, m: (df, {k: v for k, v in m.items() if k not in ("source", "model")}),
                            "metadata lacks source, model"),
    "metadata bad source": (lambda df, m: (df, {**m, "source": "guess"}), "source must be one of"),
    "schema version": (lambda df, m: (df, {**m, "schema_version": 2}), "schema_version 2 is not supported"),
    "metadata absent": (lambda df, m: (df, None), "no 'eesim' key-value metadata"),
    "empty": (lambda df, m: (df.iloc[:0], m), "the trace is empty"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_trace_is_rejected_with_one_line_naming_file(tmp_path, case):
    mutate, expected = MALFORMED[case]
    trace = small_trace()
    df, meta = mutate(trace.to_frame(), dict(trace.metadata))
    path = tmp_path / "bad.parquet"
    write_raw(df, meta, path)
    with pytest.raises(EesimError) as info:
        read_exit_trace(path)
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message, message


def test_agrees_contradicting_argmax_is_rejected(tmp_path):
    trace = hand_trace([[0, 1, 1], [0, 0, 1]], [2], argmax=[[5, 7, 7], [1, 2, 3]])
    df = _set(trace.to_frame(), "agrees", 0, True)  # token 0 exit 1: argmax 5 != 7 yet "agrees"
    write_raw(df, trace.metadata, tmp_path / "t.parquet")
    with pytest.raises(EesimError, match="agrees contradicts argmax at row 0"):
        read_exit_trace(tmp_path / "t.parquet")


@pytest.mark.parametrize("contents,expected", [(None, "no such file"), (b"not parquet at all", "not a readable parquet"),
                                               ("bad json", "not valid JSON")])
def test_unreadable_files_are_rejected(tmp_path, contents, expected):
    path = tmp_path / "t.parquet"
    if contents == "bad json":
        write_raw(small_trace().to_frame(), None, path, raw_meta=b"{oops")
    elif contents is not None:
        path.write_bytes(contents)
    with pytest.raises(EesimError) as info:
        read_exit_trace(path)
    assert str(path) in str(info.value) and expected in str(info.value)


# ---- synthetic generator -----------------------------------------------------------------------------
def test_generator_is_deterministic_per_seed():
    assert_same(small_trace(seed=3), small_trace(seed=3))
    assert not np.array_equal(small_trace(seed=3).values["max_prob"], small_trace(seed=4).values["max_prob"])


def test_generator_respects_domains_and_lengths(large):
    p = SyntheticExitParams()
    v = large.values
    assert large.num_sequences == 2000 and large.exit_layers == (4, 8, 12, 16, 20, 24, 28, 32)
    assert np.all((v["max_prob"] >= 1 / p.vocab_size) & (v["max_prob"] <= 1))
    assert np.all((v["margin"] >= 0) & (v["margin"] <= v["max_prob"]))
    assert np.all((v["entropy"] >= 0) & (v["entropy"] <= np.log(p.vocab_size)))
    assert np.all((v["cosine"] >= -1) & (v["cosine"] <= 1))
    assert np.all((v["classifier"] >= 0) & (v["classifier"] <= 1))
    assert large.agrees[:, -1].all() and np.all(large.argmax == -1)
    assert np.all((large.output_lens >= p.output_min) & (large.output_lens <= p.output_max))
    assert np.all((large.prompt_lens >= p.prompt_min) & (large.prompt_lens <= p.prompt_max))
    assert large.metadata["source"] == "synthetic" and large.metadata["params"]["seed"] == 0


def test_agreement_rises_with_depth(large):
    agreement = large.agreement_by_exit()["agreement"].to_numpy()
    assert np.all(np.diff(agreement) > 0) and agreement[-1] == 1.0
    # roughly the hard share only settles at the last layer
    assert 0.08 < large.summary()["oracle_last_exit_share"] < 0.25


@pytest.mark.parametrize("measure,sign", [("max_prob", 1), ("margin", 1), ("entropy", -1), ("cosine", 1),
                                          ("classifier", 1)])
def test_measures_correlate_with_agreement(large, measure, sign):
    for e in range(large.num_exits - 1):  # the last exit always agrees: no correlation to measure
        corr = np.corrcoef(large.values[measure][:, e], large.agrees[:, e])[0, 1]
        assert sign * corr > 0.1, (measure, e, corr)


def test_generator_rejects_exits_without_last_layer():
    with pytest.raises(EesimError, match="ending at num_layers=8"):
        synthesize_exit_trace(8, (2, 4, 6), num_sequences=3)
    with pytest.raises(EesimError, match="flip_prob"):
        SyntheticExitParams(flip_prob=0.6)


# ---- queries -----------------------------------------------------------------------------------------
def test_oracle_exit_index_hand_built():
    trace = hand_trace([[0, 1, 1], [0, 0, 1], [1, 0, 1], [1, 1, 1]], [3, 1])
    assert trace.oracle_exit_index().tolist() == [1, 2, 0, 0]
    table = trace.agreement_by_exit()
    assert table["agreement"].tolist() == [0.5, 0.5, 1.0] and table["oracle_share"].tolist() == [0.5, 0.25, 0.25]
    assert trace.exit_fractions.tolist() == [0.25, 0.5, 1.0]


def test_rows_for_wraps_within_sequence():
    trace = hand_trace(np.ones((5, 3)), [3, 2])
    assert trace.rows_for(1, 5).tolist() == [3, 4, 3, 4, 3]
    assert trace.rows_for(0, 2).tolist() == [0, 1]
    assert trace.rows_for(0, 0).tolist() == []
    with pytest.raises(EesimError):
        trace.rows_for(2, 1)


TRACE_FOR_PROPERTY = small_trace()


@settings(max_examples=200, deadline=None)
@given(seq_index=st.integers(0, 4), n_tokens=st.integers(0, 3000))
def test_rows_for_property(seq_index, n_tokens):
    trace = TRACE_FOR_PROPERTY
    rows = trace.rows_for(seq_index, n_tokens)
    start, stop = trace.seq_offsets[seq_index], trace.seq_offsets[seq_index + 1]
    assert len(rows) == n_tokens and np.all((rows >= start) & (rows < stop))
    assert np.array_equal(rows[: stop - start], np.arange(start, min(stop, start + n_tokens)))  # in order first
    assert np.array_equal(rows[stop - start:], rows[: max(n_tokens - (stop - start), 0)])  # then repeats


def test_remap_to_maps_fractions_and_rejects_collisions():
    trace = small_trace()
    assert trace.remap_to(32) == (8, 16, 24, 32) and trace.remap_to(8) == (2, 4, 6, 8)
    assert trace.remap_to(12) == (3, 6, 9, 12)
    collide = synthesize_exit_trace(8, (6, 7, 8), num_sequences=1)  # 3, 3.5, 4 on 4 layers
    with pytest.raises(EesimError, match="not distinct"):
        collide.remap_to(4)
    with pytest.raises(EesimError):
        trace.remap_to(2)  # 0.25 * 2 rounds to 0 (ties to even)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), num_sequences=st.integers(1, 6))
def test_frame_round_trip_property(seed, num_sequences):
    trace = synthesize_exit_trace(6, (1, 3, 6), num_sequences=num_sequences, seed=seed)
    assert_same(ExitTrace.from_frame(trace.to_frame(), trace.metadata), trace)
