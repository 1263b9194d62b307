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
- proj / recompute (copy_hidden, recompute): owed rows x layers, the marginal over a full-depth step;
- host scheduling time per iteration by batch size (``include_schedule``).

Interpolation is multilinear in log(1 + size) over each grid, after a cumulative maximum along every
axis (so the model is monotone non-decreasing in each size and exact on grid points whose
measurements already were). Grid points the profiler could not measure (KV cache too small) and
queries outside the grid are priced by the bytes/FLOPs roofline scaled to the nearest measured point;
``extrapolated`` counts such evaluations (``extrapolated_steps`` the steps, ``extrapolated_by``
per component), so a simulator can surface them. The decode, check and fill parts are dense lookup
tables vectorised over the (T, S) work arrays; the rarer prefill steps go through a small Python loop.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from eesim.errors import EesimError, require
from eesim.model_spec import ModelSpec
from eesim.plan import IterationWork
from eesim.profile_data import Profile, read_profile, shape_key, shape_name

PROFILE_DIR = Path(__file__).resolve().parents[1] / "traces" / "profiles"
BW, FR, SYNC = 2.98e12 * 0.85, 768e12 * 0.65, 15e-6  # roofline constants (only ratios are used)


def load_profile(path: str | Path) -> Profile:
    return read_profile(path)


def profile_for(model: ModelSpec, folder: str | Path = PROFILE_DIR) -> Path | None:
    """The profile of ``model``'s shape in ``folder`` (traces/profiles/<shape>.parquet), if there is one."""
    path = Path(folder) / f"{shape_name(model)}.parquet"
    return path if path.is_file() else None


class Grid:
    """Multilinear interpolation in log(1 + x) over a regular grid, monotone by a cumulative max, with
    roofline-scaled extrapolation from the nearest measured point."""

    def __init__(self, axes: list[np.ndarray], values: np.ndarray, measured: np.ndarray, roof) -> None:
        self.axes = [np.asarray(a, dtype=np.float64) for a in axes]
        self.logs = [np.log1p(a) for a in self.axes]
        self.roof = roof
        values = np.array(values, dtype=np.float64)
        measured = np.asarray(measured, dtype=bool)
        values = _fill_missing(self.axes, values, measured, roof)
        for axis in range(values.ndim):
            values = np.maximum.accumulate(values, axis=axis)
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
            xc = np.clip(x, ax[0], ax[-1])
            outside |= xc != x
            clipped.append(xc)
            if len(ax) == 1:
                idx.append(np.zeros(x.shape, dtype=np.int64))
                wts.append(np.zeros(x.shape))
                continue
            lx = np.log1p(xc)
            i = np.clip(np.searchsorted(lg, lx, side="right") - 1, 0, len(ax) - 2)
            idx.append(i)
            wts.append(np.clip((lx - lg[i]) / (lg[i + 1] - lg[i]), 0.0, 1.0))
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


