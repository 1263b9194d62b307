"""The hardware profile file: measured component times of the GPU executor for one model shape.

A profile is one parquet file, one row per measurement::

    component  str    decode | check | check_eager | check_eager_one | fill | prefill | mixed | proj | recompute |
                      schedule | fixed |
                      bookkeeping | leave | leave_owing_proj | leave_owing_recompute
    layers     int64  layers run (decode), layers skipped (fill), layers projected / re-run (proj, recompute), the
                      exit layer where every row leaves (leave*)
    batch      int64  decode rows (decode, check, mixed, proj, recompute, leave*), exited rows (fill), running seqs
                      (schedule, bookkeeping)
    context    int64  positions per decode row (decode, check, mixed, leave*), cached positions before a chunk (prefill)
    tokens     int64  prefill chunk tokens (prefill, mixed), owed rows (proj, recompute)
    checks     int64  exits checked (check, check_eager, check_eager_one, mixed, leave*)
    median_s   float64  median seconds over the repeats
    p25_s, p75_s float64  quartiles (their difference is the IQR)
    repeats    int64  timed repeats after warm-up

Coordinates that do not apply to a component are 0. The file's schema metadata key ``eesim_profile``
holds JSON: ``format`` (1), ``model`` (the ModelSpec fields, exits included), ``gpu``, ``driver``,
``torch``, ``triton``, ``device``, ``dtype``, ``date``, ``grid``, ``command``, and the fixed settings of
the measurements (``check_context``, ``mixed_context``, ``owed_batch``, ``owed_context``).
``read_profile`` refuses a file that breaks any of this with an ``EesimError`` naming what is wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from eesim.errors import EesimError
from eesim.model_spec import ModelSpec

FORMAT = 1
META_KEY = b"eesim_profile"
COMPONENTS = ("decode", "check", "check_eager", "check_eager_one", "fill", "prefill", "mixed", "proj", "recompute",
              "schedule", "fixed", "bookkeeping", "leave", "leave_owing_proj", "leave_owing_recompute")
COORDS = ("layers", "batch", "context", "tokens", "checks")
COLUMNS = ("component", *COORDS, "median_s", "p25_s", "p75_s", "repeats")
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "mlp_size", "vocab_size",
                "exit_layers", "dtype")
SPEC_FIELDS = ("name", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "mlp_size", "vocab_size",
               "exit_layers", "dtype", "head_dim", "tied_embeddings", "max_context", "rope_theta", "norm_eps")


@dataclass
class Profile:
    frame: pd.DataFrame
    meta: dict = field(default_factory=dict)
    path: str = ""

    @property
    def model(self) -> ModelSpec:
        return spec_from_meta(self.meta["model"])

    def component(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["component"] == name]

    def done(self) -> set[tuple]:
        """Coordinates already measured: (component, layers, batch, context, tokens, checks)."""
        return set(map(tuple, self.frame[["component", *COORDS]].itertuples(index=False, name=None)))


def spec_to_meta(spec: ModelSpec) -> dict:
    out = {k: getattr(spec, k) for k in SPEC_FIELDS}
    out["exit_layers"] = list(spec.exit_layers)
    return out


def spec_from_meta(meta: dict) -> ModelSpec:
    try:
        kw = {k: meta[k] for k in SPEC_FIELDS if k in meta}
        kw["exit_layers"] = tuple(kw["exit_layers"])
        return ModelSpec(**kw)
    except (KeyError, TypeError) as err:
        raise EesimError(f"profile: malformed model record {meta!r}: {err}") from err


def shape_key(spec: ModelSpec) -> tuple:
    return tuple(tuple(getattr(spec, k)) if k == "exit_layers" else getattr(spec, k) for k in SHAPE_FIELDS)


def shape_name(spec: ModelSpec) -> str:
    """File stem of a shape's profile: the preset name when the shape is a preset's, else a digest."""
    from eesim.model_spec import MODEL_PRESETS

    for name, preset in MODEL_PRESETS.items():
        if shape_key(preset) == shape_key(spec):
            return name
    import hashlib

    digest = hashlib.sha1(repr(shape_key(spec)).encode()).hexdigest()[:10]
    return f"{spec.name}-{digest}"


def empty_frame() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="int64") for c in COLUMNS})
    frame["component"] = frame["component"].astype(object)
    for c in ("median_s", "p25_s", "p75_s"):
        frame[c] = frame[c].astype("float64")
    return frame


def write_profile(path: str | Path, frame: pd.DataFrame, meta: dict) -> None:
    """Write atomically (a temporary file in the same folder, then a rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = frame.loc[:, list(COLUMNS)].reset_index(drop=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_profile(path: str | Path) -> Profile:
    """Read and validate a profile file; raises EesimError naming what is wrong."""
    import pyarrow.parquet as pq

    path = Path(path)
    where = f"profile {str(path)!r}"
    if not path.is_file():
        raise EesimError(f"{where}: no such file")
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise EesimError(f"{where}: not a readable parquet file ({err})") from err
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise EesimError(f"{where}: no 'eesim_profile' metadata (not written by eesim profile)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise EesimError(f"{where}: metadata is not JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EesimError(f"{where}: format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT}")
    if "model" not in meta:
        raise EesimError(f"{where}: metadata names no model shape")
    spec_from_meta(meta["model"])
    frame = table.to_pandas()
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise EesimError(f"{where}: missing columns {missing}")
    frame = frame.loc[:, list(COLUMNS)]
    bad = sorted(set(frame["component"]) - set(COMPONENTS))
    if bad:
        raise EesimError(f"{where}: unknown components {bad}")
    for c in (*COORDS, "repeats"):
        if not pd.api.types.is_integer_dtype(frame[c]) or (frame[c] < 0).any():
            raise EesimError(f"{where}: column {c!r} must hold non-negative integers")
    for c in ("median_s", "p25_s", "p75_s"):
        values = frame[c].to_numpy()
        if not pd.api.types.is_float_dtype(frame[c]) or not np.isfinite(values).all() or (values < 0).any():
            raise EesimError(f"{where}: column {c!r} must hold finite non-negative seconds")
    if frame.duplicated(subset=["component", *COORDS]).any():
        raise EesimError(f"{where}: duplicated grid points")
    return Profile(frame.reset_index(drop=True), meta, str(path))


def environment() -> dict:
    """GPU name, driver, torch and triton versions of this machine."""
    import datetime
    import subprocess

    out = {"date": datetime.date.today().isoformat()}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
            out["cuda"] = torch.version.cuda
        else:
            out["gpu"] = "none (CPU)"
    except ImportError:
        out["torch"] = None
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        out["driver"] = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        out["driver"] = None
    return out


__all__ = ["Profile", "read_profile", "write_profile", "spec_to_meta", "spec_from_meta", "shape_key",
           "shape_name", "COMPONENTS", "COORDS", "COLUMNS", "asdict"]
