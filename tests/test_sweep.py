"""Sweeps: config validation, stable cell keys, resumable atomic results, process pool and Ray, the
max-goodput search and the command line."""

import json
from pathlib import Path

import pandas as pd
import pytest

import eesim.sweep as sw
from eesim import calibrate as cal
from eesim.cli import main
from eesim.errors import EesimError

REPO = Path(__file__).resolve().parents[1]
BASE = {"workload": "poisson:rate=2,duration=10", "exit_trace": "synthetic"}
CONFIG = {"base": BASE, "grid": {"policy": ["full", "all_confident + fill", "per_sequence + copy_hidden"],
                                 "threshold": [0.5, 0.9], "rate_scale": [1, 3]}}
SUMMARY = ["throughput_tok_s", "ttft_p90", "itl_p99", "quality", "mean_layers"]


def cli(*argv) -> int:
    return main(list(argv))  # the real command line, with its subcommand wiring


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "sweep.parquet"
    return out, sw.sweep(CONFIG, out, workers=1, progress=False)


def test_grid_and_results(serial):
    out, frame = serial
    # full ignores threshold: 2 rate scales x (1 + 2 policies x 2 thresholds)
    assert len(frame) == 10 and frame["cell"].is_unique
    assert (frame[frame["rule"] == "full"]["threshold"].isna()).all()
    assert set(frame["policy"]) == {"full", "all_confident + fill", "per_sequence + copy_hidden"}
    assert {"cell", "threshold_value", "elapsed_s", "speedup", "itl_speedup", *SUMMARY} <= set(frame.columns)
    assert (frame[frame["rule"] == "full"]["speedup"] == 1.0).all()
    assert frame["speedup"].notna().all()
    stored = pd.read_parquet(out)
    assert set(stored["cell"]) == set(frame["cell"])
    assert not list(out.parent.glob(".*tmp")), "temporary files left behind"


def test_cell_keys_are_stable():
    a = sw.canonical_cell({"policy": "all_confident+fill", "threshold": 0.9, "rate_scale": 1})
    b = sw.canonical_cell({"policy": " all_confident + fill", "threshold": "0.90", "rate_scale": 1.0})
    c = sw.canonical_cell({"policy": "all_confident + fill", "threshold": 0.8})
    assert sw.cell_key(a) == sw.cell_key(b) != sw.cell_key(c)
    assert sw.cell_key(a) == "%s" % sw.cell_key(dict(reversed(list(a.items()))))
    full = [sw.canonical_cell({"policy": "full", "threshold": t}) for t in (0.5, 0.9)]
    assert sw.cell_key(full[0]) == sw.cell_key(full[1])


def test_resume_skips_finished_cells(serial, tmp_path, monkeypatch):
    out, frame = serial
    copy = tmp_path / "sweep.parquet"
    copy.write_bytes(out.read_bytes())
    monkeypatch.setattr(sw, "run_cell", lambda cell: pytest.fail("a finished cell was rerun"))
    again = sw.sweep(CONFIG, copy, workers=1, progress=False)
    pd.testing.assert_frame_equal(again[SUMMARY], frame[SUMMARY])