class ProfileCostModel:
    """CostModel from a profile: see the module docstring."""

    def __init__(self, profile: Profile | str | Path, model: ModelSpec, kv_policy=None,
                 include_schedule: bool = True, max_rows: int = 512) -> None:
        if not isinstance(profile, Profile):
            profile = read_profile(profile)
        self.profile = profile
        pm = profile.model
        if shape_key(pm) != shape_key(model):
            raise EesimError(
                f"profile {profile.path or '(in memory)'!r} was measured for shape {pm.name!r} ({pm.num_layers} "
                f"layers, d={pm.hidden_size}, {pm.num_kv_heads} KV heads, exits {list(pm.exit_layers)}, {pm.dtype}), "
                f"not for model {model.name!r} ({model.num_layers} layers, d={model.hidden_size}, "
                f"{model.num_kv_heads} KV heads, exits {list(model.exit_layers)}, {model.dtype}); profile this shape "
                f"with `eesim profile`")
        self.model = model
        if kv_policy is not None and not hasattr(kv_policy, "settle"):
            from eesim.policies import kv_policy as _kv

            kv_policy = _kv(kv_policy)
        self.policy = kv_policy
        self.fill_like = kv_policy is None or (kv_policy.settle == "iteration_end" and kv_policy.work == "kv_projection")
        self.include_schedule = include_schedule
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
        self.g_decode = _grid(dec, ["layers", "batch", "context"], roof_decode)
        self.grid_box = {c: (float(dec[c].min()), float(dec[c].max())) for c in ("batch", "context")}

        def one_d(comp, col="batch"):
            sub = frame[frame["component"] == comp]
            return _grid(sub, [col], roof_batch) if len(sub) else None

        self.g_sched = one_d("schedule")
        chk = frame[frame["component"] == "check"]
        chk_e = frame[frame["component"] == "check_eager"]
        self.g_fill = _grid(frame[frame["component"] == "fill"], ["layers", "batch"], roof_fill) \
            if "fill" in comps else None
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
        self.max_rows = Dmax = int(max(max_rows, dec["batch"].max()))
        step = max(16, model.max_context // 256)
        nodes = np.union1d(np.arange(0, model.max_context + step, step), dec["context"].unique()).astype(np.float64)
        nodes = nodes[nodes >= 1]
        self.nodes = nodes
        self.num_nodes = Cn = len(nodes)
        rows = np.arange(Dmax + 1, dtype=np.float64)
        # checks: per check, from the check grid less the full-depth decode at the same batch and context
        self.chk_tab = self._check_table(chk, rows)
        self.chk_eager_tab = self._check_table(chk_e, rows) if len(chk_e) else self.chk_tab
        # dec(layers, B, c) with the checks and the fill each decode measurement included taken out
        lay = np.asarray(self.bounds[1:], dtype=np.float64)
        Lg, Bg, Cg = np.meshgrid(lay, rows[1:], nodes, indexing="ij")
        raw, flag = self.g_decode(Lg, Bg, Cg)
        k = np.searchsorted(np.asarray(model.all_exits), lay)  # exit index of each layer count
        for i, e in enumerate(lay):
            if e < L:
                raw[i] -= k[i] * self.chk_tab[1:, None]
                if self.g_fill is not None:
                    f, ff = self.g_fill(np.full(Dmax, L - e), rows[1:])
                    raw[i] -= f[:, None]
                    flag[i] |= ff[:, None]
        raw = np.maximum(raw, 0.0)
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
            fl, fr = np.meshgrid(np.arange(L + 1, dtype=np.float64), rows, indexing="ij")
            ft, _ = self.g_fill(np.maximum(fl, 1), np.maximum(fr, 1))
            ft[0] = 0.0
            ft[:, 0] = 0.0
            self.fill_tab = ft  # (L + 1, Dmax + 1)
        else:
            self.fill_tab = np.zeros((L + 1, Dmax + 1))
        if self.g_sched is not None:
            self.sched_tab = self.g_sched(np.maximum(rows, 1))[0]
        else:
            self.sched_tab = np.zeros(Dmax + 1)
        self._segs = np.arange(S)

    def _owed_grid(self, frame, comp, roof):
        sub = frame[frame["component"] == comp]
        if not len(sub):
            return None
        meta = self.profile.meta
        b, c = int(meta.get("owed_batch", sub["batch"].iloc[0])), int(meta.get("owed_context", sub["context"].iloc[0]))
        base = float(self.g_decode(self.L, b, c)[0])
        sub = sub.assign(median_s=np.maximum(sub["median_s"].to_numpy() - base, 0.0))
        return _grid(sub, ["layers", "tokens"], roof)

    def _check_table(self, chk, rows):
        S = self.S
        tab = np.zeros(len(rows))
        if not len(chk) or S < 2:
            return tab
        c0 = float(chk["context"].iloc[0])
        bs = chk["batch"].to_numpy().astype(np.float64)
        full, _ = self.g_decode(np.full(len(bs), self.L), bs, np.full(len(bs), c0))
        per = np.maximum((chk["median_s"].to_numpy() - full) / (S - 1), 0.0)
        g = Grid([np.unique(bs)], per[np.argsort(bs)], np.ones(len(bs), dtype=bool),
                 lambda b: self.model.head_weight_bytes / BW + b * 2.0 * self.model.head_params / FR + SYNC)
        tab[1:] = g(rows[1:])[0]
        return tab

    # ---- evaluation -----------------------------------------------------------------------------
    def _parts(self, work: IterationWork) -> dict[str, np.ndarray]:
        S, Dmax, Cn = self.S, self.max_rows, self.num_nodes
        rec = work.recompute_rows
        D = work.full_rows - rec if rec.any() else work.full_rows
        R = work.kv_read
        steps = D.shape[0]
        Di = D.astype(np.int64)
        over = Di > Dmax
        Dc = np.minimum(Di, Dmax)
        c = R / np.maximum(D, 1.0)
        nodes = self.nodes
        j = np.clip(np.searchsorted(nodes, c, side="right") - 1, 0, Cn - 2)
        f = np.clip((c - nodes[j]) / (nodes[j + 1] - nodes[j]), 0.0, 1.0)
        base = (self._segs * (Dmax + 1) + Dc) * Cn + j
        tab = self.dec_tab
        seg = tab[base] * (1.0 - f) + tab[base + 1] * f
        ext = self.dec_flag[base] | (self.dec_flag[base + 1] & (f > 0)) | (c > nodes[-1]) | over
        if over.any():
            seg = np.where(over, seg * self._roof_decode(1.0, D, c) / self._roof_decode(1.0, np.maximum(Dc, 1), c), seg)
        decode = seg.sum(axis=1)
        parts = {"decode": decode}
        chk = work.check_rows
        if chk.any():
            nonterminal = self._segs < work.batch_reach[:, None]
            ci = np.minimum(chk.astype(np.int64), Dmax)
            ctab = self.chk_tab if self.fill_like else self.chk_eager_tab
            parts["checks"] = (ctab[ci] * nonterminal).sum(axis=1)
        proj = work.proj_rows
        if proj.any() and self.fill_like:
            rows = proj.max(axis=1)
            rl = proj @ self.seg_layers
            lm = rl / np.maximum(rows, 1.0)
            li = np.minimum(lm.astype(np.int64), self.L - 1)
            lf = lm - li
            ri = np.minimum(rows.astype(np.int64), Dmax)
            parts["fill"] = self.fill_tab[li, ri] * (1 - lf) + self.fill_tab[li + 1, ri] * lf
        if self.include_schedule:
            parts["schedule"] = self.sched_tab[np.minimum(Di[:, 0], Dmax)]
        # ---- steps priced through the general path: prompt chunks, projected or re-run owed rows ----
        excess = work.attn_context[:, 0] - R[:, 0]
        special = (excess > 0.5) | (rec.any(axis=1)) | ((proj.any(axis=1)) & (not self.fill_like))
        n_ext = int((ext.any(axis=1) & ~special).sum())
        if special.any():
            for name in ("prefill", "mixed", "proj", "recompute"):
                parts[name] = np.zeros(steps)
            for t in np.flatnonzero(special):
                n_ext += self._special(work, int(t), parts, float(excess[t]))
        if n_ext:
            self.extrapolated += n_ext
            self.extrapolated_steps += n_ext
            self.extrapolated_by["decode"] = self.extrapolated_by.get("decode", 0) + n_ext
        return parts

    def _flag(self, name: str, flag) -> int:
        if bool(np.any(flag)):
            self.extrapolated_by[name] = self.extrapolated_by.get(name, 0) + 1
            return 1
        return 0

    def _special(self, work: IterationWork, t: int, parts: dict, excess: float) -> int:
        L, S, Dmax = self.L, self.S, self.max_rows
        N = work.full_rows[t].tolist()
        rec = work.recompute_rows[t].tolist()
        R0 = float(work.kv_read[t, 0])
        chk = work.check_rows[t].tolist()
        flagged = 0
        if rec[0] or any(rec):
            m = max(rec)
            lay = float(sum(l for l, r in zip(self.seg_layers, rec) if r > 0))
            if self.g_recompute is not None:
                v, x = self.g_recompute(lay, m)
                parts["recompute"][t] += float(v)
                flagged |= self._flag("recompute", x)
        proj = work.proj_rows[t].tolist()
        if any(proj) and not self.fill_like:
            m = max(proj)
            lay = float(sum(l for l, r in zip(self.seg_layers, proj) if r > 0))
            if self.g_proj is not None:
                v, x = self.g_proj(lay, m)
                parts["proj"][t] += float(v)
                flagged |= self._flag("proj", x)
        if excess <= 0.5 or self.g_prefill is None:
            return flagged
        # a prompt chunk: n tokens after p cached positions, beside d decode rows
        rows0 = N[0] - rec[0]
        if chk[0] > 0:
            d = int(chk[0])
            n = max(int(rows0) - d, 2)
        else:
            # no decode row checked: all rows one chunk if the KV reads agree, else a chunk starting a prompt
            n = int(rows0)
            k = -(-n // 128)
            e = (excess + n * (n - 1) / 2) / (n - k) if n > k else float(n)
            if n < 2 or abs(e * k - R0) > 0.5 + 1e-6 * R0:
                n = _chunk_from_excess(excess, int(rows0))
            d = max(int(rows0) - n, 0)
        k = -(-n // 128)
        e = (excess + n * (n - 1) / 2) / (n - k) if n > k else float(n)
        p = max(e - n, 0.0)
        pf, x = self.g_prefill(p, n)
        pf = float(pf)
        flagged |= self._flag("prefill", x)
        decode_part = 0.0
        if d > 0 and self.g_mixed is not None:
            r_d = max(R0 - e * k, float(d))
            c = r_d / d
            mixed, x1 = self.g_mixed(d, n)
            base, _ = self.g_prefill(0.0, n)
            flagged |= self._flag("mixed", x1)
            rows_layers = sum(l * max(r - q - n, 0) for l, r, q in zip(self.seg_layers, N, rec))
            scale = rows_layers / (L * d)
            dd = min(d, Dmax)
            adj = self._full(dd, c) - self._full(dd, self.mixed_context)
            decode_part = max((float(mixed) - float(base)) * scale + adj * scale, -0.5 * pf)  # exact at mixed points
            checked = [r for r in chk if r > 0]
            if checked and self.g_mixed_chk is not None:
                per = []
                for r in checked:
                    hi, _ = self.g_mixed_chk(r, n)
                    lo, _ = self.g_mixed(r, n)
                    per.append(max(float(hi) - float(lo), 0.0) / max(S - 1, 1))
                parts["checks"][t] = sum(per)
        parts["decode"][t] = 0.0
        if "schedule" in parts:
            parts["schedule"][t] = self.sched_tab[min(d + 1, Dmax)]
        parts["prefill"][t] = pf
        parts["mixed"][t] = decode_part
        return flagged

    def _full(self, d: int, c: float) -> float:
        nodes = self.nodes
        j = int(np.clip(np.searchsorted(nodes, c, side="right") - 1, 0, self.num_nodes - 2))
        f = min(max((c - nodes[j]) / (nodes[j + 1] - nodes[j]), 0.0), 1.0)
        return float(self.full_tab[d, j] * (1 - f) + self.full_tab[d, j + 1] * f)

    def iteration_time(self, work: IterationWork) -> np.ndarray:
        parts = self._parts(work)
        total = parts.pop("decode").copy()
        for v in parts.values():
            total += v
        return total

    def breakdown(self, work: IterationWork) -> dict[str, float]:
        return {name: float(v.sum()) for name, v in self._parts(work).items()}

    def reset_counters(self) -> None:
        self.extrapolated = self.extrapolated_steps = 0
        self.extrapolated_by = {}


def _chunk_from_excess(excess: float, rows: int) -> int:
    """Tokens n of a chunk starting a prompt whose attention exceeds its KV reads by ``excess``."""
    f = lambda n: n * (n + 1) / 2 - n * (-(-n // 128))  # noqa: E731
    n = max(int(math.sqrt(2 * excess)), 2)
    while f(n) < excess and n < rows:
        n += 1
    while n > 2 and f(n - 1) >= excess:
        n -= 1
    return min(n, max(rows, 2))
