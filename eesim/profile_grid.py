"""Interpolation over a measured grid: ``Grid``, as the profile-backed cost model (profile_cost.py) prices.

Interpolation is multilinear in the sizes themselves over each grid (decode time is close to
a + b B + c C + d B C, which bilinear interpolation reproduces; in log(1 + size) it overshot interior points
by up to 15%), after a monotone envelope: the largest function at or below the measurements that is
non-decreasing along every axis (a running minimum from the far end of each axis). So the model is
monotone non-decreasing in each size and exact on grid points whose measurements already were, and one
point measured too slow (the H100 profile's decode at 8 layers, batch 2, context 16: 6.27 ms with an IQR
of 54%, beside 2.7-3.1 ms) is lowered to its larger neighbours instead of raising every larger point to
it, as the cumulative maximum used before did. Grid points the profiler could not measure (KV cache too
small) and queries outside the grid are priced by the bytes/FLOPs roofline scaled to the nearest measured
point, and flagged as extrapolated. ``Grid.on_mesh`` evaluates a grid on a mesh once per axis;
``_GridSet`` is Grid's arithmetic for many two-axis grids and points at once.
"""

from __future__ import annotations

import numpy as np

from eesim.errors import require


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
    """Multilinear interpolation over a grid of measurements (in the sizes themselves, ``LINEAR``), after
    the monotone envelope (``monotone_envelope``, unless ``monotone=False``), with roofline-scaled
    extrapolation from the nearest measured point."""

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