def test_interrupted_sweep_leaves_a_consistent_file(tmp_path, monkeypatch):
    out = tmp_path / "sweep.parquet"
    real, calls = sw.run_cell, []

    def flaky(cell):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(cell["cell"])
        return real(cell)

    monkeypatch.setattr(sw, "run_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        sw.sweep(CONFIG, out, workers=1, progress=False)
    partial = pd.read_parquet(out)
    assert list(partial["cell"]) == calls and len(partial) == 4
    monkeypatch.setattr(sw, "run_cell", lambda cell: calls.append(cell["cell"]) or real(cell))
    frame = sw.sweep(CONFIG, out, workers=1, progress=False)
    assert len(calls) == 10 and len(set(calls)) == 10  # the other 6 cells only
    assert len(frame) == 10 and len(pd.read_parquet(out)) == 10


def test_process_pool_matches_serial(serial, tmp_path):
    _, frame = serial
    pooled = sw.sweep(CONFIG, tmp_path / "pool.parquet", workers=2, progress=False)
    pd.testing.assert_frame_equal(pooled[["cell", *SUMMARY]], frame[["cell", *SUMMARY]])


def test_ray_matches_serial(serial, tmp_path):
    ray = pytest.importorskip("ray")
    _, frame = serial
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        small = {"base": BASE, "grid": {"policy": ["full", "all_confident + fill"], "threshold": [0.5],
                                        "rate_scale": [1, 3]}}
        remote = sw.sweep(small, tmp_path / "ray.parquet", ray_address="auto", progress=False)
    finally:
        ray.shutdown()
    expected = frame.set_index("cell").loc[remote["cell"], SUMMARY].reset_index(drop=True)
    pd.testing.assert_frame_equal(remote[SUMMARY], expected)


def test_calibrated_threshold_and_rate_settings(tmp_path):
    table = pd.DataFrame([{"measure": "max_prob", "threshold": 0.7, "certified": True, "epsilon": 0.05,
                           "delta": 0.1}])
    path = cal.write_calibrated(tmp_path / "cal.json", table)
    cfg = {"base": BASE | {"rate": 4.0}, "grid": {"policy": ["all_confident + fill"],
                                                 "threshold": [f"calibrated:{path}", 0.7]}}
    frame = sw.sweep(cfg, None, workers=1, progress=False)
    assert list(frame["threshold_value"]) == [0.7, 0.7]
    assert frame["throughput_tok_s"].iloc[0] == frame["throughput_tok_s"].iloc[1]
    config, workload, _ = sw.build_run(sw.canonical_cell(BASE | {"rate": 4.0}))
    assert "rate=4/s" in workload.source


@pytest.mark.parametrize("config, message", [
    ({"base": BASE, "grid": {"policy": []}}, r"\[grid\] policy is an empty list"),
    ({"base": BASE, "grdi": {}}, "unknown key\\(s\\) grdi"),
    ({"base": BASE, "grid": {"thresholds": [0.5]}}, "unknown setting\\(s\\) thresholds in \\[grid\\]"),
    ({"base": BASE | {"replicas": [1, 2]}}, "lists go under \\[grid\\]"),
    ({"base": BASE, "grid": {"replicas": [1, 0]}}, r"replicas\[1\]: replicas must be >= 1, got 0"),
    ({"base": BASE, "grid": {"rate_scale": [-1]}}, "rate_scale must be a positive number"),
    ({"base": BASE, "grid": {"max_num_seqs": [1.5]}}, "max_num_seqs must be an integer"),
    ({"base": BASE, "grid": {"threshold": [True]}}, "threshold must be a number or a string"),
    ({"base": BASE, "grid": {"workload": ["default"]}}, "workload in both \\[base\\] and \\[grid\\]"),
    ({"base": BASE, "grid": {"policy": ["fastest"]}}, "unknown exit rule 'fastest'"),
    ({"base": BASE, "grid": {"policy": ["all_confident + lazy"]}}, "unknown KV policy 'lazy'"),
    ({"base": BASE, "grid": {"policy": ["all_confident +"]}}, "must be 'rule' or 'rule \\+ kv_policy'"),
    ({"base": BASE, "grid": {"threshold": [1.5]}}, "outside the domain"),
    ({"base": BASE, "grid": {"measure": ["vibes"]}}, "unknown confidence measure"),
    ({"base": BASE | {"workload": "poisson:rate=-1,duration=5"}}, "rate"),
    ({"base": BASE | {"workload": "missing.csv", "rate": 2.0}}, "needs a generator workload"),
    ([1, 2], "expected a mapping"),
])
def test_bad_config(config, message, monkeypatch):
    monkeypatch.setattr(sw, "run_cell", lambda cell: pytest.fail("simulated before validating"))
    with pytest.raises(EesimError, match=message):
        sw.sweep(config, None, workers=1, progress=False)


def test_config_files(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[base]\nworkload = "poisson:rate=2,duration=5"\nexit_trace = "synthetic"\n'
                    '[grid]\npolicy = ["full", "per_sequence + fill"]\n')
    assert sw.load_sweep_config(toml)["grid"]["policy"] == ["full", "per_sequence + fill"]
    js = tmp_path / "s.json"
    js.write_text(json.dumps(CONFIG))
    assert len(sw.expand(sw.load_sweep_config(js))) == 10
    for name, text, message in (("bad.toml", "[base\n", "not valid TOML"), ("bad.json", "{", "not valid JSON"),
                                ("s.yaml", "base: {}", "expected a .toml or .json file")):
        (tmp_path / name).write_text(text)
        with pytest.raises(EesimError, match=message):
            sw.load_sweep_config(tmp_path / name)
    with pytest.raises(EesimError, match="no such file"):
        sw.load_sweep_config(tmp_path / "missing.toml")


def test_max_goodput():
    cfg = {"base": BASE | {"workload": "poisson:rate=2,duration=20"},
           "grid": {"policy": ["full", "per_sequence + fill"], "threshold": [0.5], "rate_scale": [7]}}
    frame = sw.max_goodput(cfg, ttft_p90=0.5, itl_p99=0.1, low=0.5, high=2.0, tolerance=0.1, workers=1,
                           progress=False)
    assert list(frame["policy"]) == ["full", "per_sequence + fill"] and "rate_scale" not in frame
    for row in frame.itertuples():
        assert row.status in ("ok", "meets at highest scale") and row.max_rate_scale >= 0.5
        assert row.ttft_p90 <= 0.5 and row.itl_p99 <= 0.1 and row.max_rate_req_s > 0
        # the scale found meets the objectives when re-simulated on its own
        cell = sw.canonical_cell({**cfg["base"], "policy": row.policy, "threshold": 0.5, "rate_scale": row.max_rate_scale})
        summary = sw.run_cell(cell | {"cell": sw.cell_key(cell)})
        assert summary["ttft_p90"] <= 0.5 and summary["itl_p99"] <= 0.1
    tight = sw.max_goodput(cfg, itl_p99=1e-6, workers=1, progress=False)
    assert (tight["status"] == "fails at lowest scale").all() and tight["max_rate_scale"].isna().all()
    with pytest.raises(EesimError, match="at least one objective"):
        sw.max_goodput(cfg, workers=1, progress=False)
    with pytest.raises(EesimError, match="unknown objective 'ttft_p95'"):
        sw.max_goodput(cfg, objectives={"ttft_p95": 1.0}, workers=1, progress=False)
    with pytest.raises(EesimError, match="need 0 < low < high"):
        sw.max_goodput(cfg, ttft_p90=1.0, low=2, high=1, workers=1, progress=False)


def test_cli(tmp_path, capsys):
    config = tmp_path / "s.json"
    config.write_text(json.dumps({"base": BASE, "grid": {"policy": ["full", "per_sequence + fill"]}}))
    out = tmp_path / "out" / "sweep.parquet"
    assert cli("sweep", str(config), "--out", str(out), "--workers", "1", "--quiet") == 0
    assert "per_sequence + fill" in capsys.readouterr().out
    assert len(pd.read_parquet(out)) == 2
    assert cli("goodput", str(config), "--itl-p99", "0.2", "--workers", "1", "--quiet", "--high", "1.5",
               "--out", str(tmp_path / "g.parquet")) == 0
    assert len(pd.read_parquet(tmp_path / "g.parquet")) == 2
    capsys.readouterr()
    config.write_text(json.dumps({"base": BASE, "grid": {"replicas": []}}))
    assert cli("sweep", str(config), "--out", str(out), "--workers", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[grid] replicas is an empty list" in err[0]
    assert cli("goodput", str(config), "--workers", "1") == 2


def test_module_is_callable():
    import eesim.sweep

    frame = eesim.sweep({"base": BASE, "grid": {"policy": ["full"]}}, workers=1, progress=False)
    assert len(frame) == 1
