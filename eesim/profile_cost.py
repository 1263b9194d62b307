"""A cost model backed by a measured hardware profile (``eesim profile``, profiler.py).

``ProfileCostModel(profile, model)`` implements the CostModel protocol (cost_model.py). It splits an
iteration's work into the profiled components and adds them up:

- decode rows, per segment of layers between exits: the marginal time of running D rows at mean
  context c through that segment, read from the profile's decode grid (layers x batch x context) after
  the checks and the fill each measurement included are taken back out; the sum over the segments a
  step ran telescopes to the measured time of a pass to that depth (exact on the grid);
- exit checks that do not end the pass (the one where the last rows leave is inside the decode
  measurement): per checked batch size, from the check grid (graphed path), or the general path's
  (``check_eager``) for KV policies other than fill;
- fill (policy fill): rows that exited x mean layers skipped, from the fill grid;
- prefill: a step whose attention exceeds its KV reads holds a prompt chunk; its token count and the
  positions before it are recovered from the work (the decode rows from the checked rows when the rule
  checks, else assuming the chunk starts a prompt) and priced from the prefill grid (tokens x
  context), plus what its decode rows add (mixed grid, decode rows x chunk tokens) and their checks;
- proj / recompute (copy_hidden, recompute): owed rows x layers, the marginal over the same step owing
  nothing (a full-depth step with the general path's checks where the points ran them, ``checks`` > 0;
  without checks in profiles from before that);
- host time per iteration by batch size (``include_schedule``): ``Scheduler.schedule`` and, when the
  profile measured it, the serving loop's bookkeeping after the GPU (priced as part of ``schedule``).

Interpolation is multilinear in the sizes themselves over each grid (decode time is close to
a + b B + c C + d B C, which bilinear interpolation reproduces; in log(1 + size) it overshot interior points
by up to 15%), after a monotone envelope: the largest function at or below the measurements that is
non-decreasing along every axis (a running minimum from the far end of each axis). So the model is
monotone non-decreasing in each size and exact on grid points whose measurements already were, and one
point measured too slow (the H100 profile's decode at 8 layers, batch 2, context 16: 6.27 ms with an IQR
of 54%, beside 2.7-3.1 ms) is lowered to its larger neighbours instead of raising every larger point to
it, as the cumulative maximum used before did. The decode grid holds each measurement less the checks
and the fill it included (taken out point by point, before the envelope, with the checks priced against
the full-depth measurements alone). Grid points the profiler could not measure (KV cache too small) and
queries outside the grid are priced by the bytes/FLOPs roofline scaled to the nearest measured point;
``extrapolated`` counts such evaluations (``extrapolated_steps`` the steps, ``extrapolated_by``
per component: ``decode`` the steps priced from the decode table that extrapolated there, a step special
only for its owed rows included; prompt chunks and owed rows under their own names), so a simulator can
surface them. Every step of a work record is priced with array
operations over its (T, S) arrays, in a number of numpy calls that does not grow with T: the decode,
check and fill parts from dense lookup tables, the steps with a prompt chunk or owed rows (proj,
recompute) through one batched lookup of the two-axis grids (``_GridSet``: Grid's arithmetic, for many
grids and points at once). A record of one step (most calls: every prompt chunk, every single decode
step) is priced on Python floats instead (``_parts1``): the same operations in the same order on the same
tables, so the same results bit for bit, in a fifth of the time numpy calls on one-row arrays take. The
fit evaluates the dense decode table on its mesh once per axis (``Grid.on_mesh``). ``with_policy`` shares a
fitted model's tables between KV policies (eesim/cost_choice.py fits each profile once per process).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import replace
from pathlib import Path

import numpy as np

from eesim.errors import EesimError, require
from eesim.model_spec import ModelSpec
from eesim.plan import IterationWork
from eesim.profile_data import Profile, read_profile, shape_key, shape_name
from eesim.work import QUERY_TILE

PROFILE_DIR = Path(__file__).resolve().parents[1] / "traces" / "profiles"
BW, FR, SYNC = 2.98e12 * 0.85, 768e12 * 0.65, 15e-6  # roofline constants (only ratios are used)


def load_profile(path: str | Path) -> Profile:
    return read_profile(path)


def profile_for(model: ModelSpec, folder: str | Path = PROFILE_DIR) -> Path | None:
    """The profile of ``model``'s shape in ``folder`` (traces/profiles/<shape>.parquet), if there is one; else
    that of a preset of the same shape with more exits (ProfileCostModel prices through ``restrict_exits``)."""
    path = Path(folder) / f"{shape_name(model)}.parquet"
    if path.is_file():
        return path
    from eesim.model_spec import MODEL_PRESETS

    for name, preset in MODEL_PRESETS.items():
        if set(model.exit_layers) <= set(preset.exit_layers) and \
                shape_key(replace(preset, exit_layers=tuple(model.exit_layers))) == shape_key(model):
            path = Path(folder) / f"{name}.parquet"
            if path.is_file():
                return path
    return None


def restrict_exits(profile: Profile, model: ModelSpec) -> Profile:
    """``profile`` (measured at its model's exits) as if measured at ``model``'s exits, a subset of them.

    ProfileCostModel prices a model with exactly the profile's exits. Measurements that do not depend on
    the exits (full-depth decode, prefill, mixed without checks, fill, proj and recompute without checks,
    schedule, fixed) are kept as they are. Decode passes that stop at a kept exit e ran a check at every profiled exit
    before e; the cost model takes out the checks at the model's exits before e, so the checks at the
    dropped ones are taken out here (priced from the profile's own check grid, as the cost model does).
    Check measurements (``check``, ``check_eager``, ``mixed`` with checks) timed all the profile's
    exits at once; they are rescaled to the model's number of checks, keeping the per-check cost (proj and
    recompute points timed with checks lose the dropped exits' checks, priced from ``check_eager``).
    Decode points at dropped exits are removed.
    """
    from eesim.profile_data import spec_to_meta

    pm = profile.model
    if tuple(pm.exit_layers) == tuple(model.exit_layers):
        return profile
    if not set(model.exit_layers) <= set(pm.exit_layers):
        raise EesimError(f"profile {profile.path or '(in memory)'!r}: its exits {list(pm.exit_layers)} do not include "
                         f"the model's {list(model.exit_layers)}")
    ref = ProfileCostModel(profile, pm, kv_policy="fill", include_schedule=False)
    ratio = (model.num_segments - 1) / (pm.num_segments - 1)
    f = profile.frame.copy()
    comp = f["component"].to_numpy()
    med = f["median_s"].to_numpy(dtype=np.float64).copy()
    for name in ("check", "check_eager"):
        m = comp == name
        if m.any():
            full = ref.g_full(f.loc[m, "batch"].to_numpy(float), f.loc[m, "context"].to_numpy(float))[0]
            med[m] = full + (med[m] - full) * ratio
    # owed points timed with the checks (checks > 0): their checks rescaled as the general path's are
    owed_checked = np.isin(comp, ("proj", "recompute")) & (f["checks"].to_numpy() > 0)
    if owed_checked.any():
        rows_o = np.minimum(f.loc[owed_checked, "batch"].to_numpy().astype(np.int64), ref.max_rows)
        med[owed_checked] -= (pm.num_segments - model.num_segments) * ref.chk_eager_tab[rows_o]
    no_checks = f[(f["component"] == "mixed") & (f["checks"] == 0)].set_index(["batch", "tokens", "context"])["median_s"]
    mixed_checked = (comp == "mixed") & (f["checks"].to_numpy() > 0)
    for i in np.flatnonzero(mixed_checked):
        base = no_checks.get((f["batch"].iat[i], f["tokens"].iat[i], f["context"].iat[i]), np.nan)
        if np.isfinite(base):
            med[i] = base + (med[i] - base) * ratio
    L = model.num_layers
    layers = f["layers"].to_numpy()
    decode = comp == "decode"
    keep = ~decode | np.isin(layers, [*model.exit_layers, L])
    inner = decode & keep & (layers < L)
    k_prof = {e: i for i, e in enumerate(pm.all_exits)}
    k_model = {e: i for i, e in enumerate(model.all_exits)}
    dropped = np.array([k_prof[int(e)] - k_model[int(e)] for e in layers[inner]], dtype=np.float64)
    rows = np.minimum(f["batch"].to_numpy().astype(np.int64), ref.max_rows)
    med[inner] -= dropped * ref.chk_tab[rows[inner]]
    f["median_s"] = med
    checks = np.isin(comp, ("check", "check_eager")) | mixed_checked | owed_checked
    f.loc[checks, "checks"] = model.num_segments - 1
    meta = dict(profile.meta)
    meta["model"] = spec_to_meta(model)
    meta["derived"] = f"exits {list(pm.exit_layers)} restricted to {list(model.exit_layers)} (restrict_exits)"
    return Profile(f[keep].reset_index(drop=True), meta, profile.path)


def _bracket(x: np.ndarray, ax: np.ndarray, lg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points ``x`` on one grid axis (nodes ``ax``, their coordinates ``lg``): clipped to the axis, the index
    of the node below each and the weight of the node above (an axis of one node: index 0, weight 0)."""
    xc = np.clip(x, ax[0], ax[-1])
    if len(ax) == 1:
        return xc, np.zeros(x.shape, dtype=np.int64), np.zeros(x.shape)
    lx = _coord(xc)
    i = np.clip(np.searchsorted(lg, lx, side="right") - 1, 0, len(ax) - 2)
    return xc, i, np.clip((lx - lg[i]) / (lg[i + 1] - lg[i]), 0.0, 1.0)


class Grid:
    """Multilinear interpolation in log(1 + x) over a regular grid, monotone by a cumulative max, with
    roofline-scaled extrapolation from the nearest measured point."""

    def __init__(self, axes: list[np.ndarray], values: np.ndarray, measured: np.ndarray, roof,
                 monotone: bool = True) -> None:
        self.axes = [np.asarray(a, dtype=np.float64) for a in axes]
        self.logs = [_coord(a) for a in self.axes]
        self.roof = roof
        values = np.array(values, dtype=np.float64)
        measured = np.asarray(measured, dtype=bool)
        values = _fill_missing(self.axes, values, measured, roof)
        self.raw = values.copy()
        if monotone:
            values = monotone_envelope(values)
        self.values = values
        self.measured = measured

    def __call__(self, *coords) -> tuple[np.ndarray, np.ndarray]:
        """Values at the points (one array per axis, broadcast together) and whether each was extrapolated."""
        coords = np.broadcast_arrays(*[np.asarray(c, dtype=np.float64) for c in coords])
        shape = coords[0].shape
        pts = [c.ravel() for c in coords]
        idx, wts, clipped = [], [], []
        outside = np.zeros(pts[0].shape, dtype=bool)
        for x, ax, lg in zip(pts, self.axes, self.logs):
            xc, i, w = _bracket(x, ax, lg)
            outside |= xc != x
            clipped.append(xc)
            idx.append(i)
            wts.append(w)
        out = np.zeros(pts[0].shape)
        unmeasured = np.zeros(pts[0].shape, dtype=bool)
        for corner in range(1 << len(pts)):
            w = np.ones(pts[0].shape)
            ii = []
            for a, (i, f) in enumerate(zip(idx, wts)):
                up = (corner >> a) & 1
                if up and len(self.axes[a]) == 1:
                    w = w * 0.0
                    ii.append(i)
                    continue
                w = w * (f if up else 1.0 - f)
                ii.append(i + up)
            ii = tuple(ii)
            out += w * self.values[ii]
            unmeasured |= (w > 0) & ~self.measured[ii]
        if outside.any() and self.roof is not None:
            o = outside
            out[o] *= self.roof(*[p[o] for p in pts]) / self.roof(*[c[o] for c in clipped])
        return out.reshape(shape), (outside | unmeasured).reshape(shape)

    def on_mesh(self, *points) -> tuple[np.ndarray, np.ndarray]:
        """``self(*np.meshgrid(*points, indexing="ij"))``, bit for bit: the same operations on each axis's points
        once, then broadcast (the fit's dense tables: about a million points for a 7B shape)."""
        n = len(points)
        shape = tuple(len(p) for p in points)

        def along(v, a):  # v as axis a of the mesh
            return v.reshape([-1 if b == a else 1 for b in range(n)])

        pts = [np.asarray(p, dtype=np.float64) for p in points]
        idx, wts, clipped = [], [], []
        outside = np.zeros(shape, dtype=bool)
        for a, (x, ax, lg) in enumerate(zip(pts, self.axes, self.logs)):
            xc, i, w = _bracket(x, ax, lg)
            outside |= along(xc != x, a)
            clipped.append(xc)
            idx.append(i)
            wts.append(w)
        out = np.zeros(shape)
        unmeasured = np.zeros(shape, dtype=bool)
        holes = not self.measured.all()
        for corner in range(1 << n):
            w = None  # (1.0 times the first factor is that factor: __call__'s product from ones, exactly)
            ii = []
            for a, (i, f) in enumerate(zip(idx, wts)):
                up = (corner >> a) & 1
                if up and len(self.axes[a]) == 1:
                    factor = np.zeros(len(i))
                    ii.append(along(i, a))
                else:
                    factor = f if up else 1.0 - f
                    ii.append(along(i + up, a))
                factor = along(factor, a)
                w = factor if w is None else w * factor
            ii = tuple(ii)
            out += w * self.values[ii]
            if holes:
                unmeasured |= (w > 0) & ~self.measured[ii]
        if outside.any() and self.roof is not None:
            o = outside
            out[o] *= (self.roof(*[np.broadcast_to(along(p, a), shape)[o] for a, p in enumerate(pts)])
                       / self.roof(*[np.broadcast_to(along(c, a), shape)[o] for a, c in enumerate(clipped)]))
        return out, outside | unmeasured


LINEAR = True


def _coord(x):
    """The coordinate the grids interpolate in: the size itself (see the module docstring)."""
    return np.asarray(x, dtype=np.float64) if LINEAR else np.log1p(x)


def monotone_envelope(values: np.ndarray) -> np.ndarray:
    """The largest function at or below ``values`` that is non-decreasing along every axis: a running minimum
    from the far end of each axis. It leaves values that already were monotone as they are, and it is robust to
    the error timings mostly have, a point measured too slow (a stall, a clock dip, host jitter during the
    repeats): such a point is lowered to what the larger configurations beyond it measured, instead of (a
    running maximum's way) raising every larger configuration to it."""
    for axis in range(values.ndim):
        values = np.flip(np.minimum.accumulate(np.flip(values, axis=axis), axis=axis), axis=axis)
    return values


def _fill_missing(axes, values, measured, roof):
    """Unmeasured points: the roofline scaled from the nearest measured point (in index distance)."""
    if measured.all():
        return values
    require(measured.any(), "profile: a component grid has no measured point")
    have = np.argwhere(measured)
    for miss in np.argwhere(~measured):
        near = have[np.argmin(np.abs(have - miss).sum(axis=1))]
        src = [axes[a][near[a]] for a in range(len(axes))]
        dst = [axes[a][miss[a]] for a in range(len(axes))]
        scale = 1.0 if roof is None else float(roof(*[np.array([v]) for v in dst])[0] / roof(*[np.array([v]) for v in src])[0])
        values[tuple(miss)] = values[tuple(near)] * scale
    return values


def _grid(frame, axes_cols: list[str], roof) -> Grid:
    axes = [np.unique(frame[c].to_numpy()) for c in axes_cols]
    values = np.zeros([len(a) for a in axes])
    measured = np.zeros(values.shape, dtype=bool)
    index = tuple(np.searchsorted(a, frame[c].to_numpy()) for a, c in zip(axes, axes_cols))
    values[index] = frame["median_s"].to_numpy()
    measured[index] = True
    return Grid(axes, values, measured, roof)


class _GridSet:
    """Two-axis Grids looked up together: one batch of points (Q, 2), each naming its grid (``gid``), priced
    as ``Grid.__call__`` prices them (clip to the grid, multilinear weights in log(1 + x), the roofline
    ratio outside, unmeasured corners flagged) in a fixed number of numpy operations whatever the batch.

    An axis of one point is padded to two (a copy of its values, always weighted 0). The cell of a point
    on an axis is the number of that axis's interior nodes at or below it (Grid's ``searchsorted`` less
    one, clipped), counted against the nodes padded with +inf."""

    def __init__(self, grids: list[Grid]) -> None:
        self.grids = grids
        G = len(grids)
        width = max(1, max(len(a) - 2 for g in grids for a in g.axes))
        self.inner = np.full((G, 2, width), np.inf)
        self.lo = np.zeros((G, 2))
        self.hi = np.zeros((G, 2))
        self.starts = np.zeros((G, 2), dtype=np.int64)  # where each grid's axes begin in logs / steps
        self.offset = np.zeros(G, dtype=np.int64)  # where each grid's cells begin in corners
        self.stride = np.zeros(G, dtype=np.int64)  # cells along axis 1
        logs, steps, corners, unmeasured = [], [], [], []
        pos = flat = 0
        for a in range(2):
            for g, grid in enumerate(grids):
                require(len(grid.axes) == 2, "profile: _GridSet takes two-axis grids")
                lg = grid.logs[a]
                if len(lg) == 1:
                    lg = np.array([lg[0], lg[0] + 1.0])
                self.lo[g, a], self.hi[g, a] = grid.axes[a][0], grid.axes[a][-1]
                self.inner[g, a, :len(lg) - 2] = lg[1:-1]
                self.starts[g, a] = pos
                logs.append(lg[:-1])
                steps.append(lg[1:] - lg[:-1])
                pos += len(lg) - 1
        for g, grid in enumerate(grids):
            values, measured = grid.values, grid.measured
            for a in range(2):
                if values.shape[a] == 1:
                    values = np.concatenate([values, values], axis=a)
                    measured = np.concatenate([measured, measured], axis=a)
            n0, n1 = values.shape[0] - 1, values.shape[1] - 1
            self.offset[g], self.stride[g] = flat, n1
            # the corners of cell (i, j): [[v(i, j), v(i, j+1)], [v(i+1, j), v(i+1, j+1)]]
            corners.append(np.stack([np.stack([values[:-1, :-1], values[:-1, 1:]], -1),
                                     np.stack([values[1:, :-1], values[1:, 1:]], -1)], -2).reshape(-1, 2, 2))
            u = ~measured
            unmeasured.append(np.stack([np.stack([u[:-1, :-1], u[:-1, 1:]], -1),
                                        np.stack([u[1:, :-1], u[1:, 1:]], -1)], -2).reshape(-1, 2, 2))
            flat += n0 * n1
        self.logs = np.concatenate(logs)
        self.steps = np.concatenate(steps)
        self.corners = np.concatenate(corners)
        self.unmeasured = np.concatenate(unmeasured)
        self.any_unmeasured = bool(self.unmeasured.any())

    def __call__(self, gid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values at the points ``x`` (Q, 2) of grids ``gid`` (Q,), and whether each was extrapolated."""
        c = np.minimum(np.maximum(x, self.lo[gid]), self.hi[gid])
        lx = _coord(c)
        i = (self.inner[gid] <= lx[:, :, None]).sum(axis=2)
        b = i + self.starts[gid]
        f = (lx - self.logs[b]) / self.steps[b]  # in [0, 1]: lx lies in its cell
        g = 1.0 - f
        v = self.corners[i[:, 0] * self.stride[gid] + i[:, 1] + self.offset[gid]]  # (Q, 2, 2)
        f1, g1 = f[:, 1:], g[:, 1:]
        along = v[:, :, 0] * g1 + v[:, :, 1] * f1  # along axis 1, at both nodes of axis 0
        out = along[:, 0] * g[:, 0] + along[:, 1] * f[:, 0]
        clipped = c != x
        if self.any_unmeasured:
            u = self.unmeasured[i[:, 0] * self.stride[gid] + i[:, 1] + self.offset[gid]]
            w = np.stack([g > 0, f > 0], axis=1)  # (Q, lower/upper node, axis): weight > 0
            flag = clipped.any(axis=1) | (u & w[:, :, None, 0] & w[:, None, :, 1]).any(axis=(1, 2))
        elif clipped.any():
            flag = clipped.any(axis=1)
        else:
            return out, clipped[:, 0]
        outside = clipped.any(axis=1)
        if outside.any():
            for k in np.unique(gid[outside]).tolist():
                o = outside & (gid == k)
                roof = self.grids[k].roof
                if roof is not None:
                    out[o] *= roof(x[o, 0], x[o, 1]) / roof(c[o, 0], c[o, 1])
        return out, flag


class ProfileCostModel:
    """CostModel from a profile: see the module docstring."""

    def __init__(self, profile: Profile | str | Path, model: ModelSpec, kv_policy=None,
                 include_schedule: bool = True, max_rows: int = 512) -> None:
        if not isinstance(profile, Profile):
            profile = read_profile(profile)
        self.profile = profile
        pm = profile.model
        if shape_key(pm) != shape_key(model) and set(model.exit_layers) < set(pm.exit_layers):
            if shape_key(replace(pm, exit_layers=tuple(model.exit_layers))) == shape_key(model):
                profile = restrict_exits(profile, model)  # a subset of the profiled exits
                self.profile, pm = profile, profile.model
        if shape_key(pm) != shape_key(model):
            raise EesimError(
                f"profile {profile.path or '(in memory)'!r} was measured for shape {pm.name!r} ({pm.num_layers} "
                f"layers, d={pm.hidden_size}, {pm.num_kv_heads} KV heads, exits {list(pm.exit_layers)}, {pm.dtype}), "
                f"not for model {model.name!r} ({model.num_layers} layers, d={model.hidden_size}, "
                f"{model.num_kv_heads} KV heads, exits {list(model.exit_layers)}, {model.dtype}); profile this shape "
                f"with `eesim profile`")
        self.model = model
        self._set_policy(kv_policy)
        self.label = f"profile:{Path(profile.path).name if profile.path else '(in memory)'} " \
                     f"({profile.meta.get('gpu') or 'unknown GPU'})"
        self.include_schedule = include_schedule
        self.chunk_padding = profile.meta.get("chunk_padding")  # how the profiled executor padded prompt chunks
        decode_padding = profile.meta.get("decode_padding")  # ... and decode batches
        meta = profile.meta
        frame = profile.frame
        L, S = model.num_layers, model.num_segments
        self.L, self.S = L, S
        self.seg_layers = np.asarray(model.segment_layers, dtype=np.float64)
        self.bounds = model.segment_bounds
        self.extrapolated = 0
        self.extrapolated_steps = 0
        self.extrapolated_by: dict[str, int] = {}
        comps = set(frame["component"])
        for need in ("decode",):
            require(need in comps, f"profile {profile.path!r}: no {need!r} measurements")
        m = model
        wl, kvb, hb = m.weight_bytes_per_layer, m.kv_bytes_per_token_per_layer, m.head_weight_bytes
        pl, kvp = 2.0 * m.params_per_layer, 2.0 * m.kv_proj_params_per_layer
        attn = 4.0 * m.q_dim

        def roof_decode(layers, b, c):
            return layers * np.maximum((wl + b * c * kvb) / BW, b * (pl + attn * c) / FR) + hb / BW + 20e-6

        def roof_batch(b, *rest):
            return hb / BW + b * 2.0 * m.head_params / FR + SYNC

        def roof_fill(layers, rows):
            return layers * np.maximum(m.kv_proj_weight_bytes_per_layer / BW, rows * kvp / FR) + 5e-6

        def roof_prefill(p, n):
            return L * np.maximum((wl + (p + n) * kvb) / BW, (n * pl + attn * n * (p + n / 2)) / FR) + hb / BW + 50e-6

        def roof_mixed(d, n):
            return L * np.maximum((wl + d * meta.get("mixed_context", 512) * kvb) / BW, (d + n) * pl / FR) + 50e-6

        def roof_owed(layers, rows):
            return layers * np.maximum(wl / BW, rows * pl / FR) + 10e-6

        self._roof_decode = roof_decode
        dec = frame[frame["component"] == "decode"]
        full = dec[dec["layers"] == L]
        require(len(full) > 0, f"profile {profile.path!r}: no full-depth ({L} layers) decode measurements")
        # full-depth decode alone (batch x context): the reference the checks and the owed rows are priced
        # against. (Not a slice of the layers grid: its envelope would mix in the exit points' checks and fill.)
        self.g_full = _grid(full, ["batch", "context"], lambda b, c: roof_decode(L, b, c))
        self.grid_box = {c: (float(dec[c].min()), float(dec[c].max())) for c in ("batch", "context")}

        def one_d(comp, col="batch"):
            sub = frame[frame["component"] == comp]
            return _grid(sub, [col], roof_batch) if len(sub) else None

        self.g_sched = one_d("schedule")
        g_book = one_d("bookkeeping")  # profiles from before 2026-11-22 evening have none: 0
        chk = frame[frame["component"] == "check"]
        chk_e = frame[frame["component"] == "check_eager"]
        self.g_fill = _grid(frame[frame["component"] == "fill"], ["layers", "batch"], roof_fill) \
            if "fill" in comps else None
        self.max_rows = Dmax = int(max(max_rows, dec["batch"].max()))
        rows = np.arange(Dmax + 1, dtype=np.float64)
        # checks: per check, from the check grid less the full-depth decode at the same batch and context
        self.chk_tab = self._check_table(chk, rows)
        self.chk_eager_tab = self._check_table(chk_e, rows) if len(chk_e) else self.chk_tab
        # the decode grid holds each measurement with the checks and the fill it included taken out (a point
        # at exit e ran the checks at exits 0..k-1 that do not end the pass, and one fill of its rows over the
        # L - e skipped layers), so that its monotone envelope is taken over the quantity the model adds up
        k_of = {e: i for i, e in enumerate(model.all_exits)}
        e_pts = dec["layers"].to_numpy().astype(np.int64)
        b_pts = dec["batch"].to_numpy().astype(np.float64)
        net = dec["median_s"].to_numpy().copy()
        inner = e_pts < L
        if inner.any():
            kk = np.array([k_of.get(int(e), 0) for e in e_pts[inner]], dtype=np.float64)
            net[inner] -= kk * self.chk_tab[np.minimum(b_pts[inner].astype(np.int64), Dmax)]
            if self.g_fill is not None:
                net[inner] -= self.g_fill(L - e_pts[inner], b_pts[inner])[0]
        self.g_decode = _grid(dec.assign(median_s=np.maximum(net, 0.0)), ["layers", "batch", "context"], roof_decode)
        self.g_prefill = _grid(frame[frame["component"] == "prefill"], ["context", "tokens"], roof_prefill) \
            if "prefill" in comps else None
        mixed = frame[frame["component"] == "mixed"]
        self.g_mixed = _grid(mixed[mixed["checks"] == 0], ["batch", "tokens"], roof_mixed) \
            if len(mixed[mixed["checks"] == 0]) else None
        self.g_mixed_chk = _grid(mixed[mixed["checks"] > 0], ["batch", "tokens"], roof_mixed) \
            if len(mixed[mixed["checks"] > 0]) else None
        self.mixed_context = float(meta.get("mixed_context", 512))
        self.g_proj = self._owed_grid(frame, "proj", roof_owed)
        self.g_recompute = self._owed_grid(frame, "recompute", roof_owed)

        # ---- dense tables for the vectorised decode path ----
        step = max(16, model.max_context // 256)
        nodes = np.union1d(np.arange(0, model.max_context + step, step), dec["context"].unique()).astype(np.float64)
        nodes = nodes[nodes >= 1]
        self.nodes = nodes
        self.num_nodes = Cn = len(nodes)
        # dec(layers, B, c), the checks and the fill each decode measurement included already taken out
        lay = np.asarray(self.bounds[1:], dtype=np.float64)
        raw, flag = self.g_decode.on_mesh(lay, rows[1:], nodes)
        if decode_padding:  # a batch ran at its padded size: price that many rows at the same KV bytes (a
            real = rows[1:]  # padding row attends one key), the context clamped to the grid's least
            padded = padded_tokens(real, decode_padding)
            moved = padded != real
            if moved.any():
                r, p = real[moved], padded[moved]
                c = np.maximum(nodes[None, :] * (r / p)[:, None], float(dec["context"].min()))
                v, f = self.g_decode(lay[:, None, None], p[None, :, None], c[None])
                raw[:, moved], flag[:, moved] = v, flag[:, moved] | f
        for axis in range(3):  # deeper, more rows, longer contexts: never cheaper
            raw = np.maximum.accumulate(raw, axis=axis)
        marg = np.diff(np.concatenate([np.zeros((1, Dmax, Cn)), raw]), axis=0)
        table = np.zeros((S, Dmax + 1, Cn))
        table[:, 1:] = marg
        self.dec_tab = table.ravel()
        xf = np.zeros((S, Dmax + 1, Cn), dtype=bool)
        xf[:, 1:] = flag
        self.dec_flag = xf.ravel()
        self.full_tab = table.sum(axis=0)  # (Dmax + 1, Cn): a full-depth pass
        # fill: rows x layers skipped, dense in both
        if self.g_fill is not None:
            ft, _ = self.g_fill.on_mesh(np.maximum(np.arange(L + 1, dtype=np.float64), 1), np.maximum(rows, 1))
            ft[0] = 0.0
            ft[:, 0] = 0.0
            self.fill_tab = ft  # (L + 1, Dmax + 1)
        else:
            self.fill_tab = np.zeros((L + 1, Dmax + 1))
        if self.g_sched is not None:
            self.sched_tab = self.g_sched(np.maximum(rows, 1))[0]
        else:
            self.sched_tab = np.zeros(Dmax + 1)
        if g_book is not None:  # the serving loop's host work after the GPU rides with the schedule's
            self.sched_tab = self.sched_tab + g_book(np.maximum(rows, 1))[0]
        self._segs = np.arange(S)
        # ---- for the vectorised evaluation ----
        # decode: the table with a node at 0 and one far beyond the last (copies of the end nodes: linear
        # interpolation clamps without a clip) and a row past max_rows (a copy of its last row: the rows
        # beyond it, priced from there by the roofline); per cell the values at both nodes, and a code
        # 2 * (lower node extrapolated) + (upper node extrapolated), the far node and the extra row flagged
        lo_node = [0.0] if nodes[0] > 0 else []
        self._nodes_ext = np.concatenate([lo_node, nodes, [max(1e18, nodes[-1] * 1e6)]])
        self._inner_ext = self._nodes_ext[1:-1]
        self._steps_ext = np.diff(self._nodes_ext)
        self._cn_ext = Ce = len(self._nodes_ext)
        pad = (len(lo_node), 1)
        tab = np.pad(table, ((0, 0), (0, 1), pad), mode="edge")
        flg = np.pad(xf, ((0, 0), (0, 1), pad), mode="edge")
        flg[:, :, -1] = True
        flg[:, -1, :] = True
        flg[:, 0, :] = False  # no rows, nothing extrapolated
        pairs = np.zeros((S, Dmax + 2, Ce, 2))
        pairs[..., :-1, 0], pairs[..., :-1, 1] = tab[..., :-1], tab[..., 1:]
        pairs[..., -1, :] = tab[..., -1:]
        self._dec_pairs = pairs.reshape(-1, 2)
        code = np.zeros((S, Dmax + 2, Ce), dtype=np.int8)
        code[..., :-1] = 2 * flg[..., :-1] + flg[..., 1:]
        code[..., -1] = 3
        self._dec_code = code.ravel()
        self._seg_base = self._segs * ((Dmax + 2) * Ce)
        self._nonterminal = (self._segs[None, :] < self._segs[:, None]).astype(np.float64)  # [reach, s]
        fp = np.zeros((L, Dmax + 1, 2))
        fp[..., 0], fp[..., 1] = self.fill_tab[:-1], self.fill_tab[1:]
        self._fill_pairs = fp.reshape(-1, 2)  # [layers * (Dmax + 1) + rows]: at layers and layers + 1
        mc = self.mixed_context  # _full(d, mixed_context) for every d, as a table
        jm = int(np.clip(np.searchsorted(nodes, mc, side="right") - 1, 0, Cn - 2))
        fm = min(max((mc - nodes[jm]) / (nodes[jm + 1] - nodes[jm]), 0.0), 1.0)
        self._full_mc = self.full_tab[:, jm] * (1 - fm) + self.full_tab[:, jm + 1] * fm
        # the two-axis grids of prompt chunks and owed rows, looked up together
        named = [(k, g) for k, g in (("prefill", self.g_prefill), ("mixed", self.g_mixed),
                                     ("mixed_chk", self.g_mixed_chk), ("proj", self.g_proj),
                                     ("recompute", self.g_recompute)) if g is not None]
        self._gid = {k: i for i, (k, _) in enumerate(named)}
        self._gset = _GridSet([g for _, g in named]) if named else None
        self._gid_cache: dict = {}
        self._mixed_checks = self.g_mixed is not None and self.g_mixed_chk is not None
        # a full-depth pass less the same at the mixed measurements' context, per (rows, context cell) the
        # values at both ends of the cell, on the decode table's extended nodes (clamped)
        ft = np.pad(self.full_tab, ((0, 0), (len(lo_node), 1)), mode="edge") - self._full_mc[:, None]
        fpairs = np.zeros((Dmax + 1, Ce, 2))
        fpairs[:, :-1, 0], fpairs[:, :-1, 1] = ft[:, :-1], ft[:, 1:]
        fpairs[:, -1, :] = ft[:, -1:]
        self._adj_pairs = fpairs.reshape(-1, 2)
        self._mixed_lo = float(self.g_mixed.axes[0][0]) if self.g_mixed is not None else 0.0
        self._chk_lo = (float(self.g_mixed_chk.axes[0][0]) if self.g_mixed_chk is not None else 0.0, self._mixed_lo)
        self._chunk_table = _chunk_table(max(model.max_context, 4096))
        self._init_one_step()

    def _init_one_step(self) -> None:
        """Plain-Python views of the tables for ``_parts1``, the path of one-step records (most calls: every
        prompt chunk and every single decode step). Small tables become lists; the large decode and mixed
        tables are read through memoryviews (Python floats, no copy)."""
        self._one_step = LINEAR  # (log coordinates would need numpy's log1p bit for bit: the array path)
        self._s_inner = self._inner_ext.tolist()
        self._s_nodes = self._nodes_ext.tolist()
        self._s_steps = self._steps_ext.tolist()
        self._s_seg_base = self._seg_base.tolist()
        self._s_dec = memoryview(np.ascontiguousarray(self._dec_pairs).reshape(-1))
        self._s_code = memoryview(np.ascontiguousarray(self._dec_code))
        self._s_adj = memoryview(np.ascontiguousarray(self._adj_pairs).reshape(-1))
        self._s_fill = self._fill_pairs.reshape(-1).tolist()
        self._s_chk = self.chk_tab.tolist()
        self._s_chk_eager = self.chk_eager_tab.tolist()
        self._s_nonterminal = self._nonterminal.tolist()
        self._s_sched = self.sched_tab.tolist()
        self._s_seg_layers = self.seg_layers.tolist()
        self._s_grids = []
        gs = self._gset
        if gs is not None:
            self._s_corners = gs.corners.reshape(-1).tolist()
            self._s_unmeasured = gs.unmeasured.reshape(-1).tolist() if gs.any_unmeasured else None
            for g, grid in enumerate(gs.grids):
                axes = []
                for a in range(2):
                    cells = int(np.isfinite(gs.inner[g, a]).sum()) + 1
                    start = int(gs.starts[g, a])
                    axes.append((float(gs.lo[g, a]), float(gs.hi[g, a]), gs.inner[g, a, :cells - 1].tolist(),
                                 gs.logs[start:start + cells].tolist(), gs.steps[start:start + cells].tolist()))
                self._s_grids.append((*axes[0], *axes[1], int(gs.stride[g]), int(gs.offset[g]), grid.roof))

    def _look1(self, g: int, x0: float, x1: float) -> tuple[float, bool]:
        """One point of two-axis grid ``g``: ``_GridSet.__call__``'s arithmetic on Python floats."""
        lo0, hi0, inner0, logs0, steps0, lo1, hi1, inner1, logs1, steps1, stride, offset, roof = self._s_grids[g]
        c0 = min(max(x0, lo0), hi0)
        c1 = min(max(x1, lo1), hi1)
        i0 = bisect_right(inner0, c0)
        i1 = bisect_right(inner1, c1)
        f0 = (c0 - logs0[i0]) / steps0[i0]
        f1 = (c1 - logs1[i1]) / steps1[i1]
        g0 = 1.0 - f0
        g1 = 1.0 - f1
        q = 4 * (i0 * stride + i1 + offset)
        v = self._s_corners
        out = (v[q] * g1 + v[q + 1] * f1) * g0 + (v[q + 2] * g1 + v[q + 3] * f1) * f0
        outside = c0 != x0 or c1 != x1
        flag = outside
        u = self._s_unmeasured
        if u is not None and not flag:
            flag = ((u[q] and g0 > 0 and g1 > 0) or (u[q + 1] and g0 > 0 and f1 > 0)
                    or (u[q + 2] and f0 > 0 and g1 > 0) or (u[q + 3] and f0 > 0 and f1 > 0))
        if outside and roof is not None:
            out *= float(roof(x0, x1)) / float(roof(c0, c1))
        return out, flag

    def _owed_grid(self, frame, comp, roof):
        sub = frame[frame["component"] == comp]
        if not len(sub):
            return None
        meta = self.profile.meta
        b, c = int(meta.get("owed_batch", sub["batch"].iloc[0])), int(meta.get("owed_context", sub["context"].iloc[0]))
        # the marginal over the same step owing nothing: full depth, plus the general path's checks where the
        # points ran them (checks > 0: profiles measured since the late evening of 2026-11-22; owed rows
        # only occur under rules that check)
        base = np.full(len(sub), float(self.g_full(b, c)[0]))
        checked = sub["checks"].to_numpy() > 0
        if checked.any():
            base[checked] += float(sub["checks"].to_numpy()[checked][0]) * self.chk_eager_tab[min(b, self.max_rows)]
        sub = sub.assign(median_s=np.maximum(sub["median_s"].to_numpy() - base, 0.0))
        return _grid(sub, ["layers", "tokens"], roof)

    def _check_table(self, chk, rows):
        S = self.S
        tab = np.zeros(len(rows))
        if not len(chk) or S < 2:
            return tab
        c0 = float(chk["context"].iloc[0])
        bs = chk["batch"].to_numpy().astype(np.float64)
        full, _ = self.g_full(bs, np.full(len(bs), c0))
        per = np.maximum((chk["median_s"].to_numpy() - full) / (S - 1), 0.0)
        # not monotone: a check's cost is a difference of two timings, and the envelope (a running minimum
        # from the largest batch) would price every batch at the largest batch's check, the cheapest measured
        g = Grid([np.unique(bs)], per[np.argsort(bs)], np.ones(len(bs), dtype=bool),
                 lambda b: self.model.head_weight_bytes / BW + b * 2.0 * self.model.head_params / FR + SYNC,
                 monotone=False)
        tab[1:] = g(rows[1:])[0]
        return tab

    # ---- evaluation -----------------------------------------------------------------------------
    # Every step of a work record is priced with array operations over the (T, S) arrays, prompt chunks
    # and owed rows included: a fixed number of numpy calls per record, however many steps it holds.
    def _parts(self, work: IterationWork) -> dict[str, np.ndarray]:
        # (np.count_nonzero and the ufuncs' own reduce: ndarray.any / .max add a Python layer per call)
        Dmax = self.max_rows
        rec = work.recompute_rows
        has_rec = np.count_nonzero(rec) > 0
        D = work.full_rows - rec if has_rec else work.full_rows
        R = work.kv_read
        proj = work.proj_rows
        has_proj = np.count_nonzero(proj) > 0
        excess = work.attn_context[:, 0] - R[:, 0]
        chunk = excess > 0.5  # a prompt chunk: attention beyond the KV reads
        chunks = np.count_nonzero(chunk)
        graphed = None  # (T,) steps of a policy that carries debts, run on the graphed decode path
        if not self.fill_like and self.graphs_fresh:
            graphed = (work.carried == 0) & ~chunk
            if not graphed.any():
                graphed = None
        # copy_hidden's rows projected on the graphed path: one fused projection at the end, priced as fill
        proj_fill = proj if self.fill_like else (proj * graphed[:, None] if graphed is not None and has_proj
                                                 and self.graphed_projection else None)
        if proj_fill is not None and proj_fill is not proj:
            proj = proj - proj_fill
            has_proj = np.count_nonzero(proj) > 0
        has_fill = proj_fill is not None and np.count_nonzero(proj_fill) > 0
        # a step is special when it holds a prompt chunk, re-runs owed rows, or projects them (not fill)
        any_special = chunks > 0 or has_rec or (has_proj and not self.fill_like)
        ext = None
        chk = work.check_rows
        all_chunks = any_special and self.g_prefill is not None and chunks == len(chunk)
        if all_chunks:
            # every step holds a prompt chunk: its decode rows, their checks (when exit 0 checked them and the
            # profile has mixed checks) and the schedule are priced in _special
            zeros = np.zeros(len(excess))
            parts = {"decode": zeros}
            own_checks = self._mixed_checks and np.count_nonzero(chk[:, 0] > 0) == len(chk)
        else:
            own_checks = False
            Di = D.astype(np.int64)
            top = np.maximum.reduce(Di, axis=None)
            # per segment: the dense table, linear in the mean context between its nodes (nodes added at 0
            # and far beyond the last hold the end values: the clamp), rows beyond max_rows on the row past
            # it (the last row's values, flagged), then scaled by the roofline
            c = R / np.maximum(D, 1.0)
            j = np.searchsorted(self._inner_ext, c, side="right")
            f = (c - self._nodes_ext[j]) / self._steps_ext[j]
            base = self._seg_base + (Di if top <= Dmax + 1 else np.minimum(Di, Dmax + 1)) * self._cn_ext + j
            v = self._dec_pairs[base]
            seg = v[..., 0] * (1.0 - f) + v[..., 1] * f
            code = self._dec_code[base]
            if np.count_nonzero(code):
                ext = code > (f <= 0)  # the lower node's flag, and the upper's if it has weight
            if top > Dmax:
                over = Di > Dmax
                Dc = np.minimum(Di, Dmax)
                seg = np.where(over, seg * self._roof_decode(1.0, D, c) / self._roof_decode(1.0, np.maximum(Dc, 1), c),
                               seg)
            parts = {"decode": np.add.reduce(seg, axis=1)}
        if own_checks:
            parts["checks"] = zeros.copy()
        elif np.count_nonzero(chk):
            ctab = self.chk_tab if self.fill_like else self.chk_eager_tab
            ci = chk.astype(np.int64)
            if np.maximum.reduce(ci, axis=None) > Dmax:  # more checked rows than the table: its last row
                ci = np.minimum(ci, Dmax)
            per = ctab[ci]
            if graphed is not None:  # the graphed path's checks
                per = np.where(graphed[:, None], self.chk_tab[ci], per)
            parts["checks"] = np.add.reduce(per * self._nonterminal[work.batch_reach], axis=1)
        if has_fill:
            rows = np.maximum.reduce(proj_fill, axis=1)
            lm = (proj_fill @ self.seg_layers) / np.maximum(rows, 1.0)
            li = np.minimum(lm.astype(np.int64), self.L - 1)
            lf = lm - li
            v = self._fill_pairs[li * (Dmax + 1) + np.minimum(rows.astype(np.int64), Dmax)]
            parts["fill"] = v[:, 0] * (1 - lf) + v[:, 1] * lf
        if self.include_schedule:
            parts["schedule"] = zeros.copy() if all_chunks else \
                self.sched_tab[Di[:, 0] if top <= Dmax else np.minimum(Di[:, 0], Dmax)]
        # extrapolated steps: the decode table's count only the steps it prices (every step but the prompt
        # chunks _special prices: a step special only for its owed rows keeps its decode-table price), the
        # two-axis grids' counts come from _special; a step flagged by both is one step
        flagged = None
        if ext is not None and ext.any():
            dec_flag = ext.any(axis=1)
            if any_special and self.g_prefill is not None:
                dec_flag &= ~chunk
            n_dec = int(dec_flag.sum())
            if n_dec:
                self.extrapolated_by["decode"] = self.extrapolated_by.get("decode", 0) + n_dec
                flagged = dec_flag
        if any_special:
            sflag = self._special(work, parts, chunk, excess, has_rec, has_proj, proj)
            if sflag is not None:
                flagged = sflag if flagged is None else flagged | sflag
        if flagged is not None:
            n_ext = int(flagged.sum())
            self.extrapolated += n_ext
            self.extrapolated_steps += n_ext
        return parts

    def _special(self, work: IterationWork, parts: dict, chunk: np.ndarray, excess: np.ndarray, has_rec,
                 has_proj, proj: np.ndarray) -> int:
        """Steps priced through the two-axis grids: prompt chunks, and owed rows projected (policies other
        than fill) or re-run. Writes their parts and counts their extrapolations per component in
        ``extrapolated_by``; returns the mask of steps any of them extrapolated (None: none)."""
        S = self.S
        steps = len(excess)
        for name in ("prefill", "mixed", "proj", "recompute"):
            parts[name] = np.zeros(steps)
        gid = self._gid
        groups = []  # (name, steps, grid, x0, x1): one group of points each, looked up together
        for name, rows, on in (("recompute", work.recompute_rows, has_rec),
                               ("proj", proj, has_proj and not self.fill_like)):
            if on and name in gid:
                t = np.flatnonzero(rows.any(axis=1))
                sub = rows[t]
                groups.append((name, t, gid[name], (sub > 0) @ self.seg_layers, np.maximum.reduce(sub, axis=1)))
        priced = self.g_prefill is not None and chunk.any()
        if priced:
            t = slice(None) if chunk.all() else np.flatnonzero(chunk)
            N = work.full_rows[t]
            R0 = work.kv_read[t, 0]
            chk = work.check_rows[t]
            x = excess[t]
            rows0 = N[:, 0] - work.recompute_rows[t, 0] if has_rec else N[:, 0]
            r0 = rows0.astype(np.int64)
            c0 = chk[:, 0]
            checked = c0 > 0
            # the chunk's tokens n and the decode rows d beside it: the checked rows when the rule checks
            if checked.all():
                d = c0.astype(np.int64)
                n = np.maximum(r0 - d, 2)
            else:
                # no decode row checked: all rows one chunk if the KV reads agree, else a chunk starting a prompt
                n = r0
                k = (n + (QUERY_TILE - 1)) // QUERY_TILE
                e = np.where(n > k, (x + n * (n - 1) / 2) / np.maximum(n - k, 1), n)
                bad = (n < 2) | (np.abs(e * k - R0) > 0.5 + 1e-6 * R0)
                if bad.any():
                    need = int(r0.max()) + 1
                    if need > len(self._chunk_table):
                        self._chunk_table = _chunk_table(max(need, 2 * len(self._chunk_table)))
                    n = np.where(bad, _chunks_from_excess(x, r0, self._chunk_table), n)
                d = np.maximum(r0 - n, 0)
                if checked.any():
                    dc = c0.astype(np.int64)
                    d = np.where(checked, dc, d)
                    n = np.where(checked, np.maximum(r0 - dc, 2), n)
            k = (n + (QUERY_TILE - 1)) // QUERY_TILE
            e = (x + n * (n - 1) / 2) / (n - k)
            p = np.maximum(e - n, 0.0)
            nb = padded_tokens(n.astype(np.float64), self.chunk_padding)  # what the executor ran
            groups.append(("prefill", t, gid["prefill"], p, nb))
            mixed = self.g_mixed is not None
            checks_on = False
            if mixed:
                mx = d > 0
                groups.append(("base", t, gid["prefill"], np.zeros(len(n)), nb))
                groups.append(("mixed", t, gid["mixed"], d if mx.all() else np.where(mx, d, self._mixed_lo), nb))
                checks_on = self.g_mixed_chk is not None and "checks" in parts
                if checks_on:
                    nz = chk > 0
                    nn = np.repeat(nb, S)
                    r = np.where(nz, chk, self._chk_lo[0]).ravel()
                    groups.append(("hi", t, gid["mixed_chk"], r, nn))
                    groups.append(("lo", t, gid["mixed"], r if self._chk_lo[0] == self._chk_lo[1]
                                   else np.where(nz, chk, self._chk_lo[1]).ravel(), nn))
        if not groups:
            return None
        key = tuple([(g[2], len(g[3])) for g in groups])
        gids = self._gid_cache.get(key)
        if gids is None:
            gids = self._gid_cache[key] = np.repeat([g for g, _ in key], [n for _, n in key])
        sizes = [n for _, n in key]
        Q = len(gids)
        # the points as one (Q, 2) array: axis-0 coordinates, then axis-1 ones
        pts = np.concatenate([g[3] for g in groups] + [g[4] for g in groups]).reshape(2, Q).T
        values, flags = self._gset(gids, pts)
        at = {}
        pos = 0
        for g, size in zip(groups, sizes):
            at[g[0]] = pos, pos + size
            pos += size
        for name, owing, *_ in groups:
            if name in ("recompute", "proj"):
                a, b = at[name]
                parts[name][owing] = values[a:b]
        if priced:
            a, b = at["prefill"]
            pf = values[a:b]
            decode_part = 0.0
            if mixed:
                a, b = at["mixed"]
                mixed_v = values[a:b]
                a, b = at["base"]
                dd = np.maximum(d, 1)
                cc = np.maximum(R0 - e * k, d) / dd  # mean context of the decode rows
                owed = N - work.recompute_rows[t] if has_rec else N
                scale = (np.maximum(owed - n[:, None], 0) @ self.seg_layers) / (self.L * dd)
                dd = np.minimum(d, self.max_rows)
                j = np.searchsorted(self._inner_ext, cc, side="right")
                fc = (cc - self._nodes_ext[j]) / self._steps_ext[j]
                v = self._adj_pairs[dd * self._cn_ext + j]
                adj = v[:, 0] * (1.0 - fc) + v[:, 1] * fc
                decode_part = np.maximum((mixed_v - values[a:b]) * scale + adj * scale, -0.5 * pf)
                if not mx.all():
                    decode_part = np.where(mx, decode_part, 0.0)
                if checks_on:
                    a, b = at["hi"]
                    c, e = at["lo"]
                    per = np.maximum(values[a:b] - values[c:e], 0.0).reshape(-1, S) / max(S - 1, 1)
                    new = np.add.reduce(per * nz, axis=1)
                    if checked.all():  # (then d > 0 and exit 0 checked)
                        parts["checks"][t] = new
                    else:
                        parts["checks"][t] = np.where(mx & nz.any(axis=1), new, parts["checks"][t])
            parts["decode"][t] = 0.0
            if "schedule" in parts:
                parts["schedule"][t] = self.sched_tab[np.minimum(d + 1, self.max_rows)]
            parts["prefill"][t] = pf
            parts["mixed"][t] = decode_part
        if not flags.any():
            return None
        # extrapolated points: count the steps, and per component the steps it extrapolated in
        flagged = np.zeros(steps, dtype=bool)
        by = self.extrapolated_by
        for name, owing, *_ in groups:
            if name in ("recompute", "proj", "prefill", "mixed"):
                a, b = at[name]
                flag = flags[a:b]
                if name == "mixed":
                    flag = flag & mx
                hits = int(flag.sum())
                if hits:
                    by[name] = by.get(name, 0) + hits
                    flagged[owing] |= flag
        return flagged

    # ---- one step -------------------------------------------------------------------------------
    # A record of one step (a prompt chunk, a single decode step: most calls) is priced on Python floats:
    # the operations of _parts and _special, in the same order, on the same tables, so the same results bit
    # for bit (sums over segments in numpy's pairwise order, _psum) at a fraction of the cost of numpy calls
    # on arrays of one row.
    def _parts1(self, work: IterationWork) -> dict[str, float]:
        Dmax = self.max_rows
        full = work.full_rows[0].tolist()
        rec = work.recompute_rows[0].tolist()
        has_rec = any(rec)
        D = [a - b for a, b in zip(full, rec)] if has_rec else full
        R = work.kv_read[0].tolist()
        proj = work.proj_rows[0].tolist()
        has_proj = any(proj)
        excess = work.attn_context.item(0) - R[0]
        chunk = excess > 0.5
        # a step of a policy that carries debts, with none carried in and no prompt chunk: the graphed path
        graphed = not self.fill_like and self.graphs_fresh and not chunk and work.carried.item(0) == 0
        fill_proj = has_proj and (self.fill_like or (graphed and self.graphed_projection))
        special = chunk or has_rec or (has_proj and not fill_proj)
        chk = work.check_rows[0].tolist()
        all_chunks = special and self.g_prefill is not None and chunk
        ext = False
        if all_chunks:
            parts = {"decode": 0.0}
            own_checks = self._mixed_checks and chk[0] > 0
        else:
            own_checks = False
            Di = [int(x) for x in D]
            inner, nodes, steps, dec, code = self._s_inner, self._s_nodes, self._s_steps, self._s_dec, self._s_code
            ce, top = self._cn_ext, Dmax + 1
            seg, cs = [], []
            for s, base in enumerate(self._s_seg_base):
                c = R[s] / max(D[s], 1.0)
                j = bisect_right(inner, c)
                f = (c - nodes[j]) / steps[j]
                di = Di[s]
                base += (di if di < top else top) * ce + j
                seg.append(dec[2 * base] * (1.0 - f) + dec[2 * base + 1] * f)
                if code[base] > (f <= 0):
                    ext = True
                cs.append(c)
            if max(Di) > Dmax:
                roof = self._roof_decode
                for s, di in enumerate(Di):
                    if di > Dmax:
                        seg[s] = seg[s] * float(roof(1.0, D[s], cs[s])) / float(roof(1.0, max(min(di, Dmax), 1), cs[s]))
            parts = {"decode": _psum(seg)}
        if own_checks:
            parts["checks"] = 0.0
        elif any(chk):
            ctab = self._s_chk if self.fill_like or graphed else self._s_chk_eager
            nt = self._s_nonterminal[int(work.batch_reach[0])]
            parts["checks"] = _psum([ctab[min(int(c), Dmax)] * w for c, w in zip(chk, nt)])
        if fill_proj:
            rows = max(proj)
            lm = sum([p * w for p, w in zip(proj, self._s_seg_layers)]) / max(rows, 1.0)  # integers: exact
            li = min(int(lm), self.L - 1)
            lf = lm - li
            i = 2 * (li * (Dmax + 1) + min(int(rows), Dmax))
            parts["fill"] = self._s_fill[i] * (1 - lf) + self._s_fill[i + 1] * lf
        if self.include_schedule:
            parts["schedule"] = 0.0 if all_chunks else self._s_sched[min(Di[0], Dmax)]
        flagged = False
        if ext:  # (then not all_chunks: the decode table priced this step)
            self.extrapolated_by["decode"] = self.extrapolated_by.get("decode", 0) + 1
            flagged = True
        if special and self._special1(work, parts, full, rec, proj, chk, R, excess, has_rec, has_proj and not fill_proj,
                                      chunk):
            flagged = True
        if flagged:
            self.extrapolated += 1
            self.extrapolated_steps += 1
        return parts

    def _special1(self, work, parts, full, rec, proj, chk, R, excess, has_rec, has_proj, chunk) -> bool:
        """_special for one step; returns whether a component it priced extrapolated."""
        S = self.S
        for name in ("prefill", "mixed", "proj", "recompute"):
            parts[name] = 0.0
        gid = self._gid
        look = self._look1
        flags = []  # (component, extrapolated), in _special's group order
        for name, rows, on in (("recompute", rec, has_rec), ("proj", proj, has_proj)):
            if on and name in gid:
                x0 = sum([w for r, w in zip(rows, self._s_seg_layers) if r > 0])  # integers: exact
                parts[name], flag = look(gid[name], float(x0), float(max(rows)))
                flags.append((name, flag))
        if self.g_prefill is not None and chunk:
            R0, x = R[0], excess
            r0 = int(full[0] - rec[0] if has_rec else full[0])
            c0 = chk[0]
            checked = c0 > 0
            if checked:
                d = int(c0)
                n = max(r0 - d, 2)
            else:
                n = r0
                k = (n + (QUERY_TILE - 1)) // QUERY_TILE
                e = (x + n * (n - 1) / 2) / max(n - k, 1) if n > k else float(n)
                if n < 2 or abs(e * k - R0) > 0.5 + 1e-6 * R0:
                    need = r0 + 1
                    if need > len(self._chunk_table):
                        self._chunk_table = _chunk_table(max(need, 2 * len(self._chunk_table)))
                    n = int(_chunks_from_excess(np.array([x]), np.array([r0]), self._chunk_table)[0])
                d = max(r0 - n, 0)
            k = (n + (QUERY_TILE - 1)) // QUERY_TILE
            e = (x + n * (n - 1) / 2) / (n - k)
            p = max(e - n, 0.0)
            fn = padded_tokens(float(n), self.chunk_padding)  # what the executor ran
            pf, flag = look(gid["prefill"], p, fn)
            flags.append(("prefill", flag))
            decode_part = 0.0
            if self.g_mixed is not None:
                mx = d > 0
                base_v = look(gid["prefill"], 0.0, fn)[0]
                mixed_v, flag = look(gid["mixed"], float(d) if mx else self._mixed_lo, fn)
                flags.append(("mixed", flag and mx))
                dd = max(d, 1)
                cc = max(R0 - e * k, float(d)) / dd  # mean context of the decode rows
                owed = [a - b for a, b in zip(full, rec)] if has_rec else full
                scale = sum([max(o - n, 0.0) * w for o, w in zip(owed, self._s_seg_layers)]) / (self.L * dd)
                dd = min(d, self.max_rows)
                j = bisect_right(self._s_inner, cc)
                fc = (cc - self._s_nodes[j]) / self._s_steps[j]
                i = 2 * (dd * self._cn_ext + j)
                adj = self._s_adj[i] * (1.0 - fc) + self._s_adj[i + 1] * fc
                decode_part = max((mixed_v - base_v) * scale + adj * scale, -0.5 * pf) if mx else 0.0
                if self.g_mixed_chk is not None and "checks" in parts:
                    g_hi, g_lo, div = gid["mixed_chk"], gid["mixed"], max(S - 1, 1)
                    per, seen = [], {}
                    for c in chk:
                        if c > 0:
                            v = seen.get(c)
                            if v is None:
                                v = seen[c] = max(look(g_hi, c, fn)[0] - look(g_lo, c, fn)[0], 0.0) / div
                            per.append(v)
                        else:
                            per.append(0.0)
                    if checked or (mx and seen):
                        parts["checks"] = _psum(per)
            parts["decode"] = 0.0
            if "schedule" in parts:
                parts["schedule"] = self._s_sched[min(d + 1, self.max_rows)]
            parts["prefill"] = pf
            parts["mixed"] = decode_part
        hit = False
        by = self.extrapolated_by
        for name, flag in flags:
            if flag:
                by[name] = by.get(name, 0) + 1
                hit = True
        return hit

    def iteration_time(self, work: IterationWork) -> np.ndarray:
        if self._one_step and len(work.syncs) == 1:
            values = iter(self._parts1(work).values())
            total = next(values)
            for v in values:
                total += v
            return np.array([total])
        parts = self._parts(work)
        total = parts.pop("decode")  # (a fresh array of this call's)
        for v in parts.values():
            total += v
        return total

    def breakdown(self, work: IterationWork) -> dict[str, float]:
        if self._one_step and len(work.syncs) == 1:
            return {name: float(v) for name, v in self._parts1(work).items()}
        return {name: float(v.sum()) for name, v in self._parts(work).items()}

    def reset_counters(self) -> None:
        self.extrapolated = self.extrapolated_steps = 0
        self.extrapolated_by = {}

    def _set_policy(self, kv_policy) -> None:
        if kv_policy is not None and not hasattr(kv_policy, "settle"):
            from eesim.policies import kv_policy as _kv

            kv_policy = _kv(kv_policy)
        self.policy = kv_policy
        self.fill_like = kv_policy is None or (kv_policy.settle == "iteration_end" and kv_policy.work == "kv_projection")
        # copy_hidden, recompute: a decode step with nothing owed runs the graphed path (GPUExecutor.
        # _graphed_decode_ok), its exits settled at the end of the pass (decode_path._settle_exits); copy_hidden's
        # projection then is one fused launch, priced as fill
        self.graphs_fresh = kv_policy is not None and kv_policy.settles_exits_after_the_pass
        self.graphed_projection = self.graphs_fresh and kv_policy.work == "kv_projection"

    def with_policy(self, kv_policy) -> ProfileCostModel:
        """This model for another KV policy, its counters at zero: a shallow copy sharing the tables (nothing
        else depends on the policy), so one profile is fitted once however many policies it prices."""
        import copy

        other = copy.copy(self)
        other._set_policy(kv_policy)
        other.reset_counters()
        return other


def _psum_pairwise(values: list[float]) -> float:
    """The sum numpy's ``add.reduce`` computes over a contiguous row (its pairwise summation: eight running sums
    for up to 128 values, halves above), so that a step priced on Python floats equals the same step priced
    in an array, bit for bit."""
    n = len(values)
    if n < 8:
        total = 0.0
        for v in values:
            total += v
        return total
    if n > 128:
        half = n // 2
        half -= half % 8
        return _psum_pairwise(values[:half]) + _psum_pairwise(values[half:])
    r = values[:8]
    i, stop = 8, n - n % 8
    while i < stop:
        for j in range(8):
            r[j] += values[i + j]
        i += 8
    total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        total += values[i]
        i += 1
    return total


def _psum_numpy(values: list[float]) -> float:
    return float(np.add.reduce(np.array(values, dtype=np.float64)))


def _pick_psum():
    """_psum_pairwise where it reproduces this numpy's row sums on values that tell summation orders apart,
    else numpy itself (slower, as exact)."""
    rng = np.random.default_rng(0)
    for n in (*range(1, 20), 31, 64, 127, 128, 129, 200, 300):
        rows = rng.choice([1e16, -1e16, 1.0, 3.3, 1e-3, 7e15], size=(4, n)) * rng.random((4, n))
        want = np.add.reduce(rows, axis=1)
        if any(_psum_pairwise(row) != w for row, w in zip(rows.tolist(), want.tolist())):
            return _psum_numpy
    return _psum_pairwise


_psum = _pick_psum()


def _chunk_table(rows: int) -> np.ndarray:
    """Running maximum over n = 0..rows of f(n) = n (n + 1) / 2 - n ceil(n / 128): the attention a chunk of n
    tokens starting a prompt does beyond its KV reads."""
    n = np.arange(rows + 1)
    return np.maximum.accumulate(n * (n + 1) / 2 - n * (-(-n // QUERY_TILE)))


def padded_tokens(n, rule: dict | None):
    """Chunk tokens (or decode rows) as the executor ran them: padded by ``rule`` (profile metadata
    ``chunk_padding`` or ``decode_padding``: a power of two, at least ``min``, up to ``pow2_until``, then a
    multiple of ``step``; no ``step``: powers of two throughout), or ``n`` itself without a rule (profiles of
    an unpadded executor)."""
    if not rule:
        return n
    least, step, until = rule.get("min", 1), rule.get("step"), rule.get("pow2_until", np.inf)
    if not isinstance(n, np.ndarray):  # one chunk (the per-step path): integers, no numpy calls
        k = max(int(n), 1)
        return float(-(-k // step) * step if step and k > until else max(least, 1 << (k - 1).bit_length()))
    p2 = np.maximum(float(least), np.exp2(np.ceil(np.log2(np.maximum(n, 1.0)))))
    return p2 if not step else np.where(n <= until, p2, np.ceil(n / step) * step)


def _chunks_from_excess(excess: np.ndarray, rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Tokens n of chunks starting a prompt whose attention exceeds their KV reads by ``excess`` (> 0.5), at
    most ``rows`` (at least 2): the least n with f(n) >= excess, searched upwards from
    max(floor(sqrt(2 excess)), 2) and stopped at ``rows``. (f is below excess everywhere before that start,
    so the least n of the running maximum is the one the upward search finds; ``table`` covers ``rows``.)"""
    start = np.maximum(np.sqrt(2.0 * excess).astype(np.int64), 2)
    first = np.searchsorted(table, excess, side="left")
    return np.minimum(np.maximum(start, np.minimum(first, rows)), np.maximum(rows, 2))
