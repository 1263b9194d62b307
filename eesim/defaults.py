"""Where the bundled defaults come from: the exit trace the simulator replays when none is named."""

from __future__ import annotations

from pathlib import Path

from eesim.exit_trace import ExitTrace, default_synthetic_trace, read_exit_trace
from eesim.model_spec import ModelSpec

# The project's own recorded traces (issue 3), present in a source checkout or an editable install.
RECORDED_TRACE = Path(__file__).resolve().parent.parent / "traces" / "exit_trace.parquet"


def load_exit_trace(spec: str, model: ModelSpec) -> tuple[ExitTrace, ModelSpec, str]:
    """The exit trace named by ``spec`` and the model with its exits placed where the trace's are.

    ``spec``: ``default`` (the recorded trace when present, else synthetic), ``synthetic``, or a path.
    A trace recorded on a shallower model drives a deeper shape by depth fraction: exits at 2, 4, 6 of
    8 layers become 8, 16, 24 of 32.
    """
    if spec == "default":
        spec = str(RECORDED_TRACE) if RECORDED_TRACE.exists() else "synthetic"
    if spec == "synthetic":
        trace = default_synthetic_trace(model.num_layers, model.all_exits)
        source = "synthetic (eesim.exit_trace.SyntheticExitParams defaults, 2,000 sequences, seed 0)"
    else:
        trace = read_exit_trace(spec)
        source = f"recorded {spec}"
    exits = trace.remap_to(model.num_layers)
    return trace, model.with_exits(exits[:-1]), source
