"""Which cost model prices a simulation: ``SimConfig.cost_model`` (``--cost-model``), resolved here only.

Values:

- ``auto`` (the default): the bundled profile of the model's shape (``traces/profiles/<shape>.parquet``,
  measured by ``eesim profile``) when there is one and it was measured on the configured hardware;
  otherwise the analytical roofline (``AnalyticalCostModel``). The hardware matches when it is a preset
  as shipped, memory aside (memory sizes the KV cache, not an iteration's time), and the GPU the profile
  recorded is that preset's: its name holds the preset's name as a word (``NVIDIA H100 80GB HBM3`` is
  ``h100``). A model whose exits are a subset of a preset's (the recorded trace maps exits 2/4/6 of 8
  layers to 8/16/24 of 32; llama2-7b is profiled at every 4th layer) is priced from that preset's profile
  restricted to its exits (``profile_restrict.restrict_exits``).
- ``analytical``: the analytical model.
- ``profile``: the bundled profile; refused when there is none for the shape or it was measured on other
  hardware.
- a path to a profile parquet: that profile, whatever GPU it was measured on (its label says which);
  refused when the file is missing, malformed or of another shape.
- a cost model object (``iteration_time`` and ``breakdown``): used as it is.

Bad values raise ``EesimError`` with one line. ``resolve_cost_model(config)`` returns the model; its
``label`` (``analytical``, ``profile:llama2-7b.parquet (NVIDIA H100 80GB HBM3)``) is the ``cost_model`` of
the run's summary. A profile is read and fitted once per file and model in a process (well under a
second for the 7B shapes) and shared, copied per KV policy, by every run after.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from eesim.errors import EesimError

CHOICES = ("auto", "analytical", "profile")
_CACHE_SIZE = 4
_read: dict[tuple, object] = {}  # (file, its mtime and size) -> Profile, least recently used first
_fitted: dict[tuple, object] = {}  # (file, its mtime and size, ModelSpec) -> ProfileCostModel, the same


def hardware_matches(gpu: str | None, hardware) -> bool:
    """Whether a profile measured on ``gpu`` (as its metadata names it) prices ``hardware``: a preset as shipped
    (memory, its usable share and the activation reserve aside) whose name is a word of the GPU's name."""
    from eesim.hardware import HARDWARE_PRESETS

    preset = HARDWARE_PRESETS.get(hardware.name)
    if preset is None or not gpu:
        return False
    as_shipped = replace(hardware, memory_bytes=preset.memory_bytes, memory_utilization=preset.memory_utilization,
                         activation_reserve_bytes=preset.activation_reserve_bytes)
    return as_shipped == preset and re.search(rf"(?<![a-z0-9]){re.escape(preset.name.lower())}(?![a-z0-9])",
                                              gpu.lower()) is not None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _remember(cache: dict, key, value) -> None:
    while len(cache) >= _CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value  # (most recently used last)


def _profile(path: Path, where: str):
    """The profile in ``path``, read and checked once per file version."""
    from eesim.profile_data import read_profile

    key = _file_key(path)
    profile = _read.pop(key, None)
    if profile is None:
        try:
            profile = read_profile(path)
        except EesimError as err:
            raise EesimError(f"{where}: {_one_line(err)}") from None
    _remember(_read, key, profile)
    return profile


def _profile_model(path: Path, model, kv_policy, shown: str, where: str):
    """The ProfileCostModel of ``path`` for ``model`` (fitted once per file version and model), for ``kv_policy``,
    labelled with ``shown`` and the GPU the profile was measured on."""
    from eesim.profile_cost import ProfileCostModel

    profile = _profile(path, where)
    key = (*_file_key(path), model)
    fitted = _fitted.pop(key, None)
    if fitted is None:
        try:
            fitted = ProfileCostModel(profile, model)
        except EesimError as err:
            raise EesimError(f"{where}: {_one_line(err)}") from None
    _remember(_fitted, key, fitted)
    cost = fitted.with_policy(kv_policy)
    cost.label = f"profile:{shown} ({profile.meta.get('gpu') or 'unknown GPU'})"
    return cost


def resolve_cost_model(config, folder: str | os.PathLike | None = None):
    """The cost model ``config.cost_model`` names for ``config``'s model, hardware and KV policy (see the module
    docstring). ``folder``: where the bundled profiles are (default ``traces/profiles``)."""
    from eesim.cost_model import AnalyticalCostModel
    from eesim.policies import kv_policy

    choice = config.cost_model
    model, hardware = config.model, config.hardware
    if not isinstance(choice, (str, os.PathLike)):
        if hasattr(choice, "iteration_time") and hasattr(choice, "breakdown"):
            return choice
        raise EesimError(f"cost model {choice!r}: expected one of {', '.join(CHOICES)} or a path to a profile parquet")
    text = os.fspath(choice).strip()
    where = f"cost model {text!r}"
    if text == "analytical":
        return AnalyticalCostModel(model, hardware)
    policy = kv_policy(config.kv_policy)
    if text in ("auto", "profile"):
        from eesim.profile_cost import PROFILE_DIR, profile_for

        folder = Path(PROFILE_DIR if folder is None else folder)
        path = profile_for(model, folder)
        if path is None:
            if text == "auto":
                return AnalyticalCostModel(model, hardware)
            raise EesimError(
                f"{where}: no bundled profile for the shape of {model.name!r} ({model.num_layers} layers, exits "
                f"{list(model.exit_layers)}) in {folder}; use auto or analytical, or measure one with eesim profile "
                f"and give its path")
        gpu = _profile(path, where).meta.get("gpu")
        if not hardware_matches(gpu, hardware):
            if text == "auto":
                return AnalyticalCostModel(model, hardware)
            raise EesimError(
                f"{where}: the bundled profile {path.name} was measured on {gpu or 'an unnamed GPU'!r}, not on "
                f"hardware {hardware.name!r} as shipped; use auto or analytical, or give the file's path to price "
                f"with it anyway")
        return _profile_model(path, model, policy, path.name, where)
    if not text:
        raise EesimError(f"cost model '': expected one of {', '.join(CHOICES)} or a path to a profile parquet")
    path = Path(text).expanduser()
    if not path.is_file():
        raise EesimError(f"{where}: not one of {', '.join(CHOICES)}, and no such profile file")
    return _profile_model(path, model, policy, text, where)


def cost_label(cost) -> str:
    """How a run's summary names the cost model that priced it."""
    return getattr(cost, "label", None) or type(cost).__name__


def describe_cost_model(config) -> str:
    """The label of the cost model ``config`` resolves to (resolving it: bad values raise EesimError)."""
    return cost_label(resolve_cost_model(config))


__all__ = ["CHOICES", "resolve_cost_model", "hardware_matches", "cost_label", "describe_cost_model"]
