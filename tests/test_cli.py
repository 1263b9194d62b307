"""The command line: the main job's outputs, bad input (one line, exit 2, nothing half-written), and
the README's own-policy example, run as a user would."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from eesim.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--workload", "poisson:rate=4,duration=10", "--exit-trace", "synthetic", "--quiet"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eesim.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})


def test_compare_writes_table_plot_and_timeline(tmp_path):
    out = tmp_path / "out"
    assert main(["compare", *SMALL, "--out", str(out), "--rules", "full,all_confident,quorum:q=0.5",
                 "--kv-policies", "fill,copy_hidden"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["policy"]) == ["full", "all_confident + fill", "all_confident + copy_hidden",
                                       "quorum:q=0.5 + fill", "quorum:q=0.5 + copy_hidden"]
    assert summary.loc[0, "speedup"] == 1.0
    # the preset's own exits on its profiled GPU: the bundled profile prices every run (--cost-model auto)
    assert summary["cost_model"].str.startswith("profile:llama2-7b.parquet (NVIDIA H100").all()
    assert (out / "comparison.png").stat().st_size > 10_000
    requests = pd.read_parquet(out / "requests.parquet")
    assert set(requests["policy"]) == set(summary["policy"])
    events = json.loads((out / "timeline.json").read_text())["traceEvents"]
    slices = [e for e in events if e.get("cat") == "iteration"]
    assert slices and all({"ts", "dur", "pid", "tid", "args"} <= set(e) for e in slices)
    assert {e["pid"] for e in slices} == set(range(5))
    components = [e for e in events if e.get("cat") == "component"]
    assert {"decode", "prefill"} <= {e["name"] for e in components}  # the profile model's components
    assert not list(out.glob(".*tmp")), "temporary files left behind"


def test_simulate_one_policy(tmp_path):
    assert main(["simulate", *SMALL, "--out", str(tmp_path), "--rule", "per_sequence", "--kv-policy",
                 "recompute", "--measure", "entropy", "--threshold", "decay:1.5,tau=4"]) == 0
    iterations = pd.read_parquet(tmp_path / "iterations.parquet")
    assert iterations["recompute_rows"].sum() > 0


@pytest.mark.parametrize("args, message", [
    (["--workload", "{csv_missing}"], "no such file"),
    (["--workload", "{csv_bad}"], ":3: column num_decode_tokens"),
    (["--workload", "{csv_empty}"], "no requests"),
    (["--workload", "poisson:rate=-1,duration=5"], "rate"),
    (["--rules", "fastest"], "unknown exit rule 'fastest'"),
    (["--kv-policies", "lazy"], "unknown KV policy 'lazy'"),
    (["--threshold", "1.5"], "outside the domain"),
    (["--measure", "vibes"], "unknown confidence measure"),
    (["--memory-gb", "12"], "does not fit"),
    (["--model", "gpt5"], "unknown model preset"),
    (["--exit-trace", "{trace_bad}"], "exit trace"),
    (["--replicas", "0"], "replicas must be at least 1"),
    (["--cost-model", "roofline"], "cost model 'roofline': not one of auto, analytical, profile"),
    (["--cost-model", "{trace_bad}"], "not a readable parquet file"),
    (["--exit-trace", "synthetic", "--cost-model", "traces/profiles/small.parquet"], "measured for shape 'small'"),
    (["--hardware", "h200", "--exit-trace", "synthetic", "--cost-model", "profile"], "measured on 'nvidia h100"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    files = {"csv_missing": tmp_path / "nope.csv", "csv_bad": tmp_path / "bad.csv",
             "csv_empty": tmp_path / "empty.csv", "trace_bad": tmp_path / "trace.parquet"}
    files["csv_bad"].write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.5,12,abc\n")
    files["csv_empty"].write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n")
    files["trace_bad"].write_text("not parquet")
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    out = tmp_path / "out"
    result = run_cli("compare", "--quiet", "--out", str(out), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eesim: error:"), result.stderr
    assert message.lower() in lines[0].lower(), lines[0]
    assert not out.exists(), "bad input left output behind"


def test_profile_bad_rounds_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "p.parquet"
    result = run_cli("profile", "--model", "llama2-7b", "--device", "cpu", "--rounds", "-2", "--out", str(out))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rounds must not be negative" in lines[0], result.stderr
    assert not out.exists()


def test_graphed_owing_is_the_default_and_can_be_turned_off():
    """``execute`` serves owing steps graphed up to where their K/V rides unless ``--no-graphed-owing``."""
    from eesim.cli import _executor_run, build_parser

    common = ["execute", "--model", "small", "--device", "cpu", "--backend", "torch", "--kv-policy", "copy_hidden",
              "--workload", "poisson:rate=3,duration=2", "--quiet"]
    parser = build_parser()
    assert _executor_run(parser.parse_args(common))[3].graphed_owing
    assert not _executor_run(parser.parse_args(common + ["--no-graphed-owing"]))[3].graphed_owing


def test_unknown_option_exits_2():
    result = run_cli("compare", "--no-such-option")
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def _readme_policy_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own policy", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_policy_example_runs_unchanged(tmp_path, monkeypatch, llama7b):
    import numpy as np

    from eesim.policies import exit_rule

    (tmp_path / "my_rules.py").write_text(_readme_policy_example())
    # as the README runs it: the user's module on PYTHONPATH, named by its dotted path
    result = subprocess.run([sys.executable, "-m", "eesim.cli", "simulate", *SMALL, "--out", str(tmp_path / "o"),
                             "--rule", "my_rules.NotBefore:min_exit=3"], capture_output=True, text=True,
                            cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    requests = pd.read_parquet(tmp_path / "o" / "requests.parquet")
    assert len(requests) > 0
    monkeypatch.syspath_prepend(str(tmp_path))
    rule = exit_rule("my_rules.NotBefore:min_exit=3")
    exit_index, _ = rule.decide_all(np.ones((1, 4, len(llama7b.exit_layers)), bool), np.ones(4, bool))
    assert (exit_index == 3).all()  # confident everywhere, yet nobody leaves before exit 3


@pytest.mark.parametrize("mode", ["replay", "model"])
def test_execute_serves_on_the_cpu_executor(tmp_path, mode):
    args = ["execute", "--model", "small", "--mode", mode, "--device", "cpu", "--backend", "torch",
            "--workload", "poisson:rate=3,duration=3", "--max-requests", "4", "--rule", "per_sequence",
            "--kv-policy", "copy_hidden",
            "--threshold", "0.5", "--max-batched-tokens", "256", "--out", str(tmp_path), "--quiet"]
    if mode == "model":
        args += ["--checkpoint", str(REPO / "traces" / "small")]
    else:
        # owing steps graphed until their K/V rides (the default), after an untimed pass (graphs captured and
        # kernels compiled before the measured one on a GPU): same exits as the simulation
        args += ["--with-simulation", "--warmup", "1"]
    assert main(args) == 0
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    iterations = pd.read_parquet(tmp_path / "iterations.parquet")
    assert len(requests) > 0 and (requests["output_len"] > 0).all()
    assert (iterations["end"] > iterations["start"]).all()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == (2 if mode == "replay" else 1)
    assert summary["graph_captures"].iloc[0] == 0  # (no CUDA here: nothing is captured)
    if mode == "replay":  # exits come from the trace, as in the simulator: same exit layers per token
        assert summary["mean_layers"].iloc[0] == pytest.approx(summary["mean_layers"].iloc[1])


def test_execute_model_mode_needs_a_matching_checkpoint(tmp_path):
    result = run_cli("execute", "--model", "llama2-7b", "--mode", "model", "--checkpoint", "traces/small",
                     "--device", "cpu", "--workload", "poisson:rate=3,duration=3", "--out", str(tmp_path))
    assert result.returncode == 2 and "run with --model small" in result.stderr


def test_validate_compares_real_time_serving_with_the_simulator(tmp_path):
    args = ["validate", "--model", "small", "--mode", "replay", "--device", "cpu", "--backend", "torch",
            "--workload", "poisson:rate=3,duration=3", "--max-requests", "3", "--rule", "per_sequence",
            "--kv-policy", "fill", "--threshold", "0.5", "--max-batched-tokens", "256", "--out", str(tmp_path)]
    assert main(args) == 0
    errors = pd.read_csv(tmp_path / "errors.csv").set_index("metric")
    assert {"throughput (tok/s)", "TTFT p50", "inter-token latency p99"} <= set(errors.index)
    # replay mode: the executor makes the simulator's exit decisions, so the depth per token agrees exactly
    assert errors.loc["layers per token", "error"] == pytest.approx(0.0, abs=1e-12)
    # request-level metrics carry the error's band over the requests, around the error itself
    ttft = errors.loc["TTFT p50"]
    assert ttft.error_lo <= ttft.error_hi and errors["error_lo"].isna().loc["throughput (tok/s)"]
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    # the small preset's exits on the H100: its bundled profile prices the simulation
    assert set(requests["run"]) == {"executor (measured, real time)",
                                    "simulator (profile:small.parquet (NVIDIA H100 80GB HBM3))"}
    events = json.loads((tmp_path / "timeline.json").read_text())["traceEvents"]
    assert {e["pid"] for e in events if e.get("cat") == "iteration"} == {0, 1}
