"""Which cost model prices a simulation (SimConfig.cost_model / --cost-model): auto picks the bundled profile
of the model's shape on its GPU and the analytical model otherwise; explicit choices; bad values refused in
one line (exit status 2 on the command line); every result says which model priced it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from test_profile_cost import META, SPEC, synthetic_frame

from eesim.config import SimConfig
from eesim.cost_choice import hardware_matches, resolve_cost_model
from eesim.cost_model import AnalyticalCostModel
from eesim.errors import EesimError
from eesim.exit_trace import synthesize_exit_trace
from eesim.hardware import HARDWARE_PRESETS
from eesim.model_spec import MODEL_PRESETS
from eesim.profile_cost import ProfileCostModel
from eesim.profile_data import shape_name, write_profile
from eesim.simulator import simulate
from eesim.workload import synthetic_workload

REPO = Path(__file__).resolve().parents[1]
H100, H200 = HARDWARE_PRESETS["h100"], HARDWARE_PRESETS["h200"]
LLAMA = MODEL_PRESETS["llama2-7b"]


def cfg(model=SPEC, hardware=H100, cost_model="auto", kv="fill", trace=None):
    return SimConfig(model, hardware, trace, "all_confident", kv, cost_model=cost_model)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A profile folder holding a synthetic profile of SPEC (llama2-7b with exits 8/16/24), 'measured' on an H100."""
    path = tmp_path_factory.mktemp("profiles")
    write_profile(path / f"{shape_name(SPEC)}.parquet", synthetic_frame(), {**META, "gpu": "NVIDIA H100 80GB HBM3"})
    return path


def test_auto_picks_the_bundled_llama2_profile_on_the_h100():
    cost = resolve_cost_model(cfg(LLAMA))
    assert isinstance(cost, ProfileCostModel)
    assert cost.label == "profile:llama2-7b.parquet (NVIDIA H100 80GB HBM3)"
    assert resolve_cost_model(cfg(LLAMA, cost_model="profile")).label == cost.label
    # memory sizes the KV cache, not an iteration's time: a smaller H100 keeps the profile
    assert isinstance(resolve_cost_model(cfg(LLAMA, dataclasses.replace(H100, memory_bytes=40e9))), ProfileCostModel)


def test_auto_restricts_the_profile_to_a_subset_of_its_exits():
    """The recorded trace's exits (8/16/24) are a subset of the profiled ones (every 4th layer)."""
    import numpy as np
    from test_profile_cost import decode_work

    narrowed = LLAMA.with_exits((8, 16, 24))
    cost = resolve_cost_model(cfg(narrowed))
    assert isinstance(cost, ProfileCostModel) and cost.label.startswith("profile:llama2-7b.parquet")
    assert list(cost.profile.model.exit_layers) == [8, 16, 24]
    assert "restricted" in cost.profile.meta["derived"]
    # no checks made, full depth: the same price as from the whole profile
    whole = resolve_cost_model(cfg(LLAMA))
    assert np.isclose(cost.iteration_time(decode_work(narrowed, 8, 512)),
                      whole.iteration_time(decode_work(LLAMA, 8, 512)), rtol=1e-9).all()


@pytest.mark.parametrize("model, hardware", [
    (LLAMA.with_exits((8, 16, 26)), H100),  # exits the profile has not measured: no profile
    (LLAMA, H200),  # the profile was measured on an H100
    (LLAMA, dataclasses.replace(H100, bandwidth_fraction=0.7)),  # not the H100 preset as shipped
    (LLAMA, dataclasses.replace(H100, name="my-gpu")),
])
def test_auto_falls_back_to_analytical(model, hardware):
    cost = resolve_cost_model(cfg(model, hardware))
    assert isinstance(cost, AnalyticalCostModel) and cost.label == "analytical"
    assert cost.hardware == hardware


def test_hardware_matching_rule():
    assert hardware_matches("NVIDIA H100 80GB HBM3", H100)
    assert hardware_matches("NVIDIA H100 PCIe", dataclasses.replace(H100, memory_bytes=40e9, memory_utilization=0.8))
    assert not hardware_matches("NVIDIA H100 80GB HBM3", H200)
    assert not hardware_matches("NVIDIA H1000", H100) and not hardware_matches("GH100X", H100)
    assert not hardware_matches(None, H100) and not hardware_matches("", H100)
    assert hardware_matches("NVIDIA H200 141GB", H200)


def test_folder_profile_and_explicit_choices(folder):
    auto = resolve_cost_model(cfg(), folder=folder)
    assert isinstance(auto, ProfileCostModel) and auto.label == f"profile:{shape_name(SPEC)}.parquet (NVIDIA H100 80GB HBM3)"
    assert isinstance(resolve_cost_model(cfg(hardware=H200), folder=folder), AnalyticalCostModel)
    assert isinstance(resolve_cost_model(cfg(cost_model="analytical"), folder=folder), AnalyticalCostModel)
    path = folder / f"{shape_name(SPEC)}.parquet"
    explicit = resolve_cost_model(cfg(hardware=H200, cost_model=str(path)))  # a path: used whatever the GPU
    assert isinstance(explicit, ProfileCostModel) and explicit.label == f"profile:{path} (NVIDIA H100 80GB HBM3)"
    assert resolve_cost_model(cfg(cost_model=path)).label == explicit.label  # a Path works too
    mine = AnalyticalCostModel(SPEC, H200)
    assert resolve_cost_model(cfg(cost_model=mine)) is mine  # a cost model object is used as it is


