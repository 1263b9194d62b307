"""A cost model backed by a measured hardware profile (``eesim profile``, profiler.py).

``ProfileCostModel(profile, model)`` implements the CostModel protocol (cost_model.py). It splits an
iteration's work into the profiled components and adds them up:

- decode rows, per segment of layers between exits: the marginal time of running D rows at mean
  context c through that segment, read from the profile's decode grid (layers x batch x context) after
  the checks and the fill each measurement included are taken back out; the sum over the segments a
  step ran telescopes to the measured time of a pass to that depth (exact on the grid);
- exit checks that do not end the pass (the one where the last rows leave is inside the decode
  measurement): per checked batch size, from the check grid (graphed path); a step of a KV policy other
  than fill that runs the general path (it starts owing) adds that path's excess over the graphed one
  once (``check_eager`` less ``check``: its host-built metadata and eager boundaries are per step), and,
  when none of its owed rows runs in it (nor, under copy_hidden, any projection), instead what the
  profile measured owing adds to a step whose rows leave at that exit (``leave_owing_*`` less ``leave``,
  by batch: ``idle_tab``), or, for profiles without those points or a pass to full depth, that excess
  plus the owed grid's fixed part (``owing_step``: the marginal of the fewest owed rows extrapolated to
  no layers);
- a decode step whose rows all leave at an exit (the pass ends there) keeping their exit states (copy_hidden,
  recompute) pays what the profile's ``leave`` points measured beyond the decode grid's price of the same work
  (``leave_time``), the median over the points (0.09-0.24 ms on the H100); under fill, nothing: the decode grid's
  partial-depth points are fill's own leaves, so it prices them whole; profiles without leave points price as
  before;
- fill (policy fill): rows that exited x mean layers skipped, from the fill grid;
- prefill: a step whose attention exceeds its KV reads holds a prompt chunk; its token count and the
  positions before it are recovered from the work (the decode rows from the checked rows when the rule
  checks, else assuming the chunk starts a prompt) and priced from the prefill grid (tokens x
  context), plus what its decode rows add (mixed grid, decode rows x chunk tokens) and their checks; a
  step holding several prompts' chunks (the work's ``prompt_chunks``, with its ``decode_rows``) is priced
  as one chunk of all their tokens after their mean cached prefix;
- proj / recompute (copy_hidden, recompute): owed rows x layers, the marginal over the same step owing
  nothing (a full-depth step with the general path's checks where the points ran them, ``checks`` > 0;
  without checks in profiles from before that);
- host time per iteration by batch size (``include_schedule``): ``Scheduler.schedule`` and, when the
  profile measured it, the serving loop's bookkeeping after the GPU (priced as part of ``schedule``).

Each grid is interpolated multilinearly after a monotone envelope, with the roofline outside it and at
points the profiler could not measure (``Grid``, profile_grid.py). The decode grid holds each measurement
less the checks and the fill it included (taken out point by point, before the envelope, with the checks
priced against the full-depth measurements alone). ``extrapolated`` counts the evaluations priced by the
roofline (``extrapolated_steps`` the steps, ``extrapolated_by`` per component: ``decode`` the steps priced
from the decode table that extrapolated there, a step special only for its owed rows included; prompt chunks
and owed rows under their own names), so a simulator can surface them. Every step of a work record is priced
with array operations over its (T, S) arrays, in a number of numpy calls that does not grow with T: the
decode, check and fill parts from dense lookup tables, the steps with a prompt chunk or owed rows (proj,
recompute) through one batched lookup of the two-axis grids (``_GridSet``: Grid's arithmetic, for many grids
and points at once). A record of one step (most calls: every prompt chunk, every single decode step) is
priced on Python floats instead (``_parts1``): the same operations in the same order on the same tables
(sums in numpy's order: pairwise_sum.py), so the same results bit for bit, in a fifth of the time numpy
calls on one-row arrays take. The fit evaluates the dense decode table on its mesh once per axis
(``Grid.on_mesh``). ``with_policy`` shares a fitted model's tables between KV policies (eesim/cost_choice.py
fits each profile once per process). Prompt-chunk sizes (padding, recovery from the attention):
profile_tokens.py. A profile measured at more exits than the model has: ``restrict_exits``
(profile_restrict.py).
"""

