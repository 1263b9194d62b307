"""eesim: simulate and profile the serving of early-exit language models."""

from pathlib import Path as _Path

# In a source checkout run without installation (PYTHONPATH=<repo>), the top-level policies/ and
# kernels/ folders are found as eesim.policies and eesim.kernels, as the installed package maps them.
_repo_root = _Path(__file__).resolve().parent.parent
if (_repo_root / "policies" / "__init__.py").exists():
    __path__.append(str(_repo_root))  # type: ignore[name-defined]

from eesim.errors import EesimError  # noqa: E402
from eesim.hardware import HARDWARE_PRESETS, HardwareSpec  # noqa: E402
from eesim.model_spec import MODEL_PRESETS, ModelSpec  # noqa: E402

__all__ = ["EesimError", "HardwareSpec", "HARDWARE_PRESETS", "ModelSpec", "MODEL_PRESETS", "SimConfig", "simulate",
           "compare", "read_exit_trace", "read_request_trace", "sweep", "calibrate", "max_goodput"]


def __getattr__(name: str):
    # The simulator and its readers load on first use, so `import eesim` stays light.
    if name in ("SimConfig", "simulate"):
        from eesim import simulator

        return getattr(simulator, name)
    if name == "compare":
        from eesim.comparison import compare

        return compare
    if name == "read_exit_trace":
        from eesim.exit_trace import read_exit_trace

        return read_exit_trace
    if name == "read_request_trace":
        from eesim.workload import read_request_trace

        return read_request_trace
    if name in ("sweep", "calibrate"):
        # the submodule of that name; it is callable: eesim.sweep(...) runs eesim.sweep.sweep(...)
        import importlib

        return importlib.import_module(f"eesim.{name}")
    if name == "max_goodput":
        from eesim.sweep import max_goodput

        return max_goodput
    raise AttributeError(f"module 'eesim' has no attribute {name!r}")