def test_one_fit_per_profile_copied_per_policy(folder):
    fill = resolve_cost_model(cfg(kv="fill"), folder=folder)
    copy = resolve_cost_model(cfg(kv="copy_hidden"), folder=folder)
    assert fill is not copy and fill.dec_tab is copy.dec_tab  # the tables are shared, not refitted
    assert fill.fill_like and not copy.fill_like and copy.policy.name == "copy_hidden"
    fill.extrapolated = 5
    assert copy.extrapolated == 0 and resolve_cost_model(cfg(), folder=folder).extrapolated == 0


@pytest.mark.parametrize("value, message", [
    ("roofline", "cost model 'roofline': not one of auto, analytical, profile, and no such profile file"),
    ("", "cost model '': expected one of auto, analytical, profile"),
    (42, "cost model 42: expected one of auto, analytical, profile"),
    ("{bad}", "not a readable parquet file"),
    ("{other_shape}", "was measured for shape 'small'"),
    ("{no_meta}", "no 'eesim_profile' metadata"),
])
def test_bad_values_refused_in_one_line(tmp_path, value, message):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    no_meta = tmp_path / "no_meta.parquet"
    synthetic_frame().to_parquet(no_meta)
    if isinstance(value, str):
        value = value.format(bad=bad, no_meta=no_meta, other_shape=REPO / "traces" / "profiles" / "small.parquet")
    with pytest.raises(EesimError, match="cost model") as err:
        resolve_cost_model(cfg(LLAMA, cost_model=value))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_profile_refused_without_a_matching_bundled_profile(folder, tmp_path):
    with pytest.raises(EesimError, match="no bundled profile for the shape of 'llama2-7b'"):
        resolve_cost_model(cfg(LLAMA.with_exits((8, 16, 26)), cost_model="profile"))
    with pytest.raises(EesimError, match="measured on 'NVIDIA H100 80GB HBM3', not on hardware 'h200'"):
        resolve_cost_model(cfg(hardware=H200, cost_model="profile"), folder=folder)
    with pytest.raises(EesimError, match="no bundled profile"):
        resolve_cost_model(cfg(cost_model="profile"), folder=tmp_path)  # an empty folder


def test_results_say_which_model_priced_them(folder):
    trace = synthesize_exit_trace(SPEC.num_layers, SPEC.all_exits, 50, seed=1)
    workload = synthetic_workload(rate=2.0, duration_s=4, seed=2).clip(SPEC.max_context)[0]
    ana = simulate(workload, cfg(cost_model="analytical", trace=trace))
    assert ana.summary["cost_model"] == ana.labels["cost_model"] == "analytical"
    path = folder / f"{shape_name(SPEC)}.parquet"
    prof = simulate(workload, cfg(cost_model=str(path), trace=trace))
    assert prof.summary["cost_model"] == f"profile:{path} (NVIDIA H100 80GB HBM3)"
    assert isinstance(prof.cost_model, ProfileCostModel)
    assert prof.summary["makespan_s"] != ana.summary["makespan_s"]
    # an explicit cost model argument wins over the config's choice, and is named too
    mine = simulate(workload, cfg(cost_model=str(path), trace=trace), AnalyticalCostModel(SPEC, H100))
    assert mine.summary["cost_model"] == "analytical"
    assert mine.summary["makespan_s"] == ana.summary["makespan_s"]


def test_sweep_setting_and_override(tmp_path):
    import eesim.sweep as sw

    base = {"workload": "poisson:rate=2,duration=4", "exit_trace": "synthetic", "policy": "all_confident + fill"}
    frame = sw.sweep({"base": base, "grid": {"cost_model": ["analytical", "auto"]}}, workers=1, progress=False)
    assert list(frame["cost_model"]) == ["analytical", "auto"]
    assert list(frame["cost_model_label"]) == ["analytical", "profile:llama2-7b.parquet (NVIDIA H100 80GB HBM3)"]
    assert frame["cell"].is_unique
    # --cost-model: one model for every cell, in place of the config's
    one = sw.sweep({"base": base, "grid": {"seed": [0]}}, workers=1, progress=False, cost_model="analytical")
    assert list(one["cost_model_label"]) == ["analytical"]
    with pytest.raises(EesimError, match="cost_model is swept in"):
        sw.sweep({"base": base, "grid": {"cost_model": ["analytical"]}}, workers=1, progress=False,
                 cost_model="auto")
    with pytest.raises(EesimError, match="cost model 'nope'"):  # refused before any cell runs
        sw.sweep({"base": base, "grid": {"cost_model": ["analytical", "nope"]}},
                 tmp_path / "s.parquet", workers=1, progress=False)
    assert not (tmp_path / "s.parquet").exists()


def test_cli_sweep_bad_cost_model_is_one_line_exit_2(tmp_path):
    config = tmp_path / "grid.toml"
    config.write_text('[base]\nworkload = "poisson:rate=2,duration=4"\n[grid]\nseed = [0]\n')
    result = subprocess.run([sys.executable, "-m", "eesim.cli", "sweep", str(config), "--cost-model", "fast",
                             "--workers", "1", "--quiet", "--out", str(tmp_path / "o.parquet")],
                            capture_output=True, text=True, cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eesim: error: cost model 'fast'"), result.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_compare_summary_names_the_cost_model():
    from eesim.comparison import compare

    trace = synthesize_exit_trace(SPEC.num_layers, SPEC.all_exits, 50, seed=1)
    workload = synthetic_workload(rate=2.0, duration_s=3, seed=2).clip(SPEC.max_context)[0]
    summary, _ = compare(workload, cfg(cost_model="analytical", trace=trace), [("full", "fill"), ("all_confident", "fill")],
                         progress=False)
    assert list(summary["cost_model"]) == ["analytical", "analytical"]