from __future__ import annotations

import math

from bisect import bisect_right
from dataclasses import replace
from pathlib import Path

import numpy as np

from eesim.errors import EesimError, require
from eesim.model_spec import ModelSpec
from eesim.pairwise_sum import _psum
from eesim.plan import IterationWork
from eesim.profile_data import Profile, read_profile, shape_key, shape_name
from eesim.profile_grid import LINEAR, Grid, _grid, _GridSet
from eesim.profile_restrict import restrict_exits
from eesim.profile_tokens import _chunk_table, _chunks_from_excess, padded_tokens
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
        # the general path's excess over the graphed one (check_eager less check, all S - 1 checks), paid once
        # per step it runs with checks: most of it is the step's host-built metadata and eager boundaries, not
        # the checks themselves (served steps that leave after one or two eager checks pay about all of it;
        # benchmarks/serve_breakdown.py)
        self.gen_step_tab = np.maximum((self.S - 1) * (self.chk_eager_tab - self.chk_tab), 0.0)
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
        self.owing_fixed = {}  # owed component -> what owing costs a step that runs none of its owed rows
        self.g_proj, self.owing_fixed["proj"] = self._owed_grid(frame, "proj", roof_owed)
        self.g_recompute, self.owing_fixed["recompute"] = self._owed_grid(frame, "recompute", roof_owed)
        # what owing adds to a step whose rows leave at an exit, measured (profiles since 2026-11-23): the
        # leave_owing_* points less the leave points at the same exit and batch; (rows, reach), NaN where unmeasured
        self.leave_excess = {name: self._leave_table(frame, f"leave_owing_{name}", rows)
                             for name in ("proj", "recompute")}
        self.idle_tab = self._idle_table()

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
        self.leave_time = None  # priced without it while it is measured against the model's own prices
        self._init_one_step()
        self.leave_time = self._graphed_leave_time(frame)

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
        self._s_gen_step = self.gen_step_tab.tolist()
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

    def _owed_grid(self, frame, comp, roof) -> tuple[Grid | None, float]:
        """The owed rows' marginal grid (layers x rows), and its fixed part (what owing costs before any
        owed row runs)."""
        sub = frame[frame["component"] == comp]
        if not len(sub):
            return None, 0.0
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
        # what owing costs a step before any owed row runs: the marginal of the fewest owed rows, extrapolated
        # linearly in the layers they ran to none (the staging and gathering of owed state on the general path)
        few = sub[sub["tokens"] == sub["tokens"].min()].sort_values("layers")
        lay, val = few["layers"].to_numpy(np.float64), few["median_s"].to_numpy()
        fixed = 0.0
        if len(few) >= 2 and np.ptp(lay) > 0:
            slope = np.polyfit(lay, val, 1)[0]
            fixed = float(max(np.median(val - slope * lay), 0.0))
        return _grid(sub, ["layers", "tokens"], roof), fixed

    def _leave_table(self, frame, comp, rows) -> np.ndarray | None:
        """(rows, reach) seconds that owing K/V adds to a step whose rows all leave at exit ``reach``: the
        ``comp`` points less the ``leave`` points (same exit, batch, context), linear in the batch between the
        measured ones (held below the smallest); NaN beyond the largest, at the last column (no exit) and
        where a point is missing."""
        owing, leave = frame[frame["component"] == comp], frame[frame["component"] == "leave"]
        if not len(owing) or not len(leave):
            return None
        tab = np.full((len(rows), self.S), np.nan)
        base = leave.set_index(["layers", "batch", "context"])["median_s"]
        for r, e in enumerate(self.model.exit_layers):
            sub = owing[owing["layers"] == e].sort_values("batch")
            keys = list(zip(sub["layers"], sub["batch"], sub["context"]))
            have = np.array([k in base.index for k in keys], dtype=bool)
            if not have.any():
                continue
            bs = sub["batch"].to_numpy(np.float64)[have]
            excess = np.maximum(sub["median_s"].to_numpy()[have] - base.loc[[k for k, h in zip(keys, have) if h]].to_numpy(), 0.0)
            inside = rows <= bs[-1]  # beyond the largest measured batch: NaN (``_idle_table`` continues it)
            tab[1:, r] = np.where(inside[1:], np.interp(rows[1:], bs, excess), np.nan)
        return tab

    def _graphed_leave_time(self, frame) -> float | None:
        """Seconds a decode step whose rows all leave at an exit keeping their exit states (copy_hidden,
        recompute) pays beyond what the decode and check tables price. The decode grid's partial-depth points are
        passes whose rows leave under fill (ExitAt, the fill taken out), so they hold what ending a pass at an
        exit costs fill: this is what keeping the exit states instead adds (fill is priced without it; pricing
        the held-out grid points with it, all fill's leaves, had overpriced them by it: run 14, held-out median
        4.70% with it, 2.98% without). Measured by the ``leave`` points (recompute, graphed, nobody owing), each
        less this model's own price of the same work; one
        value, the median of those differences over every point (exits and batches), for every batch and exit.
        Each difference alone is one host-synced measurement less another, off by up to +-0.3 ms in a sweep on
        the H100 (0 to 1.7 ms across the exits of one profile), while what it measures is host work and small
        launches that do not depend on the exit and barely on the batch (1-8 rows). A pass to full depth pays
        none of it; None for profiles without leave points (priced as before)."""
        leave = frame[frame["component"] == "leave"]
        if not len(leave) or self.S < 2:
            return None
        from eesim.forced_exits import ExitAt
        from eesim.plan import IterationPlan
        from eesim.policies import kv_policy, measure
        from eesim.work import WorkCounter

        graphed = self.with_policy("fill")  # the step's price on the graphed path, whatever this model's policy
        excess = []
        for k, e in enumerate(self.model.exit_layers):
            sub = leave[leave["layers"] == e]
            # the work the profiler's point ran (ExitAt(k) under recompute, each row at its point's context)
            counter = WorkCounter(self.model, kv_policy("recompute"), ExitAt(k), measure("max_prob").needs_logits)
            for b, c, t in sub[["batch", "context", "median_s"]].itertuples(index=False):
                b = int(b)
                plan = IterationPlan(0, [None] * b, np.ones(b, np.int64), np.full(b, int(c) - 1, np.int64),
                                     np.ones(b, bool), np.ones(b, bool), [[] for _ in range(b)], np.ones(b, np.int64))
                parts = graphed._parts(counter.count(plan, np.full((1, b), k)))
                parts.pop("schedule", None)
                excess.append(float(t) - float(sum(v[0] for v in parts.values())))
        return max(float(np.median(excess)), 0.0) if excess else None

    def _check_table(self, chk, rows):
        S = self.S
        tab = np.zeros(len(rows))
        if not len(chk) or S < 2:
            return tab
        c0 = float(chk["context"].iloc[0])
        bs = chk["batch"].to_numpy().astype(np.float64)
        full, _ = self.g_full(bs, np.full(len(bs), c0))
        per = np.maximum((chk["median_s"].to_numpy() - full) / (S - 1), 0.0)
        # A check (exit head, confidence, host sync) costs no less for more rows, but each measured value is a
        # difference of two host-synced timings, off by tens of microseconds either way. Not the envelope (a
        # running minimum from the largest batch would price every batch at the cheapest measured check): the
        # least-squares non-decreasing fit (isotonic regression, pooling adjacent violators), which averages a
        # dip with its neighbours. On the saved accuracy runs (cost_model_accuracy.md, fourth session) it
        # lowered the p95 error in five of six sets and the median in four.
        from scipy.optimize import isotonic_regression

        per = isotonic_regression(per[np.argsort(bs)]).x
        g = Grid([np.unique(bs)], per, np.ones(len(bs), dtype=bool),
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
            ci = chk.astype(np.int64)
            if np.maximum.reduce(ci, axis=None) > Dmax:  # more checked rows than the table: its last row
                ci = np.minimum(ci, Dmax)
            parts["checks"] = np.add.reduce(self.chk_tab[ci] * self._nonterminal[work.batch_reach], axis=1)
            if not self.fill_like:  # a decode step off the graphed path: the general path's excess, once
                eager = ~chunk & (ci[:, 0] > 0)
                if graphed is not None:
                    eager &= ~graphed
                extra = self.gen_step_tab[ci[:, 0]]
                if self.idle_tab is not None:  # owing, with no owed row run in this step
                    idle = (work.carried > 0) & ~(rec.any(axis=1) | work.proj_rows.any(axis=1))
                    extra = np.where(idle, self.idle_tab[ci[:, 0], work.batch_reach], extra)
                parts["checks"] = parts["checks"] + np.where(eager, extra, 0.0)
        if has_fill:
            rows = np.maximum.reduce(proj_fill, axis=1)
            lm = (proj_fill @ self.seg_layers) / np.maximum(rows, 1.0)
            li = np.minimum(lm.astype(np.int64), self.L - 1)
            lf = lm - li
            v = self._fill_pairs[li * (Dmax + 1) + np.minimum(rows.astype(np.int64), Dmax)]
            parts["fill"] = v[:, 0] * (1 - lf) + v[:, 1] * lf
        if self.leave_time is not None and not self.fill_like:  # the pass ends at an exit, the rows that left
            # keeping their exit states: what that adds over fill's leave (the decode grid's, see _graphed_leave_time)
            ends = ~chunk & (work.batch_reach < self.S - 1) & (chk[:, 0] > 0)
            if ends.any():
                parts["leave"] = np.where(ends, self.leave_time, 0.0)
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
            # several prompts' chunks in one step (the plan says how many): priced as one chunk of all their
            # tokens after their mean cached prefix (the GEMMs see all the tokens at once; the attention of one
            # long chunk over-counts theirs, which matters only far beyond the grid's chunks)
            pcs, multi = work.prompt_chunks, None
            if pcs is not None:
                kc = pcs[t]
                if np.count_nonzero(kc >= 2):
                    multi = kc >= 2
                    dr = work.decode_rows[t].astype(np.int64)
                    d = np.where(multi, dr, d)
                    n = np.where(multi, np.maximum(r0 - dr, 2), n)
            k = (n + (QUERY_TILE - 1)) // QUERY_TILE
            e = (x + n * (n - 1) / 2) / (n - k)
            p = np.maximum(e - n, 0.0)
            reads = e * k  # the chunk's KV reads
            if multi is not None:
                kcf = np.maximum(kc, 1.0)
                m = n / kcf
                c = np.ceil(m / QUERY_TILE)
                prior = np.maximum((x / kcf - m * (m + 1) / 2 + m * c) / np.maximum(m - c, 1.0), 0.0)
                p = np.where(multi, prior, p)
                reads = np.where(multi, kcf * (prior + m) * c, reads)
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
                cc = np.maximum(R0 - reads, d) / dd  # mean context of the decode rows
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
            ctab = self._s_chk
            nt = self._s_nonterminal[int(work.batch_reach[0])]
            parts["checks"] = _psum([ctab[min(int(c), Dmax)] * w for c, w in zip(chk, nt)])
            if not self.fill_like and not graphed and not chunk and chk[0] > 0:
                extra = self._s_gen_step[min(int(chk[0]), Dmax)]
                if self.idle_tab is not None and work.carried.item(0) > 0 and not (has_rec or any(proj)):
                    extra = float(self.idle_tab[min(int(chk[0]), Dmax), int(work.batch_reach[0])])  # owing, idle
                parts["checks"] = parts["checks"] + extra
        if fill_proj:
            rows = max(proj)
            lm = sum([p * w for p, w in zip(proj, self._s_seg_layers)]) / max(rows, 1.0)  # integers: exact
            li = min(int(lm), self.L - 1)
            lf = lm - li
            i = 2 * (li * (Dmax + 1) + min(int(rows), Dmax))
            parts["fill"] = self._s_fill[i] * (1 - lf) + self._s_fill[i + 1] * lf
        if self.leave_time is not None and not self.fill_like and not chunk and chk[0] > 0 \
                and work.batch_reach.item(0) < self.S - 1:
            parts["leave"] = self.leave_time
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
            pcs = work.prompt_chunks
            kc = pcs.item(0) if pcs is not None else 0.0
            if kc >= 2:  # several prompts' chunks: as _special
                d = int(work.decode_rows.item(0))
                n = max(r0 - d, 2)
            k = (n + (QUERY_TILE - 1)) // QUERY_TILE
            e = (x + n * (n - 1) / 2) / (n - k)
            p = max(e - n, 0.0)
            reads = e * k
            if kc >= 2:
                kcf = max(kc, 1.0)
                m = n / kcf
                c = float(math.ceil(m / QUERY_TILE))
                p = max((x / kcf - m * (m + 1) / 2 + m * c) / max(m - c, 1.0), 0.0)
                reads = kcf * (p + m) * c
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
                cc = max(R0 - reads, float(d)) / dd  # mean context of the decode rows
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
        self.idle_tab = self._idle_table() if hasattr(self, "leave_excess") else None

    def _idle_table(self) -> np.ndarray | None:
        """(rows, reach): what a general-path step that starts owing and runs none of its owed rows pays beyond
        its decode and graphed checks. Where the profile measured such a step leaving at that exit
        (``leave_excess``), that, and beyond its largest measured batch that value plus what the general path's
        excess gains from there (continuous, and growing with the batch as the derived terms do); elsewhere (no
        exit, older profiles) the general path's excess plus the owed grid's fixed part. None under fill
        (nothing owed across steps)."""
        if self.fill_like:
            return None
        fallback = self.gen_step_tab + self.owing_step
        tab = np.repeat(fallback[:, None], self.S, axis=1)
        measured = self.leave_excess.get(self._owed_kind)
        if measured is not None:
            for r in range(self.S):
                have = np.flatnonzero(~np.isnan(measured[:, r]))
                if not len(have):
                    continue
                top = have[-1]
                tab[: top + 1, r] = np.where(np.isnan(measured[: top + 1, r]), tab[: top + 1, r], measured[: top + 1, r])
                # beyond the largest measured batch: the measured value, growing as the general path's excess does
                tab[top + 1:, r] = measured[top, r] + np.maximum(fallback[top + 1:] - fallback[top], 0.0)
        return tab

    @property
    def _owed_kind(self) -> str:
        """The owed grid of this policy: ``recompute`` re-runs layers, copy_hidden projects (``proj``)."""
        return "recompute" if self.policy.work == "full_layers" else "proj"

    @property
    def owing_step(self) -> float:
        """What a step that starts owing but runs none of its owed rows (they wait for a deeper pass) pays
        for owing on the general path: the policy's owed grid's fixed part (0 under fill)."""
        if self.fill_like:
            return 0.0
        return self.owing_fixed[self._owed_kind]

    def with_policy(self, kv_policy) -> ProfileCostModel:
        """This model for another KV policy, its counters at zero: a shallow copy sharing the tables (nothing
        else depends on the policy), so one profile is fitted once however many policies it prices."""
        import copy

        other = copy.copy(self)
        other._set_policy(kv_policy)
        other.reset_counters()
        return other
